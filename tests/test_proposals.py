"""Soft proposals (box / GrabCut) and the prior quality table, on hand-drawn images and hand-computed cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from l2l_ray.config import ConfigError, PriorsConfig
from l2l_ray.masks import encode_rle
from l2l_ray.priors.proposals import UNINFORMATIVE, ProposalParams, clean_box, soft_proposal
from l2l_ray.priors.quality import box_iou, box_mask, format_quality, mask_box, prior_quality
from l2l_ray.records import EvalSample, LabeledSample, Prior, Sentence


@pytest.fixture(scope="module")
def circle_image():
    """128 px textured background with a red circle (centre (40, 60), radius 18); and its mask."""
    rng = np.random.default_rng(0)
    img = rng.integers(90, 160, (128, 128, 3)).astype(np.uint8)
    cv2.circle(img, (40, 60), 18, (210, 40, 40), -1)
    mask = np.zeros((128, 128), np.uint8)
    cv2.circle(mask, (40, 60), 18, 1, -1)
    return img, mask.astype(bool)


CIRCLE_BOX = (22 / 128, 42 / 128, 59 / 128, 79 / 128)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("method", ["grabcut", "box"])
def test_shape_dtype_and_inside_beats_outside(circle_image, method):
    img, _ = circle_image
    soft = soft_proposal(img, CIRCLE_BOX, [], 64, ProposalParams(method=method))
    assert soft.shape == (64, 64) and soft.dtype == np.uint8
    inside = box_mask(CIRCLE_BOX, 64)
    assert soft[inside].mean() > 150 > 60 > soft[~inside].mean()


def test_grabcut_follows_the_image_better_than_the_box(circle_image):
    img, mask = circle_image
    truth = cv2.resize(mask.astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST) > 0
    box_only = soft_proposal(img, CIRCLE_BOX, [], 64, ProposalParams(method="box")) > 127
    cut = soft_proposal(img, CIRCLE_BOX, [], 64, ProposalParams(method="grabcut")) > 127
    # a disc fills pi/4 of its box, so the box alone is near 0.78; GrabCut finds the disc's edge
    assert 0.7 < _iou(box_only, truth) < 0.85
    assert _iou(cut, truth) > 0.85


def test_no_box_no_points_is_the_uninformative_map(circle_image):
    img, _ = circle_image
    for box in (None, (np.nan, 0.1, 0.2, 0.3), (0.1, 0.2)):
        soft = soft_proposal(img, box, [], 32)
        assert soft.shape == (32, 32) and (soft == UNINFORMATIVE).all()


def test_points_without_a_box_make_a_local_blob(circle_image):
    img, _ = circle_image
    soft = soft_proposal(img, None, [(40 / 128, 60 / 128)], 64)
    assert soft[30, 20] > 200  # at the point (row = y * 64, col = x * 64)
    assert soft[5, 60] < 30 and soft[60, 60] < 30


def test_degenerate_boxes(circle_image):
    img, _ = circle_image
    a = soft_proposal(img, (59 / 128, 79 / 128, 22 / 128, 42 / 128), [], 64)  # inverted corners
    b = soft_proposal(img, CIRCLE_BOX, [], 64)
    assert np.array_equal(a, b)
    assert clean_box((1.5, -0.2, 0.5, 0.5)) == (0.5, 0.0, 1.0, 0.5)  # clipped to the image
    point_box = soft_proposal(img, (0.5, 0.5, 0.5, 0.5), [], 64)  # zero area: widened, never empty
    assert point_box.max() > 128 and point_box[0, 0] < 5
    whole = soft_proposal(img, (0, 0, 1, 1), [], 64)  # no background outside the box: still runs
    assert whole.mean() > 128
    flat = soft_proposal(np.full((50, 80, 3), 77, np.uint8), (0.2, 0.2, 0.6, 0.7), [], 16)  # non-square, flat
    assert flat.shape == (16, 16) and flat[8, 6] > flat[1, 14]


def test_params_from_config_and_validation():
    cfg = PriorsConfig(proposal_method="box", proposal_blend=0.3, proposal_work_size=32)
    p = ProposalParams.from_config(cfg)
    assert (p.method, p.blend, p.work_size) == ("box", 0.3, 32)
    with pytest.raises(ConfigError, match="proposal_method"):
        ProposalParams(method="sam")
    with pytest.raises(ConfigError, match="proposal_blend"):
        ProposalParams(blend=1.5)


# ---------------------------------------------------------------------------------------------- quality
def _square_truth() -> dict:
    m = np.zeros((4, 4), bool)
    m[:2, :2] = True  # the top-left quarter: box (0, 0, 0.5, 0.5)
    return encode_rle(m)


def test_box_helpers():
    m = np.zeros((4, 8), bool)
    m[1, 2:4] = True
    assert mask_box(m) == (0.25, 0.25, 0.5, 0.5) and mask_box(np.zeros((3, 3), bool)) is None
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(1 / 7)
    assert box_mask((0.25, 0.25, 0.75, 0.75), 4).sum() == 4


def test_prior_quality_hand_computed():
    rle = _square_truth()
    labeled = LabeledSample(1, 1, "x.png", 4, 4, (Sentence(1, "a"), Sentence(2, "b")), rle)
    evals = EvalSample(2, 3, 1, "x.png", 4, 4, "c", rle)
    proposal = np.zeros((4, 4), np.uint8)
    proposal[0, :2] = 255  # 2 px, both inside the 4-px truth: IoU 0.5
    priors = {1: Prior(1, 1, box=(0.0, 0.0, 0.5, 0.25), proposal=proposal),  # box IoU 0.5
              2: Prior(2, 1, status="malformed_json")}  # sentence 3 has no prior at all
    q = prior_quality(priors, [labeled, evals], image_size=4)
    assert q["n"] == 3 and q["coverage"] == pytest.approx(1 / 3, abs=1e-4)
    assert q["failures"] == {"malformed_json": 1, "missing": 1}
    assert q["box_iou"]["prior"] == pytest.approx(0.5 / 3, abs=1e-4)
    assert q["proposal_mIoU"]["prior"] == pytest.approx(0.5 / 3, abs=1e-4)
    # centre box: pixels (1..2, 1..2) meet the truth in pixel (1, 1): 1 / 7, same as the box IoU
    assert q["box_iou"]["centre_box"] == pytest.approx(1 / 7, abs=1e-4)
    assert q["proposal_mIoU"]["centre_box"] == pytest.approx(1 / 7, abs=1e-4)
    assert q["box_iou"]["whole_image"] == q["proposal_mIoU"]["whole_image"] == 0.25
    assert q["prior_ok_only"] == {"n": 1, "box_iou": 0.5, "proposal_mIoU": 0.5}
    table = format_quality(q)
    assert "centre_box" in table and "coverage 33.3%" in table
