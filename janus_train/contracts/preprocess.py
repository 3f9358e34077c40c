"""The paper's image transforms.

und  resize the long side to `size` (bicubic, the short side rounded, at least 14 px), pad to a
     square with RGB (127,127,127), SigLIP normalisation (x/255 - 0.5) / 0.5. This is exactly
     what transformers' `JanusImageProcessor` does with its PIL backend (Janus-Pro's
     preprocessor config: mean = std = 0.5, background = int(0.5*255) = 127); the test suite
     checks it pixel for pixel. The loader keeps images as uint8 CHW, in the batch too; the
     vision tower normalises them on the device with a table made by `normalize_siglip`, which
     gives bit-identical float32 values to transformers' float64-rescale-then-float32-normalise
     path.
gen  resize the short side to `size` (bicubic), centre crop the long side, scale to [-1, 1].
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

UND_BACKGROUND = (127, 127, 127)
MIN_SIDE = 14  # transformers' JanusImageProcessor.min_size


def open_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to RGB. With `draft_size`, JPEGs at least twice that size are
    decoded at a reduced DCT scale first (fast, but not pixel-identical to a full decode)."""
    img = Image.open(io.BytesIO(data))
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def und_resize(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [h, w, 3] with the long side resized to `size` (not yet padded)."""
    w, h = img.size
    scale = size / max(w, h)
    # Python's round() (banker's rounding) on purpose: transformers uses it too.
    nw, nh = max(round(w * scale), MIN_SIDE), max(round(h * scale), MIN_SIDE)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    return np.asarray(img)


def pad_into_chw(resized: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write an und_resize() result into `out` (uint8 [3, S, S]) centred on grey, transposing
    HWC -> CHW in the same pass (the loader's workers write straight into the batch buffer)."""
    h, w = resized.shape[:2]
    side = out.shape[-1]
    top, left = (side - h) // 2, (side - w) // 2
    grey = UND_BACKGROUND[0]  # the background is uniform grey, so borders are a memset
    if h < side:
        out[:, :top] = grey
        out[:, top + h :] = grey
    if w < side:
        out[:, :, :left] = grey
        out[:, :, left + w :] = grey
    out[:, top : top + h, left : left + w] = resized.transpose(2, 0, 1)
    return out


def und_resize_pad(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: long side to `size`, short side padded with grey, centred."""
    resized = und_resize(img, size)
    side = max(resized.shape[:2])
    out = np.empty((3, side, side), dtype=np.uint8)
    return pad_into_chw(resized, out).transpose(1, 2, 0)


def normalize_siglip_(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """uint8 x -> float32 `out`, SigLIP-normalised (mean = std = 0.5).

    (x / 255 - 0.5) * 2 in float32 equals transformers' (float32(x * (1/255)) - 0.5) / 0.5
    for all 256 input values (checked in the tests), so it is exact; three numpy ufuncs over
    a fresh buffer are faster here than torch's conversion or a lookup table.
    """
    np.divide(x, np.float32(255.0), out=out, dtype=np.float32)
    np.subtract(out, np.float32(0.5), out=out)
    np.multiply(out, np.float32(2.0), out=out)
    return out


def normalize_siglip(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 [..., 3, H, W] in [-1, 1]."""
    x = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    return torch.from_numpy(normalize_siglip_(x, np.empty(x.shape, dtype=np.float32)))


def und_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """One image as the model sees it: float32 [3, size, size] (for tools and tests)."""
    resized = und_resize(img, size)
    side = max(resized.shape[:2])
    return normalize_siglip(pad_into_chw(resized, np.empty((3, side, side), dtype=np.uint8)))


def gen_crop(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: short side to `size` (bicubic), centre crop the long side."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img)[top : top + size, left : left + size]


def gen_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """float32 [3, size, size] in [-1, 1], the VQ encoder's input."""
    return gen_crop_to_pixels(gen_crop(img, size))


def gen_crop_to_pixels(crop: np.ndarray) -> torch.Tensor:
    """`gen_crop`'s uint8 [S, S, 3] -> float32 [3, S, S] in [-1, 1]. Separate so that the crop
    (the expensive part) can run in a decoding worker and travel as uint8, a quarter of the bytes."""
    x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).to(torch.float32)
    return x.div_(127.5).sub_(1.0)
