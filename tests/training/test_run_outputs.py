"""Engine acceptance 3, 4, 5: freeze rules, HF export parity, metrics / W&B / sample grids.

One short three-stage run (2 steps per stage, one process) is shared by these tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from janus_train.logging.metrics import FIELDS
from janus_train.checkpoint.io import load_pretrained, load_tokenizer, read_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(shapes_root, tmp_path_factory, trainer_tools):
    run_dir = tmp_path_factory.mktemp("run")
    overrides = trainer_tools.base(shapes_root, run_dir) + [
        "logging.wandb.enabled=true",
        "logging.sample_every=2",
        "logging.sample_num=2",
        "logging.sample_prompts=[a red circle,a blue square]",
        # The paper's stage-2 rule (tiny_demo trains the random mini SigLIP in stage 2 too).
        "train.stages.stage2.trainable=[llm,lm_head,und_aligner,gen_embed,gen_aligner,gen_head]",
        "checkpoint.every_steps=100",
    ]
    r = trainer_tools.run(overrides, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir


def _weights(path):
    return read_checkpoint(path)[1]


def _changed(a, b, prefix):
    keys = [k for k in a if k.startswith(prefix + ".")]
    assert keys, prefix
    return any(not torch.equal(a[k], b[k]) for k in keys)


def test_status_and_checkpoints(finished_run):
    status = json.loads((finished_run / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 6
    names = sorted(p.name for p in (finished_run / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000004", "step_00000006"]  # stage ends are kept


def test_freeze_rules(finished_run, shapes_root):
    init = _weights(shapes_root / "tiny_init")
    s1, s2, s3 = (_weights(finished_run / "checkpoints" / f"step_0000000{i}" / "model") for i in (2, 4, 6))
    for frozen in ("llm", "lm_head", "vision", "vq"):
        assert not _changed(init, s1, frozen), f"stage 1 changed {frozen}"
    for trained in ("und_aligner", "gen_embed", "gen_aligner", "gen_head"):
        assert _changed(init, s1, trained), f"stage 1 did not train {trained}"
    for frozen in ("vision", "vq"):
        assert not _changed(s1, s2, frozen), f"stage 2 changed {frozen}"
    for trained in ("llm", "lm_head", "gen_head"):
        assert _changed(s1, s2, trained), f"stage 2 did not train {trained}"
    assert not _changed(s2, s3, "vq"), "stage 3 changed vq"
    assert _changed(s2, s3, "vision"), "stage 3 did not train SigLIP"


def test_hf_export_matches_our_model(finished_run):
    from transformers import JanusForConditionalGeneration

    export = finished_run / "exports" / "stage3"
    hf = JanusForConditionalGeneration.from_pretrained(str(export), dtype=torch.float32).eval()
    ours = load_pretrained(finished_run / "checkpoints" / "step_00000006" / "model")
    tok = load_tokenizer(export)
    ids = torch.tensor([tok("<|User|>: What color is the circle?\n\n<|Assistant|>: red").input_ids])
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits[0]
        from janus_train.models.attention import PackedDocs

        h = ours.llm(ours.llm.embed_tokens(ids), torch.arange(ids.shape[1])[None], PackedDocs.single_document_rows(1, ids.shape[1]), "sdpa")
        mine = ours.text_logits(h)[0]
    assert (mine - theirs).abs().max().item() <= 1e-4
    # The export carries the tokenizer and is bitwise the checkpoint's weights.
    assert (export / "tokenizer.json").is_file()
    exported = load_file(str(export / "model.safetensors"))
    assert torch.equal(exported["lm_head.weight"], ours.lm_head.weight)


def test_metrics_wandb_and_samples(finished_run):
    lines = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for r in lines:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "model_flops_per_s", "memory_gib", "step_time_s"):
            assert isinstance(r[k], float) and r[k] > 0, (k, r[k])
        assert r["mfu"] is None  # CPU without logging.peak_flops
    assert [r["stage"] for r in lines] == [1, 1, 2, 2, 3, 3]
    assert lines[0]["loss_text"] is None and lines[2]["loss_text"] is not None  # stage 1 has no text
    runs = list((finished_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert b"train/loss" in blob and b"samples/grid" in blob
    grids = sorted((finished_run / "samples").glob("step_*.png"))
    assert [g.name for g in grids][:3] == ["step_00000002.png", "step_00000004.png", "step_00000006.png"]
    img = np.asarray(Image.open(grids[0]))
    # 2 prompts (rows) x 2 samples of 64 px, scaled to 128 px, each prompt written under its image.
    cell_h = img.shape[0] // 2
    assert img.shape[1] == 2 * 128 and img.shape[0] == 2 * cell_h and cell_h > 128, img.shape
    caption = img[128:cell_h, :128]
    assert (caption < 100).any() and (caption > 200).any()  # dark text on white


def test_convert_exports_a_training_run(finished_run, tmp_path):
    from janus_train.convert import convert

    out = convert(finished_run, "train", tmp_path / "hf", "hf")
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(finished_run / "exports" / "stage3" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    step2 = convert(finished_run / "checkpoints" / "step_00000002", "train", tmp_path / "s2", "native")
    assert (step2 / "config.json").is_file()
