"""Acceptance 6 of the scale issue: the train-step benchmark runs and reports both systems with
the MFU formula beside every figure. (How fast is the benchmark's output, not a test.)"""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT


def test_bench_train_step_tiny_reports_both_systems():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), "--model", "tiny", "--threads", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    systems = {d["system"]: d for d in lines if "system" in d}
    assert set(systems) == {"janus_train", "hf_baseline"}
    for d in systems.values():
        assert d["tokens_per_s"] > 0 and d["model_tflops_per_s"] > 0 and 0 < d["mfu"] < 1
        assert "MFU = model_flops / step_time / peak" in d["mfu_formula"] and d["peak_source"]
    # Same documents, same useful work: only the time may differ.
    ours, base = systems["janus_train"], systems["hf_baseline"]
    assert ours["tokens_per_step"] == base["tokens_per_step"] and ours["model_flops_per_step"] == base["model_flops_per_step"]
    assert ours["pad_fraction"] < base["pad_fraction"]
    ratio = next(d for d in lines if d.get("ratio"))
    assert abs(ratio["value"] - ours["tokens_per_s"] / base["tokens_per_s"]) < 1e-2
    overhead = next(d for d in lines if d.get("check") == "overhead")
    assert overhead["value"] > 0
