"""Parameter counts per component, built on the meta device (instant, no memory).

    python -m janus_train.models.summary NAME [--json] [key=value ...]

NAME is a preset of either family (Janus-Pro: tiny, mini, small, janus_pro_1b, janus_pro_7b;
JanusFlow: janusflow_tiny, janusflow_1_3b); key=value pairs override config fields
(llm.num_layers=4). A tensor shared by two modules is counted once.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from janus_train.models.janus.config import PRESETS as JANUS_PRESETS
from janus_train.models.janus.config import JanusConfig, parse_overrides
from janus_train.models.janusflow.config import PRESETS as FLOW_PRESETS
from janus_train.models.janusflow.config import JanusFlowConfig

PRESETS = {**JANUS_PRESETS, **FLOW_PRESETS}


def component_counts(cfg: JanusConfig | JanusFlowConfig) -> dict[str, int]:
    if isinstance(cfg, JanusFlowConfig):
        from janus_train.models.janusflow.model import JanusFlowModel as Model
    else:
        from janus_train.models.janus.model import JanusModel as Model

    with torch.device("meta"):
        model = Model(cfg)
    seen: set[int] = set()
    counts: dict[str, int] = {}
    for name in Model.COMPONENTS:
        part = getattr(model, name)
        total = 0
        for p in [part] if isinstance(part, torch.nn.Parameter) else part.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        counts[name] = total
    counts["total"] = sum(counts.values())
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m janus_train.models.summary", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(PRESETS), help="model preset")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    family = JanusFlowConfig if args.name in FLOW_PRESETS else JanusConfig
    cfg = family.from_preset(args.name, parse_overrides(args.overrides))
    counts = component_counts(cfg)
    if args.json:
        print(json.dumps({"model": args.name, **counts}))
        return 0
    width = max(len(k) for k in counts)
    print(f"{args.name}: parameters per component")
    for k, v in counts.items():
        if k == "total":
            print("-" * (width + 18))
        print(f"  {k:<{width}}  {v:>13,}  {v / 1e6:9.1f}M" if k != "total" else f"  {k:<{width}}  {v:>13,}  {v / 1e9:9.3f}B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
