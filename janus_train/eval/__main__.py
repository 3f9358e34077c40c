"""Evaluate a checkpoint: validation loss, understanding accuracy, generation scored.

    python -m janus_train.eval --ckpt DIR --data DATA.yaml [--tasks loss,und,gen] [--num N]
        [--cfg W] [--scorer shapes] [--out DIR] [--max-new-tokens T] [--geneval-samples K]
        [--seed S] [--device cpu|cuda] [--dtype fp32|bf16] [--vae DIR] [--flow-steps N]
    torchrun --nproc-per-node N -m janus_train.eval ... --items N    (the ranks share the work)

--ckpt: a checkpoint directory (hf, deepseek or native; e.g. from make_tiny_checkpoint or an
export) or a training run / one of its checkpoints (its whole weights), Janus-Pro or JanusFlow.
A JanusFlow checkpoint's gen samples are VAE latents: --vae names the diffusers AutoencoderKL
directory it was trained with (required with the gen task; --flow-steps Euler steps per sample;
--temperature does not apply). DATA.yaml lists the
held-out sets (docs/evaluation.md): und/text/gen shard directories, an MMBench TSV, GenEval
prompts. Writes DIR/report.json (default --out eval_out), DIR/gen_grid.png (each prompt under
its image) and, with GenEval prompts, DIR/geneval/ in GenEval's layout. Prints the headline
numbers as one JSON line. Exit codes: 0 done, 2 bad input (a one-line `error:` message).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _resolve(ckpt: str) -> Path:
    """The model directory of --ckpt (a run or one of its checkpoints: the newest weights, its
    weight average when the run keeps one, a LoRA run's adapters read onto their base)."""
    from janus_train.checkpoint.export import training_model_dir
    from janus_train.checkpoint.io import CheckpointError, detect_format

    path = Path(ckpt)
    if not path.exists():
        raise CheckpointError(f"--ckpt {ckpt} does not exist")
    if (path / "checkpoints").is_dir() or (path / "meta.json").is_file():
        path = training_model_dir(path)
    detect_format(path)
    return path


def _load(path: Path, device: str, dtype: torch.dtype):
    from janus_train.checkpoint.io import CheckpointError, load_pretrained, load_tokenizer

    try:
        tok = load_tokenizer(path)
    except CheckpointError:
        raise CheckpointError(f"{path}: the checkpoint has no tokenizer (tokenizer.json / tokenizer_config.json); "
                              "copy the tokenizer files of the model it was trained from into it") from None
    return load_pretrained(path, device=device, dtype=dtype), tok


def _vae(path: str | None, config, draws: bool, device: str, dtype: torch.dtype):
    """The VAE a JanusFlow checkpoint's gen samples need (loaded and checked before the model),
    None when nothing is drawn; ConfigError naming --vae when it is missing, does not fit, or
    is given for a Janus-Pro checkpoint."""
    from janus_train.contracts.errors import ConfigError
    from janus_train.models.janusflow.config import JanusFlowConfig

    if not isinstance(config, JanusFlowConfig):
        if path is not None:
            raise ConfigError("--vae", "only JanusFlow decodes its samples with a VAE; --ckpt is a Janus-Pro checkpoint (its VQ is in it)")
        return None
    if not draws:
        return None
    if path is None:
        raise ConfigError("--vae", "--ckpt is a JanusFlow checkpoint: its gen samples are VAE latents, so the gen task needs "
                          "--vae DIR (the diffusers AutoencoderKL it was trained with); or leave gen out of --tasks")
    from janus_train.inference.flow import check_vae, load_vae

    if not Path(path).is_dir():
        raise ConfigError("--vae", f"{path!r} is not a directory (a diffusers AutoencoderKL)")
    try:
        vae = load_vae(path, device=device, dtype=dtype)  # bf16 with --dtype bf16, else fp32 (as generate)
        check_vae(vae, config)
    except ValueError as e:
        raise ConfigError("--vae", str(e).splitlines()[0]) from None
    return vae


def training_system_prompt(ckpt: str | Path) -> tuple[bool, str | None]:
    """(found, data.und_system_prompt) of the training run a checkpoint comes from: a run
    directory, one of its checkpoints/step_* or exports/stageN (the run's config.yaml is at most
    two levels up). Not found for a checkpoint outside a run."""
    import yaml

    path = Path(ckpt).resolve()
    for d in (path, *list(path.parents)[:2]):
        f = d / "config.yaml"
        if f.is_file() and ((d / "checkpoints").is_dir() or (d / "metrics.jsonl").is_file()):
            data = (yaml.safe_load(f.read_text()) or {}).get("data") or {}
            if "und_system_prompt" in data:
                return True, data["und_system_prompt"]
    return False, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m janus_train.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory or training run")
    p.add_argument("--data", required=True, help="eval data YAML (held-out sets)")
    p.add_argument("--tasks", default="loss,und,gen", help="comma-separated: loss, und, gen (default all)")
    p.add_argument("--num", "--items", dest="num", type=int, default=64,
                   help="items per task: documents per loss set, questions, prompts (default 64). Under torchrun write "
                        "--items: torchrun's own parser takes --num for its --numa-binding")
    p.add_argument("--cfg", type=float, default=5.0, help="CFG weight of the gen samples (default 5)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the gen samples (default 1)")
    p.add_argument("--scorer", default=None, help="gen scorer: shapes (default: none, samples and grid only)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default 48)")
    p.add_argument("--geneval-samples", type=int, default=4, help="images per GenEval prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i uses seed + i (default 0)")
    p.add_argument("--out", default="eval_out", help="output directory (default eval_out)")
    p.add_argument("--vae", default=None, help="JanusFlow: the diffusers AutoencoderKL directory that decodes its gen samples "
                                               "(required with the gen task; refused for Janus-Pro)")
    p.add_argument("--flow-steps", type=int, default=30, help="JanusFlow: Euler steps of each gen sample (default 30)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = p.parse_args(argv)

    from janus_train.checkpoint.io import CheckpointError, read_config
    from janus_train.contracts.errors import ConfigError
    from janus_train.eval.config import EvalData, EvalSettings, parse_tasks
    from janus_train.eval.harness import EvalContext, Evaluator, summary

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    def fail(message: str) -> int:
        if rank == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        tasks = parse_tasks(args.tasks)
        if args.scorer is not None:
            from janus_train.eval.scorers import get_scorer

            get_scorer(args.scorer)
        settings = EvalSettings(tasks=tasks, num=args.num, cfg=args.cfg, temperature=args.temperature, scorer=args.scorer,
                                max_new_tokens=args.max_new_tokens, geneval_samples=args.geneval_samples, seed=args.seed,
                                flow_steps=args.flow_steps)
        data = EvalData.from_yaml(args.data)
        found, prompt = training_system_prompt(args.ckpt)
        if found:
            data = data.following(prompt)
        data.check_exists(tuple(tasks))
        if data.mmbench and "und" in tasks:
            from janus_train.eval.harness import read_mmbench

            read_mmbench(data.mmbench)  # the columns, before any model is loaded
        path = _resolve(args.ckpt)
        vae = _vae(args.vae, read_config(path), "gen" in tasks and bool(data.gen or data.geneval), args.device, DTYPES[args.dtype])
        model, tok = _load(path, args.device, DTYPES[args.dtype])
    except (ConfigError, CheckpointError) as e:
        return fail(str(e))
    except ValueError as e:  # pydantic settings errors and bad scorer names
        return fail(str(e).splitlines()[0])
    dist_ctx = EvalContext(device=torch.device(args.device), dtype=DTYPES[args.dtype])
    if world > 1:
        from janus_train.parallel.distributed import init_distributed

        info = init_distributed()
        dist_ctx.rank, dist_ctx.world = info.rank, info.world_size
    try:
        report = Evaluator(model, tok, data, settings, dist_ctx, vae=vae).run(args.out)
    except ConfigError as e:
        return fail(str(e))
    finally:
        if world > 1:
            from janus_train.parallel.distributed import destroy

            destroy()
    if rank == 0:
        print(json.dumps({"report": str(Path(args.out) / "report.json"), **summary(report)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
