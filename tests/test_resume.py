"""Interrupted runs resume to the same records as uninterrupted ones; domain subsets (shards) merge into one run;
per-method cost info reaches the provenance."""
import json
from pathlib import Path

import pytest

import methods
from conf import import_plugins
from harness import report
from harness.task_records import ResumeError
from harness.run import evaluate
from harness.settings import SettingError
from tests.synthetic import tiny_cfg, without_cost, write_cifar_c

# An adapting, stochastic method (noise from torch's global RNG, entropy minimisation on the image LayerNorms)
# that can be told to crash after a number of batches, to simulate a killed run.
PROBE = '''
import torch
from methods.base import TTAMethod
from methods.frames import configure_norm_adaptation, norm_parameters
from methods.losses import softmax_entropy
from methods.registry import register_method

@register_method("resume_probe")
class ResumeProbe(TTAMethod):
    crash_after_batches = None     # set by the test
    batches = 0

    def configure_model(self):
        configure_norm_adaptation(self.model, self.model.clip.visual.modules())

    def collect_params(self):
        return norm_parameters(self.model, self.model.clip.visual)

    def cost_info(self):
        return {"forward_passes_per_batch": 1, "views_per_image": 1}

    @torch.enable_grad()
    def forward_and_adapt(self, x):
        cls = type(self)
        cls.batches += 1
        if cls.crash_after_batches is not None and cls.batches > cls.crash_after_batches:
            raise RuntimeError("simulated kill")
        logits = self.model(x + 0.05 * torch.randn_like(x))
        self.optimizer_step(softmax_entropy(logits).mean())
        return logits.detach()
'''

DOMAINS = ["gaussian_noise", "shot_noise", "fog", "snow"]
PER_DOMAIN, BATCH = 12, 6          # 2 batches per domain


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "resume_probe_method.py"
    path.write_text(PROBE)
    import_plugins([str(path)])
    cls = methods.METHODS.get("resume_probe")
    yield str(path), cls
    cls.crash_after_batches = None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar_c(root, DOMAINS, per_severity=PER_DOMAIN)
    return root


def run(probe, data, save_dir, crash_after=None, **kw):
    path, cls = probe
    cls.crash_after_batches, cls.batches = crash_after, 0
    kw.setdefault("OPTIM__LR", 0.05)
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", MODEL__EXTRA_MODULES=[path], MODEL__ADAPTATION="resume_probe",
                   DATA_DIR=str(data), SAVE_DIR=str(save_dir), CORRUPTION__TYPE=DOMAINS,
                   TEST__BATCH_SIZE=BATCH, **kw)
    try:
        return evaluate(cfg, progress=False)
    finally:
        cls.crash_after_batches = None


@pytest.fixture(scope="module")
def uninterrupted(probe, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return {s: run(probe, data, out, SETTING=s) for s in ("reset_each_shift", "continual")}


@pytest.mark.parametrize("setting", ["reset_each_shift", "continual"])
def test_killed_run_resumes_to_the_uninterrupted_records(probe, data, tmp_path, uninterrupted, setting):
    expected = uninterrupted[setting]
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(probe, data, tmp_path, crash_after=5, SETTING=setting)    # dies in the 3rd domain
    partial = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert [r["domain"] for r in partial["records"]] == DOMAINS[:2] and not partial["complete"]
    resumed = run(probe, data, tmp_path, SETTING=setting)
    assert without_cost(resumed["records"]) == without_cost(expected["records"]) and resumed["complete"]
    if setting == "reset_each_shift":
        # exact skip: the two finished domains are read back, only the rest runs (2 batches per domain)
        assert resumed["provenance"]["resumed_tasks"] == [0, 1]
        assert probe[1].batches == 2 * (len(DOMAINS) - 2)
    else:
        # the adapted state is not saved: continual re-runs from the start (and says so in the log)
        assert resumed["provenance"]["resumed_tasks"] == []
        assert probe[1].batches == 2 * len(DOMAINS)
        assert "re-running finished tasks" in next(tmp_path.rglob("log.txt")).read_text()
        return
    # a finished run is not run again
    again = run(probe, data, tmp_path, SETTING=setting)
    assert again["records"] == resumed["records"] and probe[1].batches == 0     # read back, cost included


def test_restart_runs_everything_again(probe, data, tmp_path, uninterrupted):
    run(probe, data, tmp_path, RUN_DOMAINS=["fog"])
    restarted = run(probe, data, tmp_path, RUN_DOMAINS=["fog"], RESUME=False)
    assert probe[1].batches == 2 and restarted["provenance"]["resumed_tasks"] == []
    assert without_cost(restarted["records"]) == without_cost(uninterrupted["reset_each_shift"]["records"][2:3])


def test_domain_subsets_then_full_list_and_merging_shards(probe, data, tmp_path, uninterrupted):
    expected = without_cost(uninterrupted["reset_each_shift"]["records"])
    # two shards into one run directory, then the full command: nothing left to run
    first = run(probe, data, tmp_path / "shared", RUN_DOMAINS=["shot_noise", "snow"])
    assert [r["domain"] for r in first["records"]] == ["shot_noise", "snow"] and not first["complete"]
    second = run(probe, data, tmp_path / "shared", RUN_DOMAINS=["gaussian_noise", "fog"])
    assert without_cost(second["records"]) == expected and second["complete"]
    full = run(probe, data, tmp_path / "shared")
    assert full["records"] == second["records"] and probe[1].batches == 0    # read back, cost included
    # shards on two machines (two directories), merged by report.merge
    other_machine = run(probe, data, tmp_path / "m2", RUN_DOMAINS=["gaussian_noise", "fog"])
    merged = report.merge([first, other_machine])
    assert without_cost(merged["records"]) == expected and merged["complete"]


def test_subsets_of_dependent_settings_and_foreign_records_are_refused(probe, data, tmp_path):
    with pytest.raises(SettingError, match="carries the adapted state"):
        run(probe, data, tmp_path, SETTING="continual", RUN_DOMAINS=["fog"])
    with pytest.raises(SettingError, match="cannot split"):
        run(probe, data, tmp_path, SETTING="mixed_domains", RUN_DOMAINS=["fog"])
    run(probe, data, tmp_path, RUN_NAME="mine", RUN_DOMAINS=["fog"])
    with pytest.raises(ResumeError, match="OPTIM.LR"):
        run(probe, data, tmp_path, RUN_NAME="mine", OPTIM__LR=0.5)


def test_method_cost_info_is_recorded(probe, data, tmp_path):
    payload = run(probe, data, tmp_path, RUN_DOMAINS=["fog"])
    assert payload["provenance"]["method_cost"] == {"forward_passes_per_batch": 1, "views_per_image": 1}
    saved = json.loads((Path(payload["provenance"]["save_dir"]) / "results.json").read_text())
    assert saved["provenance"]["method_cost"]["views_per_image"] == 1


def test_command_line_shards_and_overrides_after_list_options():
    import argparse

    import test_time
    assert test_time.shard_domains(DOMAINS, "1/2") == ["gaussian_noise", "fog"]
    assert test_time.shard_domains(DOMAINS, "2/2") == ["shot_noise", "snow"]
    with pytest.raises(Exception, match="K/N"):
        test_time.shard_domains(DOMAINS, "3/2")
    from harness.cli import parse_command_line
    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg", dest="cfg_file")
    test_time.add_run_flags(parser)
    args = parse_command_line(parser, ["--cfg", "x.yaml", "--restart", "--domains", "fog", "snow", "DATA_DIR", "/d",
                                       "MODEL.ARCH", "tiny-clip-test"])
    assert args.domains == ["fog", "snow"] and args.opts == ["DATA_DIR", "/d", "MODEL.ARCH", "tiny-clip-test"]
    # flags after the overrides are flags, not overrides
    args = parse_command_line(parser, ["--cfg", "x.yaml", "DATA_DIR", "/d", "--no-progress", "CORRUPTION.NUM_EX",
                                       "-1", "--restart"])
    assert args.restart and args.no_progress and args.opts == ["DATA_DIR", "/d", "CORRUPTION.NUM_EX", "-1"]
    cfg = test_time.build_run_cfg("conf/cifar10_c/source.yaml", ["CORRUPTION.TYPE", str(DOMAINS)], restart=True,
                                  shard="2/2").cfg
    assert cfg.RUN_DOMAINS == ["shot_noise", "snow"] and cfg.RESUME is False


def test_run_folder_names_the_checkpoint_once_and_a_folder_of_the_former_name_is_pointed_at(data, tmp_path):
    from harness.build import build_plan, run_dir
    from harness.identity import config_hash
    weights = tmp_path / "tiny-clip-test.pt"          # a checkpoint named after its architecture
    weights.write_bytes(b"not read: the plan checks only that a file is there")
    cfg = tiny_cfg("conf/cifar10_c/source.yaml", MODEL__WEIGHTS=str(weights), DATA_DIR=str(data),
                   SAVE_DIR=str(tmp_path / "out"), CORRUPTION__TYPE=["fog"])
    folder = tmp_path / "out" / "cifar10_c" / "source" / f"tiny-clip-test_reset_each_shift_seed1_{config_hash(cfg)}"
    assert run_dir(cfg) == folder
    other = tiny_cfg("conf/cifar10_c/source.yaml", SAVE_DIR=str(tmp_path / "out"), RNG_SEED=2)    # weights "none"
    assert run_dir(other).name == f"tiny-clip-test_none_reset_each_shift_seed2_{config_hash(other)}"
    assert not any("former name" in w for w in build_plan(cfg).warnings)
    # records of this config in the folder it had before (<arch>_<arch>_...) are not resumed, and the run says so
    former = folder.parent / f"tiny-clip-test_tiny-clip-test_reset_each_shift_seed1_{config_hash(cfg)}"
    former.mkdir(parents=True)
    (line,) = [w for w in build_plan(cfg).warnings if "former name" in w]
    assert str(former) in line and f"rename it to {folder.name}" in line
    folder.mkdir()
    assert not any("former name" in w for w in build_plan(cfg).warnings)
