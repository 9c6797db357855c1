"""Resolve MODEL.WEIGHTS to an open_clip model without ever hanging on the network or silently
falling back to random weights.

MODEL.WEIGHTS is one of
- an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...): used from the local cache;
  downloaded only when MODEL.ALLOW_DOWNLOAD is set and the hub answers a quick connection check;
- a path to a local checkpoint (.pt, .pth, .bin, .safetensors);
- ``none``: explicitly random weights (tests and demos only).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip
from open_clip.pretrained import download_pretrained, get_pretrained_cfg

from models.architectures import WeightsError, check_arch, check_tokenizer

logger = logging.getLogger(__name__)

_HUB_HOST = ("huggingface.co", 443)
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass
class LoadedClip:
    model: "open_clip.model.CLIP"
    preprocess_cfg: dict
    weights: str           # what was asked for
    weights_source: str    # tag@file, file path, or "random"


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith(_CHECKPOINT_SUFFIXES) or weights.startswith(".")


def _hf_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    try:
        from huggingface_hub import constants
        return constants.HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return os.path.expanduser("~/.cache/huggingface/hub")


@contextlib.contextmanager
def _hub_offline():
    """Make huggingface_hub answer from its cache only (fails in milliseconds instead of retrying)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _cached_tag_file(pretrained_cfg: dict, cache_dir: str | None) -> str | None:
    with _hub_offline():
        try:
            path = download_pretrained(pretrained_cfg, cache_dir=cache_dir or None)
        except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
            return None
    return path if path and os.path.isfile(path) else None


def _tag_missing_message(arch: str, tag: str, cache_dir: str | None, why: str) -> str:
    return (
        f"CLIP weights '{arch}' / pretrained tag '{tag}' are not in the local cache "
        f"({_hf_cache_dir(cache_dir)}) and {why}.\n"
        f"Either run once on a machine with internet access (the tag is then cached), or download "
        f"the checkpoint yourself and pass its path: MODEL.WEIGHTS /path/to/{arch}-{tag}.bin "
        f"(for OpenAI weights also set MODEL.FORCE_QUICK_GELU True or use MODEL.ARCH {arch}-quickgelu)."
    )


@dataclass(frozen=True)
class WeightsSource:
    """Where MODEL.WEIGHTS points, checked without loading anything."""
    requested: str        # MODEL.WEIGHTS as given
    kind: str             # "random", "file" or "tag"
    path: str | None      # the checkpoint file (a tag's cached file); None for random weights or a tag to download


def resolve_weights(arch: str, weights: str, *, cache_dir: str = "", allow_download: bool = True) -> WeightsSource:
    """Check that ``weights`` can be loaded into ``arch`` (see module docstring) without loading them: a file
    exists, a tag is known for the architecture and cached, or may be downloaded and the hub answers; and the
    architecture's tokenizer can be built."""
    check_arch(arch)
    check_tokenizer(arch)
    weights = str(weights)
    if weights.lower() == "none":
        return WeightsSource(weights, "random", None)
    if _looks_like_path(weights) or os.path.exists(weights):
        path = Path(weights).expanduser()
        repo_path = Path(__file__).resolve().parent.parent / path
        if not path.is_absolute() and not path.exists() and repo_path.is_file():
            path = repo_path   # the suite's own configs name committed checkpoints relative to the repository
        if not path.is_file():
            raise WeightsError(f"MODEL.WEIGHTS '{weights}' looks like a checkpoint path but {path.resolve()} "
                               f"does not exist. Pass an existing .pt/.bin/.safetensors file, an open_clip "
                               f"pretrained tag for '{arch}' "
                               f"({open_clip.list_pretrained_tags_by_model(arch)}), or 'none'.")
        if path.stat().st_size == 0:
            raise WeightsError(f"MODEL.WEIGHTS {path.resolve()} is an empty file, not a checkpoint")
        return WeightsSource(weights, "file", str(path.resolve()))
    pretrained_cfg = get_pretrained_cfg(arch, weights)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise WeightsError(f"'{weights}' is neither an existing checkpoint file nor an open_clip pretrained "
                           f"tag of '{arch}'. Tags of '{arch}': {tags or 'none (pass a local file)'}")
    cached = _cached_tag_file(pretrained_cfg, cache_dir)
    if cached is None:
        if not allow_download:
            raise WeightsError(_tag_missing_message(arch, weights, cache_dir, "MODEL.ALLOW_DOWNLOAD is False"))
        if not _hub_reachable():
            raise WeightsError(_tag_missing_message(arch, weights, cache_dir, "the hub cannot be reached"))
    return WeightsSource(weights, "tag", cached)


def _unloadable(path: str, arch: str, err: Exception) -> str:
    """One line saying why a checkpoint file does not load into ``arch``."""
    text = str(err)
    if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
        detail = next((line.strip() for line in text.splitlines() if "size mismatch" in line or "key" in line), "")
        return (f"MODEL.WEIGHTS {path} does not fit MODEL.ARCH {arch} (is it a checkpoint of another "
                f"architecture?): {detail[:200]}")
    return (f"MODEL.WEIGHTS {path} cannot be read as a {arch} checkpoint ({type(err).__name__}; a corrupt or "
            f"truncated file, or not a PyTorch / safetensors checkpoint)")


def load_clip(arch: str, weights: str | WeightsSource, *, precision: str = "fp32", device="cpu",
              cache_dir: str = "", allow_download: bool = True, force_quick_gelu: bool = False) -> LoadedClip:
    """Build an open_clip CLIP for ``arch`` with ``weights`` (MODEL.WEIGHTS, or what resolve_weights made of it)."""
    source = weights if isinstance(weights, WeightsSource) else resolve_weights(
        arch, weights, cache_dir=cache_dir, allow_download=allow_download)
    kwargs = dict(precision=precision, device=device, force_quick_gelu=force_quick_gelu)
    if source.kind == "random":
        logger.warning("MODEL.WEIGHTS none: CLIP '%s' with RANDOM weights, as explicitly requested.", arch)
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=None, **kwargs)
        described = "random"
    elif source.kind == "file":
        # torch warns about the pickle protocol of a file it then fails to read: for a bad file only the one-line
        # refusal is printed; the warnings of a file that loads are passed on.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=source.path, **kwargs)
            except Exception as err:  # noqa: BLE001 - whatever torch.load or load_state_dict raise: the file is wrong
                failure = _unloadable(source.path, arch, err)
            else:
                failure = None
        if failure:
            raise WeightsError(failure)
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        described = source.path
    else:
        tag = source.requested
        if source.path is None:
            logger.info("Downloading CLIP weights %s/%s ...", arch, tag)
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=tag, cache_dir=cache_dir or None,
                                                               **kwargs)
        else:
            with _hub_offline():
                model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=tag,
                                                                   cache_dir=cache_dir or None, **kwargs)
        described = f"{tag}@{source.path or 'downloaded'}"
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return LoadedClip(model=model, preprocess_cfg=preprocess_cfg, weights=source.requested, weights_source=described)
