"""What test-time views cost: TEST.N_AUGMENTATIONS views of images of the model's input size, per augmentation
(methods/augmentations.py), the median time of a few calls and the process's peak memory, on a device.

    python scripts/bench_views.py                         # CPU, one 224 x 224 image, 64 views, both augmentations
    python scripts/bench_views.py --device cuda --batch 8
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from methods.augmentations import VIEW_AUGMENTATIONS, AugmentedViews  # noqa: E402


def timed(views: AugmentedViews, images: torch.Tensor, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        views(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=224, help="image side (the model's input size)")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--views", type=int, default=64, help="views per image, the image included")
    parser.add_argument("--repeats", type=int, default=3, help="calls timed; the median is printed")
    parser.add_argument("--augmentations", nargs="+", default=list(VIEW_AUGMENTATIONS), choices=VIEW_AUGMENTATIONS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"{args.batch} image(s) of {args.size} x {args.size}, {args.views} views each, on {device} "
          f"({torch.get_num_threads()} CPU threads)")
    print("| augmentation | seconds per call (median) | seconds per image |")
    print("|---|---|---|")
    for augmentation in args.augmentations:
        views = AugmentedViews(args.views, augmentation, seed=0)
        seconds = timed(views, images, args.repeats)
        print(f"| {augmentation} | {seconds:.3f} | {seconds / args.batch:.3f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = f", CUDA peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
    print(f"process peak resident memory {peak:.0f} MiB{cuda}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
