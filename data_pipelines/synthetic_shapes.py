"""A synthetic "shapes world" for all three tasks: coloured shapes on backgrounds, with
captions, question-answer conversations and plain text.

    python -m data_pipelines.synthetic_shapes --out DIR --n N [--image-size PX] [--seed S] [--workers K]

writes, for N samples per task (deterministic in --seed, whatever --workers):

    DIR/images/und/*.jpg, DIR/images/gen/*.jpg
    DIR/und.jsonl            {"key", "image", "conversations": [...]}   (1-3 QA turns)
    DIR/text.jsonl           {"key", "text"}                            (short to ~1k tokens)
    DIR/gen_real.jsonl       {"key", "image", "caption", "source": "real"}       plain captions
    DIR/gen_synthetic.jsonl  {"key", "image", "caption", "source": "synthetic"}  long "aesthetic" prompts
    DIR/data.yaml            a data config over the shard dirs build_shards would make

Image paths are relative to DIR. Images vary in aspect ratio (long side --image-size) so the
und padding and gen cropping are exercised. Feed the manifests to data_pipelines.build_shards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (240, 130, 180),
    "cyan": (40, 200, 210),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
}
SHAPES = ["circle", "square", "triangle", "star", "rectangle", "ellipse", "diamond", "hexagon", "cross", "ring"]
STYLES = ["minimalist", "flat colors", "high detail", "soft light", "clean lines", "vivid", "studio render", "poster art"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
TASK_SALT = {"und": 1, "text": 2, "gen_real": 3, "gen_synthetic": 4}


def _rng(seed: int, task: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASK_SALT[task], i])


def make_scene(rng: np.random.Generator) -> dict:
    colors = list(COLORS)
    bg = colors[rng.integers(len(colors))]
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        c = bg
        while c == bg:
            c = colors[rng.integers(len(colors))]
        shapes.append(
            {
                "shape": SHAPES[rng.integers(len(SHAPES))],
                "color": c,
                "x": float(rng.uniform(0.2, 0.8)),
                "y": float(rng.uniform(0.2, 0.8)),
                "r": float(rng.uniform(0.08, 0.2)),
            }
        )
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 1.5]))
    return {"background": bg, "shapes": shapes, "aspect": aspect}


def _place(s: dict) -> str:
    h = "left" if s["x"] < 0.4 else "right" if s["x"] > 0.6 else ""
    v = "top" if s["y"] < 0.4 else "bottom" if s["y"] > 0.6 else ""
    if h and v:
        return f"{v} {h}"
    return h or v or "center"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    elif shape == "hexagon":
        pts = [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    else:  # star
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def render(scene: dict, long_side: int, rng: np.random.Generator) -> Image.Image:
    a = scene["aspect"]
    w, h = (long_side, max(8, round(long_side / a))) if a >= 1 else (max(8, round(long_side * a)), long_side)
    img = Image.new("RGB", (w, h), COLORS[scene["background"]])
    d = ImageDraw.Draw(img)
    side = min(w, h)
    for s in scene["shapes"]:
        cx, cy, r = s["x"] * w, s["y"] * h, s["r"] * side
        col = COLORS[s["color"]]
        box = [cx - r, cy - r, cx + r, cy + r]
        if s["shape"] == "circle":
            d.ellipse(box, fill=col)
        elif s["shape"] == "ring":
            d.ellipse(box, outline=col, width=max(1, int(r * 0.3)))
        elif s["shape"] == "ellipse":
            d.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=col)
        elif s["shape"] == "square":
            d.rectangle(box, fill=col)
        elif s["shape"] == "rectangle":
            d.rectangle([cx - r, cy - r * 0.5, cx + r, cy + r * 0.5], fill=col)
        elif s["shape"] == "cross":
            t = r * 0.3
            d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=col)
            d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=col)
        else:
            d.polygon(_polygon(s["shape"], cx, cy, r), fill=col)
    # light sensor-like noise so JPEGs look like photos, not flat art
    arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, size=(h, w, 1), dtype=np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def caption(scene: dict) -> str:
    parts = [f"a {s['color']} {s['shape']} at the {_place(s)}" for s in scene["shapes"]]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body[0].upper()}{body[1:]} on a {scene['background']} background."


def aesthetic_prompt(scene: dict, rng: np.random.Generator) -> str:
    styles = ", ".join(rng.choice(STYLES, size=int(rng.integers(2, 5)), replace=False))
    shapes = " and ".join(f"a bright {s['color']} {s['shape']}" for s in scene["shapes"])
    return f"A simple scene of {shapes}, placed on a plain {scene['background']} background, {styles}."


def conversation(scene: dict, rng: np.random.Generator) -> list[dict[str, str]]:
    qa = []
    s = scene["shapes"][rng.integers(len(scene["shapes"]))]
    n = len(scene["shapes"])
    pool = [
        (f"What color is the {s['shape']}?", f"The {s['shape']} is {s['color']}."),
        ("How many shapes are there?", f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' if n > 1 else ''}."),
        ("What color is the background?", f"The background is {scene['background']}."),
        (f"Where is the {s['color']} {s['shape']}?", f"It is at the {_place(s)} of the image."),
        ("Describe the image.", caption(scene)),
    ]
    order = rng.permutation(len(pool))[: int(rng.integers(1, 4))]
    for j, k in enumerate(order):
        q, a = pool[int(k)]
        qa.append({"role": "user", "content": ("<image>\n" + q) if j == 0 else q})
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
            out.append(f"The {s['shape']} is {s['color']} and sits at the {_place(s)}.")
        elif form == 2:
            out.append(f"There are {NUMBERS[len(sc['shapes'])]} shapes on the {sc['background']} background.")
        else:
            out.append(f"A {s['shape']} can be {s['color']}, but this one is drawn on {sc['background']}.")
    return " ".join(out)


def _make(args: tuple[str, int, int, int, str]) -> dict:
    task, i, seed, size, out = args
    rng = _rng(seed, task, i)
    key = f"{task.replace('_', '-')}-{i:08d}"
    if task == "text":
        return {"key": key, "text": text_sample(rng)}
    scene = make_scene(rng)
    sub = "und" if task == "und" else "gen"
    rel = f"images/{sub}/{key}.jpg"
    render(scene, size, rng).save(os.path.join(out, rel), quality=90)
    if task == "und":
        return {"key": key, "image": rel, "conversations": conversation(scene, rng)}
    if task == "gen_real":
        return {"key": key, "image": rel, "caption": caption(scene), "source": "real"}
    return {"key": key, "image": rel, "caption": aesthetic_prompt(scene, rng), "source": "synthetic"}


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
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.image_size < 8:
        p.error(f"--image-size must be >= 8, got {args.image_size}")
    out = Path(args.out)
    (out / "images" / "und").mkdir(parents=True, exist_ok=True)
    (out / "images" / "gen").mkdir(parents=True, exist_ok=True)
    n_real = (args.n + 1) // 2
    counts = {"und": args.n, "text": args.n, "gen_real": n_real, "gen_synthetic": args.n - n_real}
    jobs = [(t, i, args.seed, args.image_size, str(out)) for t, n in counts.items() for i in range(n)]
    files = {t: open(out / f"{t}.jsonl.tmp", "w") for t in counts}
    ctx = get_context("fork")
    with ctx.Pool(max(1, args.workers)) as pool:
        for job, row in zip(jobs, tqdm(pool.imap(_make, jobs, chunksize=64), total=len(jobs), desc="shapes", unit="sample")):
            files[job[0]].write(json.dumps(row) + "\n")
    for t, f in files.items():
        f.close()
        os.replace(out / f"{t}.jsonl.tmp", out / f"{t}.jsonl")
    (out / "data.yaml").write_text(data_yaml(out))
    print(f"wrote {sum(counts.values())} samples to {out} ({', '.join(f'{t}: {n}' for t, n in counts.items())})")


if __name__ == "__main__":
    main()
