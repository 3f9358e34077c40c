"""Multi-node launch, simulated with two "nodes" on localhost: two launcher invocations that
rendezvous on 127.0.0.1, exactly as two machines would (node rank 0 and 1, same master).

torchrun: `--nnodes 2 --node-rank {0,1} --master-addr 127.0.0.1`. deepspeed: one hostfile
with two hosts and `--no_ssh --node_rank {0,1}`, the way it runs on clusters without ssh
between nodes (with ssh, one `deepspeed --hostfile H` on the first node starts both).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROBE = HERE / "probe_ranks.py"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(commands: list[list[str]], tmp: Path, timeout: float, env: dict | None = None) -> list[str]:
    """Start one process per "node", wait for all; on failure or timeout kill them by PID."""
    procs, logs = [], []
    for i, cmd in enumerate(commands):
        log = open(tmp / f"node{i}.log", "w")
        logs.append(tmp / f"node{i}.log")
        # Own session per node, so a hung launcher and its ranks can be killed as one group.
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, **(env or {})), start_new_session=True))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [p.read_text() for p in logs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"node {i} exited {p.returncode}:\n{texts[i][-4000:]}"
    return texts


def reports(out: Path, world: int) -> list[dict]:
    got = sorted(out.glob("rank-*.json"))
    assert len(got) == world, f"{len(got)} rank reports, expected {world}"
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def test_torchrun_two_nodes_ranks_and_groups(tmp_path):
    """2 nodes x 2 ranks, TP=2: TP pairs stay inside a node, DP pairs span the nodes."""
    port, out = free_port(), tmp_path / "out"
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", str(port), str(PROBE), str(out), "2"]
            for n in (0, 1)]
    run_nodes(cmds, tmp_path, timeout=240)
    for r in reports(out, 4):
        rank = r["rank"]
        assert (r["world_size"], r["local_rank"], r["node_rank"]) == (4, rank % 2, rank // 2), r
        assert r["master"] == f"127.0.0.1:{port}"
        node = rank // 2
        assert r["tp_ranks"] == [2 * node, 2 * node + 1], r  # tensor parallel within a node
        assert r["dp_ranks"] == [rank % 2, rank % 2 + 2], r  # data parallel across nodes
        assert r["sums"] == {"tp": sum(r["tp_ranks"]), "dp": sum(r["dp_ranks"]), "world": 6}, r


def test_deepspeed_hostfile_two_nodes_ranks_and_groups(tmp_path):
    """A two-host hostfile, one rank per host, launched per node with --no_ssh."""
    port, out = free_port(), tmp_path / "out"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    cmds = [[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
             "--master_addr", "127.0.0.1", "--master_port", str(port), str(PROBE), str(out), "1"]
            for n in (0, 1)]
    run_nodes(cmds, tmp_path, timeout=300)
    for r in reports(out, 2):
        rank = r["rank"]
        assert (r["world_size"], r["local_rank"], r["node_rank"]) == (2, 0, rank), r
        assert r["tp_ranks"] == [rank] and r["dp_ranks"] == [0, 1], r
        assert r["sums"] == {"tp": rank, "dp": 1, "world": 1}, r


def test_torchrun_two_nodes_trains_a_step(tmp_path, trainer):
    """The training entry point itself on 2 nodes x 1 rank: it completes and logs its steps."""
    port, run_dir = free_port(), tmp_path / "run"
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", str(port), str(trainer.entry),
             *trainer.short_overrides(run_dir)]
            for n in (0, 1)]
    env = {k: v for k, v in trainer.job_env().items() if not k.startswith("JANUS_")}
    texts = run_nodes(cmds, tmp_path, timeout=300, env=env)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed", texts
    assert status.get("world_size", 2) == 2, status
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("loss" in row for row in rows)
