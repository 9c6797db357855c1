"""Transcriptions of the pieces of CLIPTTA's library (MarcLafon/cliptta) that its SoTTA and STAMP share, written
from its code for tests/test_sotta.py and tests/test_stamp.py: lib.softmax_entropy (with its 1e-6 shift),
optimizers/sam.py's SAM.step, and the parameters its configure_model frees (every norm layer's affine weight and
bias in the image tower)."""
import torch
import torch.nn as nn


def softmax_entropy(x, eps=1e-6):
    return -((x + eps).softmax(1) * (x + eps).log_softmax(1)).sum(1)


def sam_step(params, base, rho, closure):
    """CLIPTTA's SAM.step: first_step (zero_grad after), closure, second_step (p.data = old_p, base step)."""
    with torch.no_grad():
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params if p.grad is not None]), p=2)
        scale = rho / (grad_norm + 1e-12)
        old = {}
        for p in params:
            if p.grad is None:
                continue
            old[p] = p.data.clone()
            p.add_(1.0 * p.grad * scale.to(p))
    for p in params:
        p.grad = None
    with torch.enable_grad():
        closure()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.data = old[p]
    base.step()


def norm_params(model):
    return [p for m in model.clip.visual.modules()
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) for p in (m.weight, m.bias)]
