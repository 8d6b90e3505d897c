"""Candidates and the hand-crafted selection rules on hand-made 8x8 cases (expected values computed by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from l2l_ray.config import Config, apply_overrides
from l2l_ray.records import Prior
from l2l_ray.selection import select_for_method
from l2l_ray.selection.candidates import (
    CANDIDATE_NAMES,
    FEATURE_NAMES,
    PLANE_NAMES,
    build_candidates,
    concat_candidates,
)
from l2l_ray.selection.rules import RULES, pwa_weight

S = 8
P_HI = 230 / 255  # 0.902: above the 0.9 mean-teacher threshold


def teacher_map() -> np.ndarray:
    """uint8 (1, 8, 8): a 2x2 block at rows 1-2, cols 1-2 (p=0.902) and one pixel (5, 5) at p=0.4."""
    t = np.zeros((1, S, S), np.uint8)
    t[0, 1:3, 1:3] = 230
    t[0, 5, 5] = 102
    return t


def prior(cols=(2, 4), ok=True, sent_id=7, ref_id=3) -> Prior:
    """Proposal = rows 1-2 x cols[0]:cols[1]; box exactly around it; one point at (row 1, col 2)."""
    prop = np.zeros((S, S), np.uint8)
    prop[1:3, cols[0] : cols[1]] = 255
    if not ok:
        return Prior(sent_id=sent_id, ref_id=ref_id, status="no_box")
    return Prior(sent_id=sent_id, ref_id=ref_id, box=(cols[0] / S, 1 / S, cols[1] / S, 3 / S),
                 points=((2.5 / S, 1.5 / S),), score=0.8, proposal=prop)


def feat(cand, k: str, name: str) -> float:
    return float(cand.features[0, CANDIDATE_NAMES.index(k), FEATURE_NAMES.index(name)])


def test_region_candidates_by_hand():
    cand = build_candidates(teacher_map(), None, [prior()], S)
    m = {n: cand.masks()[0, i] for i, n in enumerate(CANDIDATE_NAMES)}
    block = np.zeros((S, S), bool)
    block[1:3, 1:3] = True
    prop = np.zeros((S, S), bool)
    prop[1:3, 2:4] = True
    assert not m["reject"].any()
    assert m["teacher@0.3"].sum() == 5 and m["teacher@0.3"][5, 5]
    assert (m["teacher@0.5"] == block).all() and (m["teacher@0.7"] == block).all()
    assert (m["proposal"] == prop).all()
    assert (m["intersection"] == (block & prop)).all() and m["intersection"].sum() == 2
    assert (m["union"] == (block | prop)).all() and m["union"].sum() == 6
    assert (m["teacher_parts"] == block).all()  # half of the block lies inside the proposal (>= 0.25)
    assert cand.sent_ids.tolist() == [7] and cand.ref_ids.tolist() == [3]


def test_candidate_features_by_hand():
    cand = build_candidates(teacher_map(), None, [prior()], S)
    k = "teacher@0.5"
    assert feat(cand, k, "area") == pytest.approx(4 / 64)
    assert feat(cand, k, "iou_proposal") == pytest.approx(2 / 6)
    assert feat(cand, k, "mean_proposal_in") == pytest.approx(0.5)
    assert feat(cand, k, "mean_teacher_in") == pytest.approx(P_HI, abs=1e-6)
    assert feat(cand, k, "mean_teacher_out") == pytest.approx(0.4 / 60, abs=1e-6)
    assert feat(cand, k, "teacher_mass_recall") == pytest.approx(4 * P_HI / (4 * P_HI + 0.4), abs=1e-5)
    assert feat(cand, k, "mean_agreement_in") == pytest.approx(1.0)  # a single view agrees with itself
    # block bbox [1/8, 3/8]^2 vs prior box x [2/8, 4/8], y [1/8, 3/8]: inter 1/32, union 3/32
    assert feat(cand, k, "box_fit") == pytest.approx(1 / 3, abs=1e-6)
    assert feat(cand, k, "share_in_box") == pytest.approx(0.5)
    assert feat(cand, k, "points_inside") == 1.0
    assert feat(cand, k, "prior_score") == pytest.approx(0.8) and feat(cand, k, "prior_ok") == 1.0
    assert feat(cand, k, "iou_teacher") == 1.0 and feat(cand, k, "empty") == 0.0
    assert feat(cand, k, "n_components") == pytest.approx(0.2)
    assert feat(cand, "reject", "empty") == 1.0 and feat(cand, "reject", "is_reject") == 1.0
    assert cand.features.shape == (1, len(CANDIDATE_NAMES), len(FEATURE_NAMES))


def test_evidence_planes_and_views():
    flip = teacher_map()
    flip[0, 1, 1] = 0  # the second view disagrees at one pixel
    cand = build_candidates(teacher_map(), flip, [prior()], S)
    planes = cand.planes()[0]
    ch = {n: planes[i] for i, n in enumerate(PLANE_NAMES)}
    assert ch["teacher"][1, 1] == pytest.approx(115 / 255)  # mean of 230 and 0, quantised
    assert ch["agreement"][1, 1] == pytest.approx(1 - P_HI, abs=1 / 255)
    assert ch["agreement"][2, 2] == 1.0
    assert ch["entropy"][0, 0] == pytest.approx(0.0, abs=1e-3)
    assert ch["proposal"][1, 2] == 1.0 and ch["proposal"][0, 0] == 0.0
    assert ch["in_box"][1, 2] == 1.0 and ch["in_box"][1, 1] == 0.0
    assert ch["point_proximity"][1, 2] == pytest.approx(1.0)
    assert ch["point_proximity"][1, 3] == pytest.approx(math.exp(-(1 / 8) ** 2 / (2 * 0.1**2)), abs=1e-5)


def test_no_prior_is_uninformative():
    cand = build_candidates(teacher_map(), None, [prior(ok=False)], S)
    planes = cand.planes()[0]
    assert np.allclose(planes[PLANE_NAMES.index("proposal")], 128 / 255)
    assert np.allclose(planes[PLANE_NAMES.index("in_box")], 0.5)
    assert np.allclose(planes[PLANE_NAMES.index("point_proximity")], 0.5)
    m = cand.masks()[0]
    assert not m[CANDIDATE_NAMES.index("proposal")].any()  # 0.5 is "off", not "on"
    assert feat(cand, "teacher@0.5", "prior_ok") == 0.0 and feat(cand, "teacher@0.5", "box_fit") == 0.0


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="uint8"):
        build_candidates(teacher_map().astype(np.float32), None, [prior()], S)
    with pytest.raises(ValueError, match="one Prior per pair"):
        build_candidates(teacher_map(), None, [prior(), prior()], S)
    with pytest.raises(ValueError, match="sent_ids"):
        build_candidates(teacher_map(), None, [prior()], S, sent_ids=[99])


def test_split_and_concat_round_trip():
    t = np.concatenate([teacher_map()] * 5)
    cand = build_candidates(t, None, [prior(sent_id=i) for i in range(5)], S)
    parts = cand.split(2)
    assert [len(p) for p in parts] == [2, 3]
    back = concat_candidates(parts)
    assert back.sent_ids.tolist() == list(range(5))
    assert np.array_equal(back.cand_bits, cand.cand_bits) and np.array_equal(back.features, cand.features)


# --- the hand-crafted baselines ---------------------------------------------------------------------


def semi_cfg(**kw) -> Config:
    return apply_overrides(Config(), {f"semi.{k}": v for k, v in kw.items()})


def test_mean_teacher_ignore_band():
    cand = build_candidates(teacher_map(), None, [prior()], S)
    pl = RULES["mean_teacher"](cand, semi_cfg(threshold=0.9).semi)
    w, lab = pl.weights[0], pl.label_masks()[0]
    assert lab.sum() == 4 and lab[1:3, 1:3].all()
    assert w[5, 5] == 0  # p = 0.4: inside the band (0.1, 0.9), ignored
    assert w[1, 1] == 255 and w[0, 0] == 255  # p = 0.902 > 0.9 and p = 0 < 0.1: trusted
    assert (w == 0).sum() == 1
    assert pl.stats["trusted_share"] == pytest.approx(63 / 64)


def test_pwa_weight_matches_semires_code():
    # SemiRES bce_weight: 1.3 - exp(-(p-0.5)^2 / (2*0.1)) / (sqrt(2*pi) * sqrt(0.1))
    assert pwa_weight(np.float32(0.5)) == pytest.approx(1.3 - 1 / math.sqrt(2 * math.pi * 0.1), abs=1e-6)
    assert pwa_weight(np.float32(0.5)) == pytest.approx(0.03843, abs=1e-4)
    for p in (0.0, 1.0):
        assert pwa_weight(np.float32(p)) == pytest.approx(0.93856, abs=1e-4)


def test_semires_matched_and_pwa():
    semi = semi_cfg().semi
    # proposal rows 1-2 x cols 1-3 (6 px) vs teacher block (4 px): IoU 4/6 > 0.5 -> proposal, weight 1
    pl = RULES["semires"](build_candidates(teacher_map(), None, [prior(cols=(1, 4))], S), semi)
    assert pl.label_masks()[0].sum() == 6 and (pl.weights[0] == 255).all()
    assert pl.stats["matched_share"] == 1.0
    # proposal cols 2-3: IoU 2/6 < 0.5 -> teacher mask with PWA weights
    pl = RULES["semires"](build_candidates(teacher_map(), None, [prior()], S), semi)
    lab, w = pl.label_masks()[0], pl.weights[0]
    assert lab.sum() == 4 and lab[1:3, 1:3].all() and pl.stats["matched_share"] == 0.0
    assert w[0, 0] == round(0.938556 * 255)
    assert w[1, 1] == round(float(pwa_weight(np.float32(P_HI))) * 255)
    assert w[5, 5] == round(float(pwa_weight(np.float32(0.4))) * 255)
    # no prior: never matched
    pl = RULES["semires"](build_candidates(teacher_map(), None, [prior(ok=False)], S), semi)
    assert pl.stats["matched_share"] == 0.0


def test_fixed_rule_trusts_agreement_only():
    pl = RULES["fixed_rule"](build_candidates(teacher_map(), None, [prior()], S), semi_cfg().semi)
    lab, w = pl.label_masks()[0], pl.weights[0]
    assert lab.sum() == 2 and lab[1:3, 2].all()  # teacher AND proposal
    assert (w[1:3, 1] == 0).all() and (w[1:3, 3] == 0).all()  # teacher-only and proposal-only: ignored
    assert (w > 0).sum() == 64 - 4
    # disjoint teacher and proposal: rejected
    pl = RULES["fixed_rule"](build_candidates(teacher_map(), None, [prior(cols=(5, 7))], S), semi_cfg().semi)
    assert len(pl) == 0 and pl.stats["reject_share"] == 1.0


def test_select_for_method_dispatch():
    cand = build_candidates(teacher_map(), None, [prior()], S)
    assert select_for_method("supervised", cand, semi_cfg()) is None
    assert select_for_method("mean_teacher", cand, semi_cfg()).stats["method"] == "mean_teacher"
    assert select_for_method("semires", cand, semi_cfg()).stats["method"] == "semires"
    assert select_for_method("l2l", cand, semi_cfg(use_rl=False)).stats["method"] == "fixed_rule"
    with pytest.raises(ValueError, match="SelectorGroup"):
        select_for_method("l2l", cand, semi_cfg())
