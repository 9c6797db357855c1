"""The examples a newcomer copies run as written: README's "Adding a method" and docs/adding_a_dataset.md."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

import conf.compose
from conf import import_plugins
import test_time
from harness.build import load_cfg
from harness.comparison import method_configs
from harness.run import evaluate
from tests.synthetic import TINY_OPTS, tiny_cfg, write_cifar_c, write_image_folders

ROOT = Path(__file__).resolve().parent.parent


def code_blocks(path: Path, section: str, language: str) -> list[str]:
    text = path.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(rf"```{language}\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_readme_method_example(tmp_path, monkeypatch, capsys):
    (code,), (config,) = (code_blocks(ROOT / "README.md", "## Adding a method", lang) for lang in ("python", "yaml"))
    # Where a newcomer has followed the guide in this checkout, the files saved are the example's, a built-in method.
    guide = {ROOT / "methods" / "my_method.py": code, ROOT / "conf" / "methods" / "my_method.yaml": config}
    saved = [path for path in guide if path.exists()]
    for path in saved:
        assert path.read_text() == guide[path], f"{path} is not README's example"
    if not saved:
        (tmp_path / "readme_method.py").write_text(code)
        import_plugins([str(tmp_path / "readme_method.py")])
        methods_dir = tmp_path / "methods"
        methods_dir.mkdir()
        for path in conf.compose.METHODS_DIR.glob("*.yaml"):
            (methods_dir / path.name).symlink_to(path)
        (methods_dir / "my_method.yaml").write_text(config)
        monkeypatch.setattr(conf.compose, "METHODS_DIR", methods_dir)
    else:
        assert len(saved) == len(guide), f"the guide saves both files; only {saved} exist"

    assert "imagenet_c/my_method" in conf.compose.config_names()
    assert load_cfg("conf/imagenet_c/my_method.yaml").OPTIM.LR == 2.5e-4
    write_cifar_c(tmp_path / "data", ["fog"], per_severity=8)
    cfg = load_cfg("conf/cifar10_c/my_method.yaml", [*TINY_OPTS, "DATA_DIR", str(tmp_path / "data"),
                                                     "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", "[fog]",
                                                     "TEST.BATCH_SIZE", "4", "MY_METHOD.TEMPERATURE", "2.0"])
    payload = evaluate(cfg, progress=False)
    assert payload["method"] == "my_method" and payload["records"][0]["n"] == 8
    assert payload["provenance"]["adapted_parameters"] > 0

    # on the demo's data, with the commands the README gives (here on a small synthetic Shapes-C)
    assert "shapes_c/my_method" in conf.compose.config_names()
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Adding a method"):]
    run = re.search(r"`\.venv/bin/python test_time\.py (--cfg conf/shapes_c/my_method\.yaml[^`]*)`", section)
    compare = re.search(r"\n +\.venv/bin/python scripts/compare\.py (.*my_method.*)\n", section)
    write_cifar_c(tmp_path / "shapes", ["fog", "snow"], per_severity=6, folder="Shapes-C")
    small = ["DATA_DIR", str(tmp_path / "shapes"), "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE",
             "[fog, snow]", "TEST.BATCH_SIZE", "3"]
    assert test_time.main([*run.group(1).split(), "--no-progress", *small]) == 0
    saved = json.loads(Path(capsys.readouterr().out.strip().removeprefix("results: ")).read_text())
    assert saved["method"] == "my_method" and [r["n"] for r in saved["records"]] == [6, 6]
    assert "ARCH: tiny-clip-shapes" in saved["provenance"]["config"]          # the demo's CLIP
    spec = importlib.util.spec_from_file_location("compare_cli", ROOT / "scripts" / "compare.py")
    compare_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_script)
    args = compare_script.parse_args(compare.group(1).split())
    configs = method_configs(args.methods, args.cfg_file, args.opts)
    assert [label for label, _ in configs] == ["source", "tent", "batclip", "my_method"]
    assert {cfg.SAVE_DIR for _, (cfg,) in configs} == {"output/demo"}


def test_adding_a_dataset_example(tmp_path):
    doc = ROOT / "docs" / "adding_a_dataset.md"
    (code,) = code_blocks(doc, "## 1. The class", "python")
    (protocol,) = code_blocks(doc, "## 2. The protocol", "yaml")
    (tmp_path / "toys_dataset.py").write_text(code)
    import_plugins([str(tmp_path / "toys_dataset.py")])
    (tmp_path / "toys.yaml").write_text(protocol)
    for k, domain in enumerate(["plastic", "wooden"]):
        write_image_folders(tmp_path / "data" / "Toys" / domain, ["teddy_bear", "toy_car", "yo_yo"], per_class=2,
                            seed=k)
    cfg = tiny_cfg(tmp_path / "toys.yaml", MODEL__ADAPTATION="source", DATA_DIR=str(tmp_path / "data"),
                   SAVE_DIR=str(tmp_path / "out"))
    payload = evaluate(cfg, progress=False)
    assert [(r["domain"], r["severity"], r["n"]) for r in payload["records"]] == [("plastic", 0, 6), ("wooden", 0, 6)]
    (tmp_path / "data" / "Toys" / "wooden" / "yo_yo").rename(tmp_path / "data" / "Toys" / "wooden" / "yoyo")
    from datasets import DatasetError
    with pytest.raises(DatasetError, match="wooden/yo_yo"):
        evaluate(tiny_cfg(tmp_path / "toys.yaml", MODEL__ADAPTATION="source", DATA_DIR=str(tmp_path / "data"),
                          SAVE_DIR=str(tmp_path / "out2")), progress=False)
    assert not (tmp_path / "out2").exists()
