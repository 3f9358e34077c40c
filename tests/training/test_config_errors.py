"""Engine acceptance 6: bad configs fail before training, naming the key and the value."""

from __future__ import annotations

import pytest

from janus_train.training.config import ConfigError, load_config, validate_config


def _check(overrides, dp=1, paths=False):
    cfg = load_config(["+recipe=tiny_demo", *overrides])
    return validate_config(cfg, dp_size=dp, check_paths=paths)


@pytest.mark.parametrize(
    "overrides,dp,key,fragment",
    [
        (["train.stages.stage2.ratio=1:2"], 1, "train.stages.stage2.ratio", "1:2"),
        (["train.stages.stage2.ratio=a:b:c"], 1, "train.stages.stage2.ratio", "numbers"),
        (["train.stages.stage1.ratio=0:0:0"], 1, "train.stages.stage1.ratio", "all zero"),
        (["train.stages.stage1.ratio=-1:0:3"], 1, "train.stages.stage1.ratio", "non-negative"),
        (["train.stages.stage1.global_batch=100", "train.micro_batch_rows=3"], 1, "train.stages.stage1.global_batch", "100"),
        (["train.stages.stage1.global_batch=6"], 4, "train.stages.stage1.global_batch", "x 4"),
        (["trian.steps=3"], 1, "trian.steps", "unknown key"),
        (["train.stages.stage1.lr=-1"], 1, "train.stages.stage1.lr", "-1"),
        (["train.stages.stage1.trainable=[vq]"], 1, "train.stages.stage1.trainable", "vq"),
        (["train.stages.stage2.decay=exponential"], 1, "train.stages.stage2.decay", "exponential"),
        (["train.stages.stage3.min_lr_ratio=1.5"], 1, "train.stages.stage3.min_lr_ratio", "1.5"),
        (["stage=4"], 1, "stage", "4"),
        (["parallel.zero_stage=4"], 1, "parallel.zero_stage", "4"),
        (["model.attention=fast"], 1, "model.attention", "fast"),
        (["+recipe_typo=1"], 1, "recipe_typo", "unknown key"),
    ],
)
def test_bad_config_names_key(overrides, dp, key, fragment):
    with pytest.raises(ConfigError) as e:
        _check(overrides, dp)
    assert e.value.key == key
    assert fragment in str(e.value)


def test_missing_data_dir_names_the_source(tmp_path):
    with pytest.raises(ConfigError) as e:
        _check([f"data.root={tmp_path}/nowhere"], paths=True)
    assert e.value.key.startswith("data.und[0].path")
    assert "nowhere" in str(e.value)


def test_empty_data_dir_fails_at_validation(tmp_path):
    # an existing but empty directory used to pass validation and fail after the model loaded
    for task in ("und", "text", "gen_real", "gen_synthetic"):
        (tmp_path / task).mkdir()
    with pytest.raises(ConfigError) as e:
        _check([f"data.root={tmp_path}", "model.init_from=null"], paths=True)
    assert e.value.key.startswith("data.und[0].path")
    assert str(tmp_path / "und") in str(e.value) and "build_shards" in str(e.value)


def test_unknown_recipe_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config(["+recipe=janus_pro_3b"])
    assert e.value.key == "recipe" and "janus_pro_7b" in str(e.value)


def test_paper_recipes_hold_table_2():
    cfg = load_config(["+recipe=janus_pro_7b", "model.init_from=null"])
    s = cfg.train.stages
    assert (s.stage1.lr, s.stage1.warmup_steps, s.stage1.steps, s.stage1.global_batch, s.stage1.ratio) == (1.0e-3, 600, 20000, 256, "1:0:3")
    assert (s.stage2.lr, s.stage2.warmup_steps, s.stage2.steps, s.stage2.global_batch, s.stage2.ratio) == (1.0e-4, 5000, 360000, 512, "2:3:5")
    assert (s.stage3.lr, s.stage3.warmup_steps, s.stage3.steps, s.stage3.global_batch, s.stage3.ratio) == (4.0e-5, 0, 40000, 128, "5:1:4")
    assert {s.stage1.decay, s.stage2.decay, s.stage3.decay} == {"constant"}
    assert list(cfg.train.optimizer.betas) == [0.9, 0.95] and cfg.train.optimizer.weight_decay == 0.0 and cfg.train.grad_clip == 1.0
    assert list(s.stage1.trainable) == ["und_aligner", "gen_embed", "gen_aligner", "gen_head"]
    assert "vision" not in s.stage2.trainable and "vision" in s.stage3.trainable
    one_b = load_config(["+recipe=janus_pro_1b", "model.init_from=null"]).train.stages
    assert one_b.stage3.steps == 80000


@pytest.mark.slow
def test_cli_fails_fast_before_training(trainer_tools, tmp_path):
    run_dir = tmp_path / "run"
    r = trainer_tools.run(["+recipe=tiny_demo", f"run_dir={run_dir}", "train.stages.stage2.ratio=1:2"], timeout=120)
    assert r.returncode == 2, r.stderr
    assert "config error: train.stages.stage2.ratio" in r.stderr
    assert not run_dir.exists()
    r = trainer_tools.run(["+recipe=tiny_demo", "bogus.key=1"], timeout=120)
    assert r.returncode == 2 and "config error: bogus.key: unknown key" in r.stderr
