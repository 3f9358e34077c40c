"""Document builders for model tests (the data pipeline has its own, fuller tokeniser)."""

from __future__ import annotations

import types

import pytest
import torch

from janus_train.data.batch import IGNORE_INDEX, NO_TASK, TASK_ID, Document
from janus_train.data.conversation import gen_prompt, und_prompt


def _text_doc(ids: list[int], key: str = "text") -> Document:
    n = len(ids)
    return Document(
        input_ids=ids,
        labels=ids[1:] + [IGNORE_INDEX],
        loss_task=[TASK_ID["text"]] * (n - 1) + [NO_TASK],
        gen_mask=[False] * n,
        und_mask=[False] * n,
        key=key,
    )


def _und_doc(tok, question: str, answer: str, image: torch.Tensor, num_image_tokens: int, key: str = "und") -> Document:
    prompt = tok(und_prompt(question, num_image_tokens, system=None)).input_ids
    ans = tok(" " + answer + tok.eos_token, add_special_tokens=False).input_ids
    ids = prompt + ans
    n = len(ids)
    labels = [IGNORE_INDEX] * n
    task = [NO_TASK] * n
    for i in range(len(prompt) - 1, n - 1):
        labels[i] = ids[i + 1]
        task[i] = TASK_ID["und"]
    img_id = tok.convert_tokens_to_ids("<image_placeholder>")
    return Document(ids, labels, task, [False] * n, [t == img_id for t in ids], [image], key)


def _gen_doc(tok, caption: str, codes: list[int], key: str = "gen") -> Document:
    prompt = tok(gen_prompt(caption)).input_ids
    ids = prompt + codes
    n = len(ids)
    labels = [IGNORE_INDEX] * n
    task = [NO_TASK] * n
    for k, c in enumerate(codes):
        labels[len(prompt) - 1 + k] = c
        task[len(prompt) - 1 + k] = TASK_ID["gen"]
    gen_mask = [False] * len(prompt) + [True] * len(codes)
    return Document(ids, labels, task, gen_mask, [False] * n, [], key)


@pytest.fixture
def docs():
    return types.SimpleNamespace(text=_text_doc, und=_und_doc, gen=_gen_doc)
