"""Shard directories: valid megatron-energon datasets, our tar reader agrees with tarfile,
the builders resume, and the sample schema is what docs/data.md says."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest

from janus_train.data.shards import ShardReader, dataset_shards, parse_sample, read_janus_meta


def _energon_samples(path):
    from megatron.energon import Cooker, DefaultTaskEncoder, Sample, WorkerConfig, basic_sample_keys, get_loader, get_train_dataset, stateless

    @dataclasses.dataclass
    class Raw(Sample):
        parts: dict

    @stateless
    def cook(sample: dict) -> Raw:
        return Raw(**basic_sample_keys(sample), parts={k: v for k, v in sample.items() if not k.startswith("__")})

    class Encoder(DefaultTaskEncoder):
        cookers = [Cooker(cook)]

        def batch(self, samples):
            return samples

    ds = get_train_dataset(
        str(path),
        batch_size=1,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
        task_encoder=Encoder(),
        repeat=False,
        dataset_config="crude.yaml",  # the raw parts; dataset.yaml gives energon sample types (test_energon_tools.py)
    )
    return [b[0] for b in get_loader(ds)]


@pytest.mark.filterwarnings("ignore:'pin_memory' argument")
@pytest.mark.parametrize("which", ["und", "text", "real"])
def test_datasets_are_energon_datasets(shapes_data, which):
    path = shapes_data[which]
    assert (path / ".nv-meta" / "crude.yaml").read_text().count("CrudeWebdataset") == 1
    samples = _energon_samples(path)
    shards = dataset_shards(path)
    assert len(samples) == sum(s.count for s in shards)
    parts = set(samples[0].parts)
    expected = {"und": {"jpg", "json"}, "text": {"txt"}, "real": {"json", "codes.npy", "prompt_ids.npy"}}[which]
    assert parts == expected
    assert read_janus_meta(path)["task"] == {"real": "gen"}.get(which, which)


def test_reader_agrees_with_tarfile_including_pax_and_long_names(tmp_path):
    from janus_train.data.shards import prepare_energon

    long_dir = "d" * 120  # a path over 100 chars needs a GNU long name / pax header
    for fmt, name in ((tarfile.PAX_FORMAT, "a"), (tarfile.GNU_FORMAT, "b"), (tarfile.USTAR_FORMAT, "c")):
        members = []
        for i in range(6):
            key = f"{long_dir}/{name}-{i:03d}" if i % 2 else f"{name}-{i:03d}"
            members.append((key + ".json", json.dumps({"i": i}).encode()))
            members.append((key + ".codes.npy", np.arange(i + 1).tobytes()))
        with tarfile.open(tmp_path / f"{name}.tar", "w", format=fmt) as tf:
            for n, data in members:
                if fmt == tarfile.USTAR_FORMAT and len(n) > 100 and "/" not in n[-100:]:
                    continue
                ti = tarfile.TarInfo(n)
                ti.size = len(data)
                ti.mtime = 1.5  # a float mtime makes tarfile write pax records
                tf.addfile(ti, io.BytesIO(data))
    prepare_energon(tmp_path)
    reader = ShardReader()
    for sh in dataset_shards(tmp_path):
        got = reader.read(sh.path, 0, sh.count)
        with tarfile.open(sh.path) as tf:
            ref: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                dot = m.name.index(".", m.name.rfind("/") + 1)  # key = path up to the file name's first dot
                key, part = m.name[:dot], m.name[dot + 1 :]
                ref.setdefault(key, {})[part] = tf.extractfile(m).read()
        assert [g.key for g in got] == list(ref)
        for g in got:
            assert g.error is None and g.parts == ref[g.key]


def test_parse_sample_detects_truncation():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        data = b"x" * 2000
        ti = tarfile.TarInfo("k.json")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    assert parse_sample(raw)[1]["json"] == data
    from janus_train.data.formats import SampleError

    with pytest.raises(SampleError) as e:
        parse_sample(raw[:1500])
    assert e.value.reason == "truncated_tar"


def test_build_shards_resumes_finished_shards(tmp_path, jpeg):
    from data_pipelines.build_shards import build

    for i in range(9):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(16, 16, seed=i))
    rows = [{"image": f"{i}.jpg", "conversations": [{"role": "user", "content": "?"}, {"role": "assistant", "content": str(i)}]} for i in range(9)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    first = build("und", tmp_path / "m.jsonl", out, shard_size=4, progress=False)
    assert first["shards"] == 3 and first["written"] == 9
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # Lose one shard (as if the build died while writing it): only that one is rebuilt.
    (out / "shard-000001.tar").unlink()
    (out / ".build" / "shard-000001.tar.json").unlink()
    again = build("und", tmp_path / "m.jsonl", out, shard_size=4, progress=False)
    assert again["written"] == 9
    assert (out / "shard-000000.tar").stat().st_mtime_ns == mtimes["shard-000000.tar"]
    assert (out / "shard-000002.tar").stat().st_mtime_ns == mtimes["shard-000002.tar"]
    assert sum(s.count for s in dataset_shards(out)) == 9


def test_pretokenized_gen_samples(shapes_data, image_cfg, tok):
    from janus_train.contracts import conversation as conv
    from janus_train.data.formats import load_npy

    sh = dataset_shards(shapes_data["synthetic"])[0]
    raw = ShardReader().read(sh.path, 0, 3)
    for r in raw:
        meta = json.loads(r.parts["json"])
        codes = load_npy(r.parts["codes.npy"])
        assert codes.shape == (image_cfg.num_gen_tokens,) and codes.dtype == np.uint16
        assert int(codes.max()) < image_cfg.codebook_size
        assert meta["source"] == "synthetic" and meta["prompt_tokenizer"] == tok.fingerprint
        assert load_npy(r.parts["prompt_ids.npy"]).tolist() == tok.encode(conv.gen_prompt(meta["caption"]))
        assert "jpg" not in r.parts
    report = json.loads((shapes_data["synthetic"] / "build_report.json").read_text())
    assert report["skipped"] == {} and report["num_gen_tokens"] == image_cfg.num_gen_tokens
