"""The benchmark scripts run (on the tiny CLIP, one step): they are how speed is measured, so they must not rot.
Nothing here asserts a time."""
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_bench_methods_prints_every_method_the_floor_and_the_loader(capsys, tmp_path):
    import bench_methods
    out = tmp_path / "performance.md"
    # eata: a method that reads source data; bnalpha: a config shipped for a ResNet CLIP (--resnet-arch)
    assert bench_methods.main(["--device", "cpu", "--arch", "tiny-clip-test", "--resnet-arch", "tiny-clip-test-rn",
                               "--shapes", "cifar10", "--batch", "2", "--steps", "1", "--warmup", "0", "--methods",
                               "source", "batclip", "eata", "bnalpha", "--loader-images", "8", "--write", str(out)]) == 0
    table = out.read_text()
    for row in ("| cifar10 | source | 2 |", "| cifar10 | batclip | 2 |", "| cifar10 | eata | 2 |",
                "| cifar10 | bnalpha | 2 |", "(image tower fwd+bwd)",
                "(batclip straightforward)", "CIFAR-C, 32 -> 224 bicubic", "ImageNet-C, JPEG decode"):
        assert row in table
    assert table in capsys.readouterr().out


def test_bench_refusals_every_case_is_one_line_with_exit_2(capsys):
    import bench_refusals
    assert bench_refusals.main([]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert len(rows) == 12
    for row in rows:
        assert row[46:51].strip() == "2" and "error: " in row, row


def test_bench_views_prints_a_row_per_augmentation(capsys):
    import bench_views
    from methods.augmentations import VIEW_AUGMENTATIONS
    assert bench_views.main(["--size", "32", "--views", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for augmentation in VIEW_AUGMENTATIONS:
        assert f"| {augmentation} | " in out
    assert "1 image(s) of 32 x 32, 4 views each, on cpu" in out and "peak resident memory" in out
