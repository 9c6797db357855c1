"""CLIP models: loading (tags, local files, explicit random weights) and the zero-shot classifier."""
from models.clip import ClipOutput, ZeroShotCLIP, build_zero_shot_clip, register_model_configs
from models.weights import WeightsError, load_clip

__all__ = ["ClipOutput", "ZeroShotCLIP", "build_zero_shot_clip", "load_clip", "register_model_configs",
           "WeightsError"]
