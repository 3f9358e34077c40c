"""Image understanding: our greedy answer equals transformers' greedy text generation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from janus_train.contracts.preprocess import und_pixels
from janus_train.inference.understand import answer, prompt_ids
from janus_train.checkpoint.io import load_pretrained, load_tokenizer


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path)
    return path


def test_greedy_answer_equals_transformers(tiny_hf_ckpt, image):
    from transformers import JanusForConditionalGeneration

    hf = JanusForConditionalGeneration.from_pretrained(str(tiny_hf_ckpt), dtype=torch.float32).eval()
    model, tok = load_pretrained(tiny_hf_ckpt), load_tokenizer(tiny_hf_ckpt)
    img = Image.open(image)
    _, ours = answer(model, tok, img, "What is in the image?", max_new_tokens=12, system=None)
    # The same input ids (ours, built as training builds und prompts) into both models.
    ids = torch.tensor([prompt_ids(tok, model.config.num_image_tokens, "What is in the image?", system=None)])
    pixels = und_pixels(img.convert("RGB"), model.config.vision.image_size)[None]
    out = hf.generate(ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    theirs = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.pad_token_id]
    if tok.eos_token_id in theirs:
        theirs = theirs[: theirs.index(tok.eos_token_id)]
    assert ours == theirs
    assert len(ours) > 0


def test_chat_cli(tiny_hf_ckpt, image):
    r = subprocess.run([sys.executable, "-m", "janus_train.chat", "--ckpt", str(tiny_hf_ckpt), "--image", str(image),
                        "--question", "What color?", "--max-new-tokens", "5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "janus_train.chat", "--ckpt", str(tiny_hf_ckpt), "--image", "/nonexistent.png",
                        "--question", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot read image" in r.stderr
