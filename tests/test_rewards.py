"""Reward terms (hand-computed on 4x4 cases) and the proof that the unlabeled path cannot reach a mask."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from l2l_ray.masks import encode_rle, pack_bits
from l2l_ray.records import LabeledSample, Prior, Sentence, UnlabeledSample
from l2l_ray.selection import select_for_method
from l2l_ray.selection.candidates import CANDIDATE_NAMES, CandidateBatch, build_candidates
from l2l_ray.selection.episodes import ActionRecord, candidate_reward_table, compute_rewards
from l2l_ray.selection.rewards import (
    Feedback,
    HeldOutTruth,
    RewardWeights,
    iou,
    pair_reward_terms,
    pixel_trust_reward,
    progress_signal,
    total_reward,
)
from l2l_ray.selection.rules import RULES

S = 4
W = RewardWeights(truth=2.0, prior=1.0, consistency=1.0, progress=1.0, wrong_pixel=3.0, reject_iou=0.3)


def case():
    """Pair 0: label = top-left 2x2; pair 1: rejected. Proposal of pair 0 = row 0."""
    labels = np.zeros((2, S, S), bool)
    labels[0, :2, :2] = True
    q = np.zeros((2, S, S), np.float32)
    q[0, 0, :] = 1.0
    post = np.zeros((2, S, S), np.float32)
    post[0, :2, :2] = 0.9
    post[0, 3, 3] = 0.9  # post mask: 5 px
    truth = np.zeros((2, S, S), bool)
    truth[0, :2, :3] = True  # 6 px
    return labels, np.array([False, True]), np.array([0.5, 0.0]), q, np.array([0.5, 0.8], np.float32), post, truth


def test_iou_and_progress_signal():
    a = np.zeros((2, S, S), bool)
    b = np.zeros((2, S, S), bool)
    a[0, 0, :2] = True
    b[0, 0, 1:3] = True
    assert iou(a, b).tolist() == pytest.approx([1 / 3, 0.0])
    assert iou(a, b, empty=1.0)[1] == 1.0
    assert progress_signal(2.0, 1.5) == pytest.approx(0.25)
    assert progress_signal(1.0, 3.0) == -1.0  # clipped
    assert progress_signal(float("nan"), 1.0) == 0.0


def test_pair_reward_terms_by_hand():
    labels, rejected, share, q, score, post, truth = case()
    t = pair_reward_terms(labels, rejected, share, q, score, post, truth, progress=0.5, reject_iou=0.3)
    assert t["prior"].tolist() == pytest.approx([0.5 * 2 / 6, 0.8 * 0.3])  # IoU(label, row 0) = 2/6
    assert t["consistency"].tolist() == pytest.approx([4 / 5, 0.3])
    assert t["truth"].tolist() == pytest.approx([4 / 6, 0.3])
    assert t["progress"].tolist() == pytest.approx([0.5 * 0.25, -0.5 * 0.25])  # shares 0.5, 0 -> mean 0.25
    total = total_reward(t, W)
    assert total[0] == pytest.approx(2 * 4 / 6 + 1 / 6 + 0.8 + 0.125)
    assert total[1] == pytest.approx(2 * 0.3 + 0.24 + 0.3 - 0.125)
    # unlabeled feedback has no truth term and no consistency without post-update predictions
    t = pair_reward_terms(labels, rejected, share, q, score)
    assert set(t) == {"prior"}


def test_pixel_trust_reward_by_hand():
    labels, _, _, q, score, post, truth = case()
    r = pixel_trust_reward(labels, q, score, W, post, truth, progress=0.5)
    # (0,0): label 1, q 1, post .9, truth 1: 0.5*1 + (1 - 0.2) + 2*1 + 0.5
    assert r[0, 0, 0] == pytest.approx(0.5 + 0.8 + 2.0 + 0.5)
    # (3,3): label 0, q 0, post .9, truth 0: 0.5 + (1 - 1.8) + 2 + 0.5
    assert r[0, 3, 3] == pytest.approx(0.5 - 0.8 + 2.0 + 0.5)
    # (0,2): label 0, q 1, post 0, truth 1 (wrong): -0.5 + 1 - 2*3 + 0.5
    assert r[0, 0, 2] == pytest.approx(-0.5 + 1.0 - 6.0 + 0.5)
    # no prior (score 0), no post, no truth: nothing to pay
    assert np.all(pixel_trust_reward(labels, q, np.zeros(2, np.float32), W)[1] == 0)


def two_pairs() -> CandidateBatch:
    t = np.zeros((2, S, S), np.uint8)
    t[:, :2, :2] = 230
    prop = np.zeros((S, S), np.uint8)
    prop[0, :] = 255
    priors = [Prior(sent_id=i, ref_id=i, box=(0, 0, 1, 0.25), score=0.5, proposal=prop) for i in range(2)]
    return build_candidates(t, None, priors, S)


def test_compute_rewards_matches_pure_terms():
    cand = two_pairs()
    labels, rejected, share, q, score, post, truth = case()
    teacher_k = CANDIDATE_NAMES.index("teacher@0.5")
    trust = np.zeros((2, S, S), bool)
    trust[0, :2] = True  # share 0.5
    rec = ActionRecord(1, cand.sent_ids, np.array([teacher_k, 0]), pack_bits(labels), pack_bits(trust),
                       np.zeros(2, np.float32), True, S)
    fb = Feedback(cand.sent_ids, (post * 255).round().astype(np.uint8), 0.5,
                  HeldOutTruth.from_labeled_masks(cand.sent_ids, truth))
    rw = compute_rewards(cand, rec, fb, W)
    assert rw.terms["truth"].tolist() == pytest.approx([4 / 6, 0.3])
    assert rw.terms["prior"].tolist() == pytest.approx([0.5 * 2 / 6, 0.5 * 0.3])
    assert rw.terms["progress"].tolist() == pytest.approx([0.125, -0.125])
    assert rw.stats["reward/truth"] == pytest.approx((4 / 6 + 0.3) / 2)
    pix = rw.pixel(cand, rec, np.arange(2))
    assert pix[0, 0, 0] == pytest.approx(0.5 + (1 - 2 * 25 / 255) + 2.0 + 0.5)  # post stored as 230/255
    assert np.all(pix[1] == 0)  # rejected: zeros
    with pytest.raises(ValueError, match="sent_ids"):
        compute_rewards(cand, rec, Feedback(cand.sent_ids[::-1]), W)


def test_candidate_reward_table_truth_picks_the_right_candidate():
    cand = two_pairs()
    prop_k = CANDIDATE_NAMES.index("proposal")
    truth = cand.masks()[:, prop_k]
    w = RewardWeights(truth=1.0, prior=0.0, consistency=0.0, progress=0.0, reject_iou=0.0)
    table = candidate_reward_table(cand, Feedback(cand.sent_ids, truth=HeldOutTruth.from_labeled_masks(
        cand.sent_ids, truth)), w)
    assert table.shape == (2, len(CANDIDATE_NAMES))
    assert (table.argmax(1) == prop_k).all() and table[0, prop_k] == 1.0 and table[0, 0] == 0.0


def labeled(ref_id=1) -> LabeledSample:
    m = np.zeros((16, 16), np.uint8)
    m[:, :8] = 1
    return LabeledSample(ref_id, 1, "x.jpg", 16, 16, (Sentence(10, "left thing"),), encode_rle(m))


def unlabeled(ref_id=2) -> UnlabeledSample:
    return UnlabeledSample(ref_id, 1, "x.jpg", 16, 16, (Sentence(20, "right thing"),))


def test_held_out_truth_from_labeled_samples_only():
    truth = HeldOutTruth.from_labeled([labeled()], [10], 8)
    m = truth.masks()[0]
    assert m[:, :4].all() and not m[:, 4:].any()
    with pytest.raises(TypeError, match="LabeledSample only"):
        HeldOutTruth.from_labeled([unlabeled()], [20], 8)


def test_unlabeled_path_cannot_reach_a_mask():
    """The unlabeled selection path takes teacher outputs, priors and ids; nothing on it can carry a mask."""
    from l2l_ray.selection.agent import Selector
    from l2l_ray.selection.selector import SelectorActor, SelectorGroup

    u = unlabeled()
    assert not hasattr(u, "mask") and not hasattr(u, "mask_rle")
    assert not any("mask" in f.name for f in dataclasses.fields(UnlabeledSample))
    banned = ("mask", "truth", "target", "gt", "rle")
    entry_points = [build_candidates, select_for_method, *RULES.values(), Selector.select, Selector.act,
                    SelectorActor.select, SelectorGroup.select]
    for fn in entry_points:
        names = list(inspect.signature(fn).parameters)
        assert not [n for n in names if any(b in n.lower() for b in banned)], (fn.__qualname__, names)
    fields = {f.name for f in dataclasses.fields(CandidateBatch)}
    assert fields == {"sent_ids", "ref_ids", "teacher", "agreement", "proposal", "boxes", "points", "prior_score",
                      "prior_ok", "cand_bits", "features", "size"}
    # The unlabeled path end to end: samples -> (teacher output, priors) -> candidates -> pseudo-labels.
    samples = [unlabeled(2), unlabeled(3)]
    priors = [Prior(sent_id=s.sentences[0].sent_id, ref_id=s.ref_id, status="disabled") for s in samples]
    teacher = np.zeros((2, 8, 8), np.uint8)
    teacher[:, 2:5, 2:5] = 250
    cand = build_candidates(teacher, None, priors, 8)
    for method in ("mean_teacher", "semires"):
        pl = select_for_method(method, cand, _cfg())
        assert pl.ref_ids.tolist() == [2, 3]


def _cfg():
    from l2l_ray.config import Config

    return Config()
