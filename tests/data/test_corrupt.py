"""Acceptance 3: damaged input is skipped, counted per source and reason, logged with shard and
key, and the run goes on. Also the builders' bad-row reports."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from janus_train.data.formats import npy_bytes


def _und(i, jpeg):
    turns = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": f"Shape {i}."}]
    return {"__key__": f"und-{i:04d}", "jpg": jpeg(40, 30, seed=i), "json": {"conversations": turns}}


def _gen(i, caption=True):
    meta = {"caption": f"a red circle number {i}", "source": "real"} if caption else {"source": "real"}
    return {"__key__": f"gen-{i:04d}", "json": meta, "codes.npy": npy_bytes(np.full(16, i % 256, np.uint16))}


def test_corrupt_shard_set_streams_to_the_end_with_named_skips(tmp_path, dataset_writer, jpeg, make_cfg, tok, image_cfg, caplog):
    from janus_train.data.loader import build_train_loader

    und = [_und(i, jpeg) for i in range(40)]
    und[7]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"  # corrupt JPEG
    und[12]["json"] = "{bad json"  # bad JSON
    del und[21]["jpg"]  # missing image part
    und_dir = dataset_writer(tmp_path / "und", "und", und, shard_size=10)
    gen = [_gen(i, caption=(i != 5)) for i in range(40)]  # record 5 has no caption
    gen_dir = dataset_writer(tmp_path / "gen", "gen", gen, shard_size=10)
    # Truncate one und shard and one gen shard after indexing (storage damage).
    for d in (und_dir, gen_dir):
        p = d / "shard-000003.tar"
        os.truncate(p, p.stat().st_size // 2)
    cfg = make_cfg(
        und=[{"path": str(und_dir), "name": "und_bad"}],
        gen=[{"path": str(gen_dir), "name": "gen_bad"}],
        text=[],
        ratio=[1, 0, 1],
        seq_len=128,
        global_batch=4,
        chunk_size=5,
        lookahead=4,
    )
    ld = build_train_loader(cfg, tok, image_cfg, 0, 1)
    seen = {"und": set(), "gen": set()}
    with caplog.at_level(logging.WARNING, logger="janus_train.data"):
        for _ in range(40):  # several epochs of both sources
            for mb in next(ld):
                mb.validate(image_cfg.num_image_tokens)
                for task, keys in zip(mb.meta["row_tasks"], mb.meta["keys"]):
                    seen[task].update(keys)
    st = ld.stats()
    skipped = st["skipped"]
    assert skipped["und/und_bad"]["bad_image"] >= 1
    assert skipped["und/und_bad"]["bad_json"] >= 1
    assert skipped["und/und_bad"]["missing_key"] >= 1
    assert skipped["und/und_bad"]["truncated_tar"] >= 1
    assert skipped["gen/gen_bad"]["missing_key"] >= 1
    assert skipped["gen/gen_bad"]["truncated_tar"] >= 1
    # every good sample outside the damaged shard was delivered; the bad ones never were
    bad_und = {"und-0007", "und-0012", "und-0021"}
    assert {f"und-{i:04d}" for i in range(30)} - bad_und <= seen["und"]
    assert not bad_und & seen["und"] and "gen-0005" not in seen["gen"]
    assert {f"gen-{i:04d}" for i in range(30) if i != 5} <= seen["gen"]
    # per epoch counts: one bad image per pass over the und source
    epochs = st["samples"]["und/und_bad"] / (40 - 3 - 5)
    assert abs(skipped["und/und_bad"]["bad_image"] - epochs) <= 2
    text = caplog.text
    assert "shard-000000.tar" in text and "bad_image" in text and "und-0007" in text
    assert "shard-000003.tar" in text and "truncated_tar" in text
    assert "gen-0005" in text and "missing_key" in text


def test_missing_shard_file_is_counted_not_fatal(tmp_path, dataset_writer, make_cfg, tok, image_cfg):
    from janus_train.data.loader import build_train_loader

    gen_dir = dataset_writer(tmp_path / "gen", "gen", [_gen(i) for i in range(30)], shard_size=10)
    (gen_dir / "shard-000001.tar").unlink()
    cfg = make_cfg(gen=[{"path": str(gen_dir), "name": "g"}], und=[], text=[], ratio=[0, 0, 1], seq_len=128, global_batch=2, chunk_size=5)
    ld = build_train_loader(cfg, tok, image_cfg, 0, 1)
    for _ in range(10):
        next(ld)
    assert ld.stats()["skipped"]["gen/g"]["missing_shard"] >= 10


def test_build_shards_reports_bad_rows(tmp_path, jpeg):
    from data_pipelines.build_shards import build

    (tmp_path / "ok.jpg").write_bytes(jpeg(20, 20))
    (tmp_path / "bad.jpg").write_bytes(b"garbage bytes")
    rows = [
        {"caption": "a red circle", "image": "ok.jpg"},
        {"caption": "a missing file", "image": "nope.jpg"},
        {"caption": "an undecodable image", "image": "bad.jpg"},
        {"caption": "   ", "image": "ok.jpg"},
        {"image": "ok.jpg"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    summary = build("gen", tmp_path / "m.jsonl", tmp_path / "out", shard_size=2, progress=False)
    assert summary["written"] == 1 and summary["rows"] == 6
    assert summary["skipped"] == {"missing_file": 1, "bad_image": 1, "empty_caption": 1, "missing_key": 1, "bad_json": 1}
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert {e["line"] for e in report["examples"]} == {2, 3, 4, 5, 6}  # 1-based line numbers
