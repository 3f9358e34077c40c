"""The demo's inputs, built on the fly when absent, with no downloads: the synthetic shapes world
(training and held-out splits, shards of all three tasks), a tiny VQ tokenizer trained on its
images, the tiny init checkpoint that uses it, and the gen shards pre-tokenised with it.

    python -m janus_train.tools.demo_assets --root DIR --init DIR [--preset mini] [--num-samples N]
        [--held-out N] [--tokenizer-steps N] [--max-shapes 1] [--min-size F] [--max-size F]
        [--shapes K,...] [--colors C,...] [--backgrounds C,...] [--noise 0] [--max-questions 6] [--seed S]

Layout under --root: und/, text/, gen_real/, gen_synthetic/ (training), heldout/{und,text,gen}/
(evaluation), eval.yaml (the held-out sets, for `python -m janus_train.eval --data`), tokenizer/
(the trained VQ and its report). A `.complete` marker is written last, so an interrupted build is
redone rather than trusted. `make demo` builds them before any rank starts; a training run of
the demo recipes with `demo_assets.build=true` has rank 0 build them (in a subprocess) while the
others wait.

They are built only for a run that uses the demo's own data (`uses_demo_data`): every training
source, model.init_from and model.vae under data.root, and data.root absent, empty or written by
this builder (`.demo_assets` is its first file). A demo recipe reused with one's own data.*
settings never builds (nor deletes) anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from janus_train.parallel.distributed import DistInfo, barrier





# Written first by the builder: the directory holds the demo's assets (complete or not).
MARKER = ".demo_assets"
COMPLETE = ".complete"
TASKS = ("und", "text", "gen")

# The init's weight std: the usual 0.02 (make_tiny_checkpoint's 0.05 default suits parity tests,
# but measured on the demo world, a mini model trained from it learned its und questions slower).
INIT_STD = 0.02


@dataclass(frozen=True)
class WorldSpec:
    """The shapes world's difficulty (data_pipelines/synthetic_shapes.py)."""

    max_shapes: int = 3
    min_size: float = 0.08
    max_size: float = 0.2
    shapes: tuple[str, ...] | None = None  # None: every kind
    noise: int = 6
    max_questions: int = 3
    square: bool = False
    backgrounds: tuple[str, ...] | None = None  # None: every colour
    colors: tuple[str, ...] | None = None  # shape colours; None: every colour

    @classmethod
    def of(cls, demo_assets: Any) -> "WorldSpec":
        """From the config's `demo_assets` section."""
        d = demo_assets
        return cls(int(d.max_shapes), float(d.min_size), float(d.max_size), tuple(d.shapes), int(d.noise), int(d.max_questions),
                   bool(d.square), tuple(d.backgrounds), tuple(d.colors))

    def args(self) -> list[str]:
        out = ["--max-shapes", str(self.max_shapes), "--min-size", str(self.min_size), "--max-size", str(self.max_size),
               "--noise", str(self.noise), "--max-questions", str(self.max_questions)] + (["--square"] if self.square else [])
        out += ["--backgrounds", ",".join(self.backgrounds)] if self.backgrounds else []
        out += ["--colors", ",".join(self.colors)] if self.colors else []
        return out + (["--shapes", ",".join(self.shapes)] if self.shapes else [])


# The demo world (the defaults of recipes/config.yaml's demo_assets): one large shape per image,
# square images, centred, of nearly one size, so a 64 px (tiny_learn) or 32 px (the demo) image
# is nearly one layout per shape and a model trained from scratch for minutes on CPU can learn
# to read and draw it (with sizes of
# 0.3-0.42, positions that vary with them and mixed aspect ratios, measured learning was several
# times slower); five kinds whose silhouettes stay distinct at 64 px after a tiny VQ (ellipse,
# rectangle and diamond read as circle and square; a hexagon as a circle); flat colours (pixel
# noise spreads one colour over many VQ codes, which slows generation); up to six questions per
# image (more answers per image token); two background colours: a shape's outline is a
# different set of VQ codes for every (shape colour, background colour) pair, and reading a
# shape means telling shape pixels from background pixels, so with ten backgrounds (90 pairs)
# neither generation nor und's shape questions were learned in 20 minutes (colour was); six shape
# colours, none of them a background's or close to one (white, black, and cyan and pink, which
# were the worst generated colours on white), so each of the 60 (kind, colour, background)
# combinations is seen often.
DEMO_WORLD = WorldSpec(1, 0.36, 0.4, ("circle", "square", "triangle", "star", "cross"), noise=0, max_questions=6, square=True,
                       backgrounds=("white", "black"), colors=("red", "green", "blue", "yellow", "purple", "orange"))


def _synthetic(out: Path, n: int, image_size: int, seed: int, world: WorldSpec, workers: int) -> None:
    from data_pipelines import synthetic_shapes

    synthetic_shapes.main(["--out", str(out), "--n", str(n), "--image-size", str(image_size), "--seed", str(seed),
                           "--workers", str(workers), *world.args()])


def build_shapes_dataset(root: Path, ckpt: Path | None, num_samples: int, image_size: int, seed: int, workers: int = 2,
                         world: WorldSpec = WorldSpec(), held_out: int = 0, vae: Path | None = None) -> None:
    """Shards of the shapes world under root (and root/heldout with `held_out` samples per task);
    gen shards are pre-tokenised with `ckpt`'s VQ, or with `vae` for a JanusFlow `ckpt` (left
    as images under *_images when ckpt is None)."""
    from data_pipelines import build_shards

    raw = root / "raw"
    _synthetic(raw, num_samples, image_size, seed, world, workers)
    shard = max(64, num_samples // 8)
    build_shards.build("und", raw / "und.jsonl", root / "und", shard_size=shard, workers=workers)
    build_shards.build("text", raw / "text.jsonl", root / "text", shard_size=shard, workers=workers)
    for kind in ("real", "synthetic"):
        build_shards.build("gen", raw / f"gen_{kind}.jsonl", root / f"gen_{kind}_images", shard_size=shard, workers=workers, source=kind)
    if held_out:
        # Another seed: scenes (and their captions) the model never trains on.
        hraw = root / "heldout_raw"
        _synthetic(hraw, held_out, image_size, seed + 100_003, world, workers)
        for task in ("und", "text"):
            build_shards.build(task, hraw / f"{task}.jsonl", root / "heldout" / task, shard_size=shard, workers=workers)
        build_shards.build("gen", hraw / "gen_real.jsonl", root / "heldout" / "gen_images", shard_size=shard, workers=workers, source="real")
        shutil.rmtree(hraw)
    if ckpt is not None:
        pretokenize_all(root, ckpt, vae)
    shutil.rmtree(raw, ignore_errors=True)


def pretokenize_all(root: Path, ckpt: Path, vae: Path | None = None) -> None:
    """Encode every *_images gen shard set under root (and root/heldout) with ckpt's VQ, or to
    VAE latents with `vae` (JanusFlow)."""
    from data_pipelines import pretokenize_vae, pretokenize_vq

    for images in sorted([*root.glob("*_images"), *(root / "heldout").glob("*_images")]):
        out = images.with_name(images.name.removesuffix("_images"))
        if vae is not None:
            pretokenize_vae.pretokenize(ckpt, vae, images, out, progress=False)
        else:
            pretokenize_vq.pretokenize(ckpt, images, out)
        shutil.rmtree(images)


EVAL_YAML = """\
# The demo's held-out sets (never trained on), for
#   python -m janus_train.eval --ckpt CKPT --data {root}/eval.yaml --scorer shapes
und: [{{path: heldout/und}}]
text: [{{path: heldout/text}}]
gen: [{{path: heldout/gen}}]
seq_len: 256
"""


def build_demo_assets(root: Path, init: Path, preset: str, num_samples: int, seed: int, held_out: int = 256,
                      tokenizer_steps: int = 1000, world: WorldSpec = DEMO_WORLD, workers: int = 2) -> None:
    """Build whatever is missing (idempotent; `.complete` is written last). For a JanusFlow
    preset the tokenizer is a tiny VAE (`train_tokenizer --kind vae`) and the gen shards hold
    its latents."""
    from janus_train.models.families import family_of_preset

    built = _read_complete(root)
    wanted = {"preset": preset, "num_samples": num_samples, "held_out": held_out, "world": world.args()}
    if built is not None and (init / "config.json").is_file():
        # Data of an older build with other settings (e.g. before the JanusFlow demo's world had
        # three colours) is rebuilt: the directory is the demo's own (MARKER).
        if all(built.get(k) == v for k, v in wanted.items()):
            return
        print(f"the demo data at {root} was built with other settings ({built}); rebuilding it", flush=True)
        (root / COMPLETE).unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("the janus-train demo's assets (janus_train/tools/demo_assets.py)\n")
    for sub in ("raw", "heldout_raw", "heldout", "und", "text", "gen_real", "gen_synthetic", "gen_real_images",
                "gen_synthetic_images", "tokenizer"):
        shutil.rmtree(root / sub, ignore_errors=True)  # leftovers of an interrupted build
    shutil.rmtree(init, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    family = family_of_preset(preset)
    flow = family.gen_kind == "flow"
    cfg = family.config(preset)
    image_size = int(cfg.image_size if flow else cfg.gen_image_size) * 3 // 2  # larger than the model sees: resizing is exercised
    print(f"building the synthetic shapes dataset at {root}", flush=True)
    build_shapes_dataset(root, None, num_samples, image_size, seed, workers=workers, world=world, held_out=held_out)
    kind = "vae" if flow else "vq"
    print(f"training the {preset} {kind.upper()} tokenizer for {tokenizer_steps} steps", flush=True)
    from janus_train.tools import train_tokenizer

    # The demo's VAE: width 16 at lr 4e-3 (measured on the demo world at 32 px, 500 steps: 24.4 dB,
    # the scorer reads 88% of reconstructions; width 16 at lr 2e-3 for 400 steps: 20.0 dB, 67%).
    vae_args = ["--vae-width", "16", "--lr", "4e-3"] if flow else []
    code = train_tokenizer.main(["--data", str(root / "gen_real_images"), "--out", str(root / "tokenizer"), "--preset", preset,
                                 "--kind", kind, "--steps", str(tokenizer_steps), "--held-out", "128", "--scorer", "shapes",
                                 "--seed", str(seed), *vae_args])
    if code != 0:
        raise RuntimeError(f"training the tokenizer failed (exit {code})")
    from janus_train.tools.make_tiny_checkpoint import make_tiny_checkpoint

    print(f"building the tiny init checkpoint at {init}", flush=True)
    if flow:
        make_tiny_checkpoint(init, fmt="deepseek", seed=seed, init_std=INIT_STD, preset=preset, family="janusflow")
    else:
        make_tiny_checkpoint(init, fmt="hf", seed=seed, init_std=INIT_STD, preset=preset, vq=root / "tokenizer")
    pretokenize_all(root, init, root / "tokenizer" if flow else None)
    (root / "eval.yaml").write_text(EVAL_YAML.format(root=root))
    (root / COMPLETE).write_text(json.dumps(wanted) + "\n")


def _read_complete(root: Path) -> dict | None:
    f = root / COMPLETE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return {}


def _inside(path: Any, root: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(root.resolve())


def uses_demo_data(cfg: DictConfig) -> tuple[bool, str]:
    """(whether the run uses the demo's own data, why not). The demo's data: every training
    source (data.<task> and the stages' own sources), model.init_from and model.vae under
    data.root, and data.root a directory the builder may write: absent, empty, or its own
    (`.demo_assets` or `.complete` in it)."""
    if not cfg.get("demo_assets", {}).get("build"):
        return False, "demo_assets.build is false"
    if cfg.data.get("root") is None:
        return False, "data.root is not set"
    root = Path(cfg.data.root)
    lists = {f"data.{t}": cfg.data.get(t) or [] for t in TASKS}
    for name, stage in (cfg.train.get("stages") or {}).items():
        if stage.get("enabled", True):
            lists.update({f"train.stages.{name}.sources.{t}": v for t, v in (stage.get("sources") or {}).items()})
    for key, sources in lists.items():
        for src in OmegaConf.to_container(sources, resolve=True) if OmegaConf.is_config(sources) else sources:
            if not _inside(src.get("path"), root):
                return False, f"{key} reads {src.get('path')}, not the demo's data under data.root={root}"
    if not _inside(cfg.model.get("init_from"), root):
        return False, f"model.init_from={cfg.model.get('init_from')} is not under data.root={root}"
    if cfg.model.get("vae") is not None and not _inside(cfg.model.vae, root):
        return False, f"model.vae={cfg.model.vae} is not under data.root={root}"
    if root.exists() and any(root.iterdir()) and not ((root / MARKER).is_file() or (root / COMPLETE).is_file()):
        return False, f"data.root={root} holds files the demo builder did not write"
    return True, ""


def ensure_demo_assets(cfg: DictConfig, dist_info: DistInfo) -> None:
    """Rank 0 builds the demo inputs in a fresh subprocess when the run uses the demo's own data
    (`uses_demo_data`); the others wait at a barrier.

    A subprocess, because the builders use fork-based worker pools, and forking a rank that
    already runs gloo/DeepSpeed threads can deadlock the child.
    """
    root = Path(cfg.data.root) if cfg.data.get("root") is not None else None
    init = Path(cfg.model.init_from) if cfg.model.get("init_from") is not None else None
    demo, why = uses_demo_data(cfg)
    built = demo and (init / "config.json").is_file() and (root / COMPLETE).is_file()
    if not demo:
        if init is not None and not init.exists():
            # config.py lets a demo recipe's init be absent (built here): not this time.
            from janus_train.training.config import ConfigError

            raise ConfigError("model.init_from", f"checkpoint directory {str(init)!r} does not exist (the demo's assets are not built: {why})")
        if dist_info.is_main:
            print(f"not building the demo's assets: {why}", flush=True)
        barrier()
        return
    if dist_info.is_main and demo and not built:
        d = cfg.demo_assets
        cmd = [
            sys.executable, "-m", "janus_train.tools.demo_assets",
            "--root", str(root), "--init", str(init), "--preset", str(cfg.model.preset),
            "--num-samples", str(int(d.num_samples)), "--held-out", str(int(d.held_out)),
            "--tokenizer-steps", str(int(d.tokenizer_steps)), "--seed", str(int(cfg.seed)),
            *WorldSpec.of(d).args(),
        ]
        subprocess.run(cmd, check=True)
    barrier()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m janus_train.tools.demo_assets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset directory (data.root)")
    p.add_argument("--init", required=True, help="tiny init checkpoint directory (model.init_from)")
    p.add_argument("--preset", default="mini", help="model preset (default mini)")
    p.add_argument("--num-samples", type=int, default=3000, help="training samples per task (default 3000)")
    p.add_argument("--held-out", type=int, default=256, help="held-out samples per task (default 256)")
    p.add_argument("--tokenizer-steps", type=int, default=1000,
                   help="VQ training steps of 16 images (default 1000, about 4 minutes on 2 cores)")
    w = DEMO_WORLD
    p.add_argument("--max-shapes", type=int, default=w.max_shapes, help="shapes per image, at most (default %(default)s)")
    p.add_argument("--min-size", type=float, default=w.min_size, help="smallest shape, a fraction of the short side (default %(default)s)")
    p.add_argument("--max-size", type=float, default=w.max_size, help="largest shape (default %(default)s)")
    p.add_argument("--shapes", default=",".join(w.shapes or ()), help="comma-separated shape kinds (default: %(default)s)")
    p.add_argument("--noise", type=int, default=w.noise, help="per-pixel noise amplitude, 0: flat colours (default %(default)s)")
    p.add_argument("--max-questions", type=int, default=w.max_questions, help="questions per und conversation, at most (default %(default)s)")
    p.add_argument("--square", action=argparse.BooleanOptionalAction, default=w.square, help="square images only (default %(default)s)")
    p.add_argument("--backgrounds", default=",".join(w.backgrounds or ()), help="comma-separated background colours (default: %(default)s)")
    p.add_argument("--colors", default=",".join(w.colors or ()), help="comma-separated shape colours (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    build_demo_assets(Path(a.root), Path(a.init), a.preset, a.num_samples, a.seed, a.held_out, a.tokenizer_steps,
                      WorldSpec(a.max_shapes, a.min_size, a.max_size, tuple(a.shapes.split(",")), a.noise, a.max_questions, a.square,
                                tuple(a.backgrounds.split(",")), tuple(a.colors.split(","))), a.workers)


if __name__ == "__main__":
    main()
