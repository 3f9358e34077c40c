"""Acceptance 1/2 of the model issue: our model equals transformers' Janus on the same weights."""

from __future__ import annotations

import pytest
import torch

from janus_train.contracts.batch import TASK_ID, Row, collate
from janus_train.checkpoint.io import load_pretrained, load_tokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(tiny_hf_ckpt):
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(str(tiny_hf_ckpt), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(tiny_hf_ckpt):
    return load_tokenizer(tiny_hf_ckpt)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _codes(n: int, k: int, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, k), generator=g).tolist()


def hf_und_logits(hf_model, doc, image):
    ids = torch.tensor([doc.ids.tolist()])
    with torch.no_grad():
        out = hf_model(input_ids=ids, pixel_values=image[None], attention_mask=torch.ones_like(ids))
    return out.logits[0]


def hf_gen_logits(hf_model, tok, doc, n_codes):
    ids = torch.tensor([doc.ids[:-n_codes].tolist()])
    codes = torch.tensor([doc.ids[-n_codes:].tolist()])
    with torch.no_grad():
        text_emb = hf_model.get_input_embeddings()(ids)
        code_emb = hf_model.prepare_embeddings_for_image_generation(codes)
        emb = torch.cat([text_emb, code_emb], dim=1)
        h = hf_model.model.language_model(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long)).last_hidden_state
        return hf_model.model.generation_head(h)[0]


def check_model_parity(model, hf_model, tok, docs):
    cfg = model.config
    size, n_img = cfg.vision.image_size, cfg.num_image_tokens
    images = _images(2, size)
    und1 = docs.und(tok, "What color is the circle?", "The circle is red.", images[0], n_img, key="u1")
    und2 = docs.und(tok, "How many shapes?", "There are 3 shapes.", images[1], n_img, key="u2")
    codes = _codes(2, cfg.num_image_tokens, cfg.vq.codebook_size)
    gen1 = docs.gen(tok, "a blue square", codes[0], key="g1")
    gen2 = docs.gen(tok, "a green star on the left", codes[1], key="g2")
    seq = 128
    # Two documents per row: also checks position resets and the block-diagonal mask.
    rows = [Row(TASK_ID["und"], [und1, und2]), Row(TASK_ID["gen"], [gen1, gen2])]
    batch = collate(rows, seq, tok.pad_token_id, tok.convert_tokens_to_ids("<image_placeholder>"))
    batch.validate(n_img)
    with torch.no_grad():
        hidden = model.hidden_states(batch)
    n1, n2 = len(und1), len(und2)
    ours_u1 = model.text_logits(hidden[0, :n1])
    ours_u2 = model.text_logits(hidden[0, n1 : n1 + n2])
    diff_und = max(
        (ours_u1 - hf_und_logits(hf_model, und1, images[0])).abs().max().item(),
        (ours_u2 - hf_und_logits(hf_model, und2, images[1])).abs().max().item(),
    )
    g1, g2 = len(gen1), len(gen2)
    ours_g1 = model.gen_logits(hidden[1, :g1])
    ours_g2 = model.gen_logits(hidden[1, g1 : g1 + g2])
    diff_gen = max(
        (ours_g1 - hf_gen_logits(hf_model, tok, gen1, n_img)).abs().max().item(),
        (ours_g2 - hf_gen_logits(hf_model, tok, gen2, n_img)).abs().max().item(),
    )
    assert diff_und <= TOL, f"und text logits differ by {diff_und}"
    assert diff_gen <= TOL, f"gen head logits differ by {diff_gen}"
    # The logits must carry signal, or the comparison proves nothing.
    assert ours_u1.std() > 1e-3 and ours_g1.std() > 1e-3


def check_vq_parity(model, hf_model):
    size = model.config.gen_image_size
    pixels = _images(3, size, seed=5)
    with torch.no_grad():
        ours = model.vq.encode_codes(pixels)
        theirs = hf_model.model.vqmodel.encode(pixels).image_tokens.view(3, -1)
        assert torch.equal(ours, theirs), "VQ codes differ"
        assert ours.unique().numel() > 1
        dec_ours = model.vq.decode_codes(ours)
        dec_theirs = hf_model.model.vqmodel.decode(ours)
    diff = (dec_ours - dec_theirs).abs().max().item()
    assert diff <= TOL, f"VQ decode differs by {diff}"


def test_parity_hf_checkpoint(tiny_hf_ckpt, hf_model, tok, docs):
    model = load_pretrained(tiny_hf_ckpt)
    check_model_parity(model, hf_model, tok, docs)
    check_vq_parity(model, hf_model)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_parity_attention_backends(tiny_hf_ckpt, hf_model, tok, docs, attention):
    model = load_pretrained(tiny_hf_ckpt, overrides={"attention": attention})
    check_model_parity(model, hf_model, tok, docs)


def test_parity_after_native_and_deepseek(tiny_ckpt_root, tmp_path, hf_model, tok, docs):
    from janus_train.convert import convert

    native = convert(tiny_ckpt_root / "hf", "hf", tmp_path / "native", "native")
    check_model_parity(load_pretrained(native), hf_model, tok, docs)
    from_ds = convert(tiny_ckpt_root / "deepseek", "deepseek", tmp_path / "ds_native", "native")
    model = load_pretrained(from_ds)
    check_model_parity(model, hf_model, tok, docs)
    check_vq_parity(model, hf_model)
