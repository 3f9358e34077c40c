"""`make demo`: the project's main job at tiny size, on CPU, with no model hub.

Stage 0 of the demo (until the training engine lands): write a tiny random checkpoint,
convert it hf -> native -> hf, sample images with CFG and answer a question about one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from janus_train.convert import convert
from janus_train.inference.t2i import SampleConfig, codes_to_images, generate_codes, image_grid
from janus_train.inference.understand import answer
from janus_train.models.janus.loading import load_pretrained, load_tokenizer
from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint


def main() -> int:
    out = Path("demo_out")
    out.mkdir(exist_ok=True)
    hf = make_tiny_checkpoint(out / "tiny_hf", fmt="hf", seed=0)
    native = convert(hf, "hf", out / "tiny_native", "native")
    back = convert(native, "native", out / "tiny_hf_roundtrip", "hf")
    model, tok = load_pretrained(back), load_tokenizer(back)
    codes = generate_codes(model, tok, "a red circle", 4, SampleConfig(cfg_weight=5.0), torch.Generator().manual_seed(0))
    grid = out / "samples.png"
    images = codes_to_images(model, codes)
    Image.fromarray(image_grid(images)).save(grid)
    text, _ = answer(model, tok, Image.fromarray(images[0]), "What is in the image?", max_new_tokens=16)
    print(f"checkpoints: {hf}, {native}, {back}")
    print(f"samples:     {grid}")
    print(f"answer:      {text!r} (random weights: expect noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
