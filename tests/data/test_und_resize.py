"""build_shards --und-resize: pre-resized lossless und images give the loader exactly the pixels
of the original (the loader's resize becomes a no-op), pixel for pixel."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import build_shards
from janus_train.contracts.preprocess import und_pixels
from janus_train.data.shards import read_janus_meta, write_janus_meta


def test_pre_resized_und_shards_keep_the_pixels(tmp_path):
    rng = np.random.default_rng(0)
    rows, originals = [], {}
    for i, (w, h) in enumerate([(640, 480), (300, 900), (97, 61), (64, 64)]):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        path = tmp_path / f"img{i}.jpg"
        img.save(path, "JPEG", quality=90)
        originals[f"k{i}"] = Image.open(path).convert("RGB")
        rows.append({"key": f"k{i}", "image": path.name, "conversations": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Noise."}]})
    (tmp_path / "und.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    summary = build_shards.build("und", tmp_path / "und.jsonl", out, shard_size=10, progress=False, und_resize=64)
    assert summary["written"] == 4
    assert read_janus_meta(out)["und_resized_to"] == 64
    with tarfile.open(next(out.glob("*.tar"))) as tar:
        stored = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")}
    assert sorted(stored) == sorted(originals)
    for key, raw in stored.items():
        small = Image.open(io.BytesIO(raw))
        assert small.format == "PNG" and max(small.size) == 64
        assert torch.equal(und_pixels(small.convert("RGB"), 64), und_pixels(originals[key], 64)), key


def test_loader_refuses_shards_pre_resized_for_another_image_size(tmp_path, tok, image_cfg):
    from dataclasses import replace

    from janus_train.data.loader import build_train_loader

    rows = []
    for i in range(4):
        Image.fromarray(np.full((48, 80, 3), 40 * i, np.uint8)).save(tmp_path / f"i{i}.jpg")
        rows.append({"key": f"k{i}", "image": f"i{i}.jpg", "conversations": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Grey."}]})
    (tmp_path / "und.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    build_shards.build("und", tmp_path / "und.jsonl", out, shard_size=10, progress=False, und_resize=image_cfg.image_size)
    cfg = {"und": [{"path": str(out)}], "ratio": [1, 0, 0], "seq_len": 512, "global_batch": 2, "micro_batch_rows": 1}
    with build_train_loader(cfg, tok, image_cfg, 0, 1) as loader:  # the size it was built for
        assert next(loader)[0].meta["num_docs"] > 0
    with pytest.raises(ValueError, match=rf"--und-resize {image_cfg.image_size}.*image size is {image_cfg.image_size // 2}"):
        build_train_loader(cfg, tok, replace(image_cfg, image_size=image_cfg.image_size // 2), 0, 1)
    # A dataset without the marker (images as given) fits any size.
    meta = read_janus_meta(out)
    del meta["und_resized_to"]
    write_janus_meta(out, meta)
    build_train_loader(cfg, tok, replace(image_cfg, image_size=image_cfg.image_size // 2), 0, 1).close()


def test_und_resize_is_und_only(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match="--und-resize"):
        build_shards.build("text", tmp_path / "t.jsonl", tmp_path / "o", progress=False, und_resize=64)
