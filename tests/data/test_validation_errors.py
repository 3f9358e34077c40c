"""Sources that cannot train fail when the loader is built, before any worker starts, with one
message naming the key, the directory and the command that fixes it (issue 14): an empty
directory, shards missing on disk, and gen shards not pre-tokenised for the model family."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import numpy as np
import pytest

from janus_train.contracts.errors import ConfigError
from janus_train.data.loader import build_train_loader, check_sources


@pytest.fixture
def loader(make_cfg, tok, image_cfg):
    return lambda **overrides: build_train_loader(make_cfg(**overrides), tok, image_cfg, 0, 1)


def test_empty_directory_names_key_dir_and_builder(loader, tmp_path):
    empty = tmp_path / "und_empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as e:
        loader(und=[{"path": str(empty)}])
    msg = str(e.value)
    assert e.value.key == "data.und[0].path"
    assert str(empty) in msg and "empty" in msg and "python -m data_pipelines.build_shards --task und" in msg
    assert "\n" not in msg


def test_directory_without_index_names_energon_prepare(loader, tmp_path):
    d = tmp_path / "text_unindexed"
    d.mkdir()
    (d / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data\.text\[0\]\.path: .*no \.nv-meta/\.info\.json.*build_shards"):
        loader(text=[{"path": str(d)}])


def test_no_shard_on_disk(shapes_data, loader, tmp_path):
    """A few missing shards are counted and skipped while training (test_corrupt.py); none left is no data."""
    copy = tmp_path / "text_copy"
    shutil.copytree(shapes_data["text"], copy)
    for tar in copy.glob("*.tar"):
        tar.unlink()
    with pytest.raises(ConfigError, match=r"data\.text\[0\]\.path: .*none of the \d+ shard\(s\) .* is on disk"):
        loader(text=[{"path": str(copy)}])


def test_gen_shards_without_codes_for_janus_pro(shapes_data, loader):
    raw = shapes_data["root"] / "shards" / "gen_real"  # build_shards output, before pretokenize_vq
    with pytest.raises(ConfigError) as e:
        loader(gen=[{"path": str(shapes_data["real"]), "name": "ok"}, {"path": str(raw), "name": "raw"}])
    msg = str(e.value)
    assert e.value.key == "data.gen[1].path"
    assert str(raw) in msg and "not pre-tokenised" in msg
    assert f"python -m data_pipelines.pretokenize_vq --ckpt INIT_CHECKPOINT --in {raw}" in msg


def test_gen_shards_without_latents_for_janusflow(shapes_data, make_cfg, image_cfg):
    flow = dataclasses.replace(image_cfg, gen_kind="flow", codebook_size=0, latent_shape=(4, 4, 4), num_gen_tokens=16)
    for path in (shapes_data["root"] / "shards" / "gen_real", shapes_data["real"]):  # images; VQ codes
        cfg = make_cfg(gen=[{"path": str(path)}])
        with pytest.raises(ConfigError) as e:
            check_sources(cfg, flow, ["gen"])
        assert e.value.key == "data.gen[0].path"
        assert str(path) in str(e.value) and "python -m data_pipelines.pretokenize_vae" in str(e.value)


def test_codes_from_the_manifest_are_pre_tokenised(make_cfg, image_cfg, dataset_writer, tmp_path):
    """build_shards writes gen shards with codes given in the manifest (no pretokenizer meta):
    they are accepted, by their first sample."""

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    samples = ({"__key__": f"s{i}", "json": {"caption": "a red square"}, "codes.npy": npy(np.zeros(image_cfg.num_gen_tokens, np.uint16))}
               for i in range(12))
    coded = dataset_writer(tmp_path / "gen_coded", "gen", samples)
    assert "codebook_size" not in json.loads((coded / ".nv-meta" / "janus_dataset.json").read_text())
    assert check_sources(make_cfg(gen=[{"path": str(coded)}]), image_cfg) is None


def test_the_shapes_sources_pass(make_cfg, image_cfg):
    assert check_sources(make_cfg(), image_cfg) is None
