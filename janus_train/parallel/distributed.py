"""Process-group setup shared by every launcher (deepspeed, torchrun, srun, plain python).

The launchers all export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain
`python launch/train.py` gets a world of one. gloo on CPU, nccl on GPUs. The collective
timeout is the job's dead-rank detector: a rank that dies mid-step makes the others fail
with a timeout error instead of hanging forever.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise torch.distributed (through DeepSpeed, which wraps it) once per process."""
    import deepspeed

    if "RANK" not in os.environ:  # single process, no launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # Groups created later (DeepSpeed's ZeRO groups, megatron's TP/DP groups) take torch's
        # module-level default timeout, not the one given to the world group: set both, so a
        # hung or dead rank ends every collective within timeout_minutes.
        from torch.distributed import distributed_c10d

        timeout = datetime.timedelta(minutes=timeout_minutes)
        distributed_c10d.default_pg_timeout = timeout
        if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
            distributed_c10d.default_pg_nccl_timeout = timeout
        deepspeed.init_distributed(
            dist_backend=backend,
            timeout=timeout,
            auto_mpi_discovery=False,
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank src's object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    # Without this, ZeRO-3 runs print "terminate called without an active exception" at exit.
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a dead peer: nothing left to synchronise with
            pass
        dist.destroy_process_group()
