"""Distributed pre-tokenisation (issue 15, item 4): the shards split over processes by
--rank/--world-size, by torchrun and (tests/cluster/test_pretokenize_slurm.py) by a Slurm array
give a directory byte for byte equal to one process's: every shard, its index, the per-shard
reports, energon's .nv-meta and build_report.json; the decoding workers change nothing; the
dataset-level files are written once, by one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(got: Path, want: Path) -> None:
    a, b = tree(got), tree(want)
    assert sorted(a) == sorted(b), f"files differ: only in {got}: {sorted(set(a) - set(b))}, only in {want}: {sorted(set(b) - set(a))}"
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"{got} and {want} differ in {differ}"


@pytest.fixture(scope="module")
def gen_input(tmp_path_factory, tiny_hf_ckpt):
    """A gen dataset of 5 shards (5, 5, 5, 5, 1 samples: build_shards drops the damaged image)
    and the one-process pre-tokenisation of it (the reference)."""
    from data_pipelines import build_shards, pretokenize_vq, synthetic_shapes

    root = tmp_path_factory.mktemp("pretok_dist")
    synthetic_shapes.main(["--out", str(root / "raw"), "--n", "44", "--image-size", "64", "--seed", "11", "--workers", "1"])
    manifest = root / "raw" / "gen_real.jsonl"
    lines = manifest.read_text().splitlines()
    assert len(lines) == 22
    # a damaged image: skipped and counted in the per-shard and merged reports
    (root / "raw" / json.loads(lines[1])["image"]).write_bytes(b"not an image")
    build_shards.build("gen", manifest, root / "gen", 5, source="real", progress=False)
    ref = root / "ref"
    s = pretokenize_vq.pretokenize(tiny_hf_ckpt, root / "gen", ref, batch_size=3, progress=False)
    assert s["finalized"] and s["written"] >= 1
    return {"root": root, "gen": root / "gen", "ref": ref, "ckpt": tiny_hf_ckpt}


def test_process_slot_resolution():
    from data_pipelines.pretokenize import resolve_process_slot as slot

    assert (slot(env={}).rank, slot(env={}).world_size) == (0, 1)
    assert (slot(1, 4, env={"RANK": "0", "WORLD_SIZE": "2"}).rank, slot(1, 4, env={}).world_size) == (1, 4)
    s = slot(env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (s.rank, s.world_size) == (1, 2) and "torchrun" in s.source
    s = slot(env={"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (s.rank, s.world_size) == (2, 4)
    s = slot(env={"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (s.rank, s.world_size) == (3, 4)
    # torchrun inside an array task: disjoint ranks over both
    s = slot(env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "2"})
    assert (s.rank, s.world_size) == (3, 6)
    with pytest.raises(ValueError, match=r"rank 2 is not in 0\.\.1 .*--rank/--world-size"):
        slot(2, 2, env={})
    with pytest.raises(ValueError, match="world size must be >= 1, got 0"):
        slot(0, 0, env={})
    with pytest.raises(ValueError, match="go together"):
        slot(1, None, env={})
    with pytest.raises(ValueError, match="only RANK is set"):
        slot(env={"RANK": "0"})
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' .* not an integer"):
        slot(env={"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match=r"rank 4 is not in 0\.\.1 .*Slurm array task 9.*dense range"):
        slot(env={"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "2"})
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_COUNT is not"):
        slot(env={"SLURM_ARRAY_TASK_ID": "0"})


def test_shard_assignment_round_robin_by_name():
    from data_pipelines.pretokenize import ProcessSlot, shards_for
    from janus_train.data.shards import ShardInfo

    shards = [ShardInfo(f"s{i}.tar", f"/x/s{i}.tar", 1) for i in (3, 0, 4, 1, 2)]
    got = [[s.name for s in shards_for(shards, ProcessSlot(r, 2, "t"))] for r in (0, 1)]
    assert got == [["s0.tar", "s2.tar", "s4.tar"], ["s1.tar", "s3.tar"]]
    assert [s.name for s in shards_for(shards, ProcessSlot(6, 8, "t"))] == []  # more ranks than shards: idle


def test_rank_world_size_sequential_equals_one_process(gen_input, tmp_path):
    """Rank 1 then rank 0 of 2 (with decoding workers): the second to finish finalises."""
    from data_pipelines.pretokenize_vq import pretokenize

    out = tmp_path / "two_ranks"
    kw = dict(batch_size=3, progress=False, world_size=2, workers=1)
    first = pretokenize(gen_input["ckpt"], gen_input["gen"], out, rank=1, **kw)
    assert not first["finalized"] and first["process"]["shards"] == 2 and first["process"]["waiting_for"] == 3
    assert not (out / "build_report.json").exists() and not (out / ".nv-meta").exists()
    with pytest.raises(RuntimeError, match="3 of 5 shards are not done yet"):
        pretokenize(gen_input["ckpt"], gen_input["gen"], out, progress=False, finalize_only=True)
    second = pretokenize(gen_input["ckpt"], gen_input["gen"], out, rank=0, **kw)
    assert second["finalized"] and second["process"]["shards"] == 3 and second["process"]["images_per_s"] > 0
    assert_same_tree(out, gen_input["ref"])
    # rerun: nothing encoded, nothing rewritten
    again = pretokenize(gen_input["ckpt"], gen_input["gen"], out, rank=0, **kw)
    assert again["finalized"] and again["process"]["shards"] == 0
    assert_same_tree(out, gen_input["ref"])


def test_concurrent_finalisers_write_once(gen_input, tmp_path):
    """Two finalisers at the same moment (the flock is per open file, so threads contend like
    processes): the directory ends up identical to the reference, written by one of them."""
    import shutil

    from data_pipelines import pretokenize as pt
    from janus_train.data import shards as shards_mod

    out = tmp_path / "race"
    shutil.copytree(gen_input["ref"], out)
    shutil.rmtree(out / ".nv-meta")
    (out / "build_report.json").unlink()
    for idx in out.glob("*.tar.idx"):
        idx.unlink()
    calls, real_prepare = [], shards_mod.prepare_energon

    def slow_prepare(root, *a, **k):
        calls.append(root)
        threading.Event().wait(0.5)  # widen the window in which the other finaliser arrives
        return real_prepare(root, *a, **k)

    from janus_train.checkpoint.io import read_config
    from janus_train.contracts.tokens import TokenizerInfo

    cfg = read_config(str(gen_input["ckpt"]))
    enc = pt.ImageEncoder("vq", cfg.gen_image_size, None, pt.vq_meta(cfg))
    fp = TokenizerInfo.from_hf(str(gen_input["ckpt"])).fingerprint
    results: list = [None, None]
    pt.prepare_energon = slow_prepare
    try:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, pt.finalize(enc, gen_input["ckpt"], gen_input["gen"], out, fp))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pt.prepare_energon = real_prepare
    assert len(calls) == 1, f"prepare_energon ran {len(calls)} times"
    assert sum(r is not None for r in results) >= 1
    assert_same_tree(out, gen_input["ref"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(gen_input, tmp_path):
    out = tmp_path / "torchrun"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_TASK_ID"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "data_pipelines.pretokenize_vq", "--ckpt", str(gen_input["ckpt"]), "--in", str(gen_input["gen"]),
           "--out", str(out), "--batch-size", "3", "--device", "cpu", "--workers", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "rank 0 of 2" in r.stdout and "rank 1 of 2" in r.stdout, r.stdout
    assert r.stdout.count("encoded ") == 1, r.stdout  # one process finalised
    assert_same_tree(out, gen_input["ref"])


@pytest.mark.slow
def test_throughput_bench_runs(tmp_path):
    """bench/pretokenize_throughput.py (docs/performance.md) at the smallest size: one JSON object."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "bench/pretokenize_throughput.py", "--work", str(tmp_path), "--images", "8",
                        "--image-size", "64", "--batch-size", "4", "--workers", "0", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout[r.stdout.index("{"):])
    assert [run["workers"] for run in report["runs"]] == [0, 1]
    assert all(run["images"] == 8 and run["images_per_s"] > 0 for run in report["runs"])
