"""The examples a newcomer copies run as written and compute what they say: README's "Adding a method", the three
worked examples of docs/adding_a_method.md (a norm-adapting method, a view method, a training-free cache) and
docs/adding_a_dataset.md.

Each method example is read from the markdown, added as the guide says (a plug-in and a method config beside the
shipped ones; where a newcomer has saved its files in this checkout, those, checked to be the guide's), run through
the harness on the tiny CLIP and a synthetic CIFAR-10-C, and compared with a computation written here without the
method's code or the suite's kernels: a hand-written optimizer step, a plain loop over the views, a Python-list
cache."""
import copy
import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import conf.compose
import methods
from conf import ConfigError, import_plugins
import test_time
from datasets.class_names import CIFAR10_CLASSES
from harness.build import load_cfg
from harness.comparison import method_configs
from harness.run import evaluate
from methods.augmentations import AugmentedViews
from tests.synthetic import TINY_OPTS, tiny_cfg, write_cifar_c, write_image_folders

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "adding_a_method.md"


def code_blocks(path: Path, section: str, language: str) -> list[str]:
    text = path.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(rf"```{language}\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def guide_example(name: str) -> tuple[str, str]:
    """(method file, method config) of the guide's worked example that registers ``name``: the one Python and the
    one YAML block of its section."""
    for section in re.split(r"\n(?=## )", GUIDE.read_text()):
        code = re.findall(r"```python\n(.*?)```", section, flags=re.S)
        if any(f'@register_method("{name}")' in block for block in code):
            (code,) = code
            (config,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
            return code, config
    raise AssertionError(f"docs/adding_a_method.md has no section whose example registers {name}")


def add_method(name: str, code: str, config: str, tmp_path: Path, monkeypatch) -> None:
    """The method added as the guide says. Where a newcomer has followed the guide in this checkout, its files
    (methods/<name>.py, conf/methods/<name>.yaml) are there, a built-in method: they must be the guide's. Else the
    same code as a plug-in module and its config in a copy of conf/methods/ (the checkout is left as it is)."""
    guide = {ROOT / "methods" / f"{name}.py": code, ROOT / "conf" / "methods" / f"{name}.yaml": config}
    saved = [path for path in guide if path.exists()]
    for path in saved:
        assert path.read_text() == guide[path], f"{path} is not the guide's example"
    if saved:
        assert len(saved) == len(guide), f"the guide saves both files; only {saved} exist"
        return
    module = tmp_path / f"guide_{name}.py"         # a module name no other test's plug-in takes
    module.write_text(code)
    import_plugins([str(module)])
    methods_dir = tmp_path / "conf_methods"
    methods_dir.mkdir()
    for path in conf.compose.METHODS_DIR.glob("*.yaml"):
        (methods_dir / path.name).symlink_to(path)
    (methods_dir / f"{name}.yaml").write_text(config)
    monkeypatch.setattr(conf.compose, "METHODS_DIR", methods_dir)


def run_on_cifar10c(name: str, tmp_path: Path, *opts) -> dict:
    """conf/cifar10_c/<name>.yaml through the harness on the tiny CLIP and a synthetic CIFAR-10-C (8 fog images)."""
    write_cifar_c(tmp_path / "data", ["fog"], per_severity=8)
    cfg = load_cfg(f"conf/cifar10_c/{name}.yaml", [*TINY_OPTS, "DATA_DIR", str(tmp_path / "data"),
                                                   "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", "[fog]",
                                                   "TEST.BATCH_SIZE", "4", *opts])
    payload = evaluate(cfg, progress=False)
    assert payload["method"] == name and [r["n"] for r in payload["records"]] == [8]
    return payload


def images(seed: int, n: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax along the last dimension, written out."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def image_tower_norms(model) -> list[nn.Parameter]:
    """The affine weight and bias of the tiny CLIP's image-tower normalisation layers (LayerNorms, its only kind),
    freed on ``model``, everything else frozen."""
    model.requires_grad_(False)
    params = [p for m in model.clip.visual.modules() if isinstance(m, nn.LayerNorm) for p in (m.weight, m.bias)]
    for p in params:
        p.requires_grad_(True)
    return params


def adam(params, cfg) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.OPTIM.LR, betas=(cfg.OPTIM.BETA, 0.999), weight_decay=cfg.OPTIM.WD)


def assert_same_weights(model, reference) -> None:
    for (name, mine), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)


def hand_entropy_steps(source, batches, cfg, temperature: float, max_entropy: float):
    """A norm-adapting entropy method written out: for each batch, the logits, then one Adam step on the mean
    entropy at ``temperature`` of the samples whose entropy is below ``max_entropy``. Returns (logits per batch,
    how many samples each step kept, the adapted model)."""
    model = copy.deepcopy(source)
    optimizer = adam(image_tower_norms(model), cfg)
    outputs, kept = [], []
    for batch in batches:
        logits = model(batch)
        per_sample = entropy(logits / temperature)
        keep = per_sample < max_entropy
        optimizer.zero_grad()
        per_sample[keep].mean().backward()
        optimizer.step()
        outputs.append(logits.detach())
        kept.append(int(keep.sum()))
    return outputs, kept, model


def test_readme_method_example(tmp_path, monkeypatch, capsys, tiny_clip):
    (code,), (config,) = (code_blocks(ROOT / "README.md", "## Adding a method", lang) for lang in ("python", "yaml"))
    add_method("my_method", code, config, tmp_path, monkeypatch)

    assert "imagenet_c/my_method" in conf.compose.config_names()
    assert load_cfg("conf/imagenet_c/my_method.yaml").OPTIM.LR == 2.5e-4
    write_cifar_c(tmp_path / "data", ["fog"], per_severity=8)
    cfg = load_cfg("conf/cifar10_c/my_method.yaml", [*TINY_OPTS, "DATA_DIR", str(tmp_path / "data"),
                                                     "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", "[fog]",
                                                     "TEST.BATCH_SIZE", "4", "MY_METHOD.TEMPERATURE", "2.0"])
    payload = evaluate(cfg, progress=False)
    assert payload["method"] == "my_method" and payload["records"][0]["n"] == 8
    assert payload["provenance"]["adapted_parameters"] == sum(p.numel() for p in image_tower_norms(tiny_clip))

    # what it computes: TENT's step at the temperature, written out
    cfg = tiny_cfg("conf/cifar10_c/my_method.yaml", MY_METHOD__TEMPERATURE=2.0)
    method = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    batches = [images(1), images(2)]
    expected, _, adapted = hand_entropy_steps(tiny_clip, batches, cfg, 2.0, math.inf)
    for batch, logits in zip(batches, expected):
        torch.testing.assert_close(method(batch), logits)
    assert_same_weights(method.model, adapted)
    assert not torch.equal(adapted.clip.visual.ln_post.weight, tiny_clip.clip.visual.ln_post.weight)

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
    assert {loaded.cfg.SAVE_DIR for _, (loaded,) in configs} == {"output/demo"}


def test_guide_norm_example(tmp_path, monkeypatch, tiny_clip):
    """example_norm: one Adam step per batch on the mean tempered entropy of the reliable samples, the logits from
    before the step; checked against that step written out on a copy of the model, with a margin that keeps half of
    the first batch (so that the filter decides the step)."""
    add_method("example_norm", *guide_example("example_norm"), tmp_path, monkeypatch)
    assert {"shapes_c/example_norm", "cifar10_c/example_norm"} <= set(conf.compose.config_names())
    payload = run_on_cifar10c("example_norm", tmp_path, "EXAMPLE_NORM.MARGIN", "1.0")
    assert payload["provenance"]["adapted_parameters"] == sum(p.numel() for p in image_tower_norms(tiny_clip))

    temperature, batches = 0.5, [images(1), images(2)]
    with torch.no_grad():
        first = (entropy(tiny_clip(batches[0]) / temperature) / math.log(10)).sort().values
    margin = float(first[3:5].mean())                # between the 4th and 5th lowest: 4 of 8 samples are reliable
    cfg = tiny_cfg("conf/cifar10_c/example_norm.yaml", EXAMPLE_NORM__TEMPERATURE=temperature,
                   EXAMPLE_NORM__MARGIN=margin)
    method = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    expected, kept, adapted = hand_entropy_steps(tiny_clip, batches, cfg, temperature, margin * math.log(10))
    assert kept[0] == 4
    for batch, logits in zip(batches, expected):
        torch.testing.assert_close(method(batch), logits)
    assert_same_weights(method.model, adapted)
    _, _, unfiltered = hand_entropy_steps(tiny_clip, batches[:1], cfg, temperature, math.inf)
    assert not torch.allclose(unfiltered.clip.visual.ln_post.weight, adapted.clip.visual.ln_post.weight)

    with pytest.raises(ConfigError, match="CLIP.FREEZE_TEXT_ENCODER must be True"):
        methods.METHODS.get("example_norm").check_setup(
            tiny_cfg("conf/cifar10_c/example_norm.yaml", CLIP__FREEZE_TEXT_ENCODER=False), None, CIFAR10_CLASSES)


def test_guide_views_example(tmp_path, monkeypatch, tiny_clip):
    """example_views (MEMO): per image, OPTIM.STEPS Adam steps on the marginal entropy of its most confident views,
    then the image classified, the source parameters back before the next image; checked against a plain loop over
    images, steps and views on copies of the model, with the views drawn from the same seeded stream (which goes on
    from batch to batch: a per-image reset must not restart it)."""
    add_method("example_views", *guide_example("example_views"), tmp_path, monkeypatch)
    assert {"shapes_c/example_views", "cifar10_c/example_views"} <= set(conf.compose.config_names())
    payload = run_on_cifar10c("example_views", tmp_path, "TEST.N_AUGMENTATIONS", "4")
    assert payload["provenance"]["method_cost"] == {"views_per_image": 4, "forward_passes_per_image": 2,
                                                     "backward_passes_per_image": 1}

    cfg = tiny_cfg("conf/cifar10_c/example_views.yaml", TEST__N_AUGMENTATIONS=6, EXAMPLE_VIEWS__SELECTION_P=0.5,
                   OPTIM__STEPS=2)
    assert cfg.MODEL.EPISODIC and cfg.EXAMPLE_VIEWS.VIEW_AUGMENTATION == "augmix"
    method = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    stream = AugmentedViews(6, "augmix", cfg.RNG_SEED)
    batches = [images(1, 3), images(2, 3)]
    expected = []
    for batch in batches:
        for image in batch:
            views = stream(image[None])[0]                                 # (6, C, H, W), view 0 the image
            model = copy.deepcopy(tiny_clip)                               # the source, before every image
            optimizer = adam(image_tower_norms(model), cfg)
            for _ in range(2):
                logits = torch.cat([model(view[None]) for view in views])
                scores = [float(entropy(view_logits.detach())) for view_logits in logits]
                confident = sorted(range(6), key=scores.__getitem__)[:3]  # the 3 lowest-entropy views
                mean = logits[confident].softmax(-1).mean(0)
                optimizer.zero_grad()
                (-(mean * mean.log()).sum()).backward()
                optimizer.step()
            with torch.no_grad():
                expected.append(model(image[None]))
    got = torch.cat([method(batch) for batch in batches])
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        zero_shot = tiny_clip(torch.cat(batches))
    assert (got - zero_shot).abs().max() > 1e-3                            # the steps changed the logits

    method.reset()                                                         # the view stream restarts with reset()
    torch.testing.assert_close(method(batches[0]), got[:3], rtol=0, atol=0)


def test_guide_cache_example(tmp_path, monkeypatch, tiny_clip):
    """example_cache: zero-shot logits + ALPHA * logit_scale * cos(image, mean of each class's cached features),
    each image first entering the queue of its pseudo-label that keeps the CAPACITY lowest-entropy features;
    checked against the same cache kept in Python lists, image by image, over two batches."""
    add_method("example_cache", *guide_example("example_cache"), tmp_path, monkeypatch)
    assert load_cfg("conf/shapes_c/example_cache.yaml").EXAMPLE_CACHE.CAPACITY == 4
    assert load_cfg("conf/cifar10_c/example_cache.yaml").EXAMPLE_CACHE.CAPACITY == 8      # its PER_DATASET entry
    payload = run_on_cifar10c("example_cache", tmp_path)
    assert payload["provenance"]["adapted_parameters"] == 0
    assert payload["provenance"]["method_cost"] == {"views_per_image": 1, "backward_passes_per_image": 0}
    cls = methods.METHODS.get("example_cache")
    assert cls.config_warnings(tiny_cfg("conf/cifar10_c/example_cache.yaml")) == []
    (warning,) = cls.config_warnings(tiny_cfg("conf/cifar10_c/example_cache.yaml", EXAMPLE_CACHE__ALPHA=0.0))
    assert warning.startswith("EXAMPLE_CACHE.ALPHA = 0")

    capacity, alpha = 2, 0.7
    cfg = tiny_cfg("conf/cifar10_c/example_cache.yaml", EXAMPLE_CACHE__CAPACITY=capacity, EXAMPLE_CACHE__ALPHA=alpha)
    method = methods.build_method(cfg, copy.deepcopy(tiny_clip), 10)
    batches = [images(1), images(2)]
    got = torch.cat([method(batch) for batch in batches])

    cache = {c: [] for c in range(10)}       # per class [(entropy, feature)], lowest entropy first
    arrivals, expected = Counter(), []
    with torch.no_grad():
        for image in torch.cat(batches):
            out = tiny_clip(image[None], return_features=True)
            zero_shot, feature = out.logits[0], out.image_features[0]
            label, score = int(zero_shot.argmax()), float(entropy(zero_shot))
            queue = cache[label]
            arrivals[label] += 1
            if len(queue) < capacity:
                queue.append((score, feature))
            elif score < queue[-1][0]:
                queue[-1] = (score, feature)
            queue.sort(key=lambda entry: entry[0])
            affinity = [float(sum(key for _, key in cache[c]) / len(cache[c]) @ feature) if cache[c] else 0.0
                        for c in range(10)]
            expected.append(zero_shot + alpha * tiny_clip.logit_scale * torch.tensor(affinity))
    assert max(arrivals.values()) > capacity       # a full queue took or refused a feature
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)

    method.reset()                                 # the cache is a buffer: reset() empties it
    torch.testing.assert_close(method(batches[0]), got[:8], rtol=0, atol=0)


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
