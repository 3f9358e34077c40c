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
from pathlib import Path

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
        _release_shm_segment(dist.get_rank())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


# DeepSpeed's CPU shared-memory all-reduce (its ops/csrc/cpu/comm/shm.cpp) creates one /dev/shm
# segment per rank (~66 MB), named from the uid, MASTER_ADDR, MASTER_PORT and the rank, maps its
# peers' segments, and never unlinks its own: every CPU run left ~66 MB of RAM per rank behind
# (measured: 292 segments, 19 GB, the whole RAM of a 24 GiB box, after a day of test runs).
SHM_SEGMENT = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def shm_segment_path(rank: int) -> Path:
    """Where DeepSpeed's shared-memory all-reduce puts this rank's segment (see SHM_SEGMENT)."""
    return Path(SHM_SEGMENT.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                   port=os.environ.get("MASTER_PORT", ""), rank=rank))


def _release_shm_segment(rank: int) -> None:
    """Unlink this rank's DeepSpeed /dev/shm segment once every rank has mapped it.

    DeepSpeed maps all peers' segments while it initialises, before init_distributed returns;
    after the barrier every rank has done so. An unlinked segment stays valid for the mappings
    that exist and the kernel frees it when the last one goes, so the memory comes back when the
    processes end, however they end (kill -9 included)."""
    if dist.get_world_size() > 1:
        dist.barrier()  # on every rank, whether or not its segment exists: no rank waits alone
    shm_segment_path(rank).unlink(missing_ok=True)  # absent: no shared-memory op (GPU, several nodes)


def local_world_size() -> int:
    """Ranks on this node, as the launcher says (torchrun, deepspeed, srun); 1 without one."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def set_cpu_threads(threads: int | None = None) -> int:
    """Size torch's intra-op thread pool for this rank; returns the count.

    `threads` if given, else OMP_NUM_THREADS, else this process's CPU cores shared by the
    node's ranks. torch's default (every core, in every rank) oversubscribes a shared machine:
    on a busy 2-core CPU box a step slowed from 0.13 s to 5-11 s with 2 threads and stayed at
    ~0.15 s with 1.
    """
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            threads = int(env)
        else:
            threads = max(1, len(os.sched_getaffinity(0)) // local_world_size())
    torch.set_num_threads(threads)
    return threads


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over all ranks (host floats in, host floats out)."""
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


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
