"""How model code sees parameters that may be partitioned over ranks.

Initialisation code that writes whole parameters takes a `gathered(params)` context: inside it
the listed parameters are whole and writable, and what is written there is what every rank
keeps. On one process (or ZeRO-0/1/2) that is the parameter itself (`whole_params`); a model
created partitioned under ZeRO-3 passes parallel/zero3_init.py's, which gathers a few
parameters at a time, so no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch

Gathered = Callable[[Sequence[torch.Tensor]], ContextManager]


def whole_params(params: Sequence[torch.Tensor]) -> ContextManager:
    """The parameters are whole already."""
    return contextlib.nullcontext()
