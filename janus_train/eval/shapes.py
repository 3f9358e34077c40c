"""The shapes world: coloured shapes on plain backgrounds, and a scorer that reads them back.

One definition of the world serves three users: the synthetic data generator
(`data_pipelines/synthetic_shapes.py` draws scenes with `draw_shape` and describes them with
`caption` / `place`), the tiny tokenizer's corpus (the vocabulary), and the `shapes` scorer of
the evaluation harness, which finds every shape in an image by its colour and identifies it by
drawing each candidate shape with the same `draw_shape` and keeping the best overlap.

Scenes: a background colour and 1..N shapes, each {shape, color, x, y, r}: centre (x, y) as a
fraction of the width/height, size r as a fraction of the short side. A caption names every
shape's colour, kind and position ("a red circle at the top left") and the background.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
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
}
# (No mid-tone colours such as gray or brown: the blend of two colours at a shape's edge would
# read as one of them.)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "rectangle", "ellipse", "diamond", "hexagon", "cross", "ring")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
# Positions are named by thirds of the image: x < 0.4 left, x > 0.6 right (y: top / bottom).
LOW, HIGH = 0.4, 0.6
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def place(x: float, y: float) -> str:
    """The position phrase of a centre at (x, y) (fractions of width and height)."""
    h = "left" if x < LOW else "right" if x > HIGH else ""
    v = "top" if y < LOW else "bottom" if y > HIGH else ""
    if h and v:
        return f"{v} {h}"
    return h or v or "center"


# ---- drawing ---------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(f"{shape} is not a polygon")


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: Any) -> None:
    """Draw one shape centred at (cx, cy) px with size r px."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=max(1, int(r * 0.3)))
    elif shape == "ellipse":
        d.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "rectangle":
        d.rectangle([cx - r, cy - r * 0.5, cx + r, cy + r * 0.5], fill=fill)
    elif shape == "cross":
        t = r * 0.3
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape in ("triangle", "diamond", "hexagon", "star"):
        d.polygon(_polygon(shape, cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes are {list(SHAPES)}")


def _extent(shape: str) -> tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max) of a shape drawn at centre 0, size 1."""
    if shape in ("circle", "ring", "square", "cross"):
        return -1.0, 1.0, -1.0, 1.0
    if shape == "ellipse":
        return -1.0, 1.0, -0.6, 0.6
    if shape == "rectangle":
        return -1.0, 1.0, -0.5, 0.5
    pts = np.array(_polygon(shape, 0.0, 0.0, 1.0))
    return float(pts[:, 0].min()), float(pts[:, 0].max()), float(pts[:, 1].min()), float(pts[:, 1].max())


EXTENTS = {s: _extent(s) for s in SHAPES}
# Farthest point of a drawn shape from its centre, per unit size (squares reach their corners).
CIRCUMRADIUS = {s: (math.sqrt(2.0) if s == "square" else math.sqrt(1.25) if s == "rectangle" else 1.0) for s in SHAPES}


def render(
    scene: dict, width: int, height: int, noise: int = 6, rng: np.random.Generator | None = None, centre_square: bool = False
) -> Image.Image:
    """The scene as an RGB image, with light sensor-like noise (JPEG-friendly, photo-like).

    `centre_square`: the scene's coordinates refer to the central square of the image (what a
    centre crop keeps), the rest is background; otherwise to the whole image."""
    img = Image.new("RGB", (width, height), COLORS[scene["background"]])
    d = ImageDraw.Draw(img)
    side = min(width, height)
    ox, oy, fw, fh = ((width - side) / 2, (height - side) / 2, side, side) if centre_square else (0.0, 0.0, width, height)
    for s in scene["shapes"]:
        draw_shape(d, s["shape"], ox + s["x"] * fw, oy + s["y"] * fh, s["r"] * side, COLORS[s["color"]])
    if noise and rng is not None:
        arr = np.asarray(img).astype(np.int16) + rng.integers(-noise, noise + 1, size=(height, width, 1), dtype=np.int16)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img


# ---- language ------------------------------------------------------------------------------


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption(scene: dict) -> str:
    parts = [f"{article(s['color'])} {s['color']} {s['shape']} at the {place(s['x'], s['y'])}" for s in scene["shapes"]]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body[0].upper()}{body[1:]} on {article(scene['background'])} {scene['background']} background."


@dataclass
class Request:
    """What a prompt asks for: objects (colour, shape, position or None) and the background."""

    objects: list[tuple[str | None, str, str | None]] = field(default_factory=list)
    background: str | None = None


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_POS_RE = "|".join(sorted(POSITIONS, key=len, reverse=True))
_OBJECT = re.compile(rf"\b(?:({_COLOR_RE})\s+)?({_SHAPE_RE})s?\b(?:\s+at\s+the\s+({_POS_RE})\b)?")
_BACKGROUND = re.compile(rf"\b({_COLOR_RE})\s+background\b")


def parse_prompt(prompt: str) -> Request:
    """The objects a shapes-world prompt requests (any phrasing that names `[colour] shape
    [at the position]`, e.g. our captions and the aesthetic prompts)."""
    text = prompt.lower()
    req = Request()
    m = _BACKGROUND.search(text)
    if m:
        req.background = m.group(1)
        text = text[: m.start()] + text[m.end() :]
    for m in _OBJECT.finditer(text):
        req.objects.append((m.group(1), m.group(2), m.group(3)))
    return req


# ---- reading images back -------------------------------------------------------------------


@dataclass
class Found:
    color: str
    shape: str
    position: str
    iou: float  # overlap of the best-fitting drawn shape with the blob
    area: float  # fraction of the image


def _palette_labels(image: np.ndarray) -> np.ndarray:
    """Index into COLORS of each pixel's nearest palette colour."""
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    d = ((image[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
    return d.argmin(-1)


# Blur levels (Gaussian sigma, px) a drawn shape is also compared at: a generated or
# reconstructed image rounds corners and points, and a star blurred is still not a hexagon.
FIT_BLURS = (0.0, 1.0, 2.0)


def _fit(mask: np.ndarray, x0: int, y0: int, x1: int, y1: int, shape: str) -> tuple[float, float, float, float]:
    """Draw `shape` over the blob's bounding box; (IoU with the blob, cx, cy, r) in px, the best
    over FIT_BLURS. A shape drawn from cx - r to cx + r covers 2r + 1 pixels, hence the -1s."""
    from scipy import ndimage

    ex0, ex1, ey0, ey1 = EXTENTS[shape]
    w, h = max(1, x1 - x0), max(1, y1 - y0)
    r = 0.5 * (w / (ex1 - ex0) + h / (ey1 - ey0))
    cx = x0 + w / 2 - r * (ex0 + ex1) / 2
    cy = y0 + h / 2 - r * (ey0 + ey1) / 2
    canvas = Image.new("L", (mask.shape[1], mask.shape[0]), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, r, 255)
    drawn = np.asarray(canvas, dtype=np.float32) / 255.0
    best = 0.0
    for sigma in FIT_BLURS:
        m = (ndimage.gaussian_filter(drawn, sigma) if sigma else drawn) > 0.5
        union = np.logical_or(m, mask).sum()
        if union:
            best = max(best, float(np.logical_and(m, mask).sum() / union))
    return best, cx, cy, r


# A blob that no drawn shape overlaps this well is an edge seam or a smear, not a shape.
MIN_IOU = 0.35


def find_shapes(image: np.ndarray, min_area: float = 0.004) -> tuple[str, list[Found]]:
    """(background colour, shapes found) of an RGB uint8 image [H, W, 3].

    Pixels take their nearest palette colour; the background is the most common colour of the
    border; the pixels of any other colour form blobs (8-connected, so a shape keeps its blurred
    or blended edge), each larger than `min_area` of the image a shape of the colour of its core,
    identified by the drawn shape that overlaps it best (a blob no shape fits, such as
    a seam along an edge, is dropped)."""
    from scipy import ndimage

    h, w = image.shape[:2]
    labels = _palette_labels(image)
    names = list(COLORS)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(names)).argmax())
    from_bg = np.linalg.norm(image.astype(np.float32) - np.float32(COLORS[names[bg]]), axis=-1)
    eight = np.ones((3, 3), dtype=bool)
    blobs, _ = ndimage.label(labels != bg, structure=eight)
    found: list[Found] = []
    for k, sl in enumerate(ndimage.find_objects(blobs), start=1):
        if sl is None:
            continue
        mask = blobs == k
        area = float(mask.sum()) / (h * w)
        if area < min_area:
            continue
        # The colour of the blob's core (its pixels farthest from the background): a thin or
        # blurred stroke's edge pixels are blends with the background.
        far = from_bg[mask]
        core = labels[mask][far >= np.quantile(far, 0.6)]
        color = int(np.bincount(core, minlength=len(names)).argmax())
        ys, xs = sl
        best = max((_fit(mask, xs.start, ys.start, xs.stop - 1, ys.stop - 1, s), s) for s in SHAPES)
        (iou, cx, cy, _), shape = best
        if iou < MIN_IOU:  # a seam or a smear, not a shape
            continue
        found.append(Found(names[color], shape, place(cx / w, cy / h), iou, area))
    found.sort(key=lambda f: -f.area)
    return names[bg], found


def score(image: np.ndarray, prompt: str) -> dict[str, Any]:
    """Does the image show what the prompt asks for? Per requested object: its colour and
    shape, then its position; the count of shapes; the background.

    Returns booleans `shape`, `color`, `position`, `count`, `background` (None when the prompt
    does not ask), `shape_color` (every requested shape drawn in its colour) and `correct`
    (every asked attribute right), with what was found.
    """
    req = parse_prompt(prompt)
    bg, found = find_shapes(image)
    unused = list(found)
    shape_ok = color_ok = pos_ok = True
    asked_pos = False
    for color, shape, position in req.objects:
        # The best match: right kind and colour first, then right kind, then right colour.
        def rank(f: Found) -> tuple[bool, bool, bool]:
            kind_colour = f.shape == shape and (color is None or f.color == color)
            return (kind_colour, kind_colour and (position is None or f.position == position),
                    f.shape == shape or (color is not None and f.color == color))

        match = max(unused, key=rank, default=None)
        if match is None:
            shape_ok = color_ok = pos_ok = False
            continue
        unused.remove(match)
        shape_ok &= match.shape == shape
        color_ok &= color is None or match.color == color
        if position is not None:
            asked_pos = True
            pos_ok &= match.position == position
    out = {
        "shape": shape_ok if req.objects else None,
        "color": color_ok if req.objects else None,
        "position": pos_ok if asked_pos else None,
        "count": len(found) == len(req.objects) if req.objects else None,
        "background": (bg == req.background) if req.background else None,
    }
    out["shape_color"] = bool(req.objects) and shape_ok and color_ok
    out["correct"] = all(v for v in out.values() if v is not None)
    out["found"] = [f"{f.color} {f.shape} at the {f.position}" for f in found]
    out["found_background"] = bg
    return out
