"""The lexical prior: sentence parser, image regions and the backend, on a hand-drawn image."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from l2l_ray.config import PriorsConfig
from l2l_ray.priors.base import BACKENDS, PriorRequest
from l2l_ray.priors.lexical import FALLBACK_SCORE, LexicalBackend, parse_sentence
from l2l_ray.priors.lexical_regions import load_image
from l2l_ray.priors.quality import box_iou

# hand-drawn scene (128 px): two red circles, the left one bigger, and a blue square top right
LEFT_CIRCLE = (30, 45, 16)  # cx, cy, r
RIGHT_CIRCLE = (95, 95, 10)
SQUARE = (74, 14, 102, 42)  # x1, y1, x2, y2 (inclusive)


def _circle_box(cx, cy, r):
    return ((cx - r) / 128, (cy - r) / 128, (cx + r + 1) / 128, (cy + r + 1) / 128)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> str:
    rng = np.random.default_rng(1)
    img = np.clip(np.array([185, 175, 150]) + rng.normal(0, 6, (128, 128, 3)), 0, 255).astype(np.uint8)
    for cx, cy, r in (LEFT_CIRCLE, RIGHT_CIRCLE):
        cv2.circle(img, (cx, cy), r, (210, 40, 40), -1)
    cv2.rectangle(img, SQUARE[:2], SQUARE[2:], (40, 70, 210), -1)
    path = tmp_path_factory.mktemp("lexical") / "scene.png"
    cv2.imwrite(str(path), img[..., ::-1])
    return str(path)


def _ask(path: str, *sentences: str):
    backend = LexicalBackend(PriorsConfig())
    return backend([PriorRequest(i + 1, 7, path, 128, 128, s) for i, s in enumerate(sentences)])


# ---------------------------------------------------------------------------------------------- parser
@pytest.mark.parametrize("text, colours, category, size, spatial", [
    ("the red circle on the left", ("red",), "circle", "", ("left",)),
    ("Biggest blue box at the top.", ("blue",), "square", "large", ("top",)),
    ("the round thing in the middle", (), "circle", "", ("center",)),
    ("tiny grey donut", ("gray",), "ring", "small", ()),
    ("upper left yellow stars", ("yellow",), "star", "", ("top", "left")),
])
def test_parse_target_words(text, colours, category, size, spatial):
    t = parse_sentence(text).target
    assert (t.colours, t.category, t.size, t.spatial) == (colours, category, size, spatial)


def test_parse_relation_splits_target_and_landmark():
    p = parse_sentence("green ring to the left of the yellow star")
    assert p.relation == "left"
    # "left" belongs to the relation, not to the target's position
    assert (p.target.colours, p.target.category, p.target.spatial) == (("green",), "ring", ())
    assert (p.landmark.colours, p.landmark.category) == (("yellow",), "star")
    near = parse_sentence("the bar closest to the box")
    assert (near.relation, near.target.category, near.landmark.category) == ("near", "bar", "square")
    # "left of the picture" names no landmark: it is a position
    pic = parse_sentence("cup left of the picture")
    assert pic.relation == "" and pic.target.spatial == ("left",)


def test_parse_real_refcoco_sentences():
    man = parse_sentence("man in red shirt on left").target
    assert (man.noun, man.colours, man.spatial, man.category) == ("man", ("red",), ("left",), "")
    girl = parse_sentence("girl on the very left").target
    assert (girl.noun, girl.spatial) == ("girl", ("left",))
    assert parse_sentence("guy next to the one with his hands up").relation == "near"
    assert parse_sentence("biggest darkest pot").target.size == "large"


def test_parse_every_fixture_sentence(refer_fixture_root):
    n = 0
    for refs_file in Path(refer_fixture_root).glob("*/refs(*).p"):
        with open(refs_file, "rb") as f:
            for ref in pickle.load(f):
                for s in ref["sentences"]:
                    json.dumps(parse_sentence(s["sent"]).describe())
                    n += 1
    assert n > 50


# ---------------------------------------------------------------------------------------------- backend
def test_red_circle_on_the_left(scene):
    (p,) = _ask(scene, "the red circle on the left")
    assert p.ok and p.backend == "lexical" and p.model == "lexical-v1"
    assert box_iou(p.box, _circle_box(*LEFT_CIRCLE)) > 0.7
    assert (p.category, p.attributes, p.spatial) == ("circle", ("red",), ("left",))
    x, y = p.points[0]
    assert p.box[0] <= x <= p.box[2] and p.box[1] <= y <= p.box[3]
    assert 0 < p.score <= 1 and json.loads(p.raw_text)["colours"] == ["red"]
    assert p.proposal.shape == (64, 64) and p.proposal.dtype == np.uint8
    c = (np.arange(64) + 0.5) / 64
    inside = (c[:, None] >= p.box[1]) & (c[:, None] <= p.box[3]) & (c[None, :] >= p.box[0]) & (c[None, :] <= p.box[2])
    assert p.proposal[inside].mean() > 150 > 30 > p.proposal[~inside].mean()


@pytest.mark.parametrize("sentence, truth", [
    ("red ball on the right", _circle_box(*RIGHT_CIRCLE)),
    ("the big red disc", _circle_box(*LEFT_CIRCLE)),
    ("smallest red circle", _circle_box(*RIGHT_CIRCLE)),
    ("the red circle below the blue box", _circle_box(*RIGHT_CIRCLE)),
    ("blue square", (SQUARE[0] / 128, SQUARE[1] / 128, (SQUARE[2] + 1) / 128, (SQUARE[3] + 1) / 128)),
])
def test_cues_pick_the_right_object(scene, sentence, truth):
    (p,) = _ask(scene, sentence)
    assert p.ok and box_iou(p.box, truth) > 0.7, (sentence, p.box, p.raw_text)


def test_failures_are_typed_and_order_is_kept(scene, tmp_path):
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"not a png")
    backend = LexicalBackend(PriorsConfig())
    reqs = [PriorRequest(1, 1, scene, 128, 128, ""), PriorRequest(2, 1, scene, 128, 128, " .,! "),
            PriorRequest(3, 2, str(tmp_path / "missing.png"), 128, 128, "red circle"),
            PriorRequest(4, 2, str(garbage), 128, 128, "red circle"),
            PriorRequest(5, 3, scene, 128, 128, "the green star"),
            PriorRequest(6, 3, scene, 128, 128, "the green star on the left")]
    out = backend(reqs)
    assert [p.sent_id for p in out] == [1, 2, 3, 4, 5, 6]
    assert [p.status for p in out] == ["empty_sentence", "empty_sentence", "image_error", "image_error", "no_box", "ok"]
    assert all(p.proposal is None and p.box is None for p in out[:5])
    fb = out[5]  # no green pixels: the half-image box of the position word, with a low score
    assert fb.box == (0.0, 0.0, 0.5, 1.0) and fb.score == FALLBACK_SCORE
    assert json.loads(fb.raw_text)["fallback"] == "spatial"


def test_registered_factory():
    backend = BACKENDS["lexical"](PriorsConfig(proposal_size=32))
    assert backend.name == "lexical" and backend.model == "lexical-v1" and backend.size == 32


def test_large_photo_is_read_reduced_and_square_resized(tmp_path):
    img = np.zeros((480, 640, 3), np.uint8)
    img[:, 320:] = (0, 0, 255)  # BGR red on the right half
    path = tmp_path / "photo.jpg"
    cv2.imwrite(str(path), img)
    rgb = load_image(str(path), 640, 480, 128)
    assert rgb.shape == (128, 128, 3) and rgb[64, 100, 0] > 200 and rgb[64, 20, 0] < 30
    (p,) = LexicalBackend(PriorsConfig())([PriorRequest(1, 1, str(path), 640, 480, "man in red shirt on left")])
    assert p.ok and p.category == "man" and p.attributes == ("red",) and p.box[0] >= 0.45  # the only red region
