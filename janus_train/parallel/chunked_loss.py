"""Chunked, recomputed cross-entropy for the vocabulary heads: same loss, far less memory.

A head's CE over T supervised positions normally keeps the fp32 log-softmax [T, V] for
backward and, during backward, two more [T, V] fp32 tensors (the incoming and outgoing
gradients). For Janus-Pro's lm_head (V = 102400) at 4096 supervised positions that is 1.6 GiB
kept plus ~3.9 GiB transient per micro-batch, the largest activation item in the memory plan.

    apply_chunked_head_loss(model, chunk_tokens=1024)

splits the positions into chunks and runs each chunk's projection + CE under activation
checkpointing: forward keeps only the chunk's input (already kept anyway), backward recomputes
one chunk's logits at a time. Peak head memory becomes ~chunk_tokens x V x 14 bytes; the price
is one more forward of the head projection (+1/3 of the head's FLOPs). Values and gradients are
unchanged (tests/parallel/test_chunked_loss.py).

It works through the model's hook (a head's `per_token_cross_entropy`), so it composes with
tensor parallelism: under TP the wrapped function is the vocab-parallel CE, whose collectives
are replayed in the recompute on every TP rank alike. Apply it after `apply_tensor_parallel`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from janus_train.models.heads import dense_cross_entropy

_MARK = "_chunked_ce_tokens"


def chunked_cross_entropy(
    ce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Per-token CE of `ce(hidden, labels)`, computed `chunk_tokens` rows at a time and
    recomputed in backward."""
    if hidden.shape[0] <= chunk_tokens or not torch.is_grad_enabled():
        return ce(hidden, labels)
    parts = [
        checkpoint(ce, h, y, use_reentrant=False, determinism_check="none")
        for h, y in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens))
    ]
    return torch.cat(parts)


def apply_chunked_head_loss(model: nn.Module, chunk_tokens: int = 1024) -> nn.Module:
    """Make lm_head and gen_head (the model's heads of the two: JanusFlow has no gen_head)
    compute their CE in recomputed chunks; in place, idempotent."""
    if chunk_tokens < 1:
        raise ValueError(f"head chunk_tokens={chunk_tokens} must be >= 1")
    for head in (h for h in (model.lm_head, getattr(model, "gen_head", None)) if h is not None):
        if getattr(head, _MARK, None) is not None:
            head.__dict__.pop("per_token_cross_entropy", None)
        base = getattr(head, "per_token_cross_entropy", None) or functools.partial(dense_cross_entropy, head)
        # An instance attribute: the state_dict and the module tree stay as they were.
        head.per_token_cross_entropy = functools.partial(chunked_cross_entropy, base, chunk_tokens=chunk_tokens)
        setattr(head, _MARK, chunk_tokens)
    return model
