"""Documents of each task: the chat format, loss masks, gen labels, CFG dropout, length rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from janus_train.contracts import conversation as conv
from janus_train.contracts.batch import IGNORE_INDEX, TASK_ID
from janus_train.data.formats import SampleError, npy_bytes
from janus_train.contracts.batch import Row, collate
from janus_train.data.tokenize import DocBuilder, cfg_dropped


def _builder(tok, image_cfg, **kw):
    args = dict(
        tok=tok,
        seq_len=512,
        num_image_tokens=image_cfg.num_image_tokens,
        image_size=image_cfg.image_size,
        num_gen_tokens=image_cfg.num_gen_tokens,
        codebook_size=image_cfg.codebook_size,
        seed=0,
        cfg_dropout=0.0,
        system_prompt=None,
    )
    args.update(kw)
    return DocBuilder(**args)


def _und_parts(jpeg, turns, **extra):
    return {"jpg": jpeg(80, 60), "json": json.dumps({"conversations": turns, **extra}).encode()}


def _targets(doc):
    """Token ids that are loss targets."""
    return doc.ids[doc.target].tolist()


def test_und_document_format_and_assistant_only_loss(tok, image_cfg, jpeg, hf_tokenizer):
    b = _builder(tok, image_cfg)
    turns = [
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "And the background?"},
        {"role": "assistant", "content": "Blue."},
    ]
    doc = b.und("k", _und_parts(jpeg, turns))
    n_img = image_cfg.num_image_tokens
    # The full token sequence is BOS + the rendered conversation, image slot expanded.
    segs = conv.render_conversation(turns, n_img)
    expected = [tok.bos_id]
    for s in segs:
        expected += hf_tokenizer(s.text, add_special_tokens=False).input_ids
    assert doc.ids.tolist() == expected
    i = doc.ids.tolist().index(tok.boi_id)
    assert doc.ids[i + 1 : i + 1 + n_img].tolist() == [tok.image_id] * n_img
    assert doc.ids[i + 1 + n_img] == tok.eoi_id
    # Loss exactly on the assistant answers and their EOS.
    answers = hf_tokenizer(" It is red." + conv.EOS_TOKEN, add_special_tokens=False).input_ids
    answers += hf_tokenizer(" Blue." + conv.EOS_TOKEN, add_special_tokens=False).input_ids
    assert _targets(doc) == answers
    assert doc.pixels.shape == (1, 3, image_cfg.image_size, image_cfg.image_size)
    assert not doc.target[0]


def test_und_image_slot_added_when_missing_and_rejected_when_doubled(tok, image_cfg, jpeg):
    b = _builder(tok, image_cfg)
    doc = b.und("k", _und_parts(jpeg, [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "A square."}]))
    assert int((doc.ids == tok.image_id).sum()) == image_cfg.num_image_tokens
    two = [{"role": "user", "content": "<image><image> two?"}, {"role": "assistant", "content": "No."}]
    with pytest.raises(SampleError) as e:
        b.und("k", _und_parts(jpeg, two))
    assert e.value.reason == "bad_conversation"
    injected = [{"role": "user", "content": "<image> " + conv.IMAGE_TOKEN}, {"role": "assistant", "content": "x"}]
    with pytest.raises(SampleError) as e:
        b.und("k", _und_parts(jpeg, injected))
    assert e.value.reason == "bad_conversation"


def test_und_system_prompt_has_no_loss(tok, image_cfg, jpeg):
    b = _builder(tok, image_cfg, system_prompt=conv.DEFAULT_SYSTEM_PROMPT)
    doc = b.und("k", _und_parts(jpeg, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]))
    sys_ids = tok.encode(conv.DEFAULT_SYSTEM_PROMPT + conv.SEP)
    assert doc.ids[1 : 1 + len(sys_ids)].tolist() == sys_ids
    assert not doc.target[: 1 + len(sys_ids)].any()


def test_text_document_loss_on_every_next_token(tok, image_cfg):
    b = _builder(tok, image_cfg)
    doc = b.text("t", {"txt": b"A red circle on a blue background."})
    body = tok.encode("A red circle on a blue background.")
    assert doc.ids.tolist() == [tok.bos_id] + body + [tok.eos_id]
    assert doc.target.tolist() == [False] + [True] * (len(body) + 1)
    chat = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    cdoc = b.text("c", {"json": json.dumps(chat).encode()})
    assert _targets(cdoc) == tok.encode(" Hello." + conv.EOS_TOKEN)


def _gen_parts(caption, codes, **extra):
    return {"json": json.dumps({"caption": caption, **extra}).encode(), "codes.npy": npy_bytes(np.asarray(codes, np.uint16))}


def test_gen_document_labels_boi_predicts_code0(tok, image_cfg):
    b = _builder(tok, image_cfg)
    n = image_cfg.num_gen_tokens
    codes = list(range(3, 3 + n))
    doc = b.gen("g", _gen_parts("a red circle", codes))
    prompt = tok.encode(conv.gen_prompt("a red circle"))
    assert doc.ids.tolist() == [tok.bos_id] + prompt + codes
    assert doc.gen_start == 1 + len(prompt)
    assert doc.ids[doc.gen_start - 1] == tok.boi_id
    batch = collate([Row(TASK_ID["gen"], [doc])], 512, tok.pad_id, tok.image_id)
    labels, lt = batch.labels[0], batch.loss_task[0]
    boi = doc.gen_start - 1
    assert labels[boi] == codes[0]  # <begin_of_image> predicts code 0
    for k in range(n - 1):
        assert labels[doc.gen_start + k] == codes[k + 1]  # code k predicts code k+1
    assert labels[doc.gen_start + n - 1] == IGNORE_INDEX  # the last code predicts nothing
    assert (labels[:boi] == IGNORE_INDEX).all()  # no loss on the prompt
    assert (lt[boi : boi + n] == TASK_ID["gen"]).all() and int((lt != -1).sum()) == n
    assert batch.gen_input_mask[0].nonzero().flatten().tolist() == list(range(doc.gen_start, doc.gen_start + n))


def test_gen_target_mask_is_prompt_false_codes_true_for_any_prompt_length(tok, image_cfg):
    # The mask is a view of one shared template: check it across prompt lengths and that no
    # caller can write through it into the other documents' masks.
    b = _builder(tok, image_cfg)
    n = image_cfg.num_gen_tokens
    for caption in ("x", "a red circle", "a " * 40 + "blue star", "y"):
        doc = b.gen("g", _gen_parts(caption, [7] * n))
        expect = [False] * doc.gen_start + [True] * n
        assert doc.target.tolist() == expect
        assert not doc.target.flags.writeable


@pytest.mark.parametrize(
    "raw, ok",
    [
        (b'{"caption": "x", "score": NaN}', True),  # orjson refuses NaN; the standard parser accepts it
        (b'{"caption": "x", "id": 123456789012345678901234567890}', True),  # beyond 64 bits: accepted (as a float)
        (b'{"caption": "\\u00e9t\xc3\xa9"}', True),
        (b'[1, 2]', False),
        (b'{"caption": "\xff"}', False),  # not UTF-8
        (b'', False),
    ],
)
def test_parse_json_accepts_what_the_standard_parser_accepts(raw, ok):
    from janus_train.data.formats import parse_json

    if ok:
        got, want = parse_json(raw), json.loads(raw)
        assert got.keys() == want.keys() and got["caption"] == want["caption"]
    else:
        with pytest.raises(SampleError) as e:
            parse_json(raw)
        assert e.value.reason == "bad_json"


def test_gen_stored_prompt_ids_used_only_with_matching_tokenizer(tok, image_cfg):
    b = _builder(tok, image_cfg)
    codes = [1] * image_cfg.num_gen_tokens
    fake = np.asarray(tok.encode(conv.gen_prompt("something else")), np.int32)
    parts = _gen_parts("a red circle", codes, prompt_tokenizer=tok.fingerprint)
    parts["prompt_ids.npy"] = npy_bytes(fake)
    assert b.gen("g", parts).ids[1 : 1 + len(fake)].tolist() == fake.tolist()
    parts = _gen_parts("a red circle", codes, prompt_tokenizer="another-tokenizer")
    parts["prompt_ids.npy"] = npy_bytes(fake)
    assert b.gen("g", parts).ids[1:-len(codes)].tolist() == tok.encode(conv.gen_prompt("a red circle"))


def test_cfg_dropout_is_deepseek_unconditional_row_and_deterministic(tok, image_cfg):
    codes = [5] * image_cfg.num_gen_tokens
    b = _builder(tok, image_cfg, cfg_dropout=0.1, seed=11)
    keys = [f"key-{i}" for i in range(4000)]
    dropped = [k for k in keys if cfg_dropped(11, k, 0.1)]
    assert 0.08 < len(dropped) / len(keys) < 0.12
    assert dropped == [k for k in keys if cfg_dropped(11, k, 0.1)]  # pure function of (seed, key)
    assert dropped != [k for k in keys if cfg_dropped(12, k, 0.1)]
    cond = _builder(tok, image_cfg).gen(dropped[0], _gen_parts("a blue star", codes))
    unc = b.gen(dropped[0], _gen_parts("a blue star", codes))
    p = cond.gen_start
    # Same length; BOS and <begin_of_image> kept, every prompt token between them is pad.
    assert len(unc) == len(cond)
    assert unc.ids[0] == tok.bos_id and unc.ids[p - 1] == tok.boi_id
    assert (unc.ids[1 : p - 1] == tok.pad_id).all()
    assert unc.ids[p:].tolist() == codes
    kept = next(k for k in keys if k not in set(dropped))
    assert b.gen(kept, _gen_parts("a blue star", codes)).ids.tolist() == cond.ids.tolist()


@pytest.mark.parametrize(
    "parts, reason",
    [
        ({"codes.npy": npy_bytes(np.zeros(16, np.uint16))}, "missing_key"),
        ({"json": b"{not json", "codes.npy": npy_bytes(np.zeros(16, np.uint16))}, "bad_json"),
        ({"json": b'{"caption": "  "}', "codes.npy": npy_bytes(np.zeros(16, np.uint16))}, "empty_caption"),
        ({"json": b'{"source": "real"}', "codes.npy": npy_bytes(np.zeros(16, np.uint16))}, "missing_key"),
        ({"json": b'{"caption": "x"}', "codes.npy": npy_bytes(np.zeros(5, np.uint16))}, "bad_codes"),
        ({"json": b'{"caption": "x"}', "codes.npy": npy_bytes(np.full(16, 9999, np.uint16))}, "bad_codes"),
        ({"json": b'{"caption": "x"}'}, "missing_key"),
    ],
)
def test_gen_bad_samples_name_their_reason(tok, image_cfg, parts, reason):
    assert image_cfg.num_gen_tokens == 16 and image_cfg.codebook_size < 9999
    with pytest.raises(SampleError) as e:
        _builder(tok, image_cfg).gen("g", parts)
    assert e.value.reason == reason


def test_length_rules(tok, image_cfg, jpeg):
    long_text = ("red circle " * 400).encode()
    b = _builder(tok, image_cfg, seq_len=64)
    doc = b.text("t", {"txt": long_text})
    assert len(doc) == 64 and doc.ids[0] == tok.bos_id  # text keeps its first seq_len tokens
    with pytest.raises(SampleError) as e:
        _builder(tok, image_cfg, seq_len=64, truncation="drop").text("t", {"txt": long_text})
    assert e.value.reason == "too_long"
    # und: truncated while the image and some answer stay inside; dropped otherwise.
    turns = [{"role": "user", "content": "<image>\nSay it."}, {"role": "assistant", "content": "red " * 200}]
    d = b.und("u", _und_parts(jpeg, turns))
    assert len(d) == 64 and int((d.ids == tok.image_id).sum()) == image_cfg.num_image_tokens and d.target.any()
    with pytest.raises(SampleError) as e:
        _builder(tok, image_cfg, seq_len=20).und("u", _und_parts(jpeg, turns))
    assert e.value.reason == "too_long"
    # gen documents are never cut
    with pytest.raises(SampleError) as e:
        _builder(tok, image_cfg, seq_len=20).gen("g", _gen_parts("a red circle", [0] * 16))
    assert e.value.reason == "too_long"
