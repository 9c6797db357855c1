"""What a method's calls cost, measured around a task's stream (harness/run.py:run_task) and written to each of its
records under "cost" (docs/comparison.md, "Method cost"):

- ``seconds_per_image``: wall seconds of the method's calls (``method(images)``) per streamed image;
- ``adapt_seconds_per_image``: of those, the seconds in autograd backward passes and optimizer steps (the gradient
  work of adaptation); ``predict_seconds_per_image`` the rest (forward passes, views, caches);
- ``forward_images_per_image``: images that entered the method's image tower (views included) per streamed image;
- ``backward_passes_per_image``: autograd backward calls per streamed image;
- ``peak_memory_mib`` / ``peak_memory_kind``: the task's peak memory (``PEAK_MEMORY_KINDS``).

A batch's seconds and counts go to its segments in proportion to its images; the peak is the task's, the same in
each of its records. These are the only fields of a record that differ between two runs of one config."""
from __future__ import annotations

import contextlib
import re
import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from harness.results import COST_FIELDS

# How peak_memory_mib was measured: CUDA's allocator peak since the task started; the process's resident-set
# high-water mark since the task started (/proc/self/status VmHWM, reset through /proc/self/clear_refs, Linux >= 4.0);
# where that reset is refused, the process's resident-set peak over its whole life (getrusage's ru_maxrss).
PEAK_MEMORY_KINDS = ("cuda_max_allocated", "cpu_peak_rss", "cpu_process_peak_rss")


@dataclass
class CallCost:
    """One call of the method: its wall seconds, those spent in backward passes and optimizer steps, the images
    that entered its image tower and its backward calls."""
    seconds: float = 0.0
    adapt_seconds: float = 0.0
    forward_images: int = 0
    backward_passes: int = 0


class CostTotals:
    """Per-segment sums of the calls' costs (``add``): a batch's amounts go to its segments in proportion to the
    images each holds, so a batch straddling two segments is split by its images."""

    def __init__(self, num_segments: int):
        self.sums = torch.zeros(num_segments, 4, dtype=torch.float64)   # seconds, adapt seconds, forwards, backwards
        self.images = torch.zeros(num_segments, dtype=torch.long)

    def add(self, segment: torch.Tensor, call: CallCost) -> None:
        """``segment``: the segment of each image of the batch (run_task's ``segment`` tensor, OOD images too)."""
        per_segment = torch.bincount(segment, minlength=len(self.images))
        share = per_segment.to(torch.float64) / max(len(segment), 1)
        amounts = torch.tensor([call.seconds, call.adapt_seconds, call.forward_images, call.backward_passes],
                               dtype=torch.float64)
        self.sums += share[:, None] * amounts[None, :]
        self.images += per_segment

    def fields(self, k: int, peak_mib: float, peak_kind: str) -> dict:
        """Segment ``k``'s record fields ("cost"); per-image values are NaN for a segment that streamed nothing."""
        images = int(self.images[k])
        seconds, adapt, forwards, backwards = (float(v) / images if images else float("nan") for v in self.sums[k])
        values = (seconds, adapt, seconds - adapt, forwards, backwards, peak_mib)
        return {**dict(zip(COST_FIELDS, values)), "peak_memory_kind": peak_kind, "images": images}


def image_tower_entry(model: torch.nn.Module) -> torch.nn.Module:
    """The layer every image entering ``model``'s image tower (models/clip.py: ``model.clip.visual``) goes through
    first: the patch embedding of a ViT, the first stem convolution of a ResNet. Hooked there rather than on the
    tower itself because some methods run the tower's parts without its forward (TCA, CALIP)."""
    visual = model.clip.visual
    first = getattr(visual, "conv1", None)
    return first if isinstance(first, torch.nn.Module) else visual


class CostMeter:
    """The measuring context of one task: while open, counts the images entering ``tower_entry``, times and counts
    backward passes (by wrapping ``torch.autograd.backward``, which ``Tensor.backward`` calls) and optimizer steps
    (torch's global optimizer step hooks), and tracks the peak memory from its start; everything is restored on
    exit, also on error. ``call()`` measures one call of the method (``CallCost``); ``peak_mib``, ``peak_kind``
    hold the task's peak after exit."""

    def __init__(self, device: torch.device, tower_entry: torch.nn.Module):
        self.device = torch.device(device)
        self.tower_entry = tower_entry
        self.peak_mib: float | None = None
        self.peak_kind: str | None = None
        self._current: CallCost | None = None
        self._depth = 0                 # adaptation regions open (a step may run a backward of its own)
        self._adapt_start = 0.0
        self._exit_stack: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ the context
    def __enter__(self) -> "CostMeter":
        self._peak_reset_ok = reset_peak_memory(self.device)
        stack = contextlib.ExitStack()
        try:
            stack.callback(self.tower_entry.register_forward_pre_hook(self._count_images).remove)
            stack.callback(register_optimizer_step_pre_hook(self._step_begins).remove)
            stack.callback(register_optimizer_step_post_hook(self._step_ends).remove)
            original = torch.autograd.backward
            stack.callback(setattr, torch.autograd, "backward", original)
            torch.autograd.backward = self._timed_backward(original)
        except BaseException:
            stack.close()
            raise
        self._exit_stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self._exit_stack.close()
        self._exit_stack = None
        self.peak_mib, self.peak_kind = peak_memory(self.device, self._peak_reset_ok)

    @contextlib.contextmanager
    def call(self):
        """Measure one call of the method; yields its ``CallCost``, complete once the block ends."""
        cost = CallCost()
        self._current, self._depth = cost, 0
        start = time.perf_counter()
        try:
            yield cost
        finally:
            self._synchronize()
            cost.seconds = time.perf_counter() - start
            self._current = None

    # ------------------------------------------------------------------ hooks
    def _count_images(self, module, args) -> None:
        if self._current is not None and args and isinstance(args[0], torch.Tensor):
            self._current.forward_images += int(args[0].shape[0])

    def _adapt_begins(self) -> None:
        if self._current is not None:
            if self._depth == 0:
                self._synchronize()     # the forward's queued kernels belong to prediction
                self._adapt_start = time.perf_counter()
            self._depth += 1

    def _adapt_ends(self) -> None:
        if self._current is not None and self._depth > 0:
            self._depth -= 1
            if self._depth == 0:
                self._synchronize()
                self._current.adapt_seconds += time.perf_counter() - self._adapt_start

    def _step_begins(self, optimizer, args, kwargs) -> None:
        self._adapt_begins()

    def _step_ends(self, optimizer, args, kwargs) -> None:
        self._adapt_ends()

    def _timed_backward(self, original):
        def backward(*args, **kwargs):
            if self._current is not None:
                self._current.backward_passes += 1
            self._adapt_begins()
            try:
                return original(*args, **kwargs)
            finally:
                self._adapt_ends()
        return backward

    def _synchronize(self) -> None:
        # CUDA runs kernels asynchronously: a wall time ends when the device has done the work queued before it.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------------------------------- peak memory

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak over from now: CUDA's allocator peak, or the process's resident-set high-water mark (writing
    "5" to /proc/self/clear_refs, Linux >= 4.0). False where the reset is not possible."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return _vm_hwm_kib() is not None
    except OSError:
        return False


def peak_memory(device: torch.device, reset_ok: bool) -> tuple[float, str]:
    """(MiB, kind) of the peak since ``reset_peak_memory`` (kinds: ``PEAK_MEMORY_KINDS``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_allocated"
    hwm = _vm_hwm_kib() if reset_ok else None
    if hwm is not None:
        return hwm / 1024, "cpu_peak_rss"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux, bytes on macOS
    return (peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024), "cpu_process_peak_rss"


def _vm_hwm_kib() -> int | None:
    try:
        with open(_STATUS) as f:
            found = re.search(r"^VmHWM:\s*(\d+)\s*kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None
