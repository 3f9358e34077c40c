"""Optimizer and learning-rate schedule for a stage: AdamW, linear warmup, then constant."""

from __future__ import annotations

import torch
from torch import nn


class AdamWSkipNonFinite(torch.optim.AdamW):
    """AdamW that skips the update when any gradient is NaN/inf.

    DeepSpeed's ZeRO optimizers detect a non-finite global grad norm themselves and skip
    before reaching this; with ZeRO stage 0 this class is the only guard. It sets `overflow`,
    which DeepSpeed reads to count the skipped step and hold the lr schedule.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
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
        if p.dim() < 2 or "norm" in name or name.endswith("embed_tokens.weight") or name.startswith("gen_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_constant(warmup_steps: int):
    """lr multiplier for update k (0-based): linear ramp over warmup_steps, then 1."""

    def factor(k: int) -> float:
        return min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return factor


def build_optimizer(model: nn.Module, lr: float, betas, eps: float, weight_decay: float, warmup_steps: int):
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters in this stage")
    opt = AdamWSkipNonFinite(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(warmup_steps))
    return opt, sched
