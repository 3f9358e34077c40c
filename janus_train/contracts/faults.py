"""Fault injection for the crash tests: `JANUS_FAULT` (comma-separated) names points where a
run slows down on purpose, so that a test can kill or signal it at a known moment.

    save_sleep:STEP:SECONDS   sleep inside the checkpoint write of global step STEP (kill -9 there)
    step_sleep:SECONDS        sleep in every training step (a signal lands mid-run)
"""

from __future__ import annotations

import os


def fault(name: str) -> list[float] | None:
    """The numbers of fault `name` if JANUS_FAULT asks for it, else None."""
    for spec in os.environ.get("JANUS_FAULT", "").split(","):
        if spec.startswith(name + ":"):
            return [float(x) for x in spec.split(":")[1:]]
    return None
