"""The shapes world's difficulty options: the colours and backgrounds drawn are exactly those
asked for, and a bad colour is refused naming it."""

from __future__ import annotations

import json

import pytest

from data_pipelines import synthetic_shapes
from data_pipelines.synthetic_shapes import World, _rng, make_scene


def test_scenes_draw_only_the_asked_colours():
    world = World(max_shapes=3, colors=("red", "white"), backgrounds=("white", "black"))
    seen_bg, seen_fg = set(), set()
    for i in range(300):
        scene = make_scene(_rng(5, "gen_real", i), world)
        seen_bg.add(scene["background"])
        for s in scene["shapes"]:
            assert s["color"] != scene["background"]
            seen_fg.add(s["color"])
    assert seen_bg == {"white", "black"} and seen_fg == {"red", "white"}


def test_cli_world_options(tmp_path):
    out = tmp_path / "w"
    synthetic_shapes.main(["--out", str(out), "--n", "24", "--image-size", "32", "--workers", "1", "--max-shapes", "1",
                           "--colors", "blue,yellow", "--backgrounds", "black", "--square"])
    captions = [json.loads(line)["caption"] for line in (out / "gen_real.jsonl").read_text().splitlines()]
    assert captions and all(("blue" in c or "yellow" in c) and "black background" in c for c in captions)


@pytest.mark.parametrize("args,fragment", [(["--colors", "red,mauve"], "mauve"),
                                           (["--colors", "white", "--backgrounds", "white"], "white")])
def test_cli_refuses_bad_colours(tmp_path, capsys, args, fragment):
    with pytest.raises(SystemExit) as e:
        synthetic_shapes.main(["--out", str(tmp_path / "w"), "--n", "2", *args])
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err
