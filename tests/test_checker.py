"""The model-free checker (taca_eval/checker.py) reads renders of the world right, sharp and blurred, and
gives a deliberately wrong label a score of 0."""

import subprocess
import sys

import pytest

from taca_eval import checker, world

SIZE = 128
PER_CATEGORY = 40


@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.0])
def test_reads_renders(sigma):
    results = checker.validate(PER_CATEGORY, SIZE, checker.blur(sigma) if sigma else None)
    for category, r in results.items():
        assert r["correct"] >= 0.97, (category, r["failures"])
        assert r["rejected"] >= 0.97, (category, r["failures"])


@pytest.mark.parametrize("size", [128, 184, 256])
def test_detections_match_objects(size):
    """Every object is found once, with its colour, shape and centre (within 1 % of the side)."""
    for category in world.CATEGORIES:
        for scene in checker.validation_scenes(category, 4):
            found = checker.detect(world.render(scene, size))
            assert len(found) == len(scene.objects), (scene.prompt, checker.describe(found))
            for obj in scene.objects:
                d = min(found, key=lambda d: (d.cx - obj.cx) ** 2 + (d.cy - obj.cy) ** 2)
                assert (d.color, d.shape) == (obj.color, obj.shape), scene.prompt
                assert abs(d.cx - obj.cx) < 0.01 and abs(d.cy - obj.cy) < 0.01, scene.prompt


@pytest.mark.parametrize("category", world.CATEGORIES)
def test_wrong_label_scores_zero(category):
    """Colour swapped, shape swapped, count one up and one down, relation reversed: each scores 0 on the
    render of the true scene, whose own prompt scores 1."""
    for i, scene in enumerate(checker.validation_scenes(category, 12)):
        detections = checker.detect(world.render(scene, SIZE))
        assert checker.score_detections(scene, detections) == 1.0, scene.prompt
        for variant in (i, i + 1):
            wrong = checker.mislabel(scene, variant)
            assert wrong.prompt != scene.prompt
            assert checker.score_detections(wrong, detections) == 0.0, (scene.prompt, wrong.prompt)


def _single(category, color, shape, drawn_color, drawn_shape):
    obj = world.WorldObject(drawn_color, drawn_shape, 0.5, 0.5, 0.2)
    return world.Scene(category, f"a {color} {shape}", (obj,), ((color, shape),), background_seed=7)


@pytest.mark.parametrize("drawn, color_score, shape_score", [
    (("red", "star"), 1.0, 1.0),
    (("blue", "star"), 0.0, 1.0),  # the star is found by its shape, its colour is wrong
    (("red", "circle"), 1.0, 0.0),  # the red object is found by its colour, its shape is wrong
])
def test_binding_checks_the_other_attribute(drawn, color_score, shape_score):
    image = world.render(_single("color", *drawn, *drawn), SIZE)
    assert checker.score(_single("color", "red", "star", *drawn), image) == color_score
    assert checker.score(_single("shape", "red", "star", *drawn), image) == shape_score


def test_spatial_needs_both_objects():
    scene = checker.validation_scenes("spatial", 1)[0]
    lone = world.Scene("spatial", scene.prompt, scene.objects[:1], scene.phrases, relation=scene.relation,
                       background_seed=scene.background_seed)
    assert checker.score(scene, world.render(lone, SIZE)) == 0.0


def test_background_alone_has_no_detections():
    empty = world.Scene("counting", "one red circle", (), (("red", "circle"),), count=1, background_seed=3)
    result = checker.score_all(empty, world.render(empty, SIZE))
    assert result["detections"] == [] and result["score"] == 0.0 and result["seen"] == "nothing"


def test_score_all_describes_what_it_saw():
    scene = world.Scene("color", "a red circle and a blue star", (
        world.WorldObject("red", "circle", 0.25, 0.3, 0.15), world.WorldObject("blue", "star", 0.75, 0.5, 0.18),
    ), (("red", "circle"), ("blue", "star")), background_seed=11)
    result = checker.score_all(scene, world.render(scene, SIZE))
    assert result["score"] == 1.0 and result["category"] == "color"
    assert result["seen"] == "red circle (top left), blue star (right)"


def test_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import taca_eval.checker"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=checker.__file__.rsplit("/taca_eval/", 1)[0])
