"""What every test-time adaptation method shares.

A method wraps the ZeroShotCLIP model. Its life has two steps: construction (``__init__``: plain attributes from
the config; nothing is called that a subclass overrides) and ``setup()`` (which parameters adapt, the optimizer,
the gradient scaler, method state, and the snapshot that ``reset()`` restores). ``methods.build_method`` does both.

``forward(x)`` returns the logits reported for the batch, as the method's declared ``protocol`` says. The base
class owns: choosing and freeing parameters, the optimizer from OPTIM, OPTIM.STEPS updates per batch (or per
image), episodic reset, and ``reset()``, which restores model, optimizer, gradient scaler and every other piece of
method state (everything registered on the method as a module, parameter or buffer) exactly.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
import torch.nn as nn

from conf import ConfigError

logger = logging.getLogger(__name__)

# How a method reports the logits of a test batch (a declared class attribute, ``protocol``):
PREDICT_THEN_ADAPT = "predict_then_adapt"   # the forward pass before the batch's update (TENT, BATCLIP, ...)
# computed before the batch's update, but not the plain forward pass: a teacher's prediction, an augmentation
# ensemble, a correction by a statistic of the batch (CoTTA, ROID, CMF)
PREDICT_BEFORE_UPDATE = "predict_before_update"
ADAPT_THEN_PREDICT = "adapt_then_predict"   # after adapting on the batch, or on each image's views (WATT, TPT)
TRAINING_FREE = "training_free"             # nothing is trained; one pass per batch (zero-shot, VTE, StatA)
PROTOCOLS = (PREDICT_THEN_ADAPT, PREDICT_BEFORE_UPDATE, ADAPT_THEN_PREDICT, TRAINING_FREE)


def backbone_refusal(method_name: str, cfg, model_spec, why: str) -> ConfigError:
    """The one-line refusal of an architecture a method cannot serve (``check_setup``; docs/architecture.md,
    "Backbones"): the method, MODEL.ARCH, its family and towers (models.ModelSpec), and why."""
    return ConfigError(f"{method_name} cannot serve MODEL.ARCH={cfg.MODEL.ARCH} (family {model_spec.family}: "
                       f"{model_spec.image_tower} image tower, {model_spec.text_tower} text tower): {why}")


class TTAMethod(nn.Module):
    """The base of every method. The hooks a method may override, all declared here:

    - before any model loads: ``check_setup``, ``config_warnings``;
    - set-up (``setup``): ``configure_model``, ``collect_params``, ``setup_optimizer``, ``setup_scaler``,
      ``setup_state``;
    - per batch: ``forward_and_adapt`` (default: one step on ``loss``), ``loss``, ``split_images``,
      ``episode_logits``, ``autocast``;
    - state: ``reset_episode``, ``reset_extra_state``, ``_mutable_state``, ``begin_stream`` (after every reset);
    - reporting: ``cost_info``, ``num_trainable_params``.

    A frame adds the hooks of its own kind (methods/frames.py: ``NormAffineTTA.adapted_norm_layers``)."""
    # Method-specific config: {"NODE": {"KEY": default or conf.Option, ...}}, merged into the schema by
    # harness/build.py. A subclass reads its parents' nodes too (methods.registry.own_nodes).
    config_defaults: dict = {}
    method_name = "base"
    # See PROTOCOLS. A training-free method runs ``forward_and_adapt`` once per batch, whatever OPTIM.STEPS and
    # MODEL.EPISODIC say (the run plan warns when they are set).
    protocol = PREDICT_THEN_ADAPT
    # The node of a method's own MIXED_PRECISION key, if it has one (see ``uses_mixed_precision``).
    mixed_precision_node: str | None = None
    # eps of Adam/AdamW (torch's default; a method whose reference sets another overrides it).
    adam_eps = 1e-8
    # What one episode is, for MODEL.EPISODIC and the OPTIM.STEPS loop: "batch", or "image" (every test image on
    # its own, from the units ``split_images`` makes of a batch; TPT).
    episode = "batch"
    # Further CLIPs the method needs beside the one it adapts (RLCF's reward model): {constructor keyword: (the key
    # of its MODEL.ARCH, the key of its MODEL.WEIGHTS)}. The run plan checks their weights before any model loads;
    # harness.run builds each with the one model builder, for the run's class names and templates, and passes it
    # to the constructor by that keyword; the provenance and the run's identity record it.
    auxiliary_models: dict[str, tuple[str, str]] = {}
    # Source training data the method reads before adaptation (EATA's Fisher information): the keys that must all
    # be > 0 for it to be read, e.g. ("EATA.FISHER_ALPHA", "SOURCE.NUM_SAMPLES"); () never. Such a method declares
    # the SOURCE node (NUM_SAMPLES, PERCENTAGE, NUM_WORKERS). The run plan checks the source files of the data set
    # before any model loads (datasets/source_sets.py) and puts them in the run's identity; harness.run passes the
    # images, transformed as the test images, batched by TEST.BATCH_SIZE, as ``__init__(..., source_loader=...)``.
    source_data: tuple[str, ...] = ()
    # Open-set streams (harness/open_set.py): the name of the method's own out-of-distribution score, which
    # ``ood_scores`` computes and OPEN_SET.SCORE method reads; None where the method has none (then refused).
    own_ood_score: str | None = None

    def __init__(self, cfg, model: nn.Module, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.num_classes = num_classes
        self.steps = cfg.OPTIM.STEPS
        self.episodic = cfg.MODEL.EPISODIC
        self.reset_after_num_updates = cfg.MODEL.RESET_AFTER_NUM_UPDATES
        self.performed_updates = 0
        # Steps the gradient scaler skipped (inf/NaN gradients under fp16), over the whole run; diagnostics only,
        # recorded in the results, never reset.
        self.scaler_skipped_steps = 0

    # Checks of several options, the architecture (``models.ModelSpec``) or the class names; the run plan calls it
    # before any model loads. Single options declare their accepted values in ``config_defaults`` instead.
    @classmethod
    def check_setup(cls, cfg, model_spec, class_names) -> None:
        """Refuse a config this method cannot run, before any model loads: raise conf.ConfigError with one line."""

    def begin_stream(self, num_images: int) -> None:
        """Called by the harness after every reset, before the first batch, with the number of images the method
        will be given until the next reset (OnZeta's schedule divides by it, as its reference divides by the test
        set's size). Default: nothing."""

    @classmethod
    def config_warnings(cls, cfg) -> list[str]:
        """Keys the method is given but does not use as given (logged and recorded with the results)."""
        return []

    def setup(self) -> "TTAMethod":
        """Choose and free the adapted parameters, build optimizer and scaler, register method state, and take
        the snapshot that ``reset()`` restores."""
        self.configure_model()
        self.params, self.param_names = self.collect_params()
        self.optimizer = self.setup_optimizer() if self.params else None
        self.scaler = self.setup_scaler()
        self.setup_state()
        self._snapshot = self._take_snapshot()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ the per-batch protocol
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.protocol == TRAINING_FREE:
            return self.forward_and_adapt(x)
        if self.episode == "image":
            return torch.cat([self._run_episode(unit) for unit in self.split_images(x)])
        return self._run_episode(x)

    def _run_episode(self, x):
        if self.episodic:
            self.reset_episode()
        outputs = None
        for _ in range(self.steps):
            # As in the anchor suite, the logits of the last step's forward are reported; with the default single
            # step they are the pre-update predictions (PREDICT_THEN_ADAPT).
            outputs = self.forward_and_adapt(x)
            self.performed_updates += 1
            if self.reset_after_num_updates > 0 and self.performed_updates % self.reset_after_num_updates == 0:
                self.reset_episode()
        return self.episode_logits(x, outputs)

    # Default: one forward pass of the batch, one optimizer step on ``loss`` of its logits, the logits before the
    # update reported (TENT, RPL).
    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """One step on a batch (or on one image's unit, for episode "image"); returns that step's logits."""
        with self.autocast():
            logits = self.model(x)
        loss = self.loss(logits.float())
        self.optimizer_step(loss)
        return logits.detach().float()

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The loss the default ``forward_and_adapt`` minimises, of a batch's fp32 logits (B, C)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither forward_and_adapt nor loss")

    def episode_logits(self, x, outputs):
        """The logits reported for an episode, after its OPTIM.STEPS steps; default: the last step's logits."""
        return outputs

    def split_images(self, x: torch.Tensor) -> list:
        """For episode "image": the per-image units of a batch (e.g. each image's views, encoded batch-wide)."""
        return list(x.split(1))

    def reset_episode(self) -> None:
        """What MODEL.EPISODIC restores before every episode; default: everything (``reset``)."""
        self.reset()

    # ------------------------------------------------------------------ parameters and optimizer
    def configure_model(self) -> None:
        """Freeze what does not adapt and free what does; default: nothing adapts."""
        self.model.eval()
        self.model.requires_grad_(False)

    def collect_params(self) -> tuple[list[nn.Parameter], list[str]]:
        """The adapted parameters and their names; default: every one left trainable by ``configure_model``."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return [p for _, p in named], [n for n, _ in named]

    def setup_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of the adapted parameters; default: the one OPTIM describes (Adam, AdamW or SGD)."""
        o = self.cfg.OPTIM
        if o.METHOD == "Adam":
            return torch.optim.Adam(self.params, lr=o.LR, betas=(o.BETA, 0.999), weight_decay=o.WD, eps=self.adam_eps)
        if o.METHOD == "AdamW":
            return torch.optim.AdamW(self.params, lr=o.LR, betas=(o.BETA, 0.999), weight_decay=o.WD,
                                     eps=self.adam_eps)
        return torch.optim.SGD(self.params, lr=o.LR, momentum=o.MOMENTUM, dampening=o.DAMPENING,
                               weight_decay=o.WD, nesterov=o.NESTEROV)   # OPTIM.METHOD's choices: Adam, AdamW, SGD

    def setup_scaler(self):
        """A torch.amp.GradScaler when the method trains under fp16 autocast (MIXED_PRECISION on CUDA), else None."""
        if self.cfg.MIXED_PRECISION and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    def setup_state(self) -> None:
        """Register method state (teachers, buffers) that needs the parameters; reset() covers it (snapshot after)."""

    def uses_mixed_precision(self) -> bool:
        """fp16 autocast on CUDA: MIXED_PRECISION (anchor-suite behaviour), or the method's own
        <mixed_precision_node>.MIXED_PRECISION where its reference always runs under autocast (TPT, ZERO, DPE);
        never on the CPU."""
        own = self.mixed_precision_node is not None and self.cfg[self.mixed_precision_node].MIXED_PRECISION
        return bool(self.cfg.MIXED_PRECISION or own) and self.device.type == "cuda"

    def autocast(self):
        """The context the method computes in: fp16 autocast when ``uses_mixed_precision``, else a no-op."""
        if self.uses_mixed_precision():
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def precision_info(self) -> dict:
        """The precision this method computes in (recorded in the results' provenance)."""
        context = self.autocast()
        weights = {str(p.dtype).replace("torch.", "") for p in self.model.parameters()}
        return {"weights": sorted(weights),
                "autocast": str(context.fast_dtype).replace("torch.", "") if isinstance(context, torch.autocast)
                else None,
                "grad_scaler_init": self.scaler.get_scale() if self.scaler is not None else None}

    def ood_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The method's own OOD score of each image of the batch just reported (``logits``: what ``forward``
        returned for it), higher = more in-distribution. Only for a method whose ``own_ood_score`` names one; it
        may use state its forward kept for that batch. The stream's labels and OOD flags never reach a method."""
        raise NotImplementedError(f"{self.method_name} has no own OOD score (own_ood_score is None)")

    def cost_info(self) -> dict | None:
        """The method's cost (views, forward and backward passes per image or batch) for the results; None: none."""
        return None

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """zero_grad, backward and step, through the gradient scaler when there is one."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < scale:     # the scaler backs off exactly when it skipped the step
                self.scaler_skipped_steps += 1
        else:
            loss.backward()
            self.optimizer.step()

    def num_trainable_params(self) -> int:
        """How many parameter entries adapt (recorded in the results); default: those of ``collect_params``."""
        return sum(p.numel() for p in self.params)

    # ------------------------------------------------------------------ reset
    # Frozen model weights are left out, so an episodic reset does not copy the whole CLIP; a method that edits
    # frozen weights in place must override this.
    def _mutable_state(self) -> dict:
        """What adaptation can change: the model's trainable parameters and buffers, and all other method state."""
        frozen = {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def _take_snapshot(self) -> dict:
        return {
            "module": copy.deepcopy(self._mutable_state()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
            "scaler": copy.deepcopy(self.scaler.state_dict()) if self.scaler else None,
        }

    def _restore_snapshot(self, parts=("module", "optimizer", "scaler")) -> None:
        """Load parts of the reset snapshot: "module" (the method state), "optimizer", "scaler" (where there is one).
        A subclass's partial reset (TPT's optimizer, DPE's queues) goes through here, never the snapshot itself."""
        snap = self._snapshot
        if "module" in parts:
            missing, unexpected = self.load_state_dict(snap["module"], strict=False)
            assert not unexpected, unexpected
        if "optimizer" in parts and self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        if "scaler" in parts and self.scaler is not None:
            self.scaler.load_state_dict(copy.deepcopy(snap["scaler"]))

    def reset(self) -> None:
        """Back to the source state: model, optimizer, scaler and method state, exactly."""
        self._restore_snapshot()
        self.performed_updates = 0
        if hasattr(self.model, "invalidate_text_cache"):
            self.model.invalidate_text_cache()
        self.reset_extra_state()

    def reset_extra_state(self) -> None:
        """Reset method state that is not a parameter or buffer (python lists, counters, generators)."""

    def restore_source_parameters(self) -> None:
        """Source values of the adapted parameters and a fresh optimizer and gradient scaler, from the reset
        snapshot: a reference's reload of model and optimizer before every batch (CLIPArTT, WATT), without
        ``reset()``'s other work."""
        with torch.no_grad():
            for p, name in zip(self.params, self.param_names):
                p.copy_(self._snapshot["module"][f"model.{name}"])
        self._restore_snapshot(("optimizer", "scaler"))
