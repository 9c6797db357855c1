"""EATA / ETA (methods/eata.py) against a plain transcription of the anchor suite's classification/methods/eata.py
(its Fisher loop, loss_calculation, update_model_probs and forward_and_adapt) on the tiny CLIP, ViT and ResNet
towers; the one-line-change test; reset; the source data (datasets/source_sets.py): the selection rule, the
refusal without it, ETA without it, the harness's loader and the run's identity; SAR's refusal of EATA.MARGIN_E0."""
import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
from conf import ConfigError
from harness.build import build_plan, check_method, input_files, declared_method
from tests.synthetic import tiny_cfg, varied_stream, write_cifar_c, write_cifar_train, write_source_sets

CFG_FILE = "conf/cifar10_c/eata.yaml"
BATCH = 8
# measured: logits, parameters and current_model_probs equal to the bit (difference 0) over 4 batches, fp32, both
# towers, EATA and ETA, on the native and the AVX2 CPU path (the same operations in the same order); the tolerance
# leaves room for another CPU's reductions
TOLERANCE = 2e-6
# On the tiny random CLIP the predictions are almost uniform: a 6x sharper logit scale, and margins chosen from the
# measured entropies and cosines so that both filters keep some samples and drop others in every batch (ViT: of 8,
# 6/6/5/6 reliable and 6/2/1/1 kept; ResNet: 5/6/7/5 and 5/3/5/3).
SHARPER_LOGIT_SCALE = math.log(6.0)
MARGINS = {"tiny-clip-test": dict(EATA__MARGIN_E0=0.5, EATA__D_MARGIN=0.9),
           "tiny-clip-test-rn": dict(EATA__MARGIN_E0=0.6, EATA__D_MARGIN=0.7)}


def _model(request, arch):
    model = request.getfixturevalue("tiny_clip_rn" if arch.endswith("-rn") else "tiny_clip")
    with torch.no_grad():
        model.clip.logit_scale.add_(SHARPER_LOGIT_SCALE)
    return model


def _cfg(arch, **overrides):
    values = dict(MODEL__ARCH=arch, OPTIM__LR=5e-3, EATA__FISHER_ALPHA=50.0, **MARGINS[arch])
    values.update(overrides)
    return tiny_cfg(CFG_FILE, **values)


def _source_batches(seed=5, batches=3, size=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 3, 32, 32, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(batches)]


def _stream(n_batches=4):
    return varied_stream(n_batches * BATCH, seed=1).split(BATCH)


# ---------------------------------------------------------------------- the transcription
def _configure(model):
    """Their configure_model on the CLIP: everything frozen, the norm layers' affine parameters free, BatchNorm2d on
    batch statistics (their ZeroShotCLIP drops the text transformer, so only the image tower's norms get
    gradients); their collect_params' order (named_modules)."""
    model.eval()
    model.requires_grad_(False)
    params, names = [], []
    for module_name, module in model.clip.visual.named_modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            module.requires_grad_(True)
            if isinstance(module, nn.BatchNorm2d):
                module.track_running_stats = False
                module.running_mean = None
                module.running_var = None
            for pname in ("weight", "bias"):
                params.append(getattr(module, pname))
                names.append(f"clip.visual.{module_name}.{pname}")
    return params, names


def _their_fishers(model, params, names, loader, change=None):
    """The Fisher loop of their EATA.__init__."""
    ewc_optimizer = torch.optim.SGD(params, 0.001)
    fishers = {}
    train_loss_fn = nn.CrossEntropyLoss()
    for iter_, batch in enumerate(loader, start=1):
        outputs = model(batch[0])
        _, targets = outputs.max(1)
        loss = train_loss_fn(outputs, targets)
        loss.backward()
        for name, param in zip(names, params):
            if param.grad is not None:
                if iter_ > 1:
                    fisher = param.grad.data.clone().detach() ** 2 + fishers[name][0]
                else:
                    fisher = param.grad.data.clone().detach() ** 2
                if iter_ == len(loader):
                    fisher = fisher / (iter_ if change != "fisher_not_averaged" else 1)
                fishers.update({name: [fisher, param.data.clone().detach()]})
        ewc_optimizer.zero_grad()
    return fishers


def _their_probs(current, new_probs, change=None):
    momentum = 0.8 if change == "momentum" else 0.9
    if current is None:
        return None if new_probs.size(0) == 0 else new_probs.mean(0)
    if new_probs.size(0) == 0:
        return current
    return momentum * current + (1 - momentum) * new_probs.mean(0)


def _their_run(model, cfg, loader, batches, change=None):
    """Their EATA on ``batches``: (logits per batch, parameters after, current_model_probs after, fishers)."""
    params, names = _configure(model)
    optimizer = torch.optim.Adam(params, lr=cfg.OPTIM.LR, betas=(cfg.OPTIM.BETA, 0.999), weight_decay=cfg.OPTIM.WD)
    fishers = _their_fishers(model, params, names, loader, change) if cfg.EATA.FISHER_ALPHA > 0 else None
    e_margin = cfg.EATA.MARGIN_E0 * math.log(10)
    current, outs = None, []
    for x in batches:
        with torch.enable_grad():
            outputs = model(x)
            entropys = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
            filter_ids_1 = torch.where(entropys < e_margin)
            entropys = entropys[filter_ids_1]
            if current is not None:
                cosine = F.cosine_similarity(current.unsqueeze(dim=0), outputs[filter_ids_1].softmax(1), dim=1)
                filter_ids_2 = torch.where(torch.abs(cosine) < cfg.EATA.D_MARGIN)
                if change != "no_redundancy_filter":
                    entropys = entropys[filter_ids_2]
                updated = _their_probs(current, outputs[filter_ids_1][filter_ids_2].softmax(1).detach(), change)
            else:
                updated = _their_probs(current, outputs[filter_ids_1].softmax(1).detach(), change)
            coeff = 1 / (torch.exp(entropys.clone().detach() - e_margin))
            if change == "no_reweighting":
                coeff = torch.ones_like(coeff)
            loss = entropys.mul(coeff).mean(0)
            if fishers is not None:
                ewc_loss = 0
                for name, param in zip(names, params):
                    if name in fishers:
                        ewc_loss += cfg.EATA.FISHER_ALPHA * (fishers[name][0] * (param - fishers[name][1]) ** 2).sum()
                loss += ewc_loss
            current = updated
            if len(entropys) != 0:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad()
        outs.append(outputs.detach())
    return outs, [p.detach().clone() for p in params], current, fishers


def _ours(model, cfg, loader, batches):
    method = methods.build_method(cfg, model, 10, **({"source_loader": loader} if loader is not None else {}))
    outs = [method(x) for x in batches]
    return method, outs


TOWERS = ["tiny-clip-test", "tiny-clip-test-rn"]


@pytest.mark.parametrize("arch", TOWERS)
def test_fisher_information_equals_their_loop(request, arch):
    model = _model(request, arch)
    cfg = _cfg(arch)
    loader = _source_batches()
    method = methods.build_method(cfg, copy.deepcopy(model), 10, source_loader=loader)
    theirs = _their_fishers(model, *_configure(model), loader)
    assert sorted(method.fishers) == sorted(theirs) and len(theirs) == len(method.params)
    for name, (fisher, source) in method.fishers.items():
        # measured: equal to the bit (the same operations in the same order)
        torch.testing.assert_close(fisher, theirs[name][0], rtol=1e-6, atol=1e-12)
        assert torch.equal(source, theirs[name][1])
    assert max(float(f.abs().max()) for f, _ in method.fishers.values()) > 0


@pytest.mark.parametrize("arch", TOWERS)
@pytest.mark.parametrize("fisher_alpha", [50.0, 0.0])      # EATA, and ETA (no source data)
def test_the_update_equals_their_loss_calculation_over_four_batches(request, arch, fisher_alpha):
    model = _model(request, arch)
    cfg = _cfg(arch, EATA__FISHER_ALPHA=fisher_alpha)
    loader = _source_batches() if fisher_alpha > 0 else None
    batches = _stream()
    method, ours = _ours(copy.deepcopy(model), cfg, loader, batches)
    theirs, their_params, their_probs, _ = _their_run(model, cfg, _source_batches(), batches)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=TOLERANCE)
    for a, b in zip(method.params, their_params):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(method.current_model_probs, their_probs, rtol=0, atol=TOLERANCE)
    # both filters acted: some samples dropped by each, some kept (so steps were taken)
    assert 0 < method.num_samples_update_2 < method.num_samples_update_1 < len(batches) * BATCH
    assert sum(not torch.equal(method._snapshot["module"][f"model.{n}"], p) for n, p in
               zip(method.param_names, method.params)) > 0


@pytest.mark.parametrize("change", ["no_reweighting", "no_redundancy_filter", "momentum", "fisher_not_averaged"])
def test_the_comparison_fails_when_one_line_of_the_transcription_changes(request, change):
    arch = "tiny-clip-test"
    model = _model(request, arch)
    cfg = _cfg(arch)
    batches = _stream()
    method, ours = _ours(copy.deepcopy(model), cfg, _source_batches(), batches)
    theirs, their_params, _, _ = _their_run(model, cfg, _source_batches(), batches, change=change)
    logits = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    params = max(float((a.detach() - b).abs().max()) for a, b in zip(method.params, their_params))
    # measured (native and AVX2 paths alike), logits / parameters: no_reweighting 0.16 / 1.6e-2, no_redundancy_filter
    # 1.9 / 2.5e-2, momentum 0.19 / 1.1e-2, fisher_not_averaged 0.11 / 5.0e-3: each > 10x the tolerance
    assert max(logits, params) > 10 * TOLERANCE, (change, logits, params)


def test_no_step_when_every_sample_is_filtered(tiny_clip):
    cfg = _cfg("tiny-clip-test", EATA__MARGIN_E0=0.0)
    method = methods.build_method(cfg, tiny_clip, 10, source_loader=_source_batches())
    before = [p.detach().clone() for p in method.params]
    for x in _stream(2):
        method(x)
    assert all(torch.equal(a, b) for a, b in zip(before, method.params))
    assert method.current_model_probs is None and method.optimizer.state == {}


@pytest.mark.parametrize("arch", TOWERS)
def test_reset_restores_everything_and_the_first_batches_replay_bit_for_bit(request, arch):
    cfg = _cfg(arch)
    method = methods.build_method(cfg, _model(request, arch), 10, source_loader=_source_batches())
    fishers = {k: (f.clone(), s.clone()) for k, (f, s) in method.fishers.items()}
    first = [method(x) for x in _stream(3)]
    assert method.current_model_probs is not None
    method.reset()
    assert method.current_model_probs is None
    assert all(torch.equal(fishers[k][0], f) for k, (f, _) in method.fishers.items())    # the Fisher stays
    again = [method(x) for x in _stream(3)]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_cliptta_choices_change_the_update(request):
    """EATA.REDUNDANCY_PROBS cosine (CLIPTTA's softmax of the unscaled cosines) and MARGINAL_ENTROPY_WEIGHT (its
    beta_reg) give other updates; at their defaults they are the anchor's (the transcription tests)."""
    tiny_clip = _model(request, "tiny-clip-test")
    base = _cfg("tiny-clip-test", EATA__FISHER_ALPHA=0.0)
    _, plain = _ours(copy.deepcopy(tiny_clip), base, None, _stream(3))
    for key, value in (("EATA__REDUNDANCY_PROBS", "cosine"), ("EATA__MARGINAL_ENTROPY_WEIGHT", 0.1)):
        cfg = _cfg("tiny-clip-test", EATA__FISHER_ALPHA=0.0, **{key: value})
        _, other = _ours(copy.deepcopy(tiny_clip), cfg, None, _stream(3))
        assert (other[-1] - plain[-1]).abs().max() > 1e-5, key
    # CLIPTTA's cosine probabilities are near-uniform: every second-batch sample has |cos| close to 1
    method = methods.build_method(_cfg("tiny-clip-test", EATA__FISHER_ALPHA=0.0, EATA__MARGIN_E0=1.0,
                                       EATA__REDUNDANCY_PROBS="cosine"), tiny_clip, 10)
    method(_stream(1)[0])
    assert method.current_model_probs.max() - method.current_model_probs.min() < 0.05


# ---------------------------------------------------------------------- refusals and configuration
def test_without_a_source_loader_eata_refuses_and_eta_runs(tiny_clip):
    with pytest.raises(ConfigError, match=r"^eata: EATA.FISHER_ALPHA 1.0 and SOURCE.NUM_SAMPLES 2000 need the "
                                          r"source images"):
        methods.build_method(tiny_cfg(CFG_FILE), copy.deepcopy(tiny_clip), 10)
    eta = methods.build_method(tiny_cfg(CFG_FILE, EATA__FISHER_ALPHA=0.0), tiny_clip, 10)
    assert eta.fishers is None


@pytest.mark.parametrize("opts, needle", [
    (dict(EATA__D_MARGIN=-0.1), "EATA.D_MARGIN"),
    (dict(EATA__FISHER_ALPHA=-1.0), "EATA.FISHER_ALPHA"),
    (dict(SOURCE__PERCENTAGE=0.0), "SOURCE.PERCENTAGE"),
    (dict(EATA__REDUNDANCY_PROBS="cos"), "EATA.REDUNDANCY_PROBS"),
    (dict(CLIP__FREEZE_TEXT_ENCODER=False), "CLIP.FREEZE_TEXT_ENCODER"),
])
def test_bad_values_are_refused_in_one_line_before_any_model_loads(opts, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as err:
        check_method(tiny_cfg(CFG_FILE, **opts))
    assert "\n" not in str(err.value)


def test_sar_refuses_the_anchors_eata_margin_key():
    with pytest.raises(ConfigError, match=r"^EATA.MARGIN_E0 0.3: .*this suite's SAR reads SAR.MARGIN_E0"):
        check_method(tiny_cfg("conf/cifar10_c/sar.yaml", EATA__MARGIN_E0=0.3))
    check_method(tiny_cfg("conf/cifar10_c/sar.yaml", SAR__EXCLUDED_DEEPEST_BLOCKS=1))   # the default passes


def test_warnings_name_keys_that_change_nothing():
    from harness.build import config_warnings
    cls = methods.METHODS.get("eata")
    warnings = config_warnings(tiny_cfg(CFG_FILE, SOURCE__NUM_SAMPLES=-1, SOURCE__PERCENTAGE=0.5), cls=cls)
    assert any(w.startswith("EATA.FISHER_ALPHA 1.0 has no effect: SOURCE.NUM_SAMPLES -1") for w in warnings)
    assert any(w.startswith("SOURCE.PERCENTAGE 0.5 has no effect") for w in warnings)
    assert not [w for w in config_warnings(tiny_cfg(CFG_FILE), cls=cls) if "EATA" in w or "SOURCE" in w]


# ---------------------------------------------------------------------- source data
def _their_selection(total, num_samples, percentage, seed):
    """Their get_source_loader after conf.py's random.seed(RNG_SEED), for CIFAR (indices into .data)."""
    random.seed(seed)
    if percentage < 1.0 or num_samples >= 0:
        nr_reduced = min(num_samples, total) if num_samples > 0 else int(np.ceil(total * percentage))
        return random.sample(range(0, total), nr_reduced)
    return list(range(total))


@pytest.mark.parametrize("total, num_samples, seed", [(50000, 2000, 1), (30, 2000, 1), (1000, 7, 42)])
def test_the_selection_rule_is_theirs(total, num_samples, seed):
    from datasets.source_sets import select_source_indices
    assert select_source_indices(total, num_samples, 1.0, seed) == _their_selection(total, num_samples, 1.0, seed)
    assert select_source_indices(total, -1, 1.0, seed) == list(range(total))
    from datasets import DatasetError
    with pytest.raises(DatasetError, match="SOURCE.NUM_SAMPLES -1 with SOURCE.PERCENTAGE 0.5"):
        select_source_indices(total, -1, 0.5, seed)        # their assert num_samples > 0


def _run_cfg(tmp_path, dataset="cifar10_c", **overrides):
    write_cifar_c(tmp_path, ["gaussian_noise"], per_severity=8)
    return tiny_cfg(f"conf/{dataset}/eata.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "out"),
                    CORRUPTION__TYPE=["gaussian_noise"], CORRUPTION__NUM_EX=8, CORRUPTION__SUBSET="first_n",
                    TEST__BATCH_SIZE=4, **overrides)


def test_missing_source_data_is_refused_in_one_line_naming_path_set_and_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_plan(_run_cfg(tmp_path))
    message = str(err.value)
    assert "\n" not in message and message.startswith("eata on cifar10_c reads its source training set "
                                                      "(EATA.FISHER_ALPHA 1.0, SOURCE.NUM_SAMPLES 2000 > 0)")
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert message.endswith("EATA.FISHER_ALPHA 0 runs it without source data")
    assert not (tmp_path / "out").exists()
    build_plan(_run_cfg(tmp_path, EATA__FISHER_ALPHA=0.0))                    # ETA needs none
    with pytest.raises(ConfigError, match=r"imagenet/train \(or .*imagenet2012/train\) does not exist"):
        build_plan(tiny_cfg("conf/imagenet_c/eata.yaml", DATA_DIR=str(tmp_path), SAVE_DIR=str(tmp_path / "o"),
                            CORRUPTION__TYPE=["gaussian_noise"], CORRUPTION__IMAGENET_C_LIST="all"))


def test_the_harness_reads_the_selected_source_images_and_they_are_part_of_the_runs_identity(tmp_path):
    from datasets.transforms import clip_image_transform
    from harness.run import source_loader
    write_source_sets(tmp_path)
    cfg = _run_cfg(tmp_path, SOURCE__NUM_SAMPLES=7)
    plan = build_plan(cfg)
    rows = _their_selection(30, 7, 1.0, cfg.RNG_SEED)
    assert plan.source.rows == rows and len(plan.source) == 7
    import pickle
    data = np.concatenate([pickle.loads((tmp_path / "cifar-10-batches-py" / f"data_batch_{k}").read_bytes())[b"data"]
                           for k in range(1, 6)]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    loader = source_loader(plan, clip_image_transform(32))
    assert [len(b[0]) for b in loader] == [4, 3]                       # TEST.BATCH_SIZE, as their Fisher loader
    first = next(iter(loader))[0][0]
    assert torch.equal((first * 255).round().byte().permute(1, 2, 0), torch.from_numpy(data[rows[0]]))
    entry = plan.inputs["source data (cifar10)"]
    assert entry["images"] == 7 and entry["of"] == 30
    # another selection, or a rewritten source file, is another run
    assert input_files(build_plan(_run_cfg(tmp_path, SOURCE__NUM_SAMPLES=8)).cfg, plan.dataset,
                       declared_method(cfg))["source data (cifar10)"]["sha256"] != entry["sha256"]
    write_cifar_train(tmp_path, "cifar10", per_file=6, seed=99)
    assert build_plan(cfg).inputs["source data (cifar10)"]["sha256"] != entry["sha256"]


def test_a_run_computes_the_fisher_on_the_source_images_and_records_them(tmp_path):
    from harness.run import evaluate
    write_source_sets(tmp_path)
    payload = evaluate(_run_cfg(tmp_path, SOURCE__NUM_SAMPLES=10), progress=False)
    assert payload["provenance"]["method_cost"]["source_images_for_fisher"] == 10
    assert payload["provenance"]["inputs"]["source data (cifar10)"]["images"] == 10


def test_shapes_source_is_the_demo_clips_training_split():
    from datasets.shapes import clean_split
    from datasets.source_sets import GeneratedShapes
    images, labels = clean_split("train", 40)
    part = GeneratedShapes([3, 17, 0], total=40)
    for k, i in enumerate([3, 17, 0]):
        image, label = part[k]
        assert np.array_equal(np.asarray(image), images[i]) and label == labels[i]
