"""Write a random tiny Janus checkpoint (weights + tokenizer + processor) with no model hub.

    python -m janus_train.tools.make_tiny_checkpoint DIR [--format hf|deepseek|native] [--seed S]

Tests and the demo start from this. The model is our `tiny` preset with the LLM vocabulary
sized to the tiny tokenizer; weights are random but deterministic in --seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from janus_train.models.janus.config import JanusConfig
from janus_train.checkpoint.io import write_checkpoint
from janus_train.models.janus.model import JanusModel
from janus_train.tools.tiny_tokenizer import save_tokenizer_and_processor


def make_tiny_checkpoint(
    out_dir: str | Path,
    fmt: str = "hf",
    seed: int = 0,
    init_std: float = 0.05,
    preset: str = "tiny",
    overrides: dict | None = None,
) -> Path:
    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.tokenizer"
    staging.mkdir(parents=True, exist_ok=True)
    cfg = JanusConfig.from_preset(preset, overrides)
    tok = save_tokenizer_and_processor(staging, cfg.vision.image_size, cfg.num_image_tokens)
    if len(tok) > cfg.llm.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens > llm.vocab_size {cfg.llm.vocab_size}")
    cfg.image_token_id = tok.convert_tokens_to_ids("<image_placeholder>")
    torch.manual_seed(seed)
    model = JanusModel(cfg)
    model.init_weights(std=init_std, seed=seed)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="directory to create (replaced if it exists)")
    p.add_argument("--format", default="hf", choices=["hf", "deepseek", "native"], help="checkpoint layout (default hf)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--init-std", type=float, default=0.05, help="std of the normal weight init (default 0.05)")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    args = p.parse_args(argv)
    path = make_tiny_checkpoint(args.out_dir, args.format, args.seed, args.init_std, args.preset)
    print(f"wrote {args.format} checkpoint to {path}")


if __name__ == "__main__":
    main()
