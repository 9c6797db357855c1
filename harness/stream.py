"""The stream of test data for one task: segments concatenated (or mixed), in a fixed pseudo-random order
from RNG_SEED that is the same for every method, batched by a DataLoader whose workers apply the per-image
transform (nothing up-sampled is held in memory)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class SegmentStream(Dataset):
    """(image, label, segment index) for every sample of the task's segments, in ``order``."""

    def __init__(self, parts: list[Dataset], order: np.ndarray):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def locate(self, i: int) -> tuple[int, int]:
        flat = int(self.order[i])
        segment = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        return segment, flat - int(self.offsets[segment])

    def __getitem__(self, i: int):
        segment, j = self.locate(i)
        image, label = self.parts[segment][j]
        return image, label, segment


def stream_order(sizes: list[int], order: str, seed: int, task_index: int = 0) -> np.ndarray:
    """Sequential: each segment shuffled on its own, segments one after another. Shuffled: all samples of all
    segments in one permutation. Seeded by RNG_SEED only (and, for "shuffled", by nothing else either), so every
    method sees the identical stream."""
    rng_seed = [int(seed) & 0xFFFFFFFF, 0x5EED]
    offsets = np.cumsum([0] + sizes)
    if order == "sequential":
        return np.concatenate([offsets[k] + np.random.default_rng(rng_seed).permutation(n)
                               for k, n in enumerate(sizes)]) if sizes else np.zeros(0, dtype=np.int64)
    if order == "shuffled":
        return np.random.default_rng(rng_seed + [task_index]).permutation(int(offsets[-1]))
    if order == "as_is":
        return np.arange(int(offsets[-1]))
    raise ValueError(f"unknown stream order '{order}'")


def make_loader(stream: Dataset, cfg, device: torch.device) -> DataLoader:
    workers = int(cfg.TEST.NUM_WORKERS)
    return DataLoader(stream, batch_size=int(cfg.TEST.BATCH_SIZE), shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=False,
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
