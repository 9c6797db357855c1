"""Make a corruption benchmark in the RobustBench CIFAR-C layout from any clean image set.

    # a clean uint8 array (N, H, W, 3) and its labels (N,)
    python scripts/make_corrupted.py --images clean.npy --labels labels.npy --out ./data --name MySet
    # an image folder <root>/<class>/<image> (resized and centre-cropped to --size when given)
    python scripts/make_corrupted.py --folder /path/to/images --size 32 --out ./data --name MySet
    # the suite's synthetic Shapes test split (what scripts/demo.py generates)
    python scripts/make_corrupted.py --shapes 1000 --out ./data --name Shapes

writes <out>/<name>-C/<corruption>.npy (uint8 (5N, H, W, 3): severities 1..5 stacked, N rows each; with
--severities 5 only that block, and meta.json says which severities the files hold),
<out>/<name>-C/labels.npy ((5N,), the N labels repeated) and <out>/<name>-C/meta.json (how it was made).
The 15 ImageNet-C corruptions come from the imagecorruptions-imaug package; the result is deterministic
from --seed. Images must be at least 32x32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from datasets.corruptions import (ALL_CORRUPTIONS, CORRUPTIONS, CorruptionError, load_image_folder,  # noqa: E402
                                  write_corrupted)
from harness.cli import entry_point  # noqa: E402
from harness.progress import Progress  # noqa: E402


def _load_array(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError) as err:
        raise CorruptionError(f"cannot read {what} '{path}' as a .npy array: {err}") from err


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="clean images, a .npy uint8 array (N, H, W, 3); needs --labels")
    source.add_argument("--folder", help="an image folder <root>/<class>/<image>; labels = sorted class folders")
    source.add_argument("--shapes", type=int, metavar="N", help="the synthetic Shapes test split with N images")
    parser.add_argument("--labels", help="labels for --images, a .npy integer array (N,)")
    parser.add_argument("--size", type=int, help="--folder only: resize (shortest side) and centre-crop to this")
    parser.add_argument("--out", required=True, help="output DATA_DIR; the data set goes to <out>/<name>-C/")
    parser.add_argument("--name", required=True, help="data set name, e.g. Shapes -> <out>/Shapes-C/")
    parser.add_argument("--corruptions", nargs="+", default=CORRUPTIONS,
                        help=f"corruptions to make (default: the 15 benchmark ones; available: {ALL_CORRUPTIONS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corruptions' randomness")
    parser.add_argument("--keep-existing", action="store_true",
                        help="skip corruptions whose file already exists (resume an interrupted run)")
    parser.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="severities to write (default all five; the loader refuses the others)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes corrupting (corruption, severity) blocks in parallel; output is identical")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    class_names = None
    if args.images:
        if not args.labels:
            parser.error("--images needs --labels")
        images, labels = _load_array(args.images, "--images"), _load_array(args.labels, "--labels")
        source_desc = f"images {args.images}, labels {args.labels}"
    elif args.folder:
        images, labels, class_names = load_image_folder(args.folder, args.size)
        source_desc = f"folder {args.folder}" + (f" at {args.size}px" if args.size else "")
    else:
        from datasets.shapes import SHAPE_CLASSES, SPLIT_SEEDS, clean_split
        images, labels = clean_split("test", args.shapes)
        class_names = SHAPE_CLASSES
        source_desc = f"datasets.shapes.clean_split('test', {args.shapes}) (seed {SPLIT_SEEDS['test']})"
    out = write_corrupted(images, labels, Path(args.out) / f"{args.name}-C", args.corruptions, seed=args.seed,
                          class_names=class_names, source=source_desc,
                          progress=lambda total, label: Progress(total, label, enabled=not args.no_progress),
                          overwrite=not args.keep_existing, workers=args.workers, severities=args.severities)
    print(f"wrote {out}: {len(args.corruptions)} corruption(s) x severities {sorted(set(args.severities))} x "
          f"{len(images)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
