"""The GPU acceptance command (bench/gpu_check.sh, issue 15 item 6) on a CPU machine: its dry
run reports every part in one JSON object with numbers where figures belong, a part's failure
leaves the others' figures in the report, and without a GPU the real run refuses clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


# The report's documented keys (docs/performance.md#gpu-acceptance-check): tests do not import
# bench code (tests/test_layering.py), so the contract is written out here.
COMMON = {"status", "reason", "seconds"}
FIELDS: dict[str, set[str]] = {
    "attention_parity": COMMON | {"candidate", "reference", "dtype", "rows", "seq_len", "documents", "heads", "head_dim", "max_abs_diff",
                                  "error_vs_reference", "sdpa_error_vs_reference", "tolerance", "rule", "passed"},
    "train_step": COMMON | {"model", "dtype", "attention", "zero_stage", "recompute", "rows", "seq_len", "docs", "steps", "step_s_median",
                            "step_s_all", "tokens_per_step", "tokens_per_s", "supervised_tokens_per_s", "model_flops_per_step",
                            "model_tflops_per_s", "mfu", "peak_tflops", "peak_source", "mfu_formula", "pad_fraction", "peak_memory_gib",
                            "peak_memory_reserved_gib", "peak_memory_source", "plan_peak_gib", "plan_parts_gib", "plan_over_measured"},
    "hf_baseline": COMMON | {"model", "dtype", "attention", "rows", "seq_len", "docs", "steps", "step_s_median", "step_s_all",
                             "tokens_per_step", "tokens_per_s", "supervised_tokens_per_s", "model_flops_per_step", "model_tflops_per_s",
                             "mfu", "pad_fraction", "peak_memory_gib", "peak_memory_reserved_gib", "peak_memory_source",
                             "ratio_ours_over_hf_tokens_per_s", "ratio_goal"},
}


def _fields() -> dict[str, set[str]]:
    return FIELDS


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def test_dry_run_prints_one_report_with_every_figure():
    proc = _run("--dry-run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # the whole of stdout is one JSON object: logs went to stderr
    assert report["mode"] == "dry-run" and report["status"] == "ok" and report["failed_parts"] == []
    assert "[gpu_check" in proc.stderr  # the progress log
    fields = _fields()
    assert set(report["parts"]) == set(fields)
    for name, part in report["parts"].items():
        assert set(part) == fields[name], name
        assert part["status"] in ("ok", "failed", "skipped") and _number(part["seconds"])

    parity = report["parts"]["attention_parity"]
    if not torch.cuda.is_available():
        # flash-attn cannot run on CPU: skipped, but the comparison ran with eager standing in
        assert parity["status"] == "skipped" and "flash-attn needs CUDA" in parity["reason"]
    assert parity["candidate"] == "eager" and parity["passed"] is True
    for table in ("max_abs_diff", "error_vs_reference", "sdpa_error_vs_reference", "tolerance"):
        assert set(parity[table]) == {"out", "dq", "dk", "dv"}
        assert all(_number(v) for v in parity[table].values()), table
    assert all(parity["error_vs_reference"][k] <= parity["tolerance"][k] for k in parity["tolerance"])
    assert parity["documents"] > parity["rows"]  # packed rows: several documents per row

    ours, base = report["parts"]["train_step"], report["parts"]["hf_baseline"]
    for part in (ours, base):
        assert part["status"] == "ok", part["reason"]
        assert part["model"] == "tiny" and part["dtype"] == "float32" and part["steps"] == 2
        for key in ("tokens_per_s", "model_tflops_per_s", "mfu", "step_s_median", "peak_memory_gib"):
            assert _number(part[key]) and part[key] > 0, key
    assert ours["attention"] == "sdpa" and ours["zero_stage"] == 2
    assert _number(ours["plan_peak_gib"]) and ours["plan_peak_gib"] > 0 and _number(ours["plan_over_measured"])
    assert set(ours["plan_parts_gib"]) == {"params", "grads", "optimizer", "activations", "transient", "buffers"}
    # the same documents for both systems: same useful tokens and model FLOPs
    assert ours["tokens_per_step"] == base["tokens_per_step"] and ours["model_flops_per_step"] == base["model_flops_per_step"]
    assert abs(base["ratio_ours_over_hf_tokens_per_s"] - ours["tokens_per_s"] / base["tokens_per_s"]) < 1e-2


def test_a_failed_part_keeps_the_other_figures_and_fails_the_run():
    # train_step made to raise; the parity part's figures and the report must survive it
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench.gpu_check as g\n"
        "def boom(ctx): raise RuntimeError('injected')\n"
        "g.train_step_part = boom\n"
        "sys.exit(g.main(['--dry-run', '--parts', 'attention_parity,train_step']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["status"] == "failed" and report["failed_parts"] == ["train_step"]
    parts = report["parts"]
    assert parts["train_step"]["status"] == "failed" and "injected" in parts["train_step"]["reason"]
    assert parts["train_step"]["tokens_per_s"] is None  # same keys, no figures
    assert parts["hf_baseline"]["status"] == "skipped" and "--parts" in parts["hf_baseline"]["reason"]
    assert parts["attention_parity"]["passed"] is True and _number(parts["attention_parity"]["max_abs_diff"]["out"])
    assert "RuntimeError: injected" in proc.stderr  # the traceback is logged


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_real_run_refuses_clearly():
    proc = _run(timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device: use --dry-run" in proc.stderr
    assert proc.stdout == ""


def test_help():
    proc = _run("--help", timeout=120)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "attention_parity" in proc.stdout
