"""Helper process for test_resume.py: run one rank's loader and write its batches' keys.

    python resume_worker.py CFG.json RANK DP MODE STEPS OUT.json [STATE.json]

MODE save: run STEPS steps writing every step's keys, and save the loader state to STATE.json
after step K (env RESUME_AT) without disturbing the run; resume: load STATE.json, run STEPS
steps, write their keys.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    cfg_path, rank, dp, mode, steps, out = sys.argv[1:7]
    state_path = sys.argv[7] if len(sys.argv) > 7 else None
    cfg = json.loads(open(cfg_path).read())
    image = cfg.pop("_image")
    from janus_train.data.loader import build_train_loader

    loader = build_train_loader(cfg, None, image, int(rank), int(dp))
    if mode == "resume":
        loader.load_state_dict(json.loads(open(state_path).read()))
    keys = []
    for i in range(int(steps)):
        if mode == "save" and i == int(os.environ["RESUME_AT"]):
            with open(state_path, "w") as f:
                json.dump(loader.state_dict(), f)
        mbs = next(loader)
        keys.append({"step": mbs[0].meta["step"], "keys": [mb.meta["keys"] for mb in mbs], "tasks": [mb.meta["task"] for mb in mbs]})
    loader.close()
    with open(out, "w") as f:
        json.dump({"keys": keys, "stats": loader.stats()}, f)


if __name__ == "__main__":
    main()
