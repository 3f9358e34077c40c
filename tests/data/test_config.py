"""The data config: YAML and dict loading, stage presets, errors that name the key and value."""

from __future__ import annotations

import pytest

from janus_train.data.config import DataConfig, ImageConfig

SRC = {"und": ["/d/und"], "text": ["/d/text"], "gen": [{"path": "/d/real", "weight": 1, "name": "real"}, {"path": "/d/syn", "name": "synthetic"}]}


def test_from_dict_and_yaml_agree(tmp_path):
    y = tmp_path / "data.yaml"
    y.write_text(
        "data:\n"
        "  und: [und]\n"
        "  text: [{path: /abs/text}]\n"
        "  gen:\n"
        "    - {path: real, weight: 1}\n"
        "    - {path: syn, weight: 1, name: synthetic}\n"
        "  ratio: \"2:3:5\"\n"
        "  seq_len: 4096\n"
        "  global_batch: 512\n"
        "  micro_batch_rows: 2\n"
        "  seed: 3\n"
    )
    cfg = DataConfig.from_yaml(y)
    assert cfg.ratio == (2.0, 3.0, 5.0) and cfg.global_batch == 512 and cfg.micro_batch_rows == 2
    assert cfg.und[0].path == str(tmp_path / "und") and cfg.text[0].path == "/abs/text"  # relative to the YAML
    assert [s.name for s in cfg.gen] == ["real", "synthetic"]
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "ratio, expected",
    [([2, 3, 5], (2, 3, 5)), ("5:1:4", (5, 1, 4)), ({"und": 1, "gen": 3}, (1, 0, 3)), ((1, 0, 3), (1, 0, 3))],
)
def test_ratio_forms(ratio, expected):
    assert DataConfig.from_dict({**SRC, "ratio": ratio, "global_batch": 8}).ratio == tuple(float(x) for x in expected)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"seq_len": 0}, r"data.seq_len: .*8, got 0"),
        ({"global_batch": 10, "dp_size": 4}, r"data.global_batch: 10 .*dp_size\*micro_batch_rows=4"),
        ({"cfg_dropout": 1.5}, r"data.cfg_dropout: .*got 1.5"),
        ({"truncation": "cut"}, r"data.truncation: .*got 'cut'"),
        ({"granularity": "sample"}, r"data.granularity: .*got 'sample'"),
        ({"ratio": [1, 2]}, r"data.ratio: ratio \[1, 2\]"),
        ({"ratio": 7385}, r"base-60"),  # what YAML makes of an unquoted 2:3:5
        ({"ratio": [1, 1, 1], "text": []}, r"data.text: data.ratio gives text a share of 1 but lists no sources"),
        ({"gen": [{"path": "/x", "weight": -1}]}, r"data.gen\[0\].weight: .*got -1"),
        ({"gen": [{"path": "/x", "wieght": 1}]}, r"data.gen\[0\].wieght: unknown key"),
        ({"gen": [{"weight": 1}]}, r"data.gen\[0\].path: missing"),
        ({"gen": ["/a/x", "/b/x"]}, r"data.gen: source names must be unique"),
        ({"dp_rank": 2, "dp_size": 2}, r"data.dp_rank: 2"),
        ({"sequence_length": 4096}, r"data.sequence_length: unknown key"),
    ],
)
def test_errors_name_key_and_value(override, match):
    with pytest.raises(ValueError, match=match):
        DataConfig.from_dict({**SRC, "ratio": [2, 3, 5], "global_batch": 16, **override})


def test_zero_ratio_task_needs_no_sources():
    cfg = DataConfig.from_dict({"gen": ["/d/gen"], "ratio": [0, 0, 1], "global_batch": 8})
    assert cfg.und == [] and cfg.task_ratio() == {"und": 0.0, "text": 0.0, "gen": 1.0}


def test_image_config_from_model_config():
    from janus_train.models.janus.config import JanusConfig

    for name in ("tiny",):
        mc = JanusConfig.from_preset(name)
        ic = ImageConfig.from_model(mc)
        assert ic.image_size == mc.vision.image_size and ic.num_image_tokens == mc.num_image_tokens
        assert ic.num_gen_tokens == mc.gen_grid**2 and ic.codebook_size == mc.vq.codebook_size
    full = ImageConfig.from_model(JanusConfig())  # the default is Janus-Pro's geometry
    assert (full.image_size, full.num_image_tokens, full.num_gen_tokens, full.codebook_size) == (384, 576, 576, 16384)
