"""Write a random tiny Janus checkpoint (weights + tokenizer + processor) with no model hub.

    python -m janus_train.tools.make_tiny_checkpoint DIR [--format hf|deepseek|native] [--seed S]
        [--preset tiny] [--vq TOKENIZER_DIR]
    python -m janus_train.tools.make_tiny_checkpoint DIR --family janusflow [--format deepseek|native]
        [--preset janusflow_tiny]

Tests and the demo start from this. The model is our `tiny` preset with the LLM vocabulary
sized to the tiny tokenizer; weights are random but deterministic in --seed. With --vq, the VQ
tokenizer is a trained one (`python -m janus_train.tools.train_tokenizer`, for the same preset),
so the model's generations decode to images rather than noise.

--family janusflow writes a JanusFlow model (preset janusflow_tiny) in DeepSeek's release layout
(`--format deepseek`, the default for this family: config.json with vision_und_enc_config,
vision_gen_enc_config, vision_gen_dec_config, language_config) or native; JanusFlow has no hf
layout. Its tokenizer's und images are <begin_of_image> + one placeholder per SigLIP patch, as
DeepSeek's JanusFlow processor writes them (the model puts its begin embedding at the
<begin_of_image> position).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from janus_train.models.janus.config import JanusConfig
from janus_train.checkpoint.io import write_checkpoint
from janus_train.models.janus.model import JanusModel
from janus_train.models.janusflow.config import JanusFlowConfig
from janus_train.models.janusflow.model import JanusFlowModel
from janus_train.tools.tiny_tokenizer import save_tokenizer_and_processor


def make_tiny_checkpoint(
    out_dir: str | Path,
    fmt: str = "hf",
    seed: int = 0,
    init_std: float = 0.05,
    preset: str = "tiny",
    overrides: dict | None = None,
    vq: str | Path | None = None,
    family: str = "janus",
) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {list(FAMILIES)}")
    flow = family == "janusflow"
    if flow and vq is not None:
        raise ValueError("a JanusFlow model generates through a VAE, not a VQ tokenizer (--vq)")
    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.tokenizer"
    staging.mkdir(parents=True, exist_ok=True)
    cfg = (JanusFlowConfig if flow else JanusConfig).from_preset(preset, overrides)
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    tok = save_tokenizer_and_processor(staging, cfg.vision.image_size, patches)
    if len(tok) > cfg.llm.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens > llm.vocab_size {cfg.llm.vocab_size}")
    torch.manual_seed(seed)
    if flow:
        model = JanusFlowModel(cfg)
    else:
        cfg.image_token_id = tok.convert_tokens_to_ids("<image_placeholder>")
        model = JanusModel(cfg)
    model.init_weights(std=init_std, seed=seed)
    if vq is not None:
        load_trained_vq(model, vq)
    gen_cfg = {
        "_from_model_config": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>"),
        "guidance_scale": 5.0,
        "temperature": 1.0,
        "generation_kwargs": {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")},
    }
    (staging / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    write_checkpoint(out_dir, cfg, model.state_dict(), fmt=fmt, aux_from=staging)
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    return out_dir


FAMILIES = {"janus": "tiny", "janusflow": "janusflow_tiny"}  # family -> default preset


def load_trained_vq(model: JanusModel, path: str | Path) -> None:
    """Put a trained tokenizer's weights into the model's VQ; its config must be the model's."""
    from janus_train.checkpoint.io import CheckpointError, read_tokenizer_checkpoint

    meta, sd = read_tokenizer_checkpoint(path)
    if meta.get("kind") != "vq":
        raise CheckpointError(f"{path}: a {meta.get('kind')!r} tokenizer, this model generates through a VQ")
    ours = model.config.to_dict()["vq"]
    theirs = meta.get("config", {})
    diff = sorted(k for k in ours if k in theirs and ours[k] != theirs[k])
    if diff or meta.get("image_size") != model.config.gen_image_size:
        raise CheckpointError(
            f"{path}: the tokenizer was trained for another model config (vq {diff or 'same'}, image size "
            f"{meta.get('image_size')} vs {model.config.gen_image_size}); train it with the same --preset"
        )
    model.vq.load_state_dict(sd, strict=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="directory to create (replaced if it exists)")
    p.add_argument("--family", default="janus", choices=list(FAMILIES), help="model family (default janus, i.e. Janus-Pro)")
    p.add_argument("--format", default=None, choices=["hf", "deepseek", "native"],
                   help="checkpoint layout (default hf; deepseek, the release layout, for janusflow)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--init-std", type=float, default=0.05, help="std of the normal weight init (default 0.05)")
    p.add_argument("--preset", default=None, help="model preset (default tiny; janusflow_tiny for --family janusflow)")
    p.add_argument("--vq", default=None, help="a trained VQ tokenizer directory (python -m janus_train.tools.train_tokenizer)")
    args = p.parse_args(argv)
    from janus_train.checkpoint.io import CheckpointError

    try:
        fmt = args.format or ("deepseek" if args.family == "janusflow" else "hf")
        preset = args.preset or FAMILIES[args.family]
        path = make_tiny_checkpoint(args.out_dir, fmt, args.seed, args.init_std, preset, vq=args.vq, family=args.family)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {fmt} {args.family} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
