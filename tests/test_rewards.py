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
    credit_map,
    iou,
    pair_reward_terms,
    pixel_trust_reward,
    total_reward,
)
from l2l_ray.selection.rules import RULES

S = 4
W = RewardWeights(truth=2.0, prior=1.0, consistency=1.0, credit=1.0, wrong_pixel=3.0, reject_iou=0.3)


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
    trust = np.zeros((2, S, S), bool)
    trust[0, :2] = True  # pair 0 trusts rows 0-1 (8 px); pair 1 (rejected) nothing
    return labels, np.array([False, True]), trust, q, np.array([0.5, 0.8], np.float32), post, truth


def align_map():
    """Alignment 1 everywhere but -1 at pixel (0, 0) of pair 0."""
    a = np.ones((2, S, S), np.float32)
    a[0, 0, 0] = -1.0
    return a


def test_iou_and_credit_map():
    a = np.zeros((2, S, S), bool)
    b = np.zeros((2, S, S), bool)
    a[0, 0, :2] = True
    b[0, 0, 1:3] = True
    assert iou(a, b).tolist() == pytest.approx([1 / 3, 0.0])
    assert iou(a, b, empty=1.0)[1] == 1.0
    lab = np.array([[[True, False]]])
    p = np.array([[[0.9, 0.0]]], np.float32)
    # (p - label) * align: a label the model predicts already earns ~0, clipped at +-3
    assert credit_map(lab, p, np.array([[[2.0, 5.0]]])).ravel().tolist() == pytest.approx([-0.2, 0.0])
    assert credit_map(lab, np.array([[[0.0, 1.0]]]), np.array([[[10.0, 10.0]]])).tolist() == [[[-3.0, 3.0]]]


def test_pair_reward_terms_by_hand():
    labels, rejected, trust, q, score, post, truth = case()
    t = pair_reward_terms(labels, rejected, trust, q, score, post, truth, align_map(), reject_iou=0.3)
    assert t["prior"].tolist() == pytest.approx([0.5 * 2 / 6, 0.8 * 0.3])  # IoU(label, row 0) = 2/6
    assert t["consistency"].tolist() == pytest.approx([4 / 5, 0.3])
    assert t["truth"].tolist() == pytest.approx([4 / 6, 0.3])
    # credit over the 8 trusted px of pair 0: (0,0) (0.9-1)*-1 = +0.1, (0,1) (1,0) (1,1) -0.1 each, rest 0
    assert t["credit"].tolist() == pytest.approx([-0.2 / 8, 0.0])  # a rejected pair earns no credit
    total = total_reward(t, W)
    assert total[0] == pytest.approx(2 * 4 / 6 + 1 / 6 + 0.8 - 0.025)
    assert total[1] == pytest.approx(2 * 0.3 + 0.24 + 0.3)
    # every pixel trusted (trust=None): (3,3) label 0, p .9, align 1 adds +0.9 -> (0.9 - 0.2) / 16
    t = pair_reward_terms(labels, rejected, None, q, score, post, None, align_map())
    assert t["credit"][0] == pytest.approx(0.7 / 16)
    # unlabeled feedback has no truth term and no consistency/credit without post-update predictions
    t = pair_reward_terms(labels, rejected, trust, q, score)
    assert set(t) == {"prior"}


def test_pixel_trust_reward_by_hand():
    labels, _, _, q, score, post, truth = case()
    r = pixel_trust_reward(labels, q, score, W, post, truth, align_map())
    # (0,0): label 1, q 1, post .9, truth 1, align -1: 0.5*1 + (1 - 0.2) + 2*1 + (0.9-1)*-1
    assert r[0, 0, 0] == pytest.approx(0.5 + 0.8 + 2.0 + 0.1)
    # (3,3): label 0, q 0, post .9, truth 0, align 1: 0.5 + (1 - 1.8) + 2 + 0.9
    assert r[0, 3, 3] == pytest.approx(0.5 - 0.8 + 2.0 + 0.9)
    # (0,2): label 0, q 1, post 0, truth 1 (wrong): -0.5 + 1 - 2*3 + 0
    assert r[0, 0, 2] == pytest.approx(-0.5 + 1.0 - 6.0)
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
    labels, rejected, trust, q, score, post, truth = case()
    teacher_k = CANDIDATE_NAMES.index("teacher@0.5")
    rec = ActionRecord(1, cand.sent_ids, np.array([teacher_k, 0]), pack_bits(labels), pack_bits(trust),
                       np.zeros(2, np.float32), True, S)
    fb = Feedback(cand.sent_ids, (post * 255).round().astype(np.uint8), align_map().astype(np.float16),
                  HeldOutTruth.from_labeled_masks(cand.sent_ids, truth))
    rw = compute_rewards(cand, rec, fb, W)
    assert rw.terms["truth"].tolist() == pytest.approx([4 / 6, 0.3])
    assert rw.terms["prior"].tolist() == pytest.approx([0.5 * 2 / 6, 0.5 * 0.3])
    d = 25 / 255  # post stored as 230/255: 1 - p = 25/255
    assert rw.terms["credit"].tolist() == pytest.approx([(d - 3 * d) / 8, 0.0], abs=1e-6)
    assert rw.stats["reward/credit_std"] == pytest.approx(np.std([(d - 3 * d) / 8, 0.0]), abs=1e-6)
    assert rw.stats["reward/truth"] == pytest.approx((4 / 6 + 0.3) / 2)
    pix = rw.pixel(cand, rec, np.arange(2))
    assert pix[0, 0, 0] == pytest.approx(0.5 + (1 - 2 * d) + 2.0 + d, abs=1e-6)
    assert np.all(pix[1] == 0)  # rejected: zeros
    with pytest.raises(ValueError, match="sent_ids"):
        compute_rewards(cand, rec, Feedback(cand.sent_ids[::-1]), W)


def test_candidate_reward_table_truth_picks_the_right_candidate():
    cand = two_pairs()
    prop_k = CANDIDATE_NAMES.index("proposal")
    truth = cand.masks()[:, prop_k]
    w = RewardWeights(truth=1.0, prior=0.0, consistency=0.0, credit=0.0, reject_iou=0.0)
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


def test_corruption_knob_never_reads_a_mask():
    """priors.corruption swaps priors within an image / drops them using ids only: the records it is given
    carry no mask (UnlabeledSample), and a LabeledSample whose mask would raise is never asked for it."""
    from l2l_ray.priors.corrupt import CORRUPTED, corrupt_priors, sentence_refs

    class NoMask(LabeledSample):
        def mask(self):  # pragma: no cover - the point is that it is never called
            raise AssertionError("the corruption knob read a mask")

    sig = list(inspect.signature(corrupt_priors).parameters)
    assert not [n for n in sig if any(b in n.lower() for b in ("mask", "truth", "target", "gt", "rle"))]
    lab = NoMask(1, 7, "x.jpg", 16, 16, (Sentence(10, "left thing"),), {"size": [16, 16], "counts": "bad"})
    samples = [lab, UnlabeledSample(2, 7, "x.jpg", 16, 16, (Sentence(20, "right thing"), Sentence(21, "the right"))),
               UnlabeledSample(3, 8, "y.jpg", 16, 16, (Sentence(30, "alone"),))]
    bundle = type("B", (), {"labeled": samples[:1], "unlabeled": samples[1:], "eval": {}})()
    refs = sentence_refs(bundle)
    assert sorted(refs) == [(7, 1, 10), (7, 2, 20), (7, 2, 21), (8, 3, 30)]
    priors = {sid: Prior(sent_id=sid, ref_id=ref, box=(0.1 * ref, 0, 0.5, 0.5), score=0.9)
              for _, ref, sid in refs}
    same, stats = corrupt_priors(priors, refs, rate=0.0)
    assert same == priors and sum(stats.values()) == 0
    bad, stats = corrupt_priors(priors, refs, rate=1.0, drop_share=0.0, seed=3)
    assert priors[10].box == (0.1, 0, 0.5, 0.5)  # the input is left as it was
    # every sentence of image 7 now carries the prior of the OTHER ref of its image, under its own ids
    assert bad[10].box == priors[20].box and (bad[10].sent_id, bad[10].ref_id) == (10, 1)
    assert bad[20].box == priors[10].box and bad[21].box == priors[10].box and bad[21].ref_id == 2
    assert bad[30].status == CORRUPTED and not bad[30].ok  # image 8 has one ref: nothing to swap with, dropped
    assert stats == {"corrupted_swapped": 3, "corrupted_dropped": 1, "swap_impossible": 1}
    dropped, stats = corrupt_priors(priors, refs, rate=1.0, drop_share=1.0)
    assert all(p.status == CORRUPTED for p in dropped.values()) and stats["corrupted_dropped"] == 4
    half, _ = corrupt_priors(priors, refs * 1, rate=0.5, seed=1)
    assert half == corrupt_priors(priors, refs, rate=0.5, seed=1)[0]  # seeded: every method sees the same
