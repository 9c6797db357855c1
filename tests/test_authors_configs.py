"""The authors' YAML files run what the authors ran (issue 12): every config file of both of their suites for a
method and data set this suite has (our transcription of each: tests/data/authors_configs/<suite>/<dataset>/), is
loaded as a user would load it. A file for a non-CLIP model is refused in one line as written, and runs with a CLIP
named instead (MODEL.ARCH, issue 30). Every file runs on the tiny CLIP of its tower family and synthetic data in the
real layouts, and its effective settings (optimizer and its hyper-parameters,
steps, batch size, episodic reset, adapted parameters, domains, subset rule, precision) equal what the authors'
code does with the same keys, as written out independently below from their code (docs/authors_configs.md)."""
from pathlib import Path

import pytest
import torch
import yaml

import methods
from conf import ConfigError, UserError
from datasets.source_sets import SOURCE_SETS
from harness.build import check_method, load_cfg, needs_source_data
from harness.run import evaluate
from tests.synthetic import (ALL_LAYOUT_DOMAINS, TINY_OPTS, small_run_overrides, tiny_arch, tiny_auxiliary_models,
                             tiny_source_data, write_all_layouts, write_source_sets)

FIXTURES = Path(__file__).parent / "data" / "authors_configs"
FILES = sorted(FIXTURES.rglob("*.yaml"))
STD15 = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
         "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"]
# The authors' conf.py defaults of the keys that decide the optimizer.
AUTHORS_OPTIM = {"METHOD": "Adam", "LR": 1e-3, "BETA": 0.9, "MOMENTUM": 0.9, "DAMPENING": 0.0, "NESTEROV": True,
                 "WD": 0.0, "STEPS": 1}


def name_of(path: Path) -> str:
    return "/".join(path.relative_to(FIXTURES).with_suffix("").parts)


def written(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def number(value) -> float:
    return float(value)    # "1e-3" is a string to YAML, a float to yacs (and to us)


def expected_optimizer(data: dict) -> dict | None:
    """What their methods' setup_optimizer builds (methods/base.py, methods/sar.py), or None for no optimizer."""
    model, optim = data["MODEL"], {**AUTHORS_OPTIM, **data.get("OPTIM", {})}
    method = model["ADAPTATION"]
    if method in ("source", "vte", "lame", "ttaug", "bntest", "bnalpha", "bnema"):    # their code trains nothing
        return None
    if method == "sar":     # SAM over SGD; lr 0.001 for transformers whatever OPTIM says
        arch = model["ARCH"].lower().replace("-", "_")
        lr = 0.001 if "vit_" in arch or "swin_" in arch else number(optim["LR"])
        return {"class": torch.optim.SGD, "lr": lr, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
                "dampening": 0.0}
    if optim["METHOD"] == "SGD":
        return {"class": torch.optim.SGD, "lr": number(optim["LR"]), "momentum": number(optim["MOMENTUM"]),
                "nesterov": bool(optim["NESTEROV"]), "weight_decay": number(optim["WD"]),
                "dampening": number(optim["DAMPENING"])}
    cls = torch.optim.AdamW if optim["METHOD"] == "AdamW" else torch.optim.Adam
    return {"class": cls, "lr": number(optim["LR"]), "betas": (number(optim["BETA"]), 0.999),
            "weight_decay": number(optim["WD"])}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_source_sets(write_all_layouts(tmp_path_factory.mktemp("layouts")))   # + source sets (EATA)


def test_every_file_of_both_suites_for_our_methods_and_data_sets_is_here():
    assert len(FILES) == 103
    assert {p.parts[-3] for p in FILES} == {"anchor", "batclip"}


def clip_arch_for(path: Path) -> str:
    """The CLIP a user names (MODEL.ARCH) to run one of their files written for a RobustBench / torchvision model:
    ViT-B-16, or RN50 (BatchNorm) for a method that refuses a ViT tower (their BatchNorm methods)."""
    try:
        check_method(load_cfg(path, ["MODEL.ARCH", "ViT-B-16"]))
    except ConfigError as err:
        if "tower" not in str(err):
            raise
        return "RN50"
    return "ViT-B-16"


@pytest.mark.parametrize("path", FILES, ids=name_of)
def test_an_authors_file_means_here_what_it_meant_there(path, data_dir, tmp_path, tiny_clip, tiny_clip_rn):
    data, arch_opts = written(path), []
    if data["MODEL"].get("USE_CLIP") is not True:      # their RobustBench / torchvision models: refused, saying why
        with pytest.raises(UserError, match="CLIP models only"):
            check_method(load_cfg(path))
        # ... and with a CLIP named instead (MODEL.ARCH), the file runs what it says on that CLIP (issue 30).
        arch = clip_arch_for(path)
        arch_opts = ["MODEL.ARCH", arch]
        data = {**data, "MODEL": {**data["MODEL"], "ARCH": arch, "WEIGHTS": "openai", "USE_CLIP": True}}
    cfg = load_cfg(path, arch_opts)
    tiny_model = tiny_clip_rn if tiny_arch(cfg.MODEL.ARCH) == "tiny-clip-test-rn" else tiny_clip
    model = data["MODEL"]
    dataset = {"imagenet_k": "imagenet_sketch"}.get(data["CORRUPTION"]["DATASET"], data["CORRUPTION"]["DATASET"])
    assert cfg.CORRUPTION.DATASET == dataset
    whole_set = data["CORRUPTION"]["TYPE"] == [""]
    assert list(cfg.CORRUPTION.TYPE) == (ALL_LAYOUT_DOMAINS[dataset] if whole_set else STD15)
    assert cfg.CORRUPTION.NUM_EX == -1 and cfg.CORRUPTION.SUBSET == "authors"
    assert cfg.TEST.BATCH_SIZE == data["TEST"]["BATCH_SIZE"]
    assert cfg.OPTIM.STEPS == data.get("OPTIM", {}).get("STEPS", 1)
    assert cfg.MODEL.EPISODIC is bool(model.get("EPISODIC", False))
    assert cfg.MODEL.ARCH == model["ARCH"] and cfg.MODEL.WEIGHTS == model["WEIGHTS"]
    # Their CLIP.PRECISION default is fp16; ours fp32 (docs/authors_configs.md): a file that sets it means it.
    assert cfg.CLIP.PRECISION == data.get("CLIP", {}).get("PRECISION", "fp32")
    method = methods.METHODS.canonical(cfg.MODEL.ADAPTATION)
    if method == "batclip":     # their OURS: always fp16 autocast + GradScaler(init_scale=1000) on CUDA
        assert cfg.BATCLIP.AUTOCAST is True and cfg.BATCLIP.GRAD_SCALER_INIT == 1000.0
    if method == "tpt":         # their TPT: the same, always
        assert cfg.TPT.MIXED_PRECISION is True

    # The optimizer their code builds, built here on the tiny model (the architecture's name still decides SAR's).
    built = methods.build_method(cfg, tiny_model, 10, **tiny_auxiliary_models(cfg, tiny_model),
                                  **tiny_source_data(cfg, tiny_model))
    expected = expected_optimizer(data)
    if expected is None:
        assert built.optimizer is None
    else:
        group = built.optimizer.param_groups[0]
        assert type(built.optimizer) is expected.pop("class")
        for key, value in expected.items():
            assert group[key] == pytest.approx(value), key
    names = built.param_names
    if method in ("tent", "rpl", "sar", "eata", "deyo", "roid", "cmf", "cotta", "adacontrast", "memo"):
        assert names and all(n.startswith("clip.visual.") for n in names)   # the image tower only
    if method == "batclip":
        assert any(n.startswith("clip.visual.") for n in names) and any("ln_final" in n for n in names)
    if method == "tpt":
        assert names == ["prompt_learner.ctx"]

    # It runs: on the tiny CLIP and the synthetic copy of its data set.
    overrides = small_run_overrides(dataset, "batclip" if method == "batclip" else method, data_dir)
    overrides["CORRUPTION__SUBSET"] = "authors"
    opts = arch_opts + list(TINY_OPTS) + ["DATA_DIR", str(data_dir), "SAVE_DIR", str(tmp_path)]
    opts[opts.index("MODEL.ARCH", len(arch_opts)) + 1] = tiny_arch(cfg.MODEL.ARCH)
    for key, value in overrides.items():
        opts += [key.replace("__", "."), value if isinstance(value, str) else repr(value)]
    small = load_cfg(path, opts)
    check_method(small)
    if needs_source_data(small, methods.METHODS.get(method)) and dataset not in SOURCE_SETS:
        # EATA's Fisher term on a set without a source training set here (their imagenet_others file: ImageNet-R)
        with pytest.raises(UserError, match=f"^eata on {dataset} reads its source training set .* {dataset} has no "
                                             f"source training set in this suite"):
            evaluate(small, progress=False)
        return
    payload = evaluate(small, progress=False)
    assert [r["n"] for r in payload["records"]] == [8] * len(small.CORRUPTION.TYPE)


def test_the_authors_sar_optimizer_and_ours_on_request(tiny_clip):
    path = FIXTURES / "batclip" / "imagenet_c" / "sar.yaml"       # SGD, lr 0.00025 as written
    authors = methods.build_method(load_cfg(path), tiny_clip, 10)
    assert authors.optimizer.param_groups[0]["lr"] == 0.001          # ViT: 0.001, as their SAR.setup_optimizer
    from harness.build import config_warnings
    assert any("OPTIM.LR 0.00025" in w and "SAR.OPTIMIZER config" in w for w in config_warnings(load_cfg(path)))
    configured = methods.build_method(load_cfg(path, ["SAR.OPTIMIZER", "config"]), tiny_clip, 10)
    group = configured.optimizer.param_groups[0]
    assert (group["lr"], group["nesterov"]) == (0.00025, True)       # OPTIM as written
    cifar = methods.build_method(load_cfg(FIXTURES / "batclip" / "cifar10_c" / "sar.yaml"), tiny_clip, 10)
    assert type(cifar.optimizer) is torch.optim.SGD                  # their CIFAR file says Adam; SAR ignores it
    non_vit = methods.build_method(load_cfg(path, ["MODEL.ARCH", "RN50"]), tiny_clip, 10)
    assert non_vit.optimizer.param_groups[0]["lr"] == 0.00025         # a ResNet: OPTIM.LR


@pytest.mark.parametrize("opts, needle", [
    (["MODEL.ADAPTATION", "sar", "EATA.MARGIN_E0", "0.3"], "SAR.MARGIN_E0"),
    (["CLIP.PROMPT_PATH", "x.json"], "CuPL"),
    (["RMT.LAMBDA_CE_SRC", "0.5"], "RMT configures a method of the authors' suite that this suite does not have"),
    (["MODEL.ADAPTATION", "rmt"], "Unknown method MODEL.ADAPTATION 'rmt'"),
    (["MODEL.CKPT_PATH", "ctx.pth"], "CoOp"),
    (["MODEL.ADAPTATION", "vte", "TPT.SELECTION_P", "0.25"], "reads VTE's view fraction from TPT.SELECTION_P"),
    (["CORRUPTION.DATASET", "imagenet_d109"], "Unknown data set CORRUPTION.DATASET 'imagenet_d109'"),
    (["SETTING", "mixed_domains", "CORRUPTION.NUM_EX", "5"], "samples NUM_EX images from the whole mixed stream"),
])
def test_their_keys_that_mean_nothing_here_stop_with_the_reason(opts, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cfg = load_cfg("conf/cifar10_c/source.yaml", opts)
        check_method(cfg)


def _warnings(path, opts=()):
    """config_warnings as a run gives them: with the keys the file and the command line set."""
    from harness.build import config_warnings, read_config
    loaded = read_config(path, list(opts))
    return config_warnings(loaded.cfg, loaded.keys_set)


def test_a_default_that_differs_from_theirs_is_said_when_the_file_relies_on_it():
    relies = _warnings(FIXTURES / "batclip" / "cifar10_c" / "source.yaml")    # no CLIP.PRECISION
    assert any(w.startswith("CLIP.PRECISION is not set: its default is fp16 in the authors' suite and fp32 here")
               for w in relies)
    sets_it = _warnings(FIXTURES / "batclip" / "cifar10_c" / "ours.yaml")       # PRECISION fp32
    assert not any(w.startswith("CLIP.PRECISION") for w in sets_it)
    assert not any(w.startswith("CLIP.PRECISION") for w in
                   _warnings(FIXTURES / "batclip" / "cifar10_c" / "source.yaml", ["CLIP.PRECISION", "fp32"]))


def test_correlated_imagenet_c_says_which_list_it_reads():
    warnings = _warnings("conf/imagenet_c/source.yaml", ["SETTING", "correlated"])
    assert any("50,000-image list in correlated settings" in w for w in warnings)
    explicit = _warnings("conf/imagenet_c/source.yaml", ["SETTING", "correlated", "CORRUPTION.IMAGENET_C_LIST", "all"])
    assert not any("correlated settings" in w for w in explicit)
