"""Rank body for test_shm_release.py: set up the world as training does, then use DeepSpeed's
shared-memory all-reduce after our start-up has unlinked the segments' names."""

import json
import sys

import torch

from janus_train.parallel.distributed import init_distributed, shm_segment_path

out_prefix = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]  # the deepspeed launcher adds --local_rank
info = init_distributed()
import deepspeed.comm as ds_comm  # noqa: E402  (after the world exists)

t = torch.full((1000,), float(info.rank + 1))
ds_comm.inference_all_reduce(t)  # DeepSpeed's shm kernel on CPU when every rank is local
out = {"rank": info.rank, "sum": float(t[0]), "own_segment_left": shm_segment_path(info.rank).exists(),
       "shm_op": ds_comm.comm.cdb.shm_comm_op is not None}
with open(f"{out_prefix}.{info.rank}.json", "w") as f:
    json.dump(out, f)
