"""launch/slurm/pretokenize.sbatch on the real (private, local) Slurm cluster of conftest.py: a
2-task job array pre-tokenises a gen dataset (one CPU per task, JANUS_DEVICE=cpu) into a
directory byte for byte equal to a one-process run's (tests/data/test_pretokenize_dist.py
covers --rank/--world-size and torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "pretokenize.sbatch"
CPU_TASK = ["--nodes=1", "--ntasks=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:20:00"]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_array_of_two_equals_one_process(slurm_cluster, tiny_hf_ckpt, tmp_path):
    from data_pipelines import build_shards, pretokenize_vq, synthetic_shapes

    synthetic_shapes.main(["--out", str(tmp_path / "raw"), "--n", "30", "--image-size", "64", "--seed", "4", "--workers", "1"])
    gen = tmp_path / "gen"
    build_shards.build("gen", tmp_path / "raw" / "gen_real.jsonl", gen, 4, source="real", progress=False)  # 4 shards
    ref = tmp_path / "ref"
    pretokenize_vq.pretokenize(tiny_hf_ckpt, gen, ref, batch_size=3, progress=False)

    out = tmp_path / "array"
    args = ["--ckpt", str(tiny_hf_ckpt), "--in", str(gen), "--out", str(out), "--batch-size", "3"]
    env = dict(slurm_cluster.env, JANUS_DEVICE="cpu", JANUS_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    # --wait: sbatch returns when every task of the array has ended, with the worst exit code
    r = subprocess.run(["sbatch", "--wait", "--array=0-1", *CPU_TASK, f"--output={tmp_path}/slurm-%A_%a.out",
                        str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("slurm-*.out")))
    assert r.returncode == 0, f"sbatch: {r.stdout} {r.stderr}\n{logs}"
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs, logs
    assert logs.count("encoded ") == 1, logs  # the dataset files were written by one task
    assert json.loads((out / "build_report.json").read_text())["written"] == 15
    a, b = tree(out), tree(ref)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []

    # --finalize-only as its own (non-array) job: finds the dataset final and changes nothing
    r = subprocess.run(["sbatch", "--wait", *CPU_TASK, f"--output={tmp_path}/final-%j.out", str(SBATCH), "--finalize-only", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stderr}\n" + "\n".join(p.read_text() for p in tmp_path.glob("final-*.out"))
    assert tree(out) == b
