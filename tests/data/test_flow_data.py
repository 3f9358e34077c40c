"""JanusFlow's data path: gen documents (prompt, time slot, latent slots) packed with und and text
rows, the latent drawn from the stored posterior, CFG-dropped prompts, REPA images, refusals."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from janus_train.checkpoint.io import load_pretrained, load_tokenizer, read_config
from janus_train.contracts.batch import TASK_ID
from janus_train.contracts.conversation import gen_prompt
from janus_train.contracts.preprocess import gen_crop, open_rgb
from janus_train.contracts.tokens import TokenizerInfo
from janus_train.data import formats as fmt
from janus_train.data.loader import build_train_loader
from janus_train.data.shards import ShardReader, dataset_shards
from janus_train.data.tokenize import flow_draw


def _data(root, **kw) -> dict:
    d = {
        "und": [{"path": str(root / "und")}],
        "text": [{"path": str(root / "text")}],
        "gen": [{"path": str(root / "gen_real")}],
        "seq_len": 256, "ratio": [1, 1, 2], "global_batch": 4, "micro_batch_rows": 1, "num_workers": 0,
        "granularity": "row", "tokenizer": str(root / "flow_init"), "cfg_dropout": 0.0,
    }
    d.update(kw)
    return d


def _raw_by_key(path) -> dict:
    reader = ShardReader()
    return {raw.key: raw for sh in dataset_shards(path) for raw in reader.read(sh.path, 0, sh.count)}


def _gen_docs(batch):
    """(key, start, length) of every gen document, in row-major order."""
    out, cu = [], batch.cu_seqlens.tolist()
    flat_keys = [k for row_keys, task in zip(batch.meta["keys"], batch.meta["row_tasks"]) for k in row_keys if task == "gen"]
    starts = [a for a, b in zip(cu, cu[1:]) if batch.gen_time_mask.view(-1)[a:b].any()]
    lengths = [b - a for a, b in zip(cu, cu[1:]) if batch.gen_time_mask.view(-1)[a:b].any()]
    assert len(flat_keys) == len(starts)
    return list(zip(flat_keys, starts, lengths))


def test_packed_flow_batch_layout(flow_shapes_root):
    root = flow_shapes_root
    cfg = read_config(root / "flow_init")
    tok = TokenizerInfo.of(load_tokenizer(root / "flow_init"))
    raws = _raw_by_key(root / "gen_real")
    g = cfg.num_gen_tokens
    with build_train_loader(_data(root), None, cfg, 0, 1) as loader:
        step = next(iter(loader))
    tasks = [mb.meta["row_tasks"][0] for mb in step]
    assert sorted(tasks) == ["gen", "gen", "text", "und"]
    for mb in step:
        assert mb.is_flow and mb.gen_time_mask.shape == mb.input_ids.shape
        assert not (mb.und_image_mask & (mb.gen_input_mask | mb.gen_time_mask)).any()
        if mb.meta["row_tasks"][0] == "und":
            n_img = mb.und_pixel_values.shape[0]
            # The begin embedding's position (<begin_of_image>) + the patches, per image.
            assert int(mb.und_image_mask.sum()) == n_img * (cfg.num_image_tokens + 1)
            begins = mb.input_ids[mb.und_image_mask & (mb.input_ids == tok.boi_id)]
            assert begins.numel() == n_img
            assert mb.num_gen_docs == 0 and mb.loss_counts()["flow"] == 0
        if mb.meta["row_tasks"][0] != "gen":
            continue
        docs = _gen_docs(mb)
        m = len(docs)
        assert m == mb.num_gen_docs > 0
        assert int(mb.gen_time_mask.sum()) == m and int(mb.gen_input_mask.sum()) == m * g
        assert (mb.loss_task == TASK_ID["gen"]).sum() == 0  # no CE in JanusFlow gen documents
        assert mb.loss_counts() == {"und": 0, "text": 0, "gen": 0, "flow": m * int(np.prod(cfg.flow.latent_channels * cfg.latent_size**2)),
                                    "repa": m * g}
        ids, pos = mb.input_ids.view(-1), mb.position_ids.view(-1)
        for j, (key, start, n) in enumerate(docs):
            raw = raws[key]
            caption = json.loads(raw.parts["json"])["caption"]
            prompt = tok.encode(gen_prompt(caption))
            assert prompt[-1] == tok.boi_id
            # BOS, the prompt without <begin_of_image>, the time slot where it was, G latent slots.
            assert ids[start : start + len(prompt)].tolist() == [tok.bos_id] + prompt[:-1]
            assert bool(mb.gen_time_mask.view(-1)[start + len(prompt)]) and n == len(prompt) + 1 + g
            assert pos[start : start + n].tolist() == list(range(n))
            # The latent: x1 = (mean + std * eps) * scaling factor, drawn by (seed, source/key, position).
            mean = np.load(io.BytesIO(raw.parts[fmt.LATENT_MEAN_PART]))
            std = np.load(io.BytesIO(raw.parts[fmt.LATENT_STD_PART]))
            assert 0 < float(mb.gen_t[j]) < 1
            x1 = mb.gen_latents[j].numpy()
            eps = (x1 / 0.5 - mean.astype(np.float32)) / std.astype(np.float32)
            assert np.isfinite(eps).all() and 0.5 < eps.std() < 2.0  # a unit-normal draw around the mean
            # REPA sees the clean image at the gen preprocessing, at SigLIP's size.
            want = gen_crop(open_rgb(fmt.image_part(raw.parts)), cfg.image_size).transpose(2, 0, 1)
            assert torch.equal(mb.gen_repa_pixels[j], torch.from_numpy(np.ascontiguousarray(want)))


def test_flow_draw_is_a_function_of_seed_key_and_position():
    latent = np.stack([np.zeros((4, 2, 2)), np.ones((4, 2, 2))]).astype(np.float16)
    a = flow_draw(3, "0/k", (1, 2), latent, 0.5)
    b = flow_draw(3, "0/k", (1, 2), latent, 0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2] == b[2]
    for other in (flow_draw(4, "0/k", (1, 2), latent, 0.5), flow_draw(3, "0/k", (2, 2), latent, 0.5), flow_draw(3, "1/k", (1, 2), latent, 0.5)):
        assert not np.array_equal(a[1], other[1])
    # logit-normal(0, 1) times: the median is 1/2
    ts = [flow_draw(0, f"k{i}", (0, i), latent, 1.0)[2] for i in range(2000)]
    assert 0.47 < float(np.median(ts)) < 0.53 and min(ts) > 0 and max(ts) < 1


def test_dropped_prompt_keeps_the_full_documents_positions(flow_shapes_root):
    """A CFG-dropped document is BOS, time, latents at the positions of the full document: the
    sampler's unconditional row (prompt keys hidden) seen position for position."""
    root = flow_shapes_root
    cfg = read_config(root / "flow_init")
    tok = TokenizerInfo.of(load_tokenizer(root / "flow_init"))
    raws = _raw_by_key(root / "gen_real")
    g = cfg.num_gen_tokens
    with build_train_loader(_data(root, cfg_dropout=0.999999), None, cfg, 0, 1) as loader:
        step = next(iter(loader))
    seen = 0
    for mb in step:
        if mb.meta["row_tasks"][0] != "gen":
            continue
        ids, pos = mb.input_ids.view(-1), mb.position_ids.view(-1)
        for key, start, n in _gen_docs(mb):
            full = len(tok.encode(gen_prompt(json.loads(raws[key].parts["json"])["caption"])))  # BOS + prompt - BOI
            assert n == 2 + g and ids[start].item() == tok.bos_id and bool(mb.gen_time_mask.view(-1)[start + 1])
            assert pos[start : start + n].tolist() == [0] + list(range(full, full + 1 + g))
            seen += 1
    assert seen > 0


def test_forward_backward_on_loader_batches(flow_shapes_root):
    root = flow_shapes_root
    model = load_pretrained(root / "flow_init").train()
    cfg = model.config
    with build_train_loader(_data(root, cfg_dropout=0.5), None, cfg, 0, 1) as loader:
        step = next(iter(loader))
    total = 0
    for mb in step:
        out = model(mb, touch_all=True)
        counts = mb.loss_counts()
        for name, value in out.loss_sum.items():
            assert torch.isfinite(value), name
            assert int(out.count[name]) == counts[name], name
        total = total + sum(out.loss_sum[n] / max(1, counts[n]) for n in out.loss_sum)
    total.backward()
    for part in model.COMPONENTS:
        params = [model.und_begin] if part == "und_begin" else list(getattr(model, part).parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), part


def test_mismatched_gen_data_is_refused(flow_shapes_root, shapes_root):
    root = flow_shapes_root
    flow_cfg = read_config(root / "flow_init")
    # VQ-code shards for a JanusFlow model, and latent shards for a Janus-Pro model.
    with pytest.raises(ValueError, match="pretokenize_vae"):
        build_train_loader(_data(root, gen=[{"path": str(shapes_root / "gen_real")}]), None, flow_cfg, 0, 1)
    janus_cfg = read_config(shapes_root / "tiny_init")
    with pytest.raises(ValueError, match="holds VAE latents"):
        build_train_loader(_data(root, tokenizer=str(shapes_root / "tiny_init")), None, janus_cfg, 0, 1)


def test_ratio_phases_switch_the_mix_at_their_step(flow_shapes_root):
    """A stage's `ratio_phases`: steps below until_step use the phase's ratio, later ones the
    stage's (JanusFlow's stage 2 starts at 30:20:50 for 10,000 steps)."""
    from janus_train.contracts.errors import ConfigError
    from janus_train.data.config import DataConfig

    root = flow_shapes_root
    cfg = read_config(root / "flow_init")
    d = _data(root, ratio=[0, 0, 1], ratio_phases=[[2, [1, 0, 0]], [3, [0, 1, 0]]], global_batch=2)
    with build_train_loader(d, None, cfg, 0, 1) as loader:
        tasks = [sorted(t for mb in loader.next_step() for t in mb.meta["row_tasks"]) for _ in range(5)]
    assert tasks == [["und", "und"], ["und", "und"], ["text", "text"], ["gen", "gen"], ["gen", "gen"]]
    with pytest.raises(ConfigError, match="strictly ascending"):
        DataConfig.from_dict(dict(d, ratio_phases=[[3, [1, 0, 0]], [2, [0, 1, 0]]]))
