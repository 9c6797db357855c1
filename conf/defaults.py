"""The one place where the suite's yacs defaults live.

Key names follow the authors' BATCLIP suite (a fork of mariodoebler/test-time-adaptation), so a
YAML written for that suite loads here and means the same thing. Keys that only one method uses
are declared by that method's class (``config_defaults``) and merged in by ``conf.build_defaults``,
so adding a method never requires editing this file.
"""
from yacs.config import CfgNode as CN

CORRUPTIONS_15 = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
]

_C = CN()

# reset_each_shift: back to the source state at every new domain; continual: never reset.
# (gradual, mixed_domains, correlated are added by the settings module when available.)
_C.SETTING = "reset_each_shift"
_C.DATA_DIR = "./data"
# Cache directory for downloaded CLIP weights; "" = open_clip / Hugging Face default cache.
_C.CKPT_DIR = ""
_C.SAVE_DIR = "./output"
# Skip tasks whose records an earlier run of the same config already wrote (SAVE_DIR/.../tasks/); False = start over.
_C.RESUME = True
# Run only these domains of CORRUPTION.TYPE in this process ([] = all); the others' records may come from other
# processes writing to the same run directory. Only for settings whose domains are independent (reset_each_shift).
_C.RUN_DOMAINS = []
# Results go to SAVE_DIR/<dataset>/<method>/<RUN_NAME>; "" = <arch>_<weights>_<setting>_seed<seed>_<config hash>.
_C.RUN_NAME = ""
_C.LOG_DEST = "log.txt"
_C.LOG_TIME = ""
_C.PRINT_EVERY = -1
_C.RNG_SEED = 1
_C.DETERMINISM = False
# Anchor-suite key: run the generic forward/backward under CUDA autocast. Methods whose reference
# always autocasts (BATCLIP) have their own key. Ignored on CPU.
_C.MIXED_PRECISION = False
_C.DESC = ""
# "auto" = cuda when available, else cpu.
_C.DEVICE = "auto"

_C.MODEL = CN()
_C.MODEL.ARCH = "ViT-B-16"
# An open_clip pretrained tag (e.g. openai), a local checkpoint path (.pt/.bin/.safetensors),
# or "none" for explicitly random weights (tests only).
_C.MODEL.WEIGHTS = "openai"
# Anchor-suite key; this suite is CLIP-only, so it must stay True.
_C.MODEL.USE_CLIP = True
# Anchor-suite alias of WEIGHTS for a local file; used when WEIGHTS is left at a tag.
_C.MODEL.CKPT_PATH = ""
_C.MODEL.ADAPTATION = "source"
_C.MODEL.EPISODIC = False
_C.MODEL.RESET_AFTER_NUM_UPDATES = 0
# Download a pretrained tag that is not cached yet (only after a quick connectivity check).
_C.MODEL.ALLOW_DOWNLOAD = True
# open_clip's quick_gelu: set for OpenAI weights loaded from a local file into a non -quickgelu arch.
_C.MODEL.FORCE_QUICK_GELU = False
# Python modules (dotted names or .py paths) that register extra methods or data sets.
_C.MODEL.EXTRA_MODULES = []

_C.CORRUPTION = CN()
_C.CORRUPTION.DATASET = "cifar10_c"
_C.CORRUPTION.TYPE = list(CORRUPTIONS_15)
_C.CORRUPTION.SEVERITY = [5]
# Images per domain; -1 = all (ImageNet-C: all of the selected list, see IMAGENET_C_LIST).
_C.CORRUPTION.NUM_EX = -1
# ImageNet-C: "robustbench_5000" (the paper's and RobustBench's canonical list) or "all" (50,000).
_C.CORRUPTION.IMAGENET_C_LIST = "robustbench_5000"

_C.OPTIM = CN()
_C.OPTIM.STEPS = 1
_C.OPTIM.LR = 1e-3
_C.OPTIM.METHOD = "Adam"   # Adam, AdamW, SGD
_C.OPTIM.BETA = 0.9
_C.OPTIM.MOMENTUM = 0.9
_C.OPTIM.DAMPENING = 0.0
_C.OPTIM.NESTEROV = True
_C.OPTIM.WD = 0.0

_C.CLIP = CN()
# custom: CLIP.PROMPT_TEMPLATE; ensemble: the data set's template list (18 CIFAR / 80 ImageNet).
_C.CLIP.PROMPT_MODE = "custom"
_C.CLIP.PROMPT_TEMPLATE = ["a photo of a {}."]
# Precision of the restored weights: fp32 (default), fp16 or bf16 (CUDA only, inference only).
_C.CLIP.PRECISION = "fp32"
# Anchor-suite key: freeze the text encoder (text features computed once). Methods that adapt the
# text tower (BATCLIP) set it False.
_C.CLIP.FREEZE_TEXT_ENCODER = True
# Exact speed-up: run the causal text transformer on tokens cut to the longest prompt.
_C.CLIP.TRUNCATE_TEXT = True

_C.TEST = CN()
_C.TEST.NUM_WORKERS = 4
_C.TEST.BATCH_SIZE = 128
_C.TEST.WINDOW_LENGTH = 1
_C.TEST.N_AUGMENTATIONS = 32
# Correlated settings: 0 = sort by label, > 0 = concentration of the Dirichlet class shares.
_C.TEST.DELTA_DIRICHLET = 0.0
# Who splits the classes for DELTA_DIRICHLET > 0: "anchor" (the anchor suite's sort_by_dirichlet, as for the
# *_correlated settings there) or "stata" (StatA's online sampler; the StatA paper's gamma).
_C.TEST.CORRELATION_SAMPLER = "anchor"
_C.TEST.DEBUG = False

_C.CUDNN = CN()
_C.CUDNN.BENCHMARK = True


def base_defaults() -> CN:
    """A fresh copy of the suite-wide defaults (without method-specific nodes)."""
    return _C.clone()
