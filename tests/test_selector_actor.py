"""SelectorGroup / SelectorActor on the shared local Ray cluster (real actors)."""

from __future__ import annotations

import numpy as np
import pytest

from l2l_ray.config import Config, apply_overrides
from l2l_ray.masks import quantize
from l2l_ray.records import Prior
from l2l_ray.selection import select_for_method
from l2l_ray.selection.candidates import CANDIDATE_NAMES, build_candidates
from l2l_ray.selection.rewards import Feedback, HeldOutTruth

S = 32
PROP = CANDIDATE_NAMES.index("proposal")


def two_discs(n: int, seed: int):
    """Discs A (truth, = proposal) and B (what the teacher confidently segments) in every image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    teacher, truth, priors = np.zeros((n, S, S), np.float32), np.zeros((n, S, S), bool), []
    for i in range(n):
        a, b = rng.integers(6, 12, 2), rng.integers(20, 26, 2)
        disc_a = (xx - a[0]) ** 2 + (yy - a[1]) ** 2 < 16
        truth[i] = disc_a
        teacher[i] = np.where((xx - b[0]) ** 2 + (yy - b[1]) ** 2 < 16, 0.95, 0.02)
        priors.append(Prior(sent_id=200 + i, ref_id=i, points=((a[0] / S, a[1] / S),), score=0.9,
                            proposal=quantize(disc_a.astype(np.float32))))
    return build_candidates(quantize(teacher), None, priors, S), truth


def cfg() -> Config:
    semi = {"selector_lr": 0.03, "selector_minibatch": 8, "selector_update_epochs": 2, "selector_hidden": 16,
            "reward_prior": 0.0, "reward_consistency": 0.0, "reward_credit": 0.0, "reward_truth": 1.0,
            "reject_iou": 0.0, "selector_cpus": 0.25, "selector_threads": 1, "selector_practice_steps": 5,
            "explore_share": 1.0}
    return apply_overrides(Config(), {"data.image_size": S, **{f"semi.{k}": v for k, v in semi.items()}})


@pytest.mark.ray
def test_selector_group_update_raises_the_known_best_candidate(ray_session, tmp_path):
    from l2l_ray.selection.selector import SelectorGroup

    cand, truth = two_discs(8, 0)
    labeled_truth = HeldOutTruth.from_labeled_masks(cand.sent_ids, truth)  # these pairs are LABELED
    group = SelectorGroup(cfg(), num_actors=2)
    try:
        before = group.candidate_probs(cand)[:, PROP].mean()
        for _ in range(6):
            pl = select_for_method("l2l", cand, cfg(), group, explore=True)
            assert pl.stats["n_pairs"] == 8
            kept = np.isin(cand.sent_ids, pl.sent_ids)
            assert pl.sent_ids.tolist() == cand.sent_ids[kept].tolist()  # order kept across actor slices
            stats = group.feedback(Feedback(cand.sent_ids, truth=labeled_truth))
        after = group.candidate_probs(cand)[:, PROP].mean()
        assert after > before + 0.1, (before, after)
        assert "reward/truth" in stats and stats["selector/update_pairs"] == 4.0  # 8 pairs over 2 actors
        # both actors hold the same (averaged) weights
        probs = [np.asarray(p) for p in _probs_per_actor(group, cand)]
        assert np.allclose(probs[0], probs[1], atol=1e-6)
        # practice on held-out labeled pairs through the group
        assert "practice/greedy_truth_iou" in group.practice(cand, labeled_truth)

        # checkpoint: a fresh group (as after a killed driver) resumes with the same selector
        path = tmp_path / "selector.pt"
        group.save(path)
        resumed = SelectorGroup(cfg(), num_actors=1)
        try:
            assert resumed.load(path) and not resumed.load(tmp_path / "missing.pt")
            assert np.allclose(resumed.candidate_probs(cand), group.candidate_probs(cand), atol=1e-6)
        finally:
            resumed.shutdown()
    finally:
        group.shutdown()


def _probs_per_actor(group, cand):
    import ray

    return ray.get([a.candidate_probs.remote(cand) for a in group.actors])
