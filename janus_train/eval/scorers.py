"""Scorers of generated images: `score(image, prompt) -> dict` with at least `shape_color` and
`correct` booleans (None-valued keys are attributes the prompt does not ask about).

    shapes   the shapes world (eval/shapes.py): finds every shape by colour and identifies it
             by drawing; checks the requested shapes, colours, positions, count and background.

Real-image data has no scorer here (that needs a detector, as GenEval's): evaluate its
samples with GenEval's own scorer on the folder layout `python -m janus_train.eval` writes.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

Scorer = Callable[[np.ndarray, str], dict[str, Any]]


def _shapes() -> Scorer:
    from janus_train.eval.shapes import score

    return score


SCORERS: dict[str, Callable[[], Scorer]] = {"shapes": _shapes}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; scorers are {sorted(SCORERS)}")
    return SCORERS[name]()
