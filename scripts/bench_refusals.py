"""How long bad input takes to be refused: every refusal that needs no model, run in-process after the imports
(the first call of test_time.main pays for them), each printed with its one line and its time.

    python scripts/bench_refusals.py
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

import test_time  # noqa: E402
from harness.cli import entry_point  # noqa: E402

TINY = ["MODEL.ARCH", "tiny-clip-test", "MODEL.WEIGHTS", "none", "TEST.NUM_WORKERS", "0", "DEVICE", "cpu"]


def write_cifar_c(root: Path, corruptions, n: int = 8, label_dtype=np.uint8) -> None:
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(folder / "labels.npy", np.tile(rng.integers(0, 10, n), 5).astype(label_dtype))
    for name in corruptions:
        np.save(folder / f"{name}.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))


def cases(tmp: Path) -> dict[str, list[str]]:
    good, fractional, partial = tmp / "good", tmp / "fractional", tmp / "partial"
    write_cifar_c(good, ["gaussian_noise", "fog"])
    write_cifar_c(fractional, ["fog"], label_dtype=np.float32)
    write_cifar_c(partial, ["gaussian_noise"])
    (tmp / "bad.yaml").write_text("MODEL:\n  ARCH: [ViT\n")
    (tmp / "file").write_text("x")
    base = ["--cfg", "conf/cifar10_c/tent.yaml", *TINY, "DATA_DIR", str(good), "SAVE_DIR", str(tmp / "out"),
            "CORRUPTION.TYPE", "[gaussian_noise, fog]"]
    return {
        "method option out of range (RPL.Q 2.0)": [*base, "MODEL.ADAPTATION", "rpl", "RPL.Q", "2.0"],
        "option vs architecture (SAR, 3 of 2 blocks)": [*base, "MODEL.ADAPTATION", "sar"],
        "wrong type (TEST.BATCH_SIZE 1e2)": [*base, "TEST.BATCH_SIZE", "1e2"],
        "misspelt optimizer (OPTIM.METHOD adam)": [*base, "OPTIM.METHOD", "adam"],
        "unknown key (OPTIM.LRR)": [*base, "OPTIM.LRR", "0.1"],
        "DEVICE cuda without a GPU": [*base, "DEVICE", "cuda"],
        "YAML syntax error": ["--cfg", str(tmp / "bad.yaml")],
        "missing DATA_DIR": [*base, "DATA_DIR", str(tmp / "nowhere")],
        "missing file of the 2nd domain": [*base, "DATA_DIR", str(partial)],
        "fractional labels": [*base, "DATA_DIR", str(fractional), "CORRUPTION.TYPE", "[fog]"],
        "SAVE_DIR under a regular file": [*base, "SAVE_DIR", str(tmp / "file" / "out")],
        "missing weights file": [*base, "MODEL.WEIGHTS", str(tmp / "w.pt")],
    }


@entry_point
def main(argv=None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        runs = cases(Path(tmp))
        with contextlib.redirect_stderr(io.StringIO()):
            test_time.main(next(iter(runs.values())))          # imports and registries, not timed
        print(f"{'case':<46}{'exit':>5}{'ms':>8}  line")
        for name, argv in runs.items():
            err = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stderr(err):
                code = test_time.main(argv)
            ms = 1000 * (time.perf_counter() - start)
            line = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
            print(f"{name:<46}{code:>5}{ms:>8.1f}  {line[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
