"""CLIP models: architectures (open_clip configs, checked before loading), weights (tags, local files, explicit
random weights), the zero-shot classifier, and the one builder. Layers inside: architectures <- weights, clip <-
build."""
from models.architectures import ModelSpec, WeightsError, model_spec, register_model_configs, tokenizer_for
from models.build import AuxiliaryModel, build_auxiliary_clip, build_zero_shot_clip, resolve_model_weights
from models.clip import ClipOutput, ZeroShotCLIP
from models.weights import load_clip

__all__ = ["AuxiliaryModel", "ClipOutput", "ModelSpec", "ZeroShotCLIP", "WeightsError", "build_auxiliary_clip",
           "build_zero_shot_clip", "load_clip", "model_spec", "register_model_configs", "resolve_model_weights",
           "tokenizer_for"]
