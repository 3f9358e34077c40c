"""Chunked, recomputed head CE: same losses and gradients, less memory."""

from __future__ import annotations

import copy

import torch

from janus_train.contracts.synthetic import mixed_batch
from janus_train.models.janus.config import JanusConfig
from janus_train.models.janus.model import JanusModel
from janus_train.parallel.chunked_loss import apply_chunked_head_loss


def _loss_and_grads(model, batch):
    out = model(batch)
    loss = out.total_sum() / sum(out.num_tokens.values())
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_head_loss_equals_dense():
    cfg = JanusConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = JanusModel(cfg)
    model.init_weights(std=0.05, seed=0)
    batch, _ = mixed_batch(cfg, 256, 24, seed=2)
    assert batch.supervised_tokens()["text"] > 100 and batch.supervised_tokens()["gen"] > 100
    ref_out, ref = _loss_and_grads(copy.deepcopy(model), batch)
    chunked = apply_chunked_head_loss(copy.deepcopy(model), chunk_tokens=37)
    apply_chunked_head_loss(chunked, chunk_tokens=37)  # idempotent: no nesting
    assert chunked.state_dict().keys() == model.state_dict().keys()
    out, got = _loss_and_grads(chunked, batch)
    for task in ref_out.loss_sum:
        assert torch.allclose(out.loss_sum[task], ref_out.loss_sum[task], rtol=1e-6), task
    for name, g in ref.items():
        if g.abs().max() > 1e-6:  # the vision k_proj bias gradient is float noise
            assert float((got[name] - g).abs().max() / g.abs().max()) <= 1e-5, name


def test_chunked_head_loss_on_janusflow_equals_dense():
    """JanusFlow has no gen head: only its lm_head is chunked (janusflow_1_3b sets head_chunk_tokens)."""
    from janus_train.models.janusflow.config import JanusFlowConfig
    from janus_train.models.janusflow.model import JanusFlowModel

    def loss_and_grads(model, batch):
        out = model(batch)
        sum(v / max(int(out.count[k]), 1) for k, v in out.loss_sum.items()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    cfg = JanusFlowConfig.from_preset("janusflow_tiny")
    torch.manual_seed(0)
    model = JanusFlowModel(cfg)
    model.init_weights(std=0.05, seed=0)
    batch, _ = mixed_batch(cfg, 256, 24, seed=2)
    assert batch.supervised_tokens()["text"] > 100 and batch.num_gen_docs > 0
    ref_out, ref = loss_and_grads(copy.deepcopy(model), batch)
    chunked = apply_chunked_head_loss(copy.deepcopy(model), chunk_tokens=37)
    out, got = loss_and_grads(chunked, batch)
    for task in ref_out.loss_sum:
        assert torch.allclose(out.loss_sum[task], ref_out.loss_sum[task], rtol=1e-6), task
    for name, g in ref.items():
        if g.abs().max() > 1e-6:
            assert float((got[name] - g).abs().max() / g.abs().max()) <= 1e-5, name
