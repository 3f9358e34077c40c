"""The demo recipes reused (issue 14): their assets are built only for the demo's own data, and a
second `make demo` says it trained nothing. No training here: the launcher and the builder are
replaced by recorders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from janus_train.parallel.distributed import DistInfo
from janus_train.tools import demo, demo_assets
from janus_train.training.config import ConfigError, load_config

MAIN = DistInfo(rank=0, world_size=1, local_rank=0, device=__import__("torch").device("cpu"), backend="gloo")


def _own_data(tmp_path: Path) -> list[str]:
    own = tmp_path / "own"
    for sub in ("und", "text", "gen", "init"):
        (own / sub).mkdir(parents=True)
    return [f"data.und=[{{path: {own / 'und'}}}]", f"data.text=[{{path: {own / 'text'}}}]",
            f"data.gen=[{{path: {own / 'gen'}, name: real}}]", f"model.init_from={own / 'init'}"]


def test_uses_demo_data(tmp_path):
    root = tmp_path / "data"
    assert demo_assets.uses_demo_data(load_config(["+recipe=tiny_demo", f"data.root={root}"]))[0]
    assert demo_assets.uses_demo_data(load_config(["+recipe=janusflow_tiny_demo", f"data.root={root}"]))[0]
    assert not demo_assets.uses_demo_data(load_config(["+recipe=tiny_demo", f"data.root={root}", "demo_assets.build=false"]))[0]
    demo_data, why = demo_assets.uses_demo_data(load_config(["+recipe=tiny_demo", f"data.root={root}", *_own_data(tmp_path)]))
    assert not demo_data and "data.und" in why
    # One source elsewhere is enough: the user brings data the demo's tokenizer and init do not know.
    assert not demo_assets.uses_demo_data(load_config(["+recipe=tiny_demo", f"data.root={root}", _own_data(tmp_path / "b")[0]]))[0]
    # A data.root the builder did not write (the user's own shapes shards, say) is never built into.
    (root / "und").mkdir(parents=True)
    demo_data, why = demo_assets.uses_demo_data(load_config(["+recipe=tiny_demo", f"data.root={root}"]))
    assert not demo_data and "did not write" in why
    (root / demo_assets.MARKER).write_text("")  # an interrupted build of the demo's: built again
    assert demo_assets.uses_demo_data(load_config(["+recipe=tiny_demo", f"data.root={root}"]))[0]


def test_training_run_with_own_data_builds_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_assets.subprocess, "run", lambda *a, **k: calls.append(a))
    root = tmp_path / "data"
    demo_assets.ensure_demo_assets(load_config(["+recipe=tiny_demo", f"data.root={root}", *_own_data(tmp_path)]), MAIN)
    assert calls == [] and not root.exists()
    # Own data but the demo's init (absent): a config error naming it, not a build.
    with pytest.raises(ConfigError) as e:
        demo_assets.ensure_demo_assets(load_config(["+recipe=tiny_demo", f"data.root={root}", *_own_data(tmp_path / "c")[:3]]), MAIN)
    assert e.value.key == "model.init_from" and calls == []
    demo_assets.ensure_demo_assets(load_config(["+recipe=tiny_demo", f"data.root={root}"]), MAIN)
    assert len(calls) == 1  # the demo's own data: built


@pytest.fixture
def fake_demo(monkeypatch):
    """demo.main with a recording builder and a launcher that `train(run_dir)`s."""
    built, launched = [], []

    def launch(run_dir, trains: bool):
        def call(cmd, env=None, cwd=None):
            launched.append(cmd)
            if trains:
                _finished_run(run_dir, steps=8)
            (run_dir / "status.json").write_text(json.dumps({"state": "completed", "step": 6, "stage": 3}))
            return 0

        monkeypatch.setattr(demo.subprocess, "call", call)

    monkeypatch.setattr(demo_assets, "build_demo_assets", lambda *a, **k: built.append(a))
    return built, launched, launch


def _finished_run(run_dir: Path, steps: int = 6, state: str = "completed") -> None:
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": steps, "stage": 3, "stage_step": 2, "stage_steps": 2, "world_size": 2, "dp_size": 2,
                                                "tp": 1, "zero_stage": 2}))
    rows = [{"step": i, "stage": 1 + (i - 1) // 2, "loss": 1.0, "loss_und": 1.0, "loss_text": None, "loss_gen": 1.0} for i in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "status.json").write_text(json.dumps({"state": state, "step": steps, "stage": 3}))


def test_demo_with_own_data_builds_nothing(tmp_path, fake_demo):
    built, launched, launch = fake_demo
    launch(tmp_path / "out" / "run", trains=True)
    demo.main(["--out", str(tmp_path / "out"), *_own_data(tmp_path)])
    assert built == [] and len(launched) == 1
    demo.main(["--out", str(tmp_path / "fresh_out"), "--fresh"])
    assert len(built) == 1  # the demo's own data


def test_second_demo_says_it_trained_nothing(tmp_path, fake_demo, capsys):
    _, launched, launch = fake_demo
    run_dir = tmp_path / "run"
    _finished_run(run_dir, state="running")  # e.g. stopped after its last checkpoint: the launch resumes it
    launch(run_dir, trains=False)
    demo.main(["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert len(launched) == 1
    assert "already ran to completion" in out and "--fresh" in out and "nothing was trained" in out
    assert "finished in" not in out


def test_fresh_says_it_deletes_the_previous_run(tmp_path, fake_demo, capsys):
    _, _, launch = fake_demo
    run_dir = tmp_path / "run"
    _finished_run(run_dir)
    (run_dir / "old").write_text("")
    launch(run_dir, trains=True)
    demo.main(["--out", str(tmp_path), "--fresh"])
    out = capsys.readouterr().out
    assert f"deleting the previous run in {run_dir}" in out
    assert not (run_dir / "old").exists() and "finished in" in out
