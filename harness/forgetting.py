"""Forgetting (TEST.FORGETTING): after a run whose method carries its state over the whole stream (continual,
gradual, mixed_domains and their correlated forms), how much of the source model's accuracy on the clean test set
the adapted model kept.

The clean set is the data set's domain ``none`` (datasets.base.CLEAN), read as the plan reads any segment: the
run's CORRUPTION.NUM_EX and SUBSET, the run's image transform, the stream order rule of a task of one segment
(harness.stream.task_stream_order), TEST.BATCH_SIZE. It is predicted twice, with the counting of the stream
(harness.task_run.run_task: the same record fields):

- zero-shot: before the stream, by the method's reset state, as if each clean batch were the first of the stream;
- after: after the stream's last batch, by the state the stream left, as if each clean batch were the next one.

Both are FROZEN predictions: each clean batch is given (images only, never labels) to a copy of the method's
whole state (``frozen_copy``: module state, optimizer, gradient scaler, python attributes such as caches, with the
global RNG states restored before every batch), so no clean batch adapts the model, the clean set's order does not
matter, and the method and the RNGs the stream uses are left exactly as they were. ``forgetting`` is
zero_shot_accuracy - accuracy_after (accuracy points lost; negative: the adaptation helped on clean images).

"after" exists only where this process ran the whole stream (a continual run re-runs its finished tasks when
resumed, so it does; a run whose every task was read back carries the entry of its earlier results.json).
"""
from __future__ import annotations

import copy
import json
import random
from dataclasses import replace

import numpy as np

from harness.build import CLEAN_DOMAIN, RunPlan
from harness.settings import Task
from harness.task_run import images_until_reset, run_task

# The functions below take harness.run's RunState (``state``), not imported: harness.run imports this module.


# ------------------------------------------------------------------------------------------------ frozen predictions

def rng_states() -> dict:
    """The global RNG states a method or a loader may draw from (torch, CUDA, numpy, random)."""
    import torch
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(states: dict) -> None:
    import torch
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


def frozen_copy(method):
    """A deep copy of the method's whole state (modules, optimizer, scaler, python attributes), sharing what
    adaptation cannot change: the tensors outside ``_mutable_state`` (the frozen weights, as ``reset`` treats them),
    the reset snapshot (read only), the config and any data loader (the source data), so that a copy costs the
    adapted state, not the CLIP."""
    import torch
    mutable = set(method._mutable_state())
    shared = [t for name, t in method.state_dict(keep_vars=True).items() if name not in mutable]
    shared += [method.cfg, getattr(method, "_snapshot", None)]
    shared += [v for v in vars(method).values() if isinstance(v, torch.utils.data.DataLoader)]
    return copy.deepcopy(method, {id(obj): obj for obj in shared if obj is not None})


class FrozenPredictor:
    """Stands in for the method in ``run_task``: every batch is predicted by a fresh ``frozen_copy`` of ``method``
    from the RNG states ``rng``, so ``method`` never changes and every batch sees the same state."""

    def __init__(self, method, rng: dict):
        self.method, self.rng = method, rng

    def __call__(self, images):
        predictor = frozen_copy(self.method)
        restore_rng_states(self.rng)
        return predictor(images)

    def __getattr__(self, name):        # what run_task reads of the method beyond calling it
        return getattr(self.method, name)


def clean_record(plan: RunPlan, state, method) -> dict:
    """The clean set's record (run_task's fields but ``cost``) as ``method`` predicts it frozen; the global RNG states
    are as before on return. No ``cost``: a frozen prediction's time is mostly the copying of the method's state,
    and its passes go through the copies' towers, not the one the cost meter counts."""
    segment, images = next(iter(plan.clean.items()))
    view = replace(plan, tasks=[Task([segment], reset=False)], data={segment: images}, ood={}, wanted=[0])
    states = rng_states()
    try:
        records, _, _ = run_task(view, FrozenPredictor(method, states), state.transform, 0)
    finally:
        restore_rng_states(states)
    records[0].pop("cost", None)
    return records[0]


def whole_stream_runs(plan: RunPlan, state) -> bool:
    return bool(plan.clean) and state.run_now == list(range(len(plan.tasks)))


def before_stream(plan: RunPlan, state) -> dict | None:
    """The reset state's frozen record of the clean set, where this process runs the whole stream (else None).
    The reset state is a copy of the method, reset and told the stream's length (``begin_stream``) as the stream's
    first task does, so the method itself is untouched."""
    if not whole_stream_runs(plan, state):
        return None
    source = frozen_copy(state.method)
    source.reset()
    source.begin_stream(images_until_reset(plan, state.run_now, 0))
    return clean_record(plan, state, source)


def after_stream(plan: RunPlan, state, zero_shot: dict | None) -> dict | None:
    """results.json's ``forgetting`` entry: measured after the stream where ``before_stream`` measured its
    zero-shot record; else carried from the run's earlier results.json, or saying why it was not measured. None
    where TEST.FORGETTING is off."""
    if not plan.clean:
        return None
    if zero_shot is not None:
        return forgetting_entry(zero_shot, clean_record(plan, state, state.method))
    earlier = _earlier_entry(plan, state.provenance["config_hash"])
    if earlier is not None and state.run_now == [] and "not_measured" not in earlier:
        return earlier
    return {"clean_domain": CLEAN_DOMAIN,
            "not_measured": "this process did not run the whole stream (its tasks were read back from earlier "
                            "records), so the state at its end does not exist here; run with --restart to measure it"}


def forgetting_entry(zero_shot: dict, after: dict) -> dict:
    """The top-level ``forgetting`` entry from the clean set's zero-shot and after-stream records."""
    return {"clean_domain": zero_shot["domain"], "clean_severity": zero_shot["severity"], "n": zero_shot["n"],
            "correct_zero_shot": zero_shot["correct"], "correct_after": after["correct"],
            "zero_shot_accuracy": zero_shot["accuracy"], "accuracy_after": after["accuracy"],
            "forgetting": zero_shot["accuracy"] - after["accuracy"],
            "zero_shot_record": zero_shot, "after_record": after}


def _earlier_entry(plan: RunPlan, cfg_hash: str) -> dict | None:
    path = plan.save_dir / "results.json"
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (earlier.get("provenance") or {}).get("config_hash") != cfg_hash:
        return None
    return earlier.get("forgetting")
