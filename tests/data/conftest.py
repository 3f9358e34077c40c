"""Fixtures for the data tests: the tiny checkpoint's tokenizer and geometry, and a small
shapes-world dataset built once per session through the real pipeline
(synthetic_shapes -> build_shards -> pretokenize_vq)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest

SHAPES_N = 160  # samples per task
SHARD_SIZE = 20


@pytest.fixture(scope="session")
def tok(tiny_hf_ckpt):
    from janus_train.contracts.tokens import TokenizerInfo

    return TokenizerInfo.from_hf(str(tiny_hf_ckpt))


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_hf_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_hf_ckpt))


@pytest.fixture(scope="session")
def image_cfg(tiny_hf_ckpt):
    from janus_train.data.config import ImageConfig
    from janus_train.checkpoint.io import read_config

    return ImageConfig.from_model(read_config(str(tiny_hf_ckpt)))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory, tiny_hf_ckpt) -> dict[str, Any]:
    """{"root", "und", "text", "real", "synthetic", "yaml"}: energon datasets of every task."""
    from data_pipelines import build_shards, pretokenize_vq, synthetic_shapes

    root = tmp_path_factory.mktemp("shapes")
    synthetic_shapes.main(["--out", str(root), "--n", str(SHAPES_N), "--image-size", "64", "--seed", "3", "--workers", "1"])
    sh = root / "shards"
    build_shards.build("und", root / "und.jsonl", sh / "und", SHARD_SIZE, progress=False)
    build_shards.build("text", root / "text.jsonl", sh / "text", SHARD_SIZE, progress=False)
    for src in ("real", "synthetic"):
        build_shards.build("gen", root / f"gen_{src}.jsonl", sh / f"gen_{src}", SHARD_SIZE, source=src, progress=False)
        pretokenize_vq.pretokenize(tiny_hf_ckpt, sh / f"gen_{src}", sh / f"gen_{src}_vq", batch_size=32, progress=False)
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml_path.read_text() + f"tokenizer: {tiny_hf_ckpt}\n")
    return {
        "root": root,
        "und": sh / "und",
        "text": sh / "text",
        "real": sh / "gen_real_vq",
        "synthetic": sh / "gen_synthetic_vq",
        "yaml": yaml_path,
    }


def data_cfg_dict(shapes_data: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A data config over the shapes datasets, small enough for fast tests."""
    d = {
        "und": [{"path": str(shapes_data["und"]), "name": "shapes_und"}],
        "text": [{"path": str(shapes_data["text"]), "name": "shapes_text"}],
        "gen": [
            {"path": str(shapes_data["real"]), "name": "real", "weight": 1},
            {"path": str(shapes_data["synthetic"]), "name": "synthetic", "weight": 1},
        ],
        "ratio": [2, 3, 5],
        "seq_len": 256,
        "global_batch": 16,
        "micro_batch_rows": 1,
        "num_workers": 0,
        "chunk_size": 8,
        "lookahead": 16,
        "und_system_prompt": None,
        "seed": 7,
    }
    d.update(overrides)
    return d


def jpeg_bytes(w: int, h: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_dataset(out: Path, task: str, samples: Iterable[dict[str, Any]], shard_size: int = 10) -> Path:
    """Write webdataset samples ({"__key__", part: bytes|str|dict}) as an energon dataset."""
    from janus_train.data import shards

    def encoded():
        for s in samples:
            yield {k: (json.dumps(v).encode() if isinstance(v, dict) else v.encode() if isinstance(v, str) and k != "__key__" else v) for k, v in s.items()}

    return shards.write_dataset(out, task, encoded(), shard_size)


@pytest.fixture
def make_cfg(shapes_data):
    """make_cfg(**overrides) -> DataConfig over the shapes datasets."""
    from janus_train.data.config import DataConfig

    return lambda **kw: DataConfig.from_dict(data_cfg_dict(shapes_data, **kw))


@pytest.fixture
def dataset_writer():
    return write_dataset


@pytest.fixture
def jpeg():
    return jpeg_bytes
