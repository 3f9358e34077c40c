"""Small modules the model families share: MLP projectors (the aligners) and the per-token
cross-entropy of a vocabulary head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPProjector(nn.Module):
    """Linear, then (GELU, Linear) x (depth - 1): the und and gen aligners."""

    def __init__(self, in_dim: int, out_dim: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(in_dim, out_dim)] + [nn.Linear(out_dim, out_dim) for _ in range(depth - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = layer(F.gelu(x))
        return x


def dense_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 CE per position from the head's full logits."""
    return F.cross_entropy(head(hidden).float(), labels, reduction="none")


def per_token_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 CE per position. A head may provide its own `per_token_cross_entropy` (a
    vocab-parallel head computes it without gathering the full vocabulary; the chunked loss
    recomputes it piecewise)."""
    custom = getattr(head, "per_token_cross_entropy", None)
    if custom is not None:
        return custom(hidden, labels)
    return dense_cross_entropy(head, hidden, labels)
