"""train.loss_weights: the objective is sum over tasks of weight x summed CE over the global
supervised-token count; weights of 1 are bitwise the plain token mean; logged losses stay
unweighted."""

from __future__ import annotations

import pytest
import torch

from janus_train.checkpoint.io import load_pretrained, load_tokenizer
from janus_train.contracts.batch import TASK_ID, Row, collate
from janus_train.training.step import train_step


class _Engine:
    """The slice of DeepSpeed's engine that train_step uses, on one process (no ZeRO)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch, touch_all=False):
        return self.model(batch, touch_all=touch_all)

    def gradient_accumulation_steps(self):
        return 1

    def backward(self, loss, scale_wrt_gas=False):
        loss.backward()

    def step(self):
        pass

    def was_step_applied(self):
        return True

    def get_global_grad_norm(self):
        return None


@pytest.fixture(scope="module")
def setup(tiny_hf_ckpt):
    tok = load_tokenizer(tiny_hf_ckpt)
    model = load_pretrained(tiny_hf_ckpt).float()
    return tok, model


def _batch(tok, model, docs):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, cfg.vision.image_size, cfg.vision.image_size), generator=g, dtype=torch.uint8)
    und = docs.und(tok, "What color is the circle?", "red", image, cfg.num_image_tokens)
    codes = torch.randint(0, cfg.vq.codebook_size, (cfg.num_image_tokens,), generator=g).tolist()
    gen = docs.gen(tok, "a blue square", codes)
    text = docs.text(tok("a plain sentence about shapes").input_ids)
    rows = [Row(TASK_ID["und"], [und]), Row(TASK_ID["text"], [text]), Row(TASK_ID["gen"], [gen])]
    return collate(rows, 160, tok.pad_token_id, tok.convert_tokens_to_ids("<image_placeholder>"))


def _grads(model, batch, weights):
    model.zero_grad(set_to_none=True)
    res = train_step(_Engine(model), [batch], 1, None, torch.device("cpu"), torch.float32, True, weights)
    return res, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_weights_scale_each_task_and_leave_logged_losses_alone(setup, docs):
    tok, model = setup
    batch = _batch(tok, model, docs)
    plain, g_plain = _grads(model, batch, None)
    ones, g_ones = _grads(model, batch, {"und": 1.0, "text": 1.0, "gen": 1.0})
    assert all(torch.equal(g_plain[n], g_ones[n]) for n in g_plain)  # 1/1/1 is the plain objective, bitwise
    weighted, g_w = _grads(model, batch, {"und": 3.0, "text": 0.0, "gen": 1.0})
    assert weighted.loss == pytest.approx(plain.loss) and weighted.task_loss == pytest.approx(plain.task_loss)
    # The objective is linear in the weights: grad(3, 0, 1) = 3 grad(und) + grad(gen), each task
    # alone measured with the others at weight 0 (same normalisation: all tasks' tokens).
    _, g_und = _grads(model, batch, {"und": 1.0, "text": 0.0, "gen": 0.0})
    _, g_gen = _grads(model, batch, {"und": 0.0, "text": 0.0, "gen": 1.0})
    changed = 0
    for n, g in g_w.items():
        expect = 3 * g_und.get(n, torch.zeros_like(g)) + g_gen.get(n, torch.zeros_like(g))
        torch.testing.assert_close(g, expect, rtol=1e-4, atol=1e-7)
        changed += int(not torch.allclose(g, g_plain[n]))
    assert changed > 0
