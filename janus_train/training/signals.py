"""Preemption signals: SIGTERM and SIGUSR1 ask for a clean stop (save, exit 0)."""

from __future__ import annotations

import signal


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the trainer checks it between steps (all ranks agree first).

    `install()` runs at the very start of launch/train.py, before the slow imports and the
    model build, so a preemption signal that arrives early is remembered instead of killing the
    rank; the trainer acts on it after its first step.
    """

    signum: int | None = None

    @classmethod
    def install(cls) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        cls.signum = signum
