"""Acceptance 4 (first half): und preprocessing equals transformers' JanusImageProcessor pixel
for pixel; gen preprocessing geometry and range."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from janus_train.contracts.preprocess import gen_crop, gen_pixels, normalize_siglip, open_rgb, und_pixels, und_resize_pad


def _reference_processor(size: int):
    from transformers import JanusImageProcessor

    try:
        from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil
    except ImportError:  # older transformers: the PIL one is the only one
        JanusImageProcessorPil = JanusImageProcessor
    # Janus-Pro's preprocessor_config: SigLIP mean = std = 0.5 (background int(0.5*255) = 127).
    kw = dict(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, min_size=14)
    proc = JanusImageProcessor(**kw)
    if "Pil" not in type(proc).__name__:
        # With torchvision installed, JanusImageProcessor resizes with torch's bicubic; the
        # released processor (and ours) resize with PIL, which is the PIL backend.
        proc = JanusImageProcessorPil(**kw)
    return proc


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([127 + 90 * np.sin(xx / (7 + c) + yy / (11 + 3 * c)) for c in range(3)], -1)
    arr = (base + rng.normal(0, 25, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


SHAPES = [(640, 480), (480, 640), (384, 384), (1000, 300), (300, 1000), (333, 517), (50, 20), (17, 401), (64, 48), (700, 699)]


@pytest.mark.parametrize("size", [384, 64])
@pytest.mark.parametrize("wh", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_und_matches_janus_image_processor_pixel_for_pixel(size, wh):
    img = _photo(*wh, seed=wh[0] * 7 + wh[1])
    ref = _reference_processor(size)(img, return_tensors="np")["pixel_values"][0]
    ours = und_pixels(img, size).numpy()
    assert ours.shape == ref.shape == (3, size, size)
    assert ours.dtype == ref.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_und_matches_after_jpeg_and_grey_modes():
    """Through our byte decoder (RGB conversion of L / RGBA / P inputs) as well."""
    proc = _reference_processor(64)
    for mode in ("RGB", "L", "RGBA", "P"):
        img = _photo(90, 60, seed=1).convert(mode)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        ours = und_pixels(open_rgb(buf.getvalue()), 64).numpy()
        ref = proc(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(ours, ref, err_msg=mode)


def test_siglip_normalisation_is_exact_for_every_byte_value():
    v = np.arange(256)
    # transformers: rescale in float64 then cast to float32, normalise in float32
    ref = ((v.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    ours = normalize_siglip(torch.arange(256, dtype=torch.uint8)).numpy()
    np.testing.assert_array_equal(ours, ref)
    # The batch carries uint8 pixels; the vision tower normalises them with this function.
    from janus_train.models.siglip import normalize_uint8_pixels

    on_device = normalize_uint8_pixels(torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16))
    np.testing.assert_array_equal(on_device.numpy().ravel(), ref)


def test_collated_und_pixels_are_uint8_and_normalise_to_the_processor_values(tok, image_cfg, jpeg):
    from janus_train.contracts.batch import Row, collate
    from janus_train.contracts.batch import TASK_ID
    from janus_train.data.tokenize import DocBuilder
    from janus_train.models.siglip import normalize_uint8_pixels

    size = image_cfg.image_size
    b = DocBuilder(tok, 1024, image_cfg.num_image_tokens, size)
    raws = [jpeg(90, 50), jpeg(40, 70)]
    docs = []
    for i, raw in enumerate(raws):
        conv_json = b'{"conversations": [{"role": "user", "content": "<image>\\nWhat?"}, {"role": "assistant", "content": "A shape."}]}'
        slot = np.empty((3, size, size), np.uint8)
        docs.append(b.und(f"k{i}", {"jpg": raw, "json": conv_json}, slot))
    batch = collate([Row(TASK_ID["und"], docs)], 1024, tok.pad_id, tok.image_id)
    batch.validate(image_cfg.num_image_tokens)
    assert batch.und_pixel_values.dtype == torch.uint8 and batch.und_pixel_values.shape == (2, 3, size, size)
    for i, raw in enumerate(raws):
        expect = und_pixels(open_rgb(raw), size)
        assert torch.equal(normalize_uint8_pixels(batch.und_pixel_values[i]), expect)


def test_und_pad_is_grey_127_and_centred():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    out = und_resize_pad(img, 64)
    assert out.shape == (64, 64, 3)
    assert (out[:16] == 127).all() and (out[48:] == 127).all()
    assert (out[16:48, :, 0] == 255).all()


@pytest.mark.parametrize("wh", [(640, 480), (480, 640), (64, 64), (100, 37)])
def test_gen_short_side_resize_centre_crop_and_range(wh):
    w, h = wh
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = 255  # left half white: the crop must stay centred
    img = Image.fromarray(arr)
    crop = gen_crop(img, 32)
    assert crop.shape == (32, 32, 3)
    x = gen_pixels(img, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert float(x.max()) == 1.0 and float(x.min()) == -1.0
    # centred: the white/black boundary sits in the middle column band
    col_mean = crop[..., 0].mean(axis=0)
    assert col_mean[: 32 // 2 - 2].min() > 200 and col_mean[32 // 2 + 2 :].max() < 60
