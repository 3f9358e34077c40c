"""The `shapes` scorer reads the shapes world back: on the world's real images (rendered and
JPEG-compressed as the dataset stores them) it finds every requested shape, colour, count,
position and background."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines.synthetic_shapes import World, _rng, caption, make_scene, render
from janus_train.eval import shapes
from janus_train.tools.demo_assets import DEMO_WORLD


def _accuracy(world: World, size: int, n: int, seed: int = 11) -> tuple[float, list]:
    wrong = []
    for i in range(n):
        rng = _rng(seed, "gen_real", i)
        scene = make_scene(rng, world, aspect=1.0)
        buf = io.BytesIO()
        render(scene, size, rng, centre_square=True, noise=world.noise).save(buf, "JPEG", quality=90)
        image = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        result = shapes.score(image, caption(scene))
        if not result["correct"]:
            wrong.append((caption(scene), result["found"]))
    return 1 - len(wrong) / n, wrong


@pytest.mark.parametrize(
    "world,size",
    [
        (World(1, DEMO_WORLD.min_size, DEMO_WORLD.max_size, DEMO_WORLD.shapes, DEMO_WORLD.noise), 64),  # the demo's world, at the mini model's size
        (World(1, DEMO_WORLD.min_size, DEMO_WORLD.max_size, DEMO_WORLD.shapes, DEMO_WORLD.noise), 32),  # ... and at mini32's (the demo's model)
        (World(1, 0.2, 0.35), 64),  # one shape, every kind, noisy pixels
        (World(3, 0.08, 0.2), 256),  # the default world (up to three shapes)
    ],
    ids=["demo-64px", "demo-32px", "one-shape-64px", "three-shapes-256px"],
)
def test_scorer_reads_real_images(world, size):
    acc, wrong = _accuracy(world, size, 200)
    assert acc >= 0.99, wrong[:5]


def test_scorer_is_not_fooled():
    rng = _rng(3, "gen_real", 0)
    scene = {"background": "white", "shapes": [{"shape": "circle", "color": "red", "x": 0.3, "y": 0.3, "r": 0.2}], "aspect": 1.0}
    image = np.asarray(render(scene, 64, rng, centre_square=True))
    assert shapes.score(image, "A red circle at the top left on a white background.")["correct"]
    wrong_colour = shapes.score(image, "a blue circle")
    assert wrong_colour["shape"] and not wrong_colour["color"] and not wrong_colour["shape_color"]
    assert not shapes.score(image, "a red square")["shape_color"]
    assert shapes.score(image, "a red circle at the bottom right")["position"] is False
    assert shapes.score(image, "two red circles")["count"] is True  # one object named: counted per object named
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)
    assert shapes.score(blank, "a red circle")["shape_color"] is False


def test_parse_prompt_grammars():
    req = shapes.parse_prompt("A pink ring at the top left, an orange star at the center and a blue cross on a black background.")
    assert req.objects == [("pink", "ring", "top left"), ("orange", "star", "center"), ("blue", "cross", None)]
    assert req.background == "black"
    req = shapes.parse_prompt("A simple scene of a bright red circle, placed on a plain white background, vivid.")
    assert req.objects == [("red", "circle", None)] and req.background == "white"
