"""Document builders for model tests (the data pipeline has its own, fuller tokeniser)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from janus_train.contracts.batch import TASK_ID, Doc
from janus_train.contracts.conversation import gen_prompt, und_prompt


def _doc(key: str, task: str, ids: list[int], first_target: int, gen_start: int | None = None, pixels=None) -> Doc:
    target = np.zeros(len(ids), dtype=bool)
    target[first_target:] = True
    return Doc(key=key, task=TASK_ID[task], ids=np.asarray(ids, dtype=np.int32), target=target,
               gen_start=len(ids) if gen_start is None else gen_start, pixels=pixels)


def _text_doc(ids: list[int], key: str = "text") -> Doc:
    return _doc(key, "text", ids, first_target=1)


def _und_doc(tok, question: str, answer: str, image: torch.Tensor, num_image_tokens: int, key: str = "und") -> Doc:
    prompt = tok(und_prompt(question, num_image_tokens, system=None)).input_ids
    ans = tok(" " + answer + tok.eos_token, add_special_tokens=False).input_ids
    return _doc(key, "und", prompt + ans, first_target=len(prompt), pixels=image[None])


def _gen_doc(tok, caption: str, codes: list[int], key: str = "gen") -> Doc:
    prompt = tok(gen_prompt(caption)).input_ids
    return _doc(key, "gen", prompt + codes, first_target=len(prompt), gen_start=len(prompt))


@pytest.fixture
def docs():
    return types.SimpleNamespace(text=_text_doc, und=_und_doc, gen=_gen_doc)
