"""`python -m janus_train.eval` and the Evaluator on a JanusFlow checkpoint: und accuracy and CE,
the flow and REPA losses on fixed draws, gen samples drawn by the flow ODE and decoded by the
VAE (--vae, required with the gen task, refused for Janus-Pro), MMBench by likelihood."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def run_eval(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "janus_train.eval", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def flow_eval_yaml(flow_shapes_root, tmp_path_factory) -> Path:
    """The fixture's shard sets as eval data (it has no held-out split)."""
    root = flow_shapes_root
    path = tmp_path_factory.mktemp("flow_eval") / "eval.yaml"
    path.write_text(yaml.safe_dump({"und": [{"path": str(root / "und")}], "text": [{"path": str(root / "text")}],
                                    "gen": [{"path": str(root / "gen_real")}], "seq_len": 256}))
    return path


def test_cli_on_a_janusflow_checkpoint(flow_shapes_root, flow_eval_yaml, tmp_path):
    root, out = flow_shapes_root, tmp_path / "out"
    r = run_eval("--ckpt", str(root / "flow_init"), "--vae", str(root / "vae"), "--data", str(flow_eval_yaml), "--num", "3",
                 "--scorer", "shapes", "--cfg", "2", "--flow-steps", "3", "--max-new-tokens", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    for key in ("loss_und", "loss_text", "loss_flow", "loss_repa"):
        assert isinstance(rep[key], float) and math.isfinite(rep[key]) and rep[key] > 0, (key, rep[key])
    assert "loss_gen" not in rep
    assert rep["docs_und"] == rep["docs_text"] == rep["docs_gen"] == 3 and rep["tokens_und"] > 0 and rep["tokens_text"] > 0
    assert rep["tokens_gen"] == 3 * 16  # janusflow_tiny: 16 latent tokens per image
    assert 0.0 <= rep["und_acc"] <= 1.0 and rep["und_questions"] == 3
    assert rep["gen_prompts"] == 3 and rep["gen_scorer"] == "shapes" and 0.0 <= rep["gen_acc"] <= 1.0 and len(rep["gen_samples"]) == 3
    grid = Image.open(out / "gen_grid.png")
    assert grid.width >= 3 * 64 // 2 and grid.height > 64
    headline = json.loads(r.stdout.strip().splitlines()[-1])
    assert headline["loss_flow"] == rep["loss_flow"] and headline["loss_repa"] == rep["loss_repa"] and "loss_gen" not in headline


def test_vae_is_required_for_janusflow_gen_and_refused_for_janus_pro(flow_shapes_root, flow_eval_yaml, tmp_path, capsys):
    """The CLI's main in process (the real CLI runs above): one `error:` line, exit code 2."""
    from janus_train.eval.__main__ import main
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    root = flow_shapes_root
    pro = tmp_path / "pro"
    make_tiny_checkpoint(pro, fmt="hf", seed=0)
    cases = [
        (["--ckpt", str(root / "flow_init")], "--vae"),  # gen task (the default) without --vae
        (["--ckpt", str(pro), "--vae", str(root / "vae")], "--vae"),  # a Janus-Pro checkpoint with one
        (["--ckpt", str(root / "flow_init"), "--vae", str(tmp_path / "nowhere")], "nowhere"),
    ]
    for args, fragment in cases:
        capsys.readouterr()
        rc = main([*args, "--data", str(flow_eval_yaml), "--out", str(tmp_path / "o"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2, (args, err[-2000:])
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (args, err)
    # Without the gen task no VAE is needed.
    rc = main(["--ckpt", str(root / "flow_init"), "--data", str(flow_eval_yaml), "--tasks", "loss", "--num", "1", "--out", str(tmp_path / "l"),
               "--device", "cpu"])
    assert rc == 0 and json.loads((tmp_path / "l" / "report.json").read_text())["docs_gen"] == 1


@pytest.fixture(scope="module")
def flow_model(flow_shapes_root):
    from janus_train.checkpoint.io import load_pretrained, load_tokenizer
    from janus_train.contracts.tokens import TokenizerInfo

    path = flow_shapes_root / "flow_init"
    return load_pretrained(path), TokenizerInfo.of(load_tokenizer(path))


def test_evaluator_in_process(flow_shapes_root, flow_eval_yaml, flow_model, tmp_path):
    """Two items per task; the flow loss is the training normalisation over the documents' fixed
    draws (flow_draw of the eval seed and the key), recomputed here one document at a time."""
    from janus_train.contracts.batch import TASK_ID, Row, collate
    from janus_train.contracts.errors import ConfigError
    from janus_train.eval.config import EvalData, EvalSettings
    from janus_train.eval.harness import Evaluator, summary

    model, tok = flow_model
    data = EvalData.from_yaml(flow_eval_yaml)
    settings = EvalSettings(num=2, cfg=2.0, flow_steps=2, max_new_tokens=4, seed=5)
    with pytest.raises(ConfigError, match="vae"):
        Evaluator(model, tok, data, settings)
    ev = Evaluator(model, tok, data, settings, vae=str(flow_shapes_root / "vae"))
    rep = ev.run(tmp_path / "out")
    assert rep["docs_gen"] == 2 and rep["gen_prompts"] == 2 and rep["und_questions"] == 2
    assert (tmp_path / "out" / "gen_grid.png").is_file() and ev.grid is not None
    assert set(summary(rep)) >= {"loss_und", "loss_text", "loss_flow", "loss_repa", "und_acc"} and "loss_gen" not in summary(rep)

    # The same draws on a second evaluation (the VAE is loaded now).
    again = Evaluator(model, tok, data, EvalSettings(tasks=["loss"], num=2, seed=5), vae=ev.vae).loss()
    assert again["loss_flow"] == rep["loss_flow"] and again["loss_repa"] == rep["loss_repa"]
    other = Evaluator(model, tok, data, EvalSettings(tasks=["loss"], num=2, seed=6)).loss()
    assert other["loss_flow"] != rep["loss_flow"]

    from janus_train.data.shards import read_janus_meta
    from janus_train.data.tokenize import flow_draw

    docs, _ = ev._documents("gen")
    scale = read_janus_meta(flow_shapes_root / "gen_real")["vae_scaling_factor"]
    im = ev.image
    sums = {"flow": [0.0, 0], "repa": [0.0, 0]}
    with torch.no_grad():
        for d in docs:
            d.flow = flow_draw(5, d.key, (0, 0), d.latent, scale, im.t_logit_mean, im.t_logit_std)
            res = model(collate([Row(TASK_ID["gen"], [d])], d.n, tok.pad_id, tok.image_id, flow=True))
            for k in sums:
                sums[k][0] += float(res.loss_sum[k])
                sums[k][1] += int(res.count[k])
    assert rep["loss_flow"] == pytest.approx(sums["flow"][0] / sums["flow"][1], rel=1e-5)
    assert rep["loss_repa"] == pytest.approx(sums["repa"][0] / sums["repa"][1], rel=1e-5)


def test_mmbench_by_likelihood(flow_model, tmp_path):
    """JanusFlow scores each option by its summed und CE (one forward per option)."""
    import base64
    import io

    import numpy as np

    from janus_train.eval.config import EvalData, EvalSettings
    from janus_train.eval.harness import Evaluator

    model, tok = flow_model
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, "PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [["0", "What color is the circle?", "nan", "red", "blue", "green", "nan", "A", "colour", img],
            ["1", "How many shapes?", "nan", "one", "two", "nan", "nan", "B", "count", "0"]]
    tsv = tmp_path / "mmb.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in [cols, *rows]) + "\n")
    data = EvalData.from_dict({"mmbench": str(tsv), "seq_len": 256})
    out = Evaluator(model, tok, data, EvalSettings(tasks=["und"])).und()
    assert out["mmbench_questions"] == 2
    assert [p["prediction"] for p in out["mmbench_predictions"]][0] in ("A", "B", "C")
    assert out["mmbench_predictions"][1]["prediction"] in ("A", "B")


def test_training_config_needs_model_vae_for_flow_gen_eval():
    """A JanusFlow run whose evaluation draws samples needs model.vae, refused before training;
    without the gen task (or without gen sets) it does not."""
    from janus_train.training.config import ConfigError, load_config, validate_config

    base = ["+recipe=janusflow_tiny_demo", "model.vae=null", "logging.sample_every=0",
            "eval.data={und: [{path: u}], gen: [{path: g}], seq_len: 256}"]
    with pytest.raises(ConfigError) as e:
        validate_config(load_config(base), dp_size=1, check_paths=False)
    assert e.value.key == "model.vae" and "eval" in str(e.value)
    run = validate_config(load_config([*base, "eval.tasks=[loss,und]", "eval.flow_steps=7"]), dp_size=1, check_paths=False)
    assert run.eval.flow_steps == 7
