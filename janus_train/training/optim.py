"""Optimizer and learning-rate schedule for a stage: AdamW, linear warmup, then constant,
linear or cosine decay to a floor over the rest of the stage."""

from __future__ import annotations

import math

import torch
from torch import nn


class AdamWSkipNonFinite(torch.optim.AdamW):
    """AdamW that skips the update when any gradient is NaN/inf (`check_finite`).

    DeepSpeed's ZeRO optimizers detect a non-finite global grad norm themselves and skip
    before reaching this, so under ZeRO-1/2/3 the check is off (it would only add a wait for
    the device); with ZeRO stage 0 this class is the only guard. It sets `overflow`, which
    DeepSpeed reads as a Python bool to count the skipped step and hold the lr schedule: one
    device-to-host read per step, of all gradients' finiteness at once.
    """

    overflow = False

    def __init__(self, params, check_finite: bool = True, **kwargs):
        super().__init__(params, **kwargs)
        self.check_finite = check_finite
        # Set by training/step.py from the step's one fetch (nonfinite_grads() travels in it),
        # so the decision below costs no read of its own; None: read it here.
        self.known_nonfinite: bool | None = None

    @torch.no_grad()
    def nonfinite_grads(self) -> torch.Tensor:
        """1.0 if any gradient holds a NaN/inf, else 0.0 (float64, shape [1], on the device)."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.zeros(1, dtype=torch.float64)
        return (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).to(torch.float64).reshape(1)

    @torch.no_grad()
    def step(self, closure=None):
        known, self.known_nonfinite = self.known_nonfinite, None
        if self.check_finite and (known if known is not None else bool(self.nonfinite_grads())):
            self.overflow = True
            return None
        self.overflow = False
        return super().step(closure)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; norms, biases and embeddings get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A ZeRO-3 parameter created partitioned is flat here: its whole shape is ds_shape.
        if len(getattr(p, "ds_shape", p.shape)) < 2 or "norm" in name or name.endswith("embed_tokens.weight") or name.startswith("gen_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


DECAYS = ("constant", "linear", "cosine")


def lr_factor(warmup_steps: int, total_steps: int = 0, decay: str = "constant", min_lr_ratio: float = 0.0):
    """lr multiplier for update k (0-based): a linear ramp over warmup_steps, then 1 (constant) or
    a linear / half-cosine fall from 1 to min_lr_ratio reached at the stage's last update
    (k = total_steps - 1). A pure function of k, so a resumed stage replays it exactly."""
    if decay not in DECAYS:
        raise ValueError(f"lr decay {decay!r}: expected one of {list(DECAYS)}")

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        span = total_steps - 1 - warmup_steps
        if decay == "constant" or span <= 0:
            return 1.0
        t = min(1.0, (k - warmup_steps) / span)
        shape = 1.0 - t if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return factor


def build_optimizer(model: nn.Module, lr: float, betas, eps: float, weight_decay: float, warmup_steps: int,
                    total_steps: int = 0, decay: str = "constant", min_lr_ratio: float = 0.0, check_finite: bool = True):
    """AdamW over the trainable parameters and its lr schedule. `check_finite`: skip non-finite
    updates here (ZeRO-0; DeepSpeed's ZeRO optimizers do it themselves)."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters in this stage")
    opt = AdamWSkipNonFinite(groups, check_finite=check_finite, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(warmup_steps, total_steps, decay, min_lr_ratio))
    return opt, sched
