"""ZeRO-3 start-up that scales: parameters are created partitioned and each rank loads only its
slice of every weight.

    model = build_partitioned(lambda: family.build(cfg), ds_config, dtype, mpu)
    load_partitioned(model, native_sd)      # native_sd may be views of mmap'd files
    model.init_weights(seed=..., gathered=zero3_gathered)   # or a fresh start

`deepspeed.zero.Init` partitions each module's parameters as soon as the module is built, so
the largest whole tensor a rank ever holds is one module's. Loading writes rank r's piece of
the flattened tensor (DeepSpeed's ZeRO-3 layout: equal pieces, the last padded) straight into
the parameter's partition (`ds_tensor`); with a memory-mapped checkpoint a rank touches only
the pages of its pieces. Random initialisation gathers one module at a time instead.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
import torch.distributed as dist
from torch import nn


def build_partitioned(build: Callable[[], nn.Module], ds_config: dict, dtype: torch.dtype, mpu=None) -> nn.Module:
    """`build()` under `deepspeed.zero.Init`: parameters partitioned over the data-parallel
    group as they are created, in `dtype`. Floating buffers are cast to `dtype` too (what the
    dense path's `.to(dtype)` does)."""
    import deepspeed

    # DeepSpeed's communication layer over our process group (deepspeed.initialize would set
    # it up later; zero.Init needs it now, for the world size and the partition ranks).
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    # The parameters' dtype comes from the config's bf16 section: DeepSpeed 0.19 ignores an
    # explicit dtype= on an accelerator without fp16 (CPU), where it picks bf16.
    if ds_config.get("bf16", {}).get("enabled", False) != (dtype == torch.bfloat16):
        raise ValueError(f"the DeepSpeed config's bf16 section does not match the run dtype {dtype}")
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu):
        model = build()
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)
    return model


def zero3_gathered(params: Sequence[torch.Tensor]) -> ContextManager:
    """Whole, writable parameters inside; rank 0's values are what every rank keeps."""
    import deepspeed

    ps = [p for p in params if p is not None and hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(ps, modifier_rank=0) if ps else contextlib.nullcontext()


def _piece(flat: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return flat[rank * size:(rank + 1) * size]


@torch.no_grad()
def load_partitioned(model: nn.Module, sd: dict[str, torch.Tensor], optional: Sequence[str] = (),
                     release: Callable[[torch.Tensor], None] | None = None) -> list[str]:
    """Copy this rank's piece of every parameter (and the buffers, which are not partitioned)
    from the native state dict `sd`; returns the names it did not hold. A name missing from
    `sd` is an error unless it starts with one of `optional` (parts a release lacks).
    `release(tensor)`, called after each copy, may drop the source's pages (checkpoint/io.py
    release_pages for memory-mapped reads)."""
    absent = []
    for name, p in model.named_parameters():
        src = sd.get(name)
        if src is None:
            if not name.startswith(tuple(optional)):
                raise KeyError(f"the checkpoint has no tensor {name!r}")
            absent.append(name)
            continue
        if tuple(src.shape) != tuple(p.ds_shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)}, model {tuple(p.ds_shape)}")
        part = p.ds_tensor
        rank = dist.get_rank(group=p.ds_process_group)
        piece = _piece(src.reshape(-1), rank, part.numel())
        part.zero_()
        part[: piece.numel()].copy_(piece)
        if release is not None:
            release(src)
    for name, b in model.named_buffers():
        if name in sd:
            b.copy_(sd[name])
    return absent
