"""Text-to-image generation from any Janus checkpoint (Janus-Pro or JanusFlow).

    python -m janus_train.generate --ckpt DIR --prompt TEXT [--cfg W] [--num N] [--seed S] --out DIR
                                   [--device cpu|cuda] [--dtype fp32|bf16|fp16]
        Janus-Pro (VQ codes):  [--temperature 1.0] [--top-k K] [--greedy]
        JanusFlow (rectified flow on VAE latents):  --vae VAE_DIR [--steps 30]

The family is read from the checkpoint. --cfg defaults to 5 for Janus-Pro (logits u + w(c-u))
and 2 for JanusFlow (velocities w c - (w-1) u), each family's release default. JanusFlow needs
the VAE its latents belong to (a diffusers AutoencoderKL directory: the SDXL-VAE for the
release, or one written by `train_tokenizer --kind vae`); it runs in bf16 with --dtype bf16 and
in fp32 otherwise (the SDXL-VAE overflows in fp16). Options of the other family are refused.

Writes N PNGs (prompt slug + index) and a grid.png into --out, and prints their paths.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from PIL import Image

from janus_train.inference.flow import FlowSampleConfig, check_vae, generate_latents, latents_to_images, load_vae
from janus_train.inference.t2i import SampleConfig, codes_to_images, generate_codes, image_grid
from janus_train.checkpoint.io import CheckpointError, load_pretrained, load_tokenizer, read_config
from janus_train.models.janusflow.config import JanusFlowConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Each family's default guidance weight (its release demo's).
DEFAULT_CFG = {"janus": 5.0, "janusflow": 2.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m janus_train.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (hf, deepseek or native; auto-detected)")
    p.add_argument("--prompt", required=True, help="the caption to draw")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance weight w (default: 5 for Janus-Pro, u + w(c-u) on logits; "
                        "2 for JanusFlow, w c - (w-1) u on velocities)")
    p.add_argument("--temperature", type=float, default=None, help="Janus-Pro only: sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="Janus-Pro only: sample only among the k most likely codes (default: all)")
    p.add_argument("--greedy", action="store_true", help="Janus-Pro only: argmax instead of sampling")
    p.add_argument("--vae", default=None, help="JanusFlow only, required there: the diffusers AutoencoderKL directory that decodes its latents")
    p.add_argument("--steps", type=int, default=None, help="JanusFlow only: Euler steps of the flow ODE (default 30)")
    p.add_argument("--num", type=int, default=4, help="images to generate (default 4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", required=True, help="output directory for PNGs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model dtype (default fp32)")
    return p


def _family_options(args: argparse.Namespace, flow: bool) -> str | None:
    """The error for an option of the other family or a missing --vae; None when all fit."""
    if flow:
        given = [name for name, v in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--greedy", args.greedy or None))
                 if v is not None]
        if given:
            return f"{', '.join(given)}: Janus-Pro options; {args.ckpt} is a JanusFlow checkpoint (see --cfg, --steps)"
        if args.vae is None:
            return (f"--vae VAE_DIR is required for a JanusFlow checkpoint ({args.ckpt}): the diffusers AutoencoderKL "
                    "directory that decodes its latents (the SDXL-VAE for DeepSeek's release)")
        return None
    given = [name for name, v in (("--vae", args.vae), ("--steps", args.steps)) if v is not None]
    if given:
        return f"{', '.join(given)}: JanusFlow options; {args.ckpt} is a Janus-Pro checkpoint"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num < 1:
        print(f"error: --num must be >= 1, got {args.num}", file=sys.stderr)
        return 2
    try:
        model_cfg = read_config(args.ckpt)
        flow = isinstance(model_cfg, JanusFlowConfig)
        problem = _family_options(args, flow)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        cfg_weight = DEFAULT_CFG["janusflow" if flow else "janus"] if args.cfg is None else args.cfg
        if flow:
            fsc = FlowSampleConfig(30 if args.steps is None else args.steps, cfg_weight).validate()
        else:
            temperature = 1.0 if args.temperature is None else args.temperature
            sc = SampleConfig(cfg_weight, temperature, args.top_k, args.greedy).validate()
        if flow:
            vae = load_vae(args.vae, args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
            check_vae(vae, model_cfg)
        model = load_pretrained(args.ckpt, device=args.device, dtype=DTYPES[args.dtype])
        tok = load_tokenizer(args.ckpt)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    if flow:
        latents = generate_latents(model, tok, args.prompt, args.num, fsc, generator=gen, progress=True)
        images = latents_to_images(vae, latents)
    else:
        codes = generate_codes(model, tok, args.prompt, args.num, sc, generator=gen, progress=True)
        images = codes_to_images(model, codes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", args.prompt).strip("_")[:48] or "image"
    for i, img in enumerate(images):
        path = out / f"{slug}_{i:02d}.png"
        Image.fromarray(img).save(path)
        print(path)
    Image.fromarray(image_grid(images)).save(out / "grid.png")
    print(out / "grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
