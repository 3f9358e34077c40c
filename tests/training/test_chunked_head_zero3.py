"""The chunked head loss (recomputed in backward) under ZeRO-3 gives the unchunked losses and
gradient norms: the recompute re-gathers the partitioned head weights."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_chunked_head_loss_under_zero3(shapes_root, tmp_path, trainer_tools):
    runs = {}
    for chunk in ("null", "16"):
        run_dir = tmp_path / f"chunk_{chunk}"
        ov = trainer_tools.base(shapes_root, run_dir, steps=(1, 3, 1)) + [
            "parallel.zero_stage=3",
            f"model.head_chunk_tokens={chunk}",
            "train.stages.stage1.enabled=false",
            "train.stages.stage3.enabled=false",
            "checkpoint.export_hf=false",
        ]
        r = trainer_tools.run(ov, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[chunk] = trainer_tools.metrics(run_dir)
    for a, b in zip(runs["null"], runs["16"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
