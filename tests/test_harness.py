"""The harness end to end on synthetic CIFAR-10-C and ImageNet-C, against independent counts."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.run import evaluate
from models import load_clip
from tests.synthetic import tiny_cfg, without_cost, write_cifar_c, write_imagenet_c

# An adapting method living outside the repository (registered through MODEL.EXTRA_MODULES): entropy minimisation
# on the image tower's LayerNorms, with a stateful counter buffer, so determinism and reset are exercised.
EXTERNAL_METHOD = '''
import torch
from methods.base import TTAMethod
from methods.frames import configure_norm_adaptation, norm_parameters
from methods.losses import softmax_entropy
from methods.registry import register_method

@register_method("ext_entropy")
class ExtEntropy(TTAMethod):
    def __init__(self, *args):
        super().__init__(*args)
    def configure_model(self):
        configure_norm_adaptation(self.model, self.model.clip.visual.modules())
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
    def collect_params(self):
        return norm_parameters(self.model, self.model.clip.visual)
    @torch.enable_grad()
    def forward_and_adapt(self, x):
        logits = self.model(x)
        self.optimizer_step(softmax_entropy(logits).mean())
        self.batches_seen += 1
        return logits.detach()
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(load_clip("tiny-clip-test", "none").model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def external_method(tmp_path_factory):
    path = tmp_path_factory.mktemp("ext") / "ext_entropy.py"
    path.write_text(EXTERNAL_METHOD)
    return str(path)


def independent_accuracy(checkpoint, images_uint8, labels, class_names):
    """Zero-shot predictions computed directly with open_clip, outside the suite's model wrapper and loaders."""
    import open_clip
    clip = load_clip("tiny-clip-test", str(checkpoint)).model.eval()
    tok = open_clip.get_tokenizer("tiny-clip-test")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        text = clip.encode_text(tok([f"a photo of a {c}." for c in class_names]))
        x = torch.from_numpy(np.stack(images_uint8)).permute(0, 3, 1, 2).float() / 255
        img = clip.encode_image((x - mean) / std)
        sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    return int((sims.argmax(1).numpy() == np.asarray(labels)).sum())


def test_cifar10c_accuracy_equals_an_independent_count(tmp_path, checkpoint):
    write_cifar_c(tmp_path, ["gaussian_noise", "fog"], per_severity=30)
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", MODEL__WEIGHTS=str(checkpoint), DATA_DIR=str(tmp_path),
                   SAVE_DIR=str(tmp_path / "out"), CORRUPTION__TYPE=["gaussian_noise", "fog"],
                   CORRUPTION__SEVERITY=[5, 2], TEST__BATCH_SIZE=7)
    payload = evaluate(cfg, progress=False)
    from datasets.class_names import CIFAR10_CLASSES
    labels = np.load(tmp_path / "CIFAR-10-C" / "labels.npy")
    assert [(r["domain"], r["severity"]) for r in payload["records"]] == [
        ("gaussian_noise", 5), ("gaussian_noise", 2), ("fog", 5), ("fog", 2)]
    for r in payload["records"]:
        rows = slice((r["severity"] - 1) * 30, r["severity"] * 30)
        images = np.load(tmp_path / "CIFAR-10-C" / f"{r['domain']}.npy")[rows]
        expected = independent_accuracy(checkpoint, list(images), labels[rows], CIFAR10_CLASSES)
        assert r["n"] == 30 and r["correct"] == expected
        assert r["accuracy"] == pytest.approx(expected / 30) and r["error"] == pytest.approx(1 - expected / 30)
    accs = [r["accuracy"] for r in payload["records"]]
    assert payload["summary"]["mean_accuracy"] == pytest.approx(np.mean(accs))


def test_imagenetc_accuracy_equals_an_independent_count(tmp_path, checkpoint):
    from datasets.class_names import IMAGENET_CLASSES
    from datasets.imagenet_c import imagenet_wnids
    wnids = [imagenet_wnids()[i] for i in (1, 2, 500)]
    entries = write_imagenet_c(tmp_path, ["snow"], wnids=wnids, per_class=4, size=32)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(entries))
    cfg = tiny_cfg("conf/imagenet_c/source.yaml", MODEL__WEIGHTS=str(checkpoint), DATA_DIR=str(tmp_path),
                   SAVE_DIR=str(tmp_path / "out"), CORRUPTION__TYPE=["snow"], TEST__BATCH_SIZE=5,
                   CORRUPTION__IMAGENET_C_LIST=str(listing))
    payload = evaluate(cfg, progress=False)
    root = tmp_path / "ImageNet-C" / "snow" / "5"
    images = [np.asarray(Image.open(root / e).convert("RGB")) for e in entries]
    labels = [imagenet_wnids().index(e.split("/")[0]) for e in entries]
    (record,) = payload["records"]
    assert record["n"] == 12 and record["correct"] == independent_accuracy(checkpoint, images, labels,
                                                                             IMAGENET_CLASSES)
    assert payload["provenance"]["data"]["imagenet_c_list"] == str(listing)


def test_results_files_and_provenance(tmp_path, checkpoint):
    write_cifar_c(tmp_path, ["fog"], per_severity=10)
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", MODEL__WEIGHTS=str(checkpoint), DATA_DIR=str(tmp_path),
                   SAVE_DIR=str(tmp_path / "out"), CORRUPTION__TYPE=["fog"], TEST__BATCH_SIZE=4)
    payload = evaluate(cfg, progress=False)
    run_dir = Path(payload["provenance"]["save_dir"])
    assert run_dir.parent == tmp_path / "out" / "cifar10_c" / "source"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["records"] == payload["records"]
    prov = saved["provenance"]
    for key in ("config", "git", "versions", "model", "device", "wall_time_s", "images_per_second", "images"):
        assert key in prov, key
    assert prov["model"]["weights_source"] == str(checkpoint.resolve()) and prov["model"]["precision"] == "fp32"
    assert prov["versions"]["torch"] == torch.__version__.split("+")[0] or prov["versions"]["torch"]
    assert prov["images"] == 10 and "MODEL:" in prov["config"]
    assert prov["method_precision"] == {"weights": ["float32"], "autocast": None, "grad_scaler_init": None}
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert rows[0]["domain"] == "fog" and int(rows[0]["n"]) == 10 and rows[-1]["domain"] == "mean"
    assert float(rows[0]["accuracy"]) == pytest.approx(payload["records"][0]["accuracy"])
    assert "fog severity 5" in (run_dir / "log.txt").read_text()


def _run_external(tmp_path, external_method, checkpoint, **kw):
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", MODEL__WEIGHTS=str(checkpoint), DATA_DIR=str(tmp_path),
                   SAVE_DIR=str(tmp_path / "out"), CORRUPTION__TYPE=["gaussian_noise", "fog"], TEST__BATCH_SIZE=8,
                   MODEL__EXTRA_MODULES=[external_method], MODEL__ADAPTATION="ext_entropy", OPTIM__LR=0.05, **kw)
    return evaluate(cfg, progress=False)


def test_same_config_and_seed_give_identical_results_on_cpu(tmp_path, external_method, checkpoint):
    write_cifar_c(tmp_path, ["gaussian_noise", "fog"], per_severity=40)
    first = _run_external(tmp_path, external_method, checkpoint)
    second = _run_external(tmp_path, external_method, checkpoint, RESUME=False)   # recompute, do not resume
    assert without_cost(first["records"]) == without_cost(second["records"])
    continual = _run_external(tmp_path, external_method, checkpoint, SETTING="continual")
    # adaptation really happened: continual (no reset before fog) differs from reset_each_shift on fog
    assert without_cost(continual["records"])[0] == without_cost(first["records"])[0]
    assert continual["records"][1]["correct"] != first["records"][1]["correct"] or \
        continual["provenance"]["config_hash"] != first["provenance"]["config_hash"]


def test_stream_order_depends_on_seed_only_not_on_method():
    from harness.stream import stream_order
    a = stream_order([50, 50], "sequential", seed=1)
    assert np.array_equal(a, stream_order([50, 50], "sequential", seed=1))
    assert not np.array_equal(a, stream_order([50, 50], "sequential", seed=2))
    assert sorted(a[:50]) == list(range(50)) and sorted(a[50:]) == list(range(50, 100))


def test_reset_restores_model_optimizer_and_method_state_exactly(tiny_clip, external_method):
    import methods
    from conf import import_plugins
    import_plugins([external_method])
    cfg = tiny_cfg(None, MODEL__ADAPTATION="ext_entropy", OPTIM__METHOD="Adam", OPTIM__LR=0.1)
    method = methods.build_method(cfg, tiny_clip, 10)
    model_before = {k: v.clone() for k, v in method.model.state_dict().items()}
    x = torch.rand(6, 3, 32, 32)
    replay = [method(x) for _ in range(3)]
    assert int(method.batches_seen) == 3 and method.optimizer.state
    changed = [k for k, v in method.model.state_dict().items() if not torch.equal(v, model_before[k])]
    assert changed and all(".ln" in k or "norm" in k for k in changed)   # only the adapted LayerNorms moved
    method.reset()
    assert int(method.batches_seen) == 0
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, model_before[k]), k
    assert method.optimizer.state_dict()["state"] == {}
    # after reset the method replays exactly: same logits and same updates (optimizer moments included)
    for expected in replay:
        torch.testing.assert_close(method(x), expected, rtol=0, atol=0)


def test_a_config_file_is_read_once_and_the_keys_it_sets_come_back(monkeypatch):
    """read_config reads each file of a composition once (protocol, method config, the composition file) and
    returns the keys the files and the command line set, which config_warnings tells from defaults."""
    import conf.compose
    import conf.schema
    from harness.build import read_config
    reads = []
    real = conf.schema.read_yaml

    def counted(path):
        reads.append(Path(path).resolve())
        return real(path)
    monkeypatch.setattr(conf.compose, "read_yaml", counted)
    loaded = read_config("conf/imagenet_c/tent.yaml", ["OPTIM.STEPS", "2"])
    root = Path(conf.compose.CONF_DIR)
    assert sorted(reads) == sorted({root / "imagenet_c" / "tent.yaml", root / "datasets" / "imagenet_c.yaml",
                                    root / "methods" / "tent.yaml"})
    assert {"OPTIM.LR", "OPTIM.STEPS", "CORRUPTION.DATASET", "MODEL.ADAPTATION"} <= loaded.keys_set
    assert "CORRUPTION.IMAGENET_C_LIST" not in loaded.keys_set and loaded.cfg.OPTIM.STEPS == 2


def test_a_run_checks_its_config_once_and_runs_the_plans_method_class(tmp_path, checkpoint, monkeypatch, capsys):
    """test_time.py checks the config once (in build_plan), and the method harness.run builds is the plan's
    method_class: a plan handed another class runs that one."""
    import harness.build
    import test_time
    from harness.build import build_plan
    from methods.source import Source
    write_cifar_c(tmp_path, ["fog"], per_severity=6)
    opts = ["MODEL.ARCH", "tiny-clip-test", "MODEL.WEIGHTS", str(checkpoint), "DATA_DIR", str(tmp_path),
            "SAVE_DIR", str(tmp_path / "out"), "CORRUPTION.TYPE", "[fog]", "TEST.BATCH_SIZE", "3"]
    checks = []
    real = harness.build.check_config
    monkeypatch.setattr(harness.build, "check_config", lambda cfg: (checks.append(cfg), real(cfg))[1])
    assert test_time.main(["--cfg", "conf/cifar10_c/source.yaml", "--no-progress", *opts]) == 0
    assert len(checks) == 1
    capsys.readouterr()

    built = []

    class Recorded(Source):
        def __init__(self, cfg, model, num_classes):
            built.append(num_classes)
            super().__init__(cfg, model, num_classes)
    plan = build_plan(tiny_cfg("conf/cifar10_c/source.yaml", MODEL__WEIGHTS=str(checkpoint), DATA_DIR=str(tmp_path),
                               SAVE_DIR=str(tmp_path / "other"), CORRUPTION__TYPE=["fog"], TEST__BATCH_SIZE=3))
    plan.method_class = Recorded
    assert evaluate(plan, progress=False)["records"][0]["n"] == 6 and built == [10]
    assert plan.model_spec.image_tower == "vit"
