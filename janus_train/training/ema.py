"""An exponential moving average (EMA) of the trainable weights, for sampling, evaluation and exports.

    ema = WeightEMA(engine.module, decay, zero_stage, dp_group)
    ema.update()                       after every applied optimizer step
    with ema.swapped_in(): ...         the module holds the averaged weights inside (collective)
    ema.full_state_dict()              whole averaged weights (native keys) on rank 0 (collective)
    ema.state_dict() / load_state_dict()   this rank's part, for checkpoints (same topology)

JanusFlow keeps such an average (decay 0.99, the paper's training details) and samples from it;
a flow model trained at small batch draws cleaner images from averaged weights than from the
last step's. The average costs one fp32 copy of the trainable weights spread over the
data-parallel ranks: each rank keeps the slice of every trainable parameter that ZeRO-3 would
give it (its `ds_tensor` under ZeRO-3; the same equal, padded slice of the flat weight
otherwise), so no rank holds more than 1/dp of it. Reading the averaged weights whole therefore
gathers slices over the data-parallel group: every rank of the job takes part.

The average follows the weights as the module holds them (the run's dtype: in bf16 the
working copies DeepSpeed writes back from its fp32 masters after each step), accumulated in
fp32. Parameters frozen in the stage are not averaged (they do not change).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from janus_train.checkpoint.consolidate import full_state_dict
from janus_train.parallel.tensor_parallel import gather_tp_param, is_tp_split


def _group_size_rank(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class WeightEMA:
    def __init__(self, module: nn.Module, decay: float, zero_stage: int, dp_group=None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = module
        self.decay = decay
        self.zero3 = zero_stage == 3
        self.group = dp_group
        self.dp, self.dp_rank = _group_size_rank(dp_group)
        self.params: list[tuple[str, nn.Parameter]] = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow: dict[str, torch.Tensor] = {n: self._local(p).detach().float().clone() for n, p in self.params}
        self.updates = 0

    # ---- this rank's slice of a parameter ----------------------------------------------------
    def _slice_size(self, p: torch.Tensor) -> int:
        return math.ceil(p.numel() / self.dp)

    def _local(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's slice of p's current values (flat, padded to the slice size)."""
        if self.zero3:
            return p.ds_tensor.view(-1)
        size = self._slice_size(p)
        flat = p.data.reshape(-1)
        part = flat[self.dp_rank * size:(self.dp_rank + 1) * size]
        if part.numel() < size:
            part = torch.cat([part, part.new_zeros(size - part.numel())])
        return part

    def _whole(self, name: str, p: nn.Parameter) -> torch.Tensor:
        """The averaged parameter whole over the data-parallel group (a TP shard under TP);
        collective over that group."""
        piece = self.shadow[name]
        if self.dp > 1:
            pieces = [torch.empty_like(piece) for _ in range(self.dp)]
            dist.all_gather(pieces, piece.contiguous(), group=self.group)
            flat = torch.cat(pieces)
        else:
            flat = piece
        shape = p.ds_shape if self.zero3 else p.shape
        return flat[: math.prod(shape)].view(shape)

    # ---- training ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights (after an applied optimizer step)."""
        for name, p in self.params:
            self.shadow[name].lerp_(self._local(p).float(), 1.0 - self.decay)
        self.updates += 1

    # ---- reading the average ----------------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside, the module holds the averaged weights (cast to its dtype); restored after.
        Collective: every rank of the job enters it."""
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        with torch.no_grad():
            for name, p in self.params:
                if self.zero3:
                    saved.append((p, p.ds_tensor.detach().clone()))
                    p.ds_tensor.copy_(self.shadow[name].view_as(p.ds_tensor).to(p.ds_tensor.dtype))
                else:
                    saved.append((p, p.data.detach().clone()))
                    p.data.copy_(self._whole(name, p).to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in saved:
                    (p.ds_tensor if self.zero3 else p.data).copy_(value)

    def full_state_dict(self, dst: int | None = 0) -> dict[str, torch.Tensor] | None:
        """Whole native-key weights on global rank `dst` with the averaged values (fp32) for the
        trainable parameters; collective."""
        out = full_state_dict(self.module, 3 if self.zero3 else 0, dst=dst)
        rank = dist.get_rank() if dist.is_initialized() else 0
        for name, p in self.params:
            whole = self._whole(name, p)
            if is_tp_split(p):
                whole = gather_tp_param(name, whole)
            if out is not None:
                out[name] = whole.detach().to("cpu", torch.float32, copy=True)
        if out is not None:  # a tied weight appears under both names
            for name, p in self.module.named_parameters(remove_duplicate=False):
                for n2, p2 in self.params:
                    if p2 is p and name != n2:
                        out[name] = out[n2]
        return out if (dst is None or rank == dst) else None

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's slice and where it goes (checkpoint/sharded.py puts the slices of every
        rank back together: `dp_rank`-th piece of the flat tensor of shape `shapes[name]`, of
        TP rank `tp_rank`)."""
        tp_rank = 0
        if any(is_tp_split(p) for _, p in self.params):
            from megatron.core import parallel_state

            tp_rank = parallel_state.get_tensor_model_parallel_rank()
        return {"decay": self.decay, "updates": self.updates, "dp": self.dp, "dp_rank": self.dp_rank, "tp_rank": tp_rank,
                "zero3": self.zero3, "shapes": {n: tuple(p.ds_shape if self.zero3 else p.shape) for n, p in self.params},
                "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if (state["dp"], state.get("dp_rank", self.dp_rank)) != (self.dp, self.dp_rank) or set(state["shadow"]) != set(self.shadow) \
                or any(state["shadow"][n].shape != t.shape for n, t in self.shadow.items()):
            raise ValueError("the checkpoint's EMA belongs to another topology or set of trainable parameters")
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
        self.updates = int(state["updates"])

    @torch.no_grad()
    def load_whole(self, sd: dict[str, torch.Tensor]) -> None:
        """Start the average from whole weights (native keys; e.g. the previous stage's average,
        or after a topology change), sliced for this rank."""
        from janus_train.parallel.tensor_parallel import slice_tp_param

        for name, p in self.params:
            if name not in sd:
                continue
            value = slice_tp_param(name, sd[name]) if is_tp_split(p) else sd[name]
            flat = value.reshape(-1).float()
            size = self.shadow[name].numel()
            part = flat[self.dp_rank * size:(self.dp_rank + 1) * size]
            self.shadow[name].zero_()
            self.shadow[name][: part.numel()].copy_(part.to(self.shadow[name].device))
