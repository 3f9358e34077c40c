"""Acceptance 2: save the loader state at step k on 2 ranks, restore in fresh processes, and
steps k+1..k+20 are identical to an uninterrupted run (sample keys compared)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("resume_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _spawn(*args: str, resume_at: int = 0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), RESUME_AT=str(resume_at))
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_resume_on_two_ranks_in_fresh_processes(tmp_path, shapes_data, make_cfg, image_cfg, tiny_hf_ckpt):
    k, n, dp = 6, 20, 2
    cfg = make_cfg(global_batch=8, micro_batch_rows=2, seq_len=192, tokenizer=str(tiny_hf_ckpt)).to_dict()
    cfg["_image"] = dataclasses.asdict(image_cfg)
    base = dict(cfg, num_workers=0)
    (tmp_path / "inline.json").write_text(json.dumps(base))
    # The resumed run uses decode worker processes: the worker count must not matter.
    (tmp_path / "workers.json").write_text(json.dumps(dict(cfg, num_workers=2)))
    # Uninterrupted runs that also save their state after step k (saving changes nothing).
    procs = [
        _spawn(str(tmp_path / "inline.json"), str(r), str(dp), "save", str(k + n), str(tmp_path / f"full{r}.json"), str(tmp_path / f"state{r}.json"), resume_at=k)
        for r in range(dp)
    ]
    _wait(procs)
    procs = [
        _spawn(str(tmp_path / "workers.json"), str(r), str(dp), "resume", str(n), str(tmp_path / f"res{r}.json"), str(tmp_path / f"state{r}.json"))
        for r in range(dp)
    ]
    _wait(procs)
    for r in range(dp):
        full = json.loads((tmp_path / f"full{r}.json").read_text())["keys"]
        resumed = json.loads((tmp_path / f"res{r}.json").read_text())["keys"]
        assert [s["step"] for s in resumed] == list(range(k, k + n))
        assert resumed == full[k:], f"rank {r}: resumed steps differ from the uninterrupted run"
        assert len({key for s in resumed for mb in s["keys"] for row in mb for key in row}) > 50
    # the two ranks read different samples
    first = [json.loads((tmp_path / f"full{r}.json").read_text())["keys"][0] for r in range(dp)]
    k0, k1 = ({key for mb in f["keys"] for row in mb for key in row} for f in first)
    assert k0 and k1 and not k0 & k1


def test_state_round_trip_in_process_keeps_stats(make_cfg, tok, image_cfg):
    from janus_train.data.loader import build_train_loader

    cfg = make_cfg(global_batch=8, micro_batch_rows=2, seq_len=192)
    a = build_train_loader(cfg, tok, image_cfg, 1, 2)
    for _ in range(4):
        next(a)
    sd = json.loads(json.dumps(a.state_dict()))  # JSON-able
    expect = [[mb.meta["keys"] for mb in next(a)] for _ in range(6)]
    b = build_train_loader(cfg, tok, image_cfg, 1, 2)
    b.load_state_dict(sd)
    assert b.stats()["samples"] == sd["stats"]["samples"]
    assert [[mb.meta["keys"] for mb in next(b)] for _ in range(6)] == expect
    assert b.stats() == a.stats()


def test_state_from_another_layout_is_refused(make_cfg, tok, image_cfg):
    from janus_train.data.loader import build_train_loader

    sd = build_train_loader(make_cfg(), tok, image_cfg, 0, 2).state_dict()
    with pytest.raises(ValueError, match="dp_size"):
        build_train_loader(make_cfg(), tok, image_cfg, 0, 4).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed"):
        build_train_loader(make_cfg(seed=99), tok, image_cfg, 0, 2).load_state_dict(sd)
