"""`python -m janus_train.eval`: all three tasks on the checkpoints a user has (a
make_tiny_checkpoint model, an HF export, a training run), MMBench's TSV layout scored by
likelihood, GenEval's folder layout, 2 ranks = 1 rank, and one-line errors for bad input."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def run_eval(*args: str, nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "janus_train.eval", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port()),
               "-m", "janus_train.eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=full_env, timeout=900)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def one_rank(tiny_hf_ckpt, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_one")
    r = run_eval("--ckpt", str(tiny_hf_ckpt), "--data", str(eval_data / "eval.yaml"), "--num", "6", "--scorer", "shapes",
                 "--max-new-tokens", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_all_tasks_on_a_tiny_checkpoint(one_rank):
    out, r = one_rank
    rep = _report(out)
    for task in ("und", "text", "gen"):
        assert rep[f"loss_{task}"] > 0 and rep[f"tokens_{task}"] > 0 and rep[f"docs_{task}"] == 6
    assert 0.0 <= rep["und_acc"] <= 1.0 and rep["und_questions"] == 6 and len(rep["und_answers"]) == 6
    assert set(rep["und_acc_by_type"]) <= {"color", "shape", "count", "background", "position", "describe"}
    assert rep["gen_prompts"] == 6 and 0.0 <= rep["gen_acc"] <= 1.0 and len(rep["gen_samples"]) == 6
    grid = Image.open(out / "gen_grid.png")
    assert grid.width >= 6 * 128 // 2 and grid.height > 128  # images with their prompts written under them
    headline = json.loads(r.stdout.strip().splitlines()[-1])
    assert headline["loss_gen"] == rep["loss_gen"] and headline["report"].endswith("report.json")


def test_val_loss_is_the_training_normalisation(one_rank, tiny_hf_ckpt, eval_data):
    """loss_und = summed CE over the held-out und documents / their supervised tokens, computed
    here document by document with the model's plain forward."""
    from janus_train.checkpoint.io import load_pretrained, load_tokenizer
    from janus_train.contracts.batch import TASK_ID, Row, collate
    from janus_train.contracts.tokens import TokenizerInfo
    from janus_train.eval.config import EvalData, EvalSettings
    from janus_train.eval.harness import Evaluator

    rep = _report(one_rank[0])
    model, tok = load_pretrained(tiny_hf_ckpt), TokenizerInfo.from_hf(load_tokenizer(tiny_hf_ckpt))
    ev = Evaluator(model, tok, EvalData.from_yaml(eval_data / "eval.yaml"), EvalSettings(num=6))
    docs, _ = ev._documents("und")
    total, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            out = model(collate([Row(TASK_ID["und"], [d])], d.n, tok.pad_id, tok.image_id))
            total += float(out.loss_sum["und"])
            n += int(out.num_tokens["und"])
    assert rep["tokens_und"] == n
    assert rep["loss_und"] == pytest.approx(total / n, rel=1e-5)


@pytest.mark.slow
def test_two_ranks_report_what_one_does(one_rank, tiny_hf_ckpt, eval_data, tmp_path):
    out = tmp_path / "two"
    r = run_eval("--ckpt", str(tiny_hf_ckpt), "--data", str(eval_data / "eval.yaml"), "--items", "6", "--scorer", "shapes",
                 "--max-new-tokens", "8", "--out", str(out), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _report(one_rank[0]), _report(out)
    for rep in (a, b):
        rep.pop("eval_seconds")
        rep.pop("gen_grid")
    assert a == b
    assert np.array_equal(np.asarray(Image.open(one_rank[0] / "gen_grid.png")), np.asarray(Image.open(out / "gen_grid.png")))


def test_training_run_and_hf_export(reference_runs, eval_data, tmp_path):
    """A training run directory (its newest checkpoint's whole weights) and an HF export of it."""
    from janus_train.convert import convert

    run = reference_runs.one_rank
    r = run_eval("--ckpt", str(run), "--data", str(eval_data / "eval.yaml"), "--tasks", "loss", "--num", "4", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    hf = convert(run, "train", tmp_path / "hf", "hf")
    # An export taken out of its run carries no training config: the eval data says what the run
    # trained with (tiny_demo: no system prompt), as docs/evaluation.md tells users to.
    held = eval_data / "heldout"
    own = tmp_path / "eval_no_system.yaml"
    own.write_text(f"und: [{{path: {held / 'und'}}}]\ntext: [{{path: {held / 'text'}}}]\ngen: [{{path: {held / 'gen'}}}]\n"
                   "seq_len: 256\nund_system_prompt: null\n")
    r2 = run_eval("--ckpt", str(hf), "--data", str(own), "--tasks", "loss", "--num", "4", "--out", str(tmp_path / "hf_eval"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = _report(tmp_path / "run"), _report(tmp_path / "hf_eval")
    assert a["und_system_prompt"] is None and b["und_system_prompt"] is None  # the run's own, found from its config.yaml
    assert a["loss_und"] == pytest.approx(b["loss_und"], rel=1e-6) and a["loss_gen"] == pytest.approx(b["loss_gen"], rel=1e-6)


# ---- MMBench ----------------------------------------------------------------------------------


def _b64_png(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_mmbench(path: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    """A TSV in VLMEvalKit's MMBench layout (the columns and their order as the released files)."""
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "comment", "split"]
    rows = [
        {"index": "0", "question": "What color is the circle?", "hint": "nan", "A": "red", "B": "blue", "C": "green", "D": "white",
         "answer": "A", "category": "attribute_recognition", "image": _b64_png(0)},
        {"index": "1", "question": "How many shapes are there?", "hint": "Count carefully.", "A": "one", "B": "two", "C": "nan", "D": "nan",
         "answer": "B", "category": "object_localization", "image": _b64_png(1)},
        # VLMEvalKit stores a repeated image once: the other rows name its index.
        {"index": "2", "question": "Which shape is it?", "hint": "nan", "A": "star", "B": "square", "C": "cross", "D": "nan",
         "answer": "C", "category": "attribute_recognition", "image": "0"},
    ]
    keep = [c for c in cols if c not in drop]
    lines = ["\t".join(keep)] + ["\t".join(r.get(c, "nan") for c in keep) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return rows


def test_mmbench_tsv_scored_by_likelihood(tiny_hf_ckpt, eval_data, tmp_path):
    import yaml
    from transformers import JanusForConditionalGeneration

    from janus_train.checkpoint.io import load_tokenizer
    from janus_train.contracts import conversation as conv
    from janus_train.contracts.preprocess import und_pixels
    from janus_train.contracts.tokens import TokenizerInfo, conversation_ids
    from janus_train.eval.harness import mmbench_prompt, read_mmbench

    tsv = tmp_path / "MMBench_DEV_EN.tsv"
    write_mmbench(tsv)
    data = tmp_path / "eval.yaml"
    data.write_text(yaml.safe_dump({"mmbench": str(tsv), "seq_len": 256}))
    r = run_eval("--ckpt", str(tiny_hf_ckpt), "--data", str(data), "--tasks", "und", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = _report(tmp_path / "out")
    assert rep["mmbench_questions"] == 3 and set(rep["mmbench_acc_by_category"]) == {"attribute_recognition", "object_localization"}
    preds = [p["prediction"] for p in rep["mmbench_predictions"]]
    assert preds[1] in ("A", "B")  # options C and D are empty there
    # The same choice from transformers' own model: the option whose letter it finds likeliest.
    hf = JanusForConditionalGeneration.from_pretrained(str(tiny_hf_ckpt), dtype=torch.float32).eval()
    tok = TokenizerInfo.from_hf(load_tokenizer(tiny_hf_ckpt))
    n_img = hf.config.vision_config.num_image_tokens
    for row, pred in zip(read_mmbench(str(tsv)), preds):
        question, letters = mmbench_prompt(row)
        image = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
        pixels = und_pixels(image, hf.config.vision_config.image_size)[None]
        scores = []
        for letter in letters:
            turns = [{"role": "user", "content": conv.IMAGE_SLOT + "\n" + question}, {"role": "assistant", "content": letter}]
            ids, target = conversation_ids(tok, conv.render_conversation(turns, n_img, system=conv.DEFAULT_SYSTEM_PROMPT), n_img)
            ids_t = torch.tensor([ids])
            with torch.no_grad():
                logp = hf(input_ids=ids_t, pixel_values=pixels, attention_mask=torch.ones_like(ids_t)).logits[0].float().log_softmax(-1)
            answer_pos = [i for i, t in enumerate(target) if t][:-1]  # the letter, not the end-of-sentence
            scores.append(sum(float(logp[i - 1, ids[i]]) for i in answer_pos))
        assert pred == letters[int(np.argmax(scores))], (row["index"], scores)


def test_geneval_layout(tiny_hf_ckpt, tmp_path):
    import yaml

    meta = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"},
        {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}], "prompt": "a photo of a cat and a dog"},
    ]
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text("".join(json.dumps(m) + "\n" for m in meta))
    data = tmp_path / "eval.yaml"
    data.write_text(yaml.safe_dump({"geneval": str(prompts)}))
    r = run_eval("--ckpt", str(tiny_hf_ckpt), "--data", str(data), "--tasks", "gen", "--geneval-samples", "2", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    root = tmp_path / "out" / "geneval"
    assert sorted(p.name for p in root.iterdir()) == ["00000", "00001", "00002"]
    for i, m in enumerate(meta):
        folder = root / f"{i:05d}"
        # GenEval's evaluate_images.py reads metadata.jsonl with json.load and samples/<digits>.png.
        assert json.load(open(folder / "metadata.jsonl")) == m
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]
        img = Image.open(folder / "samples" / "00000.png")
        assert img.mode == "RGB" and img.size == (64, 64)


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_input_is_one_line_exit_2(tiny_hf_ckpt, eval_data, tmp_path):
    import shutil

    import yaml

    cases = []
    cases.append((["--data", str(tmp_path / "missing.yaml")], "missing.yaml"))
    bad_set = tmp_path / "bad_set.yaml"
    bad_set.write_text(yaml.safe_dump({"und": [str(tmp_path / "nowhere")]}))
    cases.append((["--data", str(bad_set)], "nowhere"))
    tsv = tmp_path / "bad.tsv"
    write_mmbench(tsv, drop=("answer", "image"))
    bad_tsv = tmp_path / "bad_tsv.yaml"
    bad_tsv.write_text(yaml.safe_dump({"mmbench": str(tsv)}))
    cases.append((["--data", str(bad_tsv), "--tasks", "und"], "['answer', 'image']"))
    cases.append((["--data", str(eval_data / "eval.yaml"), "--tasks", "loss,dance"], "dance"))
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_hf_ckpt, no_tok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink()
    cases.append((["--ckpt", str(no_tok), "--data", str(eval_data / "eval.yaml")], "no tokenizer"))
    for args, fragment in cases:
        full = (["--ckpt", str(tiny_hf_ckpt)] if "--ckpt" not in args else []) + args + ["--out", str(tmp_path / "o")]
        r = run_eval(*full)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (args, r.stderr)


# ---- the und system prompt follows training -----------------------------------------------------


def test_system_prompt_follows_the_training_run(tmp_path):
    """A model is asked with the system prompt it was trained with: the run's, found from the run
    directory, its checkpoints and its exports, unless the eval data sets one."""
    from janus_train.eval.__main__ import training_system_prompt
    from janus_train.eval.config import EvalData

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "exports" / "stage1").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  und_system_prompt: null\n  seq_len: 256\n")
    for where in (run, run / "checkpoints" / "step_00000002", run / "exports" / "stage1"):
        assert training_system_prompt(where) == (True, None), where
    alone = tmp_path / "hf"
    alone.mkdir()
    assert training_system_prompt(alone) == (False, None)

    unset = EvalData.from_dict({"seq_len": 64})
    assert unset.und_system_prompt == "default"  # nothing known about training: DeepSeek's
    assert unset.following(None).und_system_prompt is None
    assert unset.following("Be brief.").und_system_prompt == "Be brief."
    explicit = EvalData.from_dict({"seq_len": 64, "und_system_prompt": "default"})
    assert explicit.following(None).und_system_prompt == "default"  # the eval data's own choice wins
    assert unset.following(None).following("x").und_system_prompt is None  # set once, then fixed
