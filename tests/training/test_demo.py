"""`make demo` end to end (real deepspeed launcher, 2 CPU ranks, its assets built on the fly:
the shapes world, a trained mini VQ, the init checkpoint), shortened: every stage ends with an
evaluation on held-out data, the demo prints the evaluation table, and a second run finds the
finished run instead of training again. (Its duration is a benchmark figure,
docs/performance.md, not a test; the learning floors are test_learnability.py's.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from janus_train.tools.demo import eval_table, loss_trend

pytestmark = pytest.mark.slow

SHORT = [
    "demo_assets.num_samples=400", "demo_assets.held_out=32", "demo_assets.tokenizer_steps=60",
    "train.stages.stage1.steps=6", "train.stages.stage2.steps=12", "train.stages.stage3.steps=6",
    "eval.num=4", "eval.max_new_tokens=6", "logging.sample_every=6", "checkpoint.every_steps=100",
]


def test_demo_runs_evaluates_and_reports(tmp_path):
    cmd = [sys.executable, "-m", "janus_train.tools.demo", "--out", str(tmp_path), *SHORT]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode in (0, 4), r.stdout[-4000:] + r.stderr[-4000:]  # 4: a loss did not fall in so few steps
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m["step"] for m in rows if "eval/und_acc" in m]
    assert evaluated == [6, 18, 24]  # the end of every stage
    assert "Evaluation on held-out data" in r.stdout and "gen acc" in r.stdout
    table = [line for line in r.stdout.splitlines() if line.strip().split(" ")[0] in ("6", "18", "24")]
    assert len(table) == 3
    for stage in (1, 2, 3):
        assert (run / "exports" / f"stage{stage}" / "model.safetensors").is_file()
    assert (run / "eval" / "step_00000024" / "gen_grid.png").is_file()
    assert list((run / "samples").glob("*.png"))
    tokenizer = json.loads((tmp_path / "data" / "tokenizer" / "report.json").read_text())
    assert tokenizer["kind"] == "vq" and tokenizer["held_out"]["scored_images"] > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode in (0, 4)
    assert "already ran to completion" in again.stdout and "--fresh" in again.stdout
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [m["step"] for m in rows]


def test_loss_trend_detects_a_flat_task():
    rows = [{"loss_und": 5.0, "loss_text": None, "loss_gen": 5.0 - 0.1 * i} for i in range(10)]
    trend = loss_trend(rows)
    assert trend["text"] is None
    assert trend["und"] == (5.0, 5.0)
    assert trend["gen"][1] < trend["gen"][0]
    assert "flow" not in trend and "repa" not in trend  # JanusFlow's losses: absent from a Janus-Pro run
    flow = loss_trend([{"loss_und": 5.0, "loss_text": None, "loss_gen": None, "loss_flow": 2.0 - 0.1 * i, "loss_repa": 1.0} for i in range(10)])
    assert "gen" not in flow and flow["flow"][1] < flow["flow"][0] and flow["repa"] == (1.0, 1.0)


def test_eval_table_rows_and_missing_values():
    rows = [{"step": 1, "stage": 1, "loss": 1.0}, {"step": 2, "stage": 1, "eval/und_acc": 0.5, "eval/gen_acc": 0.25},
            {"step": 4, "stage": 2, "eval/und_acc": 0.75}]
    table = eval_table(rows).splitlines()
    assert len(table) == 3 and "und acc" in table[0] and "gen acc" in table[0]
    assert table[1].split()[:4] == ["2", "1", "0.500", "0.250"]
    assert table[2].split()[2:] == ["0.750", "-"]


def test_janusflow_demo_runs_evaluates_and_reports(tmp_path):
    """`make demo-flow` shortened: a tiny VAE trained first, gen shards of its latents, the
    JanusFlow run on 2 ranks with an evaluation per stage, and the report with the flow losses."""
    cmd = [sys.executable, "-m", "janus_train.tools.demo", "--recipe", "janusflow_tiny_demo", "--out", str(tmp_path), *SHORT,
           "eval.flow_steps=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode in (0, 4), r.stdout[-4000:] + r.stderr[-4000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if "eval/und_acc" in m] == [6, 18, 24]
    assert all(m["loss_gen"] is None for m in rows) and all(m["loss_flow"] is not None for m in rows if m["tokens_gen"])
    assert "val loss flow" in r.stdout and "gen acc" in r.stdout and "loss flow:" in r.stdout and "loss repa:" in r.stdout
    vae = json.loads((tmp_path / "data" / "tokenizer" / "report.json").read_text())
    assert vae["kind"] == "vae" and vae["held_out"]["scored_images"] > 0
    export = run / "exports" / "stage3"
    assert "vision_gen_enc_config" in json.loads((export / "config.json").read_text())  # DeepSeek's release layout
    assert (run / "eval" / "step_00000024" / "gen_grid.png").is_file() and list((run / "samples").glob("*.png"))
