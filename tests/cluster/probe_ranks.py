"""One rank of a launcher probe: report what the launcher told this process, build the
tensor/data-parallel groups the way the engine does (megatron-core parallel_state over gloo),
prove the groups work with one all-reduce each, and write rank-<RANK>.json into OUT_DIR.

    torchrun ... probe_ranks.py OUT_DIR TP       deepspeed ... probe_ranks.py OUT_DIR TP
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed appends it
    out_dir, tp = Path(args[0]), int(args[1])
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=2))
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_group, dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()

    # Each group sums its members' ranks: the result must match the members we report.
    sums = {}
    for name, group in (("tp", tp_group), ("dp", dp_group), ("world", None)):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        sums[name] = int(t.item())
    report = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        # torchrun says GROUP_RANK, the deepspeed launcher says CROSS_RANK; both mean the node.
        "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("CROSS_RANK", "-1"))),
        "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        "host": socket.gethostname(),
        "tp_ranks": dist.get_process_group_ranks(tp_group),
        "dp_ranks": dist.get_process_group_ranks(dp_group),
        "sums": sums,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank-{rank}.json").write_text(json.dumps(report))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
