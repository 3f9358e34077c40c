"""energon's own command-line tools on the datasets we build (docs/data.md, "energon's tools").

`energon info`, `energon lint` and `energon preview` (megatron-energon's CLI, run as a user
would, from the venv's bin) succeed on und, text and gen shards written by `build_shards` and on
pre-tokenised gen shards (codes, no image): our `.nv-meta/dataset.yaml` gives the samples as energon's standard sample
types through `.nv-meta/sample_loader.py`. energon's loader reads them with the fields
docs/data.md lists. A directory whose samples are none of ours keeps a crude `dataset.yaml`, on
which `energon info` fails (energon's info needs a `sample_type`, which crude datasets do not
have) - the documented limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ENERGON = str(Path(sys.executable).parent / "energon")
N = 5


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from PIL import Image

    from data_pipelines.build_shards import build
    from janus_train.data.shards import write_dataset

    root = tmp_path_factory.mktemp("energon_tools")
    for i in range(N):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
    und = [{"image": f"{i}.jpg", "conversations": [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": f"red {i}"}]} for i in range(N - 1)]
    und.append(
        {
            "image": "0.jpg",
            "conversations": [
                {"role": "user", "content": "<image>\nWhat colour?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "yes"},
            ],
        }
    )
    manifests = {
        "und": und,
        "text": [{"text": f"plain text {i}"} for i in range(N)],
        "gen": [{"image": f"{i}.jpg", "caption": f"a red square {i}"} for i in range(N)],
    }
    out = {}
    for task, rows in manifests.items():
        (root / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[task] = root / "shards" / task
        build(task, root / f"{task}.jsonl", out[task], shard_size=3, progress=False)
    # what pretokenize_vq writes: codes (and prompt ids), the image dropped
    out["gen_vq"] = write_dataset(
        root / "shards" / "gen_vq",
        "gen",
        ({"__key__": f"g{i:03d}", "json": json.dumps({"caption": f"a red square {i}"}).encode(), "codes.npy": np.zeros(4, "<i4").tobytes()} for i in range(N)),
        shard_size=3,
    )
    out["other"] = write_dataset(root / "shards" / "other", "und", ({"__key__": f"o{i:03d}", "json": json.dumps({"i": i}).encode()} for i in range(N)), shard_size=3)
    return out


SAMPLE_TYPE = {"und": "VQASample", "text": "TextSample", "gen": "CaptioningSample", "gen_vq": "TextSample"}


# Each CLI run imports torch and energon (~5 s of CPU): und (images, chats) in the quick loop,
# the other kinds with the slow tests.
@pytest.mark.parametrize("kinds", [("und",), pytest.param(("text", "gen", "gen_vq"), marks=pytest.mark.slow)], ids=["und", "text-gen-gen_vq"])
def test_energon_info_and_lint_accept_our_shards(datasets, kinds):
    env = {**os.environ, "COLUMNS": "40", "LINES": "10"}  # preview draws images as ASCII art this wide
    cmds = ("info", "lint", "preview")
    runs = {(cmd, kind): subprocess.Popen([ENERGON, cmd, str(datasets[kind])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for kind in kinds for cmd in cmds}
    # preview shows the first sample, then asks "Continue?": answer no
    out = {k: (p.communicate(input="n\n", timeout=300), p.returncode) for k, p in runs.items()}
    for (cmd, kind), ((stdout, stderr), rc) in out.items():
        assert rc == 0, f"energon {cmd} {kind}: exit {rc}\n{stdout}\n{stderr}"
        if cmd == "info":
            t = SAMPLE_TYPE[kind]
            assert f"Sample Type: {{py:class}}`{t} <megatron.energon.{t}>`" in stdout, stdout
            assert f"`train`: 100%, {N} samples in 2 shards" in stdout, stdout
        elif cmd == "lint":
            assert "failed" not in (stdout + stderr).lower(), stdout + stderr
            assert f"{N}/{N}" in stderr, stderr  # tqdm: every sample of the train split was read
        else:
            fields = {"und": ("image", "context", "answers"), "text": ("text",), "gen": ("image", "caption"), "gen_vq": ("text",)}[kind]
            assert "Sample 0" in stdout and all(f" - {f} (" in stdout for f in fields), stdout


@pytest.mark.filterwarnings("ignore:'pin_memory' argument")
def test_energon_loader_gives_the_documented_fields(datasets):
    from megatron.energon import WorkerConfig, get_loader, get_val_dataset

    def samples(path):
        ds = get_val_dataset(str(path), split_part="train", worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0), batch_size=None)
        return {s.__key__: s for s in get_loader(ds)}

    got = {kind: list(samples(datasets[kind]).values()) for kind in SAMPLE_TYPE}
    for kind, ss in got.items():
        assert len(ss) == N and {type(x).__name__ for x in ss} == {SAMPLE_TYPE[kind]}
    und = sorted(got["und"], key=lambda s: s.answers[0])
    assert [(s.context, s.answers) for s in und] == [("What colour?", [f"red {i}"]) for i in range(N - 1)] + [
        ("User: What colour?\nAssistant: red\nUser: Sure?", ["yes"])
    ]
    assert sorted(s.text for s in got["text"]) == [f"plain text {i}" for i in range(N)]
    assert sorted(s.caption for s in got["gen"]) == [f"a red square {i}" for i in range(N)]
    assert all(tuple(s.image.shape) == (3, 16, 16) for s in got["und"] + got["gen"])
    assert sorted(s.text for s in got["gen_vq"]) == [f"a red square {i}" for i in range(N)]


def test_energon_info_on_samples_that_are_none_of_ours_fails_as_documented(datasets):
    """Samples that are none of our tasks get energon's crude dataset.yaml, which energon's
    `info` cannot describe (it needs a sample_type) and `lint` cannot read without cookers."""
    meta = datasets["other"] / ".nv-meta"
    assert "CrudeWebdataset" in (meta / "dataset.yaml").read_text() and not (meta / "sample_loader.py").exists()
    info = subprocess.run([ENERGON, "info", str(datasets["other"])], capture_output=True, text=True, timeout=300, check=False)
    assert info.returncode != 0 and "sample_type" in info.stderr


def test_the_pipelines_datasets_name_their_energon_types(shapes_data):
    """build_shards and pretokenize_vq (the shapes world of the data tests) write the typed
    dataset.yaml: und VQASample, text TextSample, pre-tokenised gen (codes, no image) TextSample."""
    import yaml

    want = {"und": ("VQASample", "sample_loader.py:und"), "text": ("TextSample", "sample_loader.py:text"), "real": ("TextSample", "sample_loader.py:gen_caption")}
    for which, (cls, loader) in want.items():
        meta = shapes_data[which] / ".nv-meta"
        cfg = yaml.safe_load((meta / "dataset.yaml").read_text())
        assert cfg == {"sample_type": {"__module__": "megatron.energon", "__class__": cls}, "sample_loader": loader, "part_filter": "sample_loader.py:part_filter"}
        assert (meta / "sample_loader.py").is_file() and "CrudeWebdataset" in (meta / "crude.yaml").read_text()
