"""build_shards --format: each published input schema (LLaVA, ms-swift, ShareGPT, a folder of
captioned images, parquet / HF datasets, energon sample types) becomes the samples our loader
reads, bad records are skipped and counted, and the shards stream through inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from data_pipelines import build_shards
from data_pipelines.input_formats import Columns, InputError, detect_format

REPO = Path(__file__).resolve().parents[2]


def _samples(out: Path) -> dict[str, dict[str, Any]]:
    """key -> parts of every sample of a built dataset (json parts parsed)."""
    from janus_train.data.shards import ShardReader, dataset_shards

    reader, got = ShardReader(), {}
    for sh in dataset_shards(out):
        for r in reader.read(sh.path, 0, sh.count):
            assert r.error is None
            got[r.key] = {k: json.loads(v) if k == "json" else v for k, v in r.parts.items()}
    return got


def _build(task: str, inp: Path, out: Path, **kw: Any) -> dict[str, Any]:
    return build_shards.build(task, inp, out, shard_size=2, progress=False, **kw)


# ---- inputs in the published schemas --------------------------------------------------------


def write_llava(root: Path, jpeg) -> Path:
    """LLaVA-Instruct rows, images under a separate folder (LLaVA's --image_folder)."""
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(jpeg(24, 16, seed=1))
    (root / "images" / "b.jpg").write_bytes(jpeg(16, 24, seed=2))
    rows = [
        {"id": "a", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "b", "image": "b.jpg", "conversations": [
            {"from": "human", "value": "How many?\n<image>"}, {"from": "gpt", "value": "Two."},
            {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "Left."}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
        {"id": "two", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image><image> Same?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "gone", "image": "missing.jpg", "conversations": [
            {"from": "human", "value": "<image>\n?"}, {"from": "gpt", "value": "?"}]},
    ]
    (root / "ann").mkdir()
    (root / "ann" / "llava.json").write_text(json.dumps(rows))
    return root / "ann" / "llava.json"


def write_swift(root: Path, jpeg) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cat.jpg").write_bytes(jpeg(20, 20, seed=3))
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>What is this?"},
                      {"role": "assistant", "content": "A cat."}], "images": [str(root / "cat.jpg")]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "?"}],
         "images": ["http://example.com/x.jpg"]},
    ]
    (root / "swift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "swift.jsonl"


def write_sharegpt(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": "s0", "conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "Hello"},
                                        {"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}]},
        {"id": "s1", "conversations": [{"from": "human", "value": "Only a question"}]},
        {"id": "s2", "conversations": [{"from": "robot", "value": "?"}, {"from": "gpt", "value": "?"}]},
    ]
    (root / "sharegpt.json").write_text(json.dumps(rows))
    return root / "sharegpt.json"


def write_folder(root: Path, jpeg) -> Path:
    from PIL import Image

    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg(32, 20, seed=4))
    (root / "a.txt").write_text("a photo of a red fox\n")
    Image.new("RGB", (18, 30), (0, 90, 200)).save(root / "sub" / "b.png")
    (root / "sub" / "b.txt").write_text("a blue square")
    (root / "c.jpg").write_bytes(jpeg(16, 16, seed=5))  # no caption file
    (root / "d.jpg").write_bytes(jpeg(16, 16, seed=6))
    (root / "d.txt").write_text("  \n")  # empty caption
    return root


def image_table(jpeg) -> dict[str, list[Any]]:
    """Columns as a HuggingFace image-caption dataset has them (datasets.Image structs)."""
    imgs = [jpeg(20, 12, seed=10 + i) for i in range(3)]
    return {
        "image": [{"bytes": b, "path": None} for b in imgs],
        "caption": ["a green circle", "two yellow stars", ""],
        "id": ["p0", "p1", "p2"],
    }


def write_energon(root: Path, jpeg, kind: str) -> Path:
    """An energon dataset of a standard sample type, as a Megatron-LM user has one."""
    import yaml

    from janus_train.data import shards

    if kind == "CaptioningSample":
        samples = [{"__key__": f"c{i}", "jpg": jpeg(20, 20, seed=20 + i), "txt": f"caption number {i}".encode()} for i in range(3)]
        field_map = {"image": "jpg", "caption": "txt"}
    elif kind == "VQASample":
        samples = [
            {"__key__": f"q{i}", "jpg": jpeg(20, 20, seed=30 + i),
             "json": json.dumps({"question": f"question {i}?", "answers": [f"answer {i}"] if i < 2 else []}).encode()}
            for i in range(3)
        ]
        field_map = {"image": "jpg", "context": "json[question]", "answers": "json[answers]"}
    else:
        samples = [{"__key__": f"t{i}", "txt": f"plain text number {i}".encode()} for i in range(3)]
        field_map = {"text": "txt"}
    shards.write_dataset(root, "text", iter(samples), 2)
    (root / ".nv-meta" / "dataset.yaml").write_text(
        yaml.safe_dump({"sample_type": {"__module__": "megatron.energon", "__class__": kind}, "field_map": field_map})
    )
    return root


# ---- one test per format --------------------------------------------------------------------


def test_llava_und_and_text(tmp_path, jpeg):
    src = write_llava(tmp_path / "in", jpeg)
    assert detect_format(src)[0] == "llava"
    images = tmp_path / "in" / "images"
    s = _build("und", src, tmp_path / "und", image_root=images)
    assert s["format"] == "llava" and s["written"] == 2
    assert s["skipped"] == {"missing_key": 1, "bad_conversation": 1, "missing_file": 1}
    # 1-based record numbers: the text row is the 3rd element, the two-image row the 4th
    assert {(e["line"], e["reason"]) for e in s["examples"]} == {(3, "missing_key"), (4, "bad_conversation"), (5, "missing_file")}
    got = _samples(tmp_path / "und")
    assert set(got) == {"a", "b"}
    assert got["a"]["jpg"] == (images / "a.jpg").read_bytes()  # stored untouched
    # The <image> marker stays where LLaVA put it: our und format places the image by it.
    assert got["a"]["json"]["conversations"] == [
        {"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "Red."}]
    assert [t["role"] for t in got["b"]["json"]["conversations"]] == ["user", "assistant"] * 2
    assert got["b"]["json"]["conversations"][0]["content"] == "How many?\n<image>"

    s = _build("text", src, tmp_path / "text", image_root=images)
    assert s["written"] == 1 and s["skipped"] == {"bad_conversation": 4}
    (t,) = _samples(tmp_path / "text").values()
    assert t["json"] == {"conversations": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]}

    # The same rows as JSONL are detected and read the same way.
    jl = tmp_path / "in" / "ann" / "llava.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in json.loads(src.read_text())))
    assert detect_format(jl)[0] == "llava"
    assert _build("und", jl, tmp_path / "und_jsonl", image_root=images)["written"] == 2


def test_swift_messages(tmp_path, jpeg):
    src = write_swift(tmp_path / "in", jpeg)
    assert detect_format(src)[0] == "swift"
    s = _build("und", src, tmp_path / "und")
    assert s["written"] == 1 and s["skipped"] == {"missing_key": 1, "missing_file": 1}
    (u,) = _samples(tmp_path / "und").values()
    assert u["jpg"] == (tmp_path / "in" / "cat.jpg").read_bytes()
    assert u["json"]["system"] == "Be brief."  # the system turn becomes the sample's system prompt
    assert u["json"]["conversations"] == [
        {"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."}]
    s = _build("text", src, tmp_path / "text")
    assert s["written"] == 1
    (t,) = _samples(tmp_path / "text").values()
    assert t["json"]["conversations"][1] == {"role": "assistant", "content": "4"}


def test_sharegpt_text(tmp_path):
    src = write_sharegpt(tmp_path / "in")
    assert detect_format(src)[0] == "sharegpt"
    s = _build("text", src, tmp_path / "text")
    assert s["written"] == 1 and s["skipped"] == {"bad_conversation": 2}
    got = _samples(tmp_path / "text")
    assert got["s0"]["json"]["system"] == "You are terse."
    assert [t["role"] for t in got["s0"]["json"]["conversations"]] == ["user", "assistant", "user", "assistant"]
    with pytest.raises(InputError, match="cannot feed --task und"):
        _build("und", src, tmp_path / "und")
    assert not (tmp_path / "und").exists()


def test_folder_of_captioned_images(tmp_path, jpeg):
    src = write_folder(tmp_path / "in", jpeg)
    assert detect_format(src)[0] == "folder"
    s = _build("gen", src, tmp_path / "gen", source="real")
    assert s["written"] == 2 and s["skipped"] == {"missing_file": 1, "empty_caption": 1}
    got = _samples(tmp_path / "gen")
    assert got["a"]["json"] == {"caption": "a photo of a red fox", "source": "real"}
    assert got["a"]["jpg"] == (src / "a.jpg").read_bytes()
    assert got["sub_b"]["json"]["caption"] == "a blue square" and "png" in got["sub_b"]
    # und: the caption answers a describe-the-image question
    _build("und", src, tmp_path / "und")
    conv = _samples(tmp_path / "und")["a"]["json"]["conversations"]
    assert conv[1] == {"role": "assistant", "content": "a photo of a red fox"} and conv[0]["role"] == "user"
    with pytest.raises(InputError, match="cannot feed --task text"):
        _build("text", src, tmp_path / "text")


def test_folder_given_as_a_relative_path(tmp_path, jpeg, monkeypatch):
    """`--input my_data/captions` from the parent directory: the images are found (they were
    read against the folder a second time)."""
    write_folder(tmp_path / "my_data" / "captions", jpeg)
    monkeypatch.chdir(tmp_path)
    s = _build("gen", Path("my_data/captions"), Path("gen"))
    assert s["written"] == 2 and s["skipped"] == {"missing_file": 1, "empty_caption": 1}


def test_parquet_and_hf_datasets(tmp_path, jpeg):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = image_table(jpeg)
    ds = datasets.Dataset.from_dict(cols).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "train.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    for src in (tmp_path / "train.parquet", tmp_path / "hf"):
        assert detect_format(src)[0] == "parquet"
        out = tmp_path / f"gen_{src.name}"
        s = _build("gen", src, out)
        assert s["written"] == 2 and s["skipped"] == {"empty_caption": 1}
        got = _samples(out)
        assert got["p0"]["json"]["caption"] == "a green circle"
        assert got["p1"]["jpg"] == cols["image"][1]["bytes"]  # bytes passed through untouched

    # Raw binary image column and other names, chosen with the column flags; und from a chat column.
    msgs = [[{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": c}] for c in ("red", "blue")]
    table = pa.table({"jpeg_bytes": [jpeg(12, 12, seed=40), jpeg(12, 12, seed=41)], "description": ["x", "y"], "chat": msgs})
    pq.write_table(table, tmp_path / "raw.parquet")
    s = _build("und", tmp_path / "raw.parquet", tmp_path / "und", columns=Columns(image="jpeg_bytes", conversations="chat"))
    assert s["written"] == 2
    assert [x["json"]["conversations"][1]["content"] for x in _samples(tmp_path / "und").values()] == ["red", "blue"]
    s = _build("text", tmp_path / "raw.parquet", tmp_path / "text", columns=Columns(text="description"))
    assert sorted(x["txt"] for x in _samples(tmp_path / "text").values()) == [b"x", b"y"]
    with pytest.raises(InputError, match="--image-column 'pixels' is not a column"):
        _build("gen", tmp_path / "raw.parquet", tmp_path / "bad", columns=Columns(image="pixels"))
    with pytest.raises(InputError, match="no image column"):
        _build("gen", tmp_path / "raw.parquet", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(InputError, match="no split 'test'"):
        _build("gen", tmp_path / "hf", tmp_path / "bad", split="test")


def test_energon_sample_types(tmp_path, jpeg):
    cap = write_energon(tmp_path / "cap", jpeg, "CaptioningSample")
    vqa = write_energon(tmp_path / "vqa", jpeg, "VQASample")
    txt = write_energon(tmp_path / "txt", jpeg, "TextSample")
    assert detect_format(cap)[0] == "energon"
    s = _build("gen", cap, tmp_path / "gen")
    got = _samples(tmp_path / "gen")
    assert s["written"] == 3 and got["c1"]["json"]["caption"] == "caption number 1"
    assert got["c1"]["jpg"] == jpeg(20, 20, seed=21)  # energon's bytes, not a re-encoded decode
    _build("und", cap, tmp_path / "cap_und")
    assert _samples(tmp_path / "cap_und")["c0"]["json"]["conversations"][1]["content"] == "caption number 0"
    s = _build("und", vqa, tmp_path / "und")
    assert s["written"] == 2 and s["skipped"] == {"bad_conversation": 1}  # a VQASample without answers
    assert _samples(tmp_path / "und")["q1"]["json"]["conversations"] == [
        {"role": "user", "content": "question 1?"}, {"role": "assistant", "content": "answer 1"}]
    _build("text", txt, tmp_path / "text")
    assert _samples(tmp_path / "text")["t2"]["txt"] == b"plain text number 2"
    with pytest.raises(InputError, match="TextSample samples cannot feed --task gen"):
        _build("gen", txt, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ---- the CLI: detection line, errors, and the round trip through inspect ---------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "data_pipelines.build_shards", *args], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


def test_cli_says_the_detected_format_and_refuses_bad_input(tmp_path):
    src = write_sharegpt(tmp_path / "in")
    p = _cli("--task", "text", "--input", str(src), "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].startswith("input format: sharegpt (")
    for bad, why in ((tmp_path / "nope.jsonl", "no such file"), (tmp_path / "empty.jsonl", "empty")):
        if why == "empty":
            bad.write_text("\n\n")
        p = _cli("--task", "gen", "--input", str(bad), "--out", str(tmp_path / "o"))
        assert p.returncode == 2
        assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: ") and str(bad) in p.stderr
        assert why in p.stderr and "Traceback" not in p.stderr
        assert not (tmp_path / "o").exists()


def test_every_format_streams_through_inspect(tmp_path, jpeg, tiny_hf_ckpt, capsys):
    """Shards from each format are what the loader trains on: no skips, every source used."""
    import datasets

    from data_pipelines import inspect, pretokenize_vq

    sh = tmp_path / "shards"
    cols = image_table(jpeg)
    datasets.Dataset.from_dict(cols).cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "t.parquet"))
    llava = write_llava(tmp_path / "llava", jpeg)
    builds = [
        ("und", llava, "llava", {"image_root": tmp_path / "llava" / "images"}),
        ("und", write_swift(tmp_path / "swift", jpeg), "swift", {}),
        ("und", write_energon(tmp_path / "vqa", jpeg, "VQASample"), "vqa", {}),
        ("text", write_sharegpt(tmp_path / "sharegpt"), "sharegpt", {}),
        ("text", write_energon(tmp_path / "etxt", jpeg, "TextSample"), "etxt", {}),
        ("gen", write_folder(tmp_path / "folder", jpeg), "folder", {}),
        ("gen", tmp_path / "t.parquet", "parquet", {}),
        ("gen", write_energon(tmp_path / "cap", jpeg, "CaptioningSample"), "cap", {}),
    ]
    data: dict[str, list[dict[str, str]]] = {"und": [], "text": [], "gen": []}
    for task, src, name, kw in builds:
        _build(task, src, sh / name, source=name if task == "gen" else None, **kw)
        path = sh / name
        if task == "gen":
            pretokenize_vq.pretokenize(tiny_hf_ckpt, path, sh / f"{name}_vq", batch_size=8, progress=False)
            path = sh / f"{name}_vq"
        data[task].append({"path": str(path), "name": name})
    cfg = {**data, "ratio": [1, 1, 1], "seq_len": 256, "global_batch": 6, "tokenizer": str(tiny_hf_ckpt),
           "chunk_size": 2, "lookahead": 4, "num_workers": 0}
    (tmp_path / "data.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    capsys.readouterr()
    inspect.main(["--data-config", str(tmp_path / "data.yaml"), "--steps", "3"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 3
    for x in lines:
        assert x["skipped"] == {} and all(x["rows"][t] > 0 for t in ("und", "text", "gen"))
    assert {s for x in lines for s in x["gen_sources"]} == {"folder", "parquet", "cap"}
