"""Acceptance 3 of the scale issue: the packed-attention backends agree and never attend
across documents."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from janus_train.contracts.synthetic import mixed_batch
from janus_train.models import attention as attn_mod
from janus_train.models.attention import PackedDocs, packed_attention
from janus_train.models.janus.config import JanusConfig
from janus_train.models.janus.model import JanusModel

TOL = 1e-5
SEQ, DOCS = 256, 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def model_and_batch():
    cfg = JanusConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = JanusModel(cfg)
    model.init_weights(std=0.05, seed=0)
    batch, _ = mixed_batch(cfg, SEQ, DOCS, seed=3)
    docs_per_row = [int(((batch.cu_seqlens >= r * SEQ) & (batch.cu_seqlens < (r + 1) * SEQ)).sum()) for r in range(batch.num_rows)]
    assert max(docs_per_row) >= 3, "rows must hold several documents"
    return model.train(), batch


def _with_backend(model: JanusModel, backend: str) -> JanusModel:
    m = copy.deepcopy(model)
    m.config.attention = backend
    return m


# "sdpa" on CPU runs either one masked call per layer or one causal call per document
# (attention.py decides by the work it saves); both must be exact. These force each path.
SDPA_PATHS = {"sdpa-masked": float("inf"), "sdpa-by-document": 0.0}


@pytest.fixture(params=["eager", "sdpa-masked", "sdpa-by-document", "flex"])
def backend(request, monkeypatch):
    name = request.param
    if name in SDPA_PATHS:
        monkeypatch.setattr(attn_mod, "BY_DOCUMENT_MIN_SAVED_FLOPS_PER_CALL", SDPA_PATHS[name])
        return "sdpa"
    return name


def _loss(model, batch) -> torch.Tensor:
    out = model(batch)
    return out.total_sum() / sum(out.num_tokens.values())


def test_backends_same_outputs(model_and_batch, backend):
    model, batch = model_and_batch
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's "use torch.compile" advice on CPU
        ref = _with_backend(model, "eager").hidden_states(batch)
        h = _with_backend(model, backend).hidden_states(batch)
    assert rel(h, ref) <= TOL


@pytest.mark.parametrize("path", list(SDPA_PATHS))
def test_sdpa_eager_same_gradients(model_and_batch, path, monkeypatch):
    model, batch = model_and_batch
    monkeypatch.setattr(attn_mod, "BY_DOCUMENT_MIN_SAVED_FLOPS_PER_CALL", SDPA_PATHS[path])
    grads = {}
    for backend in ("eager", "sdpa"):
        m = _with_backend(model, backend)
        _loss(m, batch).backward()
        grads[backend] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads["eager"].keys() == grads["sdpa"].keys() and len(grads["eager"]) > 50
    for name, g in grads["eager"].items():
        # A softmax is shift invariant: the vision k_proj bias gradient is float noise.
        if g.abs().max() > 1e-6:
            assert rel(grads["sdpa"][name], g) <= TOL, name


def test_function_level_backends_agree_with_gqa():
    g = torch.Generator().manual_seed(0)
    rows, seq, heads, kv_heads, dim = 2, 128, 4, 2, 16
    cu = torch.tensor([0, 10, 70, 128, 128 + 33, 128 + 34, 256], dtype=torch.int32)
    docs = PackedDocs.from_cu_seqlens(cu, 60, rows, seq)
    q = torch.randn(rows, heads, seq, dim, generator=g)
    k = torch.randn(rows, kv_heads, seq, dim, generator=g)
    v = torch.randn(rows, kv_heads, seq, dim, generator=g)
    ref = packed_attention(q, k, v, docs, "eager")
    for threshold in SDPA_PATHS.values():
        attn_mod.BY_DOCUMENT_MIN_SAVED_FLOPS_PER_CALL, saved = threshold, attn_mod.BY_DOCUMENT_MIN_SAVED_FLOPS_PER_CALL
        try:
            assert rel(packed_attention(q, k, v, docs, "sdpa"), ref) <= TOL
        finally:
            attn_mod.BY_DOCUMENT_MIN_SAVED_FLOPS_PER_CALL = saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel(packed_attention(q, k, v, docs, "flex"), ref) <= TOL


def _middle_documents(batch) -> list[int]:
    """Documents with another document before and after them in the same row."""
    cu = batch.cu_seqlens.tolist()
    return [d for d in range(len(cu) - 1) if cu[d] % SEQ != 0 and cu[d + 1] % SEQ != 0 and cu[d + 1] - cu[d] > 4]


def _perturb(batch, target: int):
    """A copy of batch with document `target`'s text ids changed and its image (if any) replaced."""
    doc_ids = batch.doc_ids()
    in_doc = doc_ids == target
    ids = batch.input_ids.clone()
    text_pos = in_doc & ~batch.gen_input_mask & ~batch.und_image_mask
    ids[text_pos] = (ids[text_pos] * 7 + 13) % 1000 + 4
    out = copy.copy(batch)
    out.input_ids = ids
    if bool((in_doc & batch.und_image_mask).any()):
        # Images are consumed in row-major order: count the und documents before this one.
        und_docs = doc_ids[batch.und_image_mask].unique().tolist()
        pixels = batch.und_pixel_values.clone()
        pixels[und_docs.index(target)] = 255 - pixels[und_docs.index(target)]  # uint8 from the loader
        out.und_pixel_values = pixels
    return out, in_doc


def test_no_cross_document_attention(model_and_batch, backend):
    """Change one document (tokens and image): only its own logits move, in every backend."""
    model, batch = model_and_batch
    m = _with_backend(model.eval(), backend)
    targets = _middle_documents(batch)
    assert targets, "need a document with neighbours in its row"
    und = [d for d in targets if bool(((batch.doc_ids() == d) & batch.und_image_mask).any())]
    for target in {targets[0], *und[:1]}:
        perturbed, in_doc = _perturb(batch, target)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = m.text_logits(m.hidden_states(batch))
            b = m.text_logits(m.hidden_states(perturbed))
        assert (a[in_doc] - b[in_doc]).abs().max() > 1e-3, "the perturbation must change the document itself"
        assert (a[~in_doc] - b[~in_doc]).abs().max() <= 1e-6, f"document {target} leaked into others"


def test_flash_falls_back_to_sdpa_with_one_warning(monkeypatch):
    monkeypatch.setattr(attn_mod, "_warned_fallback", False)
    if attn_mod.flash_available():
        pytest.skip("flash-attn and a GPU are present")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert attn_mod.resolve_backend("flash") == "sdpa"
        assert attn_mod.resolve_backend("flash") == "sdpa"
    assert len([w for w in caught if "flash" in str(w.message)]) == 1
