"""A synthetic "shapes world" for all three tasks: coloured shapes on backgrounds, with
captions, question-answer conversations and plain text.

    python -m data_pipelines.synthetic_shapes --out DIR --n N [--image-size PX] [--seed S] [--workers K]
        [--max-shapes N] [--min-size F] [--max-size F] [--shapes circle,square,...] [--noise N] [--max-questions N]
        [--square] [--backgrounds white,black,...] [--colors red,green,...]

writes, for N samples per task (deterministic in --seed, whatever --workers):

    DIR/images/und/*.jpg, DIR/images/gen/*.jpg
    DIR/und.jsonl            {"key", "image", "conversations": [...]}   (1 to --max-questions QA turns)
    DIR/text.jsonl           {"key", "text"}                            (short to ~1k tokens)
    DIR/gen_real.jsonl       {"key", "image", "caption", "source": "real"}       plain captions
    DIR/gen_synthetic.jsonl  {"key", "image", "caption", "source": "synthetic"}  long "aesthetic" prompts
    DIR/data.yaml            a data config over the shard dirs build_shards would make

and with --user-formats, the same samples again in the layouts people's own data come in (to try
`build_shards --format ...` and the fine-tuning chain of docs/finetune.md without downloads):

    DIR/llava.json           und as LLaVA instruction data: [{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]
    DIR/swift.jsonl          und as ms-swift rows: {"messages": [{"role", "content"}], "images": [path]}
    DIR/sharegpt.json        text as ShareGPT chats: [{"conversations": [{"from", "value"}]}]
    DIR/captions/            gen_real's images with same-named .txt captions (a text-to-image folder)

Image paths are relative to DIR. Images vary in aspect ratio (long side --image-size), so the
und padding and gen cropping are exercised, unless --square; a gen image's shapes lie in its
central square, which the gen crop keeps, so its caption describes what the model sees. Shapes never overlap,
and their centres keep clear of the position words' boundaries. The world itself (colours,
shapes, drawing, captions) is `janus_train/eval/shapes.py`, which the `shapes` scorer shares.
Feed the manifests to data_pipelines.build_shards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from janus_train.eval import shapes

STYLES = ["minimalist", "flat colors", "high detail", "soft light", "clean lines", "vivid", "studio render", "poster art"]
TASK_SALT = {"und": 1, "text": 2, "gen_real": 3, "gen_synthetic": 4}


ALL_COLORS = tuple(shapes.COLORS)  # (inside World, `shapes` is a field)


@dataclass(frozen=True)
class World:
    """How hard the world is: shapes per image and their size (a fraction of the short side),
    the kinds drawn, the pixel noise, and how many questions a conversation asks at most."""

    max_shapes: int = 3
    min_size: float = 0.08
    max_size: float = 0.2
    shapes: tuple[str, ...] = shapes.SHAPES
    noise: int = 6  # uniform per-pixel noise amplitude (0: flat colours)
    max_questions: int = 3  # 1..len(QUESTION_TYPES)
    square: bool = False  # every image square (else mixed aspect ratios, which und pads)
    backgrounds: tuple[str, ...] = ALL_COLORS  # background colours drawn
    colors: tuple[str, ...] = ALL_COLORS  # shape colours drawn (never the image's background)


def _rng(seed: int, task: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASK_SALT[task], i])


def _coordinate(rng: np.random.Generator, margin: float) -> float:
    """A centre coordinate in [margin, 1 - margin], kept clear of the position-word boundaries
    (0.4, 0.6), so the words a caption uses are never a matter of a pixel."""
    lo, hi = margin, 1.0 - margin
    while True:
        v = float(rng.uniform(lo, hi))
        if abs(v - shapes.LOW) > 0.03 and abs(v - shapes.HIGH) > 0.03:
            return v


def make_scene(rng: np.random.Generator, world: World = World(), aspect: float | None = None) -> dict:
    bg = world.backgrounds[rng.integers(len(world.backgrounds))]
    colors = [c for c in world.colors if c != bg]
    placed: list[dict] = []
    for _ in range(int(rng.integers(1, world.max_shapes + 1))):
        c = colors[rng.integers(len(colors))]
        r = float(rng.uniform(world.min_size, world.max_size))
        kind = world.shapes[rng.integers(len(world.shapes))]
        reach = r * shapes.CIRCUMRADIUS[kind]
        # Shapes neither overlap nor touch (a few tries, then the scene keeps fewer shapes).
        for _try in range(20):
            x, y = _coordinate(rng, min(0.45, r + 0.02)), _coordinate(rng, min(0.45, r + 0.02))
            if all(math.hypot(x - o["x"], y - o["y"]) > 1.1 * (reach + o["r"] * shapes.CIRCUMRADIUS[o["shape"]]) for o in placed):
                placed.append({"shape": kind, "color": c, "x": x, "y": y, "r": r})
                break
    if aspect is None:
        aspect = 1.0 if world.square else float(rng.choice([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 1.5]))
    return {"background": bg, "shapes": placed, "aspect": aspect}


def render(scene: dict, long_side: int, rng: np.random.Generator, centre_square: bool = False, noise: int = 6) -> Image.Image:
    a = scene["aspect"]
    w, h = (long_side, max(8, round(long_side / a))) if a >= 1 else (max(8, round(long_side * a)), long_side)
    return shapes.render(scene, w, h, noise=noise, rng=rng, centre_square=centre_square)


caption = shapes.caption


def aesthetic_prompt(scene: dict, rng: np.random.Generator) -> str:
    styles = ", ".join(rng.choice(STYLES, size=int(rng.integers(2, 5)), replace=False))
    shapes = " and ".join(f"a bright {s['color']} {s['shape']}" for s in scene["shapes"])
    return f"A simple scene of {shapes}, placed on a plain {scene['background']} background, {styles}."


QUESTION_TYPES = ("color", "shape", "count", "background", "position", "describe")


def conversation(scene: dict, rng: np.random.Generator, max_questions: int = 3) -> list[dict[str, str]]:
    """1 to max_questions question-answer turns of distinct types (QUESTION_TYPES) about the
    scene, answered the way VQA datasets answer (a word or a phrase; the description is a sentence); each user turn carries its question `type`
    (color, shape, count, background, position, describe) for per-type evaluation."""
    qa = []
    s = scene["shapes"][rng.integers(len(scene["shapes"]))]
    n = len(scene["shapes"])
    pool = [
        ("color", f"What color is the {s['shape']}?", s["color"]),
        ("shape", f"What shape is the {s['color']} object?", s["shape"]),
        ("count", "How many shapes are there?", shapes.NUMBERS[n]),
        ("background", "What color is the background?", scene["background"]),
        ("position", f"Where is the {s['color']} {s['shape']}?", shapes.place(s["x"], s["y"])),
        ("describe", "Describe the image.", caption(scene)),
    ]
    order = rng.permutation(len(pool))[: int(rng.integers(1, max_questions + 1))]
    for j, k in enumerate(order):
        kind, q, a = pool[int(k)]
        qa.append({"role": "user", "content": ("<image>\n" + q) if j == 0 else q, "type": kind})
        qa.append({"role": "assistant", "content": a})
    return qa


def text_sample(rng: np.random.Generator) -> str:
    # Lengths from one sentence to ~1k tokens, so packing and truncation are exercised.
    n = int(min(120, rng.geometric(0.08)))
    out = []
    for _ in range(n):
        sc = make_scene(rng)
        s = sc["shapes"][0]
        form = int(rng.integers(4))
        if form == 0:
            out.append(caption(sc))
        elif form == 1:
            out.append(f"The {s['shape']} is {s['color']} and sits at the {shapes.place(s['x'], s['y'])}.")
        elif form == 2:
            out.append(f"There are {shapes.NUMBERS[len(sc['shapes'])]} shapes on the {sc['background']} background.")
        else:
            out.append(f"A {s['shape']} can be {s['color']}, but this one is drawn on {sc['background']}.")
    return " ".join(out)


def _make(args: tuple[str, int, int, int, str, World]) -> dict:
    task, i, seed, size, out, world = args
    rng = _rng(seed, task, i)
    key = f"{task.replace('_', '-')}-{i:08d}"
    if task == "text":
        return {"key": key, "text": text_sample(rng)}
    scene = make_scene(rng, world)
    sub = "und" if task == "und" else "gen"
    rel = f"images/{sub}/{key}.jpg"
    # A gen image is centre-cropped to a square for the model, so its scene lives in that
    # square (the caption describes what the model sees); und images are padded, not cropped.
    render(scene, size, rng, centre_square=sub == "gen", noise=world.noise).save(os.path.join(out, rel), quality=90)
    if task == "und":
        return {"key": key, "image": rel, "conversations": conversation(scene, rng, world.max_questions)}
    if task == "gen_real":
        return {"key": key, "image": rel, "caption": caption(scene), "source": "real"}
    return {"key": key, "image": rel, "caption": aesthetic_prompt(scene, rng), "source": "synthetic"}


def write_user_formats(out: Path, rows: dict[str, list[dict]]) -> None:
    """The und, text and gen_real samples in the published layouts of LLaVA, ms-swift, ShareGPT
    and an image folder with .txt captions (docs/data.md "Input formats")."""
    llava, swift = [], []
    for r in rows["und"]:
        turns = [{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]} for t in r["conversations"]]
        llava.append({"id": r["key"], "image": r["image"], "conversations": turns})
        swift.append({"messages": [{"role": t["role"], "content": t["content"].replace("<image>\n", "<image>")} for t in r["conversations"]],
                      "images": [r["image"]]})
    (out / "llava.json").write_text(json.dumps(llava, indent=1))
    (out / "swift.jsonl").write_text("".join(json.dumps(x) + "\n" for x in swift))
    chats = [{"conversations": [{"from": "human", "value": "Tell me something about shapes and colours."},
                                {"from": "gpt", "value": r["text"]}]} for r in rows["text"]]
    (out / "sharegpt.json").write_text(json.dumps(chats, indent=1))
    folder = out / "captions"
    folder.mkdir(exist_ok=True)
    for r in rows["gen_real"]:
        name = Path(r["image"]).name
        shutil.copyfile(out / r["image"], folder / name)
        (folder / name).with_suffix(".txt").write_text(r["caption"] + "\n")


def data_yaml(out: Path) -> str:
    return (
        "# shards made by: python -m data_pipelines.build_shards (see docs/data.md)\n"
        "und: [{path: shards/und, name: shapes_und}]\n"
        "text: [{path: shards/text, name: shapes_text}]\n"
        "gen:\n"
        "  - {path: shards/gen_real_vq, name: real, weight: 1}\n"
        "  - {path: shards/gen_synthetic_vq, name: synthetic, weight: 1}\n"
        "ratio: [2, 3, 5]  # und:text:gen\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, required=True, help="samples per task (gen is split half real, half synthetic)")
    p.add_argument("--image-size", type=int, default=384, help="long side of the images in px (default 384)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-shapes", type=int, default=3, help="shapes per image: 1..N (default 3)")
    p.add_argument("--min-size", type=float, default=0.08, help="smallest shape size, a fraction of the short side (default 0.08)")
    p.add_argument("--max-size", type=float, default=0.2, help="largest shape size (default 0.2)")
    p.add_argument("--shapes", default=",".join(shapes.SHAPES), help="comma-separated kinds to draw (default: all)")
    p.add_argument("--square", action="store_true", help="square images only (default: mixed aspect ratios)")
    p.add_argument("--backgrounds", default=",".join(shapes.COLORS), help="comma-separated background colours (default: all)")
    p.add_argument("--colors", default=",".join(shapes.COLORS), help="comma-separated shape colours (default: all)")
    p.add_argument("--noise", type=int, default=6, help="per-pixel noise amplitude, 0 for flat colours (default 6)")
    p.add_argument("--max-questions", type=int, default=3,
                   help=f"questions per und conversation: 1..N, distinct types (default 3, at most {len(QUESTION_TYPES)})")
    p.add_argument("--user-formats", action="store_true",
                   help="also write the samples as LLaVA JSON, ms-swift JSONL, ShareGPT JSON and an image folder with .txt captions")
    args = p.parse_args(argv)
    kinds = tuple(k.strip() for k in args.shapes.split(",") if k.strip())
    bad = [k for k in kinds if k not in shapes.SHAPES]
    if bad or not kinds:
        p.error(f"--shapes: unknown kind(s) {bad or [args.shapes]}; kinds are {list(shapes.SHAPES)}")
    if not 1 <= args.max_shapes <= len(shapes.NUMBERS) - 1:
        p.error(f"--max-shapes must be in 1..{len(shapes.NUMBERS) - 1}, got {args.max_shapes}")
    if not 0 < args.min_size <= args.max_size <= 0.45:
        p.error(f"need 0 < --min-size <= --max-size <= 0.45, got {args.min_size}, {args.max_size}")
    backgrounds = tuple(c.strip() for c in args.backgrounds.split(",") if c.strip())
    bad = [c for c in backgrounds if c not in shapes.COLORS]
    if bad or not backgrounds:
        p.error(f"--backgrounds: unknown colour(s) {bad or [args.backgrounds]}; colours are {list(shapes.COLORS)}")
    colors = tuple(c.strip() for c in args.colors.split(",") if c.strip())
    bad = [c for c in colors if c not in shapes.COLORS]
    if bad or not colors:
        p.error(f"--colors: unknown colour(s) {bad or [args.colors]}; colours are {list(shapes.COLORS)}")
    alone = [b for b in backgrounds if not set(colors) - {b}]
    if alone:
        p.error(f"--colors {args.colors}: no shape colour other than the background {alone[0]}")
    if not 1 <= args.max_questions <= len(QUESTION_TYPES):
        p.error(f"--max-questions must be in 1..{len(QUESTION_TYPES)}, got {args.max_questions}")
    if not 0 <= args.noise <= 64:
        p.error(f"--noise must be in 0..64, got {args.noise}")
    world = World(args.max_shapes, args.min_size, args.max_size, kinds, args.noise, args.max_questions, args.square, backgrounds, colors)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.image_size < 8:
        p.error(f"--image-size must be >= 8, got {args.image_size}")
    out = Path(args.out)
    (out / "images" / "und").mkdir(parents=True, exist_ok=True)
    (out / "images" / "gen").mkdir(parents=True, exist_ok=True)
    n_real = (args.n + 1) // 2
    counts = {"und": args.n, "text": args.n, "gen_real": n_real, "gen_synthetic": args.n - n_real}
    jobs = [(t, i, args.seed, args.image_size, str(out), world) for t, n in counts.items() for i in range(n)]
    files = {t: open(out / f"{t}.jsonl.tmp", "w") for t in counts}
    kept: dict[str, list[dict]] = {t: [] for t in counts}
    ctx = get_context("fork")
    with ctx.Pool(max(1, args.workers)) as pool:
        for job, row in zip(jobs, tqdm(pool.imap(_make, jobs, chunksize=64), total=len(jobs), desc="shapes", unit="sample")):
            files[job[0]].write(json.dumps(row) + "\n")
            if args.user_formats:
                kept[job[0]].append(row)
    for t, f in files.items():
        f.close()
        os.replace(out / f"{t}.jsonl.tmp", out / f"{t}.jsonl")
    (out / "data.yaml").write_text(data_yaml(out))
    if args.user_formats:
        write_user_formats(out, kept)
    print(f"wrote {sum(counts.values())} samples to {out} ({', '.join(f'{t}: {n}' for t, n in counts.items())})")


if __name__ == "__main__":
    main()
