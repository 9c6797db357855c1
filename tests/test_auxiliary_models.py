"""A further CLIP a method needs beside the one it adapts (TTAMethod.auxiliary_models; RLCF's reward model): checked
before any model loads and refused in the words of its keys, built by the one model builder for the run's classes,
handed to the method, recorded in the provenance, and its checkpoint file part of the run's identity."""
import json

import pytest
import torch

from conf import ConfigError
from harness.build import build_plan, input_files, records_identity
from harness.run import evaluate
from models import WeightsError
from tests.synthetic import tiny_cfg, write_cifar_c

# A plug-in method (one file) that needs a second CLIP: it predicts with the adapted model and records what the
# harness gave it, so the test can look.
PLUGIN = '''
import torch
from conf import Option
from methods.base import TTAMethod, TRAINING_FREE
from methods.registry import register_method

@register_method("with_a_judge")
class WithAJudge(TTAMethod):
    protocol = TRAINING_FREE
    auxiliary_models = {"judge": ("JUDGE.ARCH", "JUDGE.WEIGHTS")}
    config_defaults = {"JUDGE": {"ARCH": "", "WEIGHTS": ""}}

    def __init__(self, cfg, model, num_classes, judge=None):
        super().__init__(cfg, model, num_classes)
        self.judge = [judge]        # kept out of the method's modules: never adapted, never reset

    def cost_info(self):
        judge = self.judge[0]
        return {"judge_classes": judge.class_names, "judge_trainable": any(p.requires_grad for p in judge.parameters()),
                "judge_weights_sum": float(sum(v.double().sum() for v in judge.clip.state_dict().values()))}

    @torch.no_grad()
    def forward_and_adapt(self, x):
        return self.model(x) + 0 * self.judge[0](x)[:, :1]
'''


@pytest.fixture
def plugin(tmp_path):
    module = tmp_path / "with_a_judge.py"
    module.write_text(PLUGIN)
    return str(module)


def _cfg(tmp_path, plugin, **overrides):
    write_cifar_c(tmp_path, ["gaussian_noise"], per_severity=4)
    return tiny_cfg(None, MODEL__EXTRA_MODULES=[plugin], MODEL__ADAPTATION="with_a_judge", DATA_DIR=str(tmp_path),
                    SAVE_DIR=str(tmp_path / "out"), CORRUPTION__TYPE=["gaussian_noise"], CORRUPTION__SEVERITY=[5],
                    CORRUPTION__NUM_EX=4, TEST__BATCH_SIZE=2, **overrides)


def test_an_empty_or_unusable_auxiliary_model_is_refused_by_its_keys_before_any_load(tmp_path, plugin):
    with pytest.raises(ConfigError, match=r"^JUDGE.ARCH '' and JUDGE.WEIGHTS '': the method needs this further CLIP"):
        build_plan(_cfg(tmp_path, plugin))
    with pytest.raises(WeightsError, match=r"^Unknown CLIP architecture JUDGE.ARCH 'no-such-clip'"):
        build_plan(_cfg(tmp_path, plugin, JUDGE__ARCH="no-such-clip", JUDGE__WEIGHTS="none"))
    missing = tmp_path / "judge.pt"
    with pytest.raises(WeightsError, match=r"^JUDGE.WEIGHTS '.*judge.pt' looks like a checkpoint path but"):
        build_plan(_cfg(tmp_path, plugin, JUDGE__ARCH="tiny-clip-test", JUDGE__WEIGHTS=str(missing)))
    assert not (tmp_path / "out").exists()


def test_the_run_builds_it_for_its_classes_hands_it_over_and_records_it(tmp_path, plugin):
    torch.manual_seed(5)
    judge_file = tmp_path / "judge.pt"
    import open_clip
    torch.save(open_clip.create_model("tiny-clip-shapes").state_dict(), judge_file)
    cfg = _cfg(tmp_path, plugin, JUDGE__ARCH="tiny-clip-shapes", JUDGE__WEIGHTS=str(judge_file))
    plan = build_plan(cfg)
    assert plan.auxiliary["judge"].arch == "tiny-clip-shapes" and plan.auxiliary["judge"].weights.kind == "file"
    payload = evaluate(cfg, progress=False)

    # What the method was given (it reports it in its cost entry of the provenance)
    given = payload["provenance"]["method_cost"]
    assert given["judge_classes"] == plan.class_names and given["judge_trainable"] is False
    expected = open_clip.create_model("tiny-clip-shapes")
    expected.load_state_dict(torch.load(judge_file))
    assert given["judge_weights_sum"] == float(sum(v.double().sum() for v in expected.state_dict().values()))

    recorded = payload["provenance"]["auxiliary_models"]["judge"]
    assert recorded["arch"] == "tiny-clip-shapes" and recorded["arch_key"] == "JUDGE.ARCH"
    from harness.identity import file_sha256
    assert recorded["weights_sha256"] == file_sha256(judge_file)
    # The checkpoint file is part of what the run reads: another file under the same name is another run.
    assert payload["provenance"]["inputs"]["JUDGE.WEIGHTS"]["sha256"] == file_sha256(judge_file)
    assert json.loads((tmp_path / "out").rglob("results.json").__next__().read_text())["provenance"][
        "auxiliary_models"]["judge"]["weights_key"] == "JUDGE.WEIGHTS"


def test_the_identity_without_torch_names_the_same_checkpoint(tmp_path, plugin):
    """grid.py status reads a run's identity from the methods' declarations (stand-ins read from source where no
    method module ran): the auxiliary checkpoint is in it, as in the plan's."""
    judge_file = tmp_path / "judge.pt"
    judge_file.write_bytes(b"not read here")
    cfg = _cfg(tmp_path, plugin, JUDGE__ARCH="tiny-clip-test", JUDGE__WEIGHTS=str(judge_file))
    import datasets
    from harness.build import declared_method
    named = input_files(cfg, datasets.get_dataset(cfg.CORRUPTION.DATASET), declared_method(cfg))
    assert "JUDGE.WEIGHTS" in named
    assert records_identity(cfg)(0)["inputs"]["JUDGE.WEIGHTS"] == named["JUDGE.WEIGHTS"]["sha256"]


def test_the_stand_ins_read_from_source_declare_the_auxiliary_models():
    from methods.declarations import _static_declarations
    import methods
    static = _static_declarations()
    assert static is not None, "a built-in method's declarations cannot be read from its source"
    for name, stand_in in static.items():
        assert getattr(stand_in, "auxiliary_models", {}) == methods.METHODS.get(name).auxiliary_models, name
