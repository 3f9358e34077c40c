"""Rank worker for test_zero3_init.py (torchrun, 2 ranks, gloo): a model created partitioned
under ZeRO-3 gets the same weights as the dense build, from a fresh seeded init and from a
memory-mapped checkpoint, while no rank holds a whole parameter outside `gathered`."""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from janus_train.checkpoint.io import read_checkpoint, write_checkpoint
from janus_train.models.families import family_of_preset
from janus_train.parallel.deepspeed_engine import deepspeed_config
from janus_train.parallel.zero3_init import build_partitioned, load_partitioned, zero3_gathered


def whole(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def main(preset: str, tmp: str) -> None:
    dist.init_process_group("gloo")
    family = family_of_preset(preset)
    cfg = family.config(preset)
    ds_cfg = deepspeed_config(3, 1, 1, dist.get_world_size(), 1.0, torch.float32)

    dense = family.build(cfg)
    dense.init_weights(seed=7)
    part = build_partitioned(lambda: family.build(cfg), ds_cfg, torch.float32)
    # Partitioned: no parameter of the model is whole on a rank after the build.
    assert all(p.numel() == 0 and p.ds_tensor.numel() <= -(-p.ds_numel // 2) for p in part.parameters()), "not partitioned"
    part.init_weights(seed=7, gathered=zero3_gathered)
    got, want = whole(part), dict(dense.named_parameters())
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"fresh init differs: {bad[:5]}"

    # From a checkpoint (other weights than the fresh ones), read as memory maps.
    other = family.build(cfg)
    other.init_weights(seed=8)
    ckpt = Path(tmp) / "ckpt"
    if dist.get_rank() == 0:
        write_checkpoint(ckpt, cfg, other.state_dict())
    dist.barrier()
    _, sd = read_checkpoint(ckpt, "native", mmap=True)
    load_partitioned(part, sd)
    got = whole(part)
    bad = [k for k, v in other.named_parameters() if not torch.equal(got[k], v.detach())]
    assert not bad, f"checkpoint slices differ: {bad[:5]}"
    dist.barrier()
    dist.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
