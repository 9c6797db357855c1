"""The suite-wide config keys, their defaults and the values they accept.

Key names follow the authors' BATCLIP suite (a fork of mariodoebler/test-time-adaptation), so a YAML written for
that suite loads here and means the same thing. Keys that only one method uses are declared by that method's class
(``config_defaults``, in the same format), so adding a method never requires editing this file. A plain value is
a default that accepts any value of its type; ``Option`` adds the accepted values (conf/options.py)."""
from __future__ import annotations

import re

from conf.options import Option

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

SUITE_OPTIONS = {
    # reset_each_shift: back to the source state at every new domain; continual, gradual, mixed_domains,
    # correlated and <setting>_correlated: see harness/settings.py.
    "SETTING": "reset_each_shift",
    "DATA_DIR": "./data",
    # Cache directory for downloaded CLIP weights; "" = open_clip / Hugging Face default cache.
    "CKPT_DIR": "",
    "SAVE_DIR": "./output",
    # Skip tasks whose records an earlier run of the same config already wrote (SAVE_DIR/.../tasks/); False =
    # start over.
    "RESUME": True,
    # Run only these domains of CORRUPTION.TYPE in this process ([] = all); the others' records may come from
    # other processes writing to the same run directory. Only for settings whose domains are independent.
    "RUN_DOMAINS": [],
    # Results go to SAVE_DIR/<dataset>/<method>/<RUN_NAME>; "" = <arch>_<weights>_<setting>_seed<seed>_<hash>, the
    # weights' tag or file stem left out where it is the arch's name (tiny-clip-shapes_reset_each_shift_seed1_<hash>).
    "RUN_NAME": "",
    "LOG_DEST": Option("log.txt", valid=lambda name: bool(name) and "/" not in name,
                       expected="a file name inside the run folder"),
    "LOG_TIME": "",
    "PRINT_EVERY": -1,
    # np.random.seed takes 0 .. 2**32 - 1.
    "RNG_SEED": Option(1, within="[0, 4294967295]"),
    "DETERMINISM": False,
    # Anchor-suite key: run the generic forward/backward under CUDA autocast. Methods whose reference always
    # autocasts (BATCLIP, TPT) have their own key. Ignored on the CPU.
    "MIXED_PRECISION": False,
    "DESC": "",
    # "auto" = cuda when available, else cpu.
    "DEVICE": Option("auto", valid=lambda d: bool(_DEVICE.match(d)),
                     expected="'auto', 'cpu', 'cuda' or 'cuda:<index>'"),
    "MODEL": {
        "ARCH": "ViT-B-16",
        # An open_clip pretrained tag (e.g. openai), a local checkpoint path (.pt/.bin/.safetensors), or "none" for
        # explicitly random weights (tests only).
        "WEIGHTS": "openai",
        # Anchor-suite key; this suite is CLIP-only, so it must stay True.
        "USE_CLIP": Option(True, valid=lambda v: v is True, expected="True (this suite evaluates CLIP models only)"),
        # The authors' suite's key for a non-CLIP checkpoint (resnet26_gn) or TPT's CoOp-learned context; neither
        # exists here, so a value is refused (CLIP weights from a file: MODEL.WEIGHTS <path>).
        "CKPT_PATH": Option("", valid=lambda path: path == "",
                            expected="'' (in the authors' suite a non-CLIP checkpoint or TPT's CoOp context, "
                                     "neither of which exists here; give CLIP weights as MODEL.WEIGHTS <file>)"),
        "ADAPTATION": "source",
        "EPISODIC": False,
        "RESET_AFTER_NUM_UPDATES": Option(0, within="[0, inf)"),
        # Download a pretrained tag that is not cached yet (only after a quick connectivity check).
        "ALLOW_DOWNLOAD": True,
        # open_clip's quick_gelu: set for OpenAI weights loaded from a local file into a non -quickgelu arch.
        "FORCE_QUICK_GELU": False,
        # What a method's softmax-based quantities (probabilities, entropies, confidences) are on a SigLIP model, whose
        # logits are logit_scale.exp() * cos + logit_bias (sigmoid loss): "softmax" = the softmax over the classes of
        # those logits, in which the bias cancels (every quantity is that of the scaled cosines, as on a CLIP).
        # "sigmoid" (per-class sigmoids normalised over the classes) is not implemented. Left out of the run's
        # identity at "softmax" (harness/identity.py); docs/architecture.md, "Backbones".
        "SIGLIP_PROBABILITIES": Option("softmax", valid=lambda v: v == "softmax",
                                       expected="'softmax' (the softmax of the biased logits, where the bias cancels; "
                                                "'sigmoid' is not implemented)"),
        # The one plug-in key: Python modules (dotted names or .py paths) that register methods, data sets or
        # settings of their own.
        "EXTRA_MODULES": [],
    },
    "CORRUPTION": {
        "DATASET": "cifar10_c",
        # The authors' default: the 15 ImageNet-C corruptions (kept equal to datasets.corruptions.CORRUPTIONS by
        # a test).
        "TYPE": ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                 "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                 "jpeg_compression"],
        "SEVERITY": [5],
        # Images per domain; -1 = all (ImageNet-C: all of the selected list, see IMAGENET_C_LIST).
        "NUM_EX": Option(-1, valid=lambda n: n == -1 or n >= 1, expected="-1 (all images) or a count >= 1"),
        # Which NUM_EX images: "authors" = the seeded random sample the authors' suite's loaders draw (Python's
        # random seeded with RNG_SEED shuffles the domain's images in their loader's order, then samples NUM_EX),
        # so their YAMLs and command lines select the same images here; "first_n" = RobustBench's first NUM_EX.
        "SUBSET": Option("authors", choices=("authors", "first_n")),
        # ImageNet-C: "robustbench_5000" (the paper's and RobustBench's canonical list), "all" (50,000) or a list
        # file.
        "IMAGENET_C_LIST": "robustbench_5000",
    },
    "OPTIM": {
        "STEPS": Option(1, within="[1, inf)"),
        "LR": Option(1e-3, within="[0, inf)"),
        "METHOD": Option("Adam", choices=("Adam", "AdamW", "SGD")),
        "BETA": Option(0.9, within="[0, 1)"),
        "MOMENTUM": Option(0.9, within="[0, inf)"),
        "DAMPENING": 0.0,
        "NESTEROV": True,
        "WD": Option(0.0, within="[0, inf)"),
    },
    "CLIP": {
        # custom: CLIP.PROMPT_TEMPLATE; ensemble: CLIP's template list for the data set (18 CIFAR / 80 ImageNet);
        # coop: CoOp's per-data-set template; tda: the per-data-set templates of TDA's code (datasets/base.py).
        "PROMPT_MODE": Option("custom", choices=("custom", "ensemble", "coop", "tda")),
        "PROMPT_TEMPLATE": Option(["a photo of a {}."],
                                  valid=lambda ts: len(ts) > 0 and all(str(t).count("{}") == 1 for t in ts),
                                  expected="a non-empty list of templates, each with one '{}' for the class name"),
        # Precision of the restored weights: fp32 (default), fp16 or bf16 (CUDA only, inference only).
        "PRECISION": Option("fp32", choices=("fp32", "fp16", "bf16")),
        # Anchor-suite key: freeze the text encoder (text features computed once). Methods that adapt the text
        # tower (BATCLIP) set it False.
        "FREEZE_TEXT_ENCODER": True,
        # Exact speed-up: run the causal text transformer on tokens cut to the longest prompt.
        "TRUNCATE_TEXT": True,
    },
    "TEST": {
        "NUM_WORKERS": Option(4, within="[0, inf)"),
        "BATCH_SIZE": Option(128, within="[1, inf)"),
        "WINDOW_LENGTH": 1,
        "N_AUGMENTATIONS": Option(32, within="[1, inf)"),
        # Correlated settings: 0 = sort by label, > 0 = concentration of the Dirichlet class shares.
        "DELTA_DIRICHLET": Option(0.0, within="[0, inf)"),
        # Who splits the classes for DELTA_DIRICHLET > 0: "anchor" (the anchor suite's sort_by_dirichlet, as for
        # the *_correlated settings there) or "stata" (StatA's online sampler; the StatA paper's gamma).
        "CORRELATION_SAMPLER": Option("anchor", choices=("anchor", "stata")),
        # Which images form each batch: "authors", the order of the authors' loaders for the same RNG_SEED (Python's
        # random shuffles each loader's sample list, their label sort or Dirichlet sort follows: the batches of the
        # paper's runs); "suite", this suite's own seeded permutation. docs/comparison.md#stream-order.
        "STREAM_ORDER": Option("authors", choices=("authors", "suite")),
        # Seed of the stream order alone (both STREAM_ORDERs and the OOD mixing; the images chosen and the method's
        # randomness stay on RNG_SEED): -1 = RNG_SEED, today's streams. scripts/compare.py --orders K sets 1..K.
        "ORDER_SEED": Option(-1, within="[-1, 4294967295]"),
        # Forgetting (harness/forgetting.py): after the stream, the frozen end state's accuracy on the data set's
        # clean domain "none" against the reset state's. Only for settings with one stream (no reset after the
        # first domain). At False the key stays out of the run's identity (harness/identity.py).
        "FORGETTING": False,
        # StatA's effective classes per batch: > 0 = every batch of TEST.BATCH_SIZE images drawn from that many
        # classes (STREAM_ORDER suite, seeded by the order seed; harness.stream.classes_per_batch_order); 0 = off,
        # left out of the run's identity.
        "CLASSES_PER_BATCH": Option(0, within="[0, inf)"),
        "DEBUG": False,
    },
    "CUDNN": {
        "BENCHMARK": True,
    },
    # Open-set streams (harness/open_set.py, docs/open_set.md): OOD images mixed into every domain's stream. At
    # these defaults (a closed-set run) the node stays out of the run's identity (harness/identity.py).
    "OPEN_SET": {
        # The OOD set (datasets/ood_sets.py: svhn, svhn_c, places, ninco, textures, ..., or any benchmark data
        # set by its name); "" = a closed-set run.
        "OOD_DATASET": "",
        # Its domain beside each in-distribution domain: "same" (the ID domain and severity, as CLIPTTA reads
        # SVHN-C beside CIFAR-10-C; a set without domains is read whole) or one of its domains (e.g. none).
        "OOD_DOMAIN": "same",
        "OOD_SEVERITY": Option(0, within="[0, 5]"),        # 0: the in-distribution segment's severity
        "RATIO": Option(1.0, within="(0, inf)"),           # OOD images per in-distribution image
        # Where they go: uniform (random positions), bursts (runs of BURST_LENGTH), per_batch (CLIPTTA's: each
        # batch is TEST.BATCH_SIZE ID images then round(RATIO * TEST.BATCH_SIZE) OOD images).
        "MIX": Option("uniform", choices=("uniform", "bursts", "per_batch")),
        "BURST_LENGTH": Option(64, within="[1, inf)"),
        # The score the metrics rank by (higher = in-distribution): msp (max softmax of logits / T), max_logit,
        # energy (T logsumexp(logits / T)), or method (the method's own, TTAMethod.ood_scores).
        "SCORE": Option("msp", choices=("msp", "max_logit", "energy", "method")),
        # T: 100 gives CLIPTTA's max softmax of the raw cosines for logits 100 * cos.
        "SCORE_TEMPERATURE": Option(1.0, within="(0, inf)"),
    },
}

# Keys of the authors' suite (sarthaxxxxx/BATCLIP and the suite it forks) that this schema does not have, and
# why: an unknown-key error for one of them says so instead of only listing near names.
FOREIGN_KEYS = {
    "CLIP.PROMPT_PATH": "CuPL prompt files (CLIP.PROMPT_MODE cupl / all_prompts) are not implemented here",
}
# Config nodes of methods the authors' suite has and this one does not.
FOREIGN_METHOD_NODES = ("GTTA", "RMT", "SANTA")

# Defaults of the authors' suites that differ from this suite's and change what a run computes: a config file
# that leaves such a key unset ran with their default there and runs with ours here, so the run says so.
AUTHORS_DEFAULTS = {
    "CLIP.PRECISION": ("fp16", "their source and VTE runs then use fp16 weights; set CLIP.PRECISION fp16 (CUDA) to "
                               "match"),
}

# Keys of the authors' suite that do nothing here: they load (so their YAML files run), and setting one to another
# value than its default logs a warning.
INERT_KEYS = {
    "LOG_TIME": "the log is always SAVE_DIR/<dataset>/<method>/<run>/LOG_DEST",
    "PRINT_EVERY": "per-domain results are logged when each domain finishes",
    "TEST.WINDOW_LENGTH": "no method of this suite uses a sliding window",
    "TEST.DEBUG": "there is no debug mode",
}
