"""A truncated weight file is one line naming it, and exit code 2 in the CLIs (issue 14)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from PIL import Image

from janus_train.checkpoint.io import CheckpointError, read_checkpoint


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def truncated_hf(tiny_hf_ckpt, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_hf_ckpt, bad)
    _truncate(bad / "model.safetensors")
    return bad


def _assert_one_line_error(r, weights):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no traceback
    assert lines[0].startswith("error: ") and str(weights) in lines[0] and "truncated or corrupt" in lines[0]


def test_convert_cli_names_truncated_file(truncated_hf, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "janus_train.convert", "--src", str(truncated_hf), "--src-format", "hf", "--dst", str(tmp_path / "o"), "--dst-format", "native"],
        capture_output=True, text=True, check=False,
    )
    _assert_one_line_error(r, truncated_hf / "model.safetensors")
    assert not (tmp_path / "o").exists()


def test_chat_cli_names_truncated_file(truncated_hf, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 24), (200, 10, 10)).save(image)
    r = subprocess.run(
        [sys.executable, "-m", "janus_train.chat", "--ckpt", str(truncated_hf), "--image", str(image), "--question", "what?", "--device", "cpu"],
        capture_output=True, text=True, check=False,
    )
    _assert_one_line_error(r, truncated_hf / "model.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_shard_and_pickle_name_the_file(tiny_deepseek_ckpt, tmp_path, keep):
    bad = tmp_path / "ds"
    shutil.copytree(tiny_deepseek_ckpt, bad)
    _truncate(bad / "pytorch_model.bin", keep)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: truncated or corrupt"):
        read_checkpoint(bad)


def test_missing_shard_names_the_file(tiny_hf_ckpt, tmp_path):
    import json

    bad = tmp_path / "sharded"
    shutil.copytree(tiny_hf_ckpt, bad)
    (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: missing weight file"):
        read_checkpoint(bad)
