"""The selection policy (RLlib TorchRLModule) and the plain Selector, in-process (no Ray cluster)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray.rllib")

import torch  # noqa: E402
from ray.rllib.core.columns import Columns  # noqa: E402
from ray.rllib.core.rl_module.torch import TorchRLModule  # noqa: E402

from l2l_ray.config import Config, apply_overrides  # noqa: E402
from l2l_ray.masks import quantize  # noqa: E402
from l2l_ray.records import Prior  # noqa: E402
from l2l_ray.selection import select_for_method  # noqa: E402
from l2l_ray.selection.agent import Selector  # noqa: E402
from l2l_ray.selection.candidates import CANDIDATE_NAMES, build_candidates  # noqa: E402
from l2l_ray.selection.policy import make_obs, policy_spec  # noqa: E402
from l2l_ray.selection.rewards import Feedback, HeldOutTruth  # noqa: E402

S = 32
PROP = CANDIDATE_NAMES.index("proposal")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The SelectorActor runs with semi.selector_threads=1; 2 threads on a busy 2-core box are much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def two_discs(n: int, seed: int):
    """Each image has discs A (the referent, = truth) and B. The teacher segments B (confidently wrong);
    the proposal is A. So the 'proposal' candidate is right and every teacher candidate is wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    teacher, truth, priors = np.zeros((n, S, S), np.float32), np.zeros((n, S, S), bool), []
    for i in range(n):
        a, b = rng.integers(6, 12, 2), rng.integers(20, 26, 2)
        if rng.random() < 0.5:
            a, b = b, a
        disc_a = (xx - a[0]) ** 2 + (yy - a[1]) ** 2 < 16
        disc_b = (xx - b[0]) ** 2 + (yy - b[1]) ** 2 < 16
        truth[i] = disc_a
        teacher[i] = np.where(disc_b, 0.95, 0.02)
        priors.append(Prior(sent_id=100 + i, ref_id=i, box=None, points=((a[0] / S, a[1] / S),), score=0.9,
                            proposal=quantize(disc_a.astype(np.float32))))
    return build_candidates(quantize(teacher), None, priors, S), truth


def semi(**kw):
    base = {"selector_lr": 0.02, "selector_minibatch": 16, "selector_practice_steps": 20,
            "reward_prior": 0.0, "reward_consistency": 0.0, "reward_credit": 0.0, "reward_truth": 1.0,
            "reject_iou": 0.0, "selector_hidden": 16, "explore_share": 1.0}
    base.update(kw)
    return apply_overrides(Config(), {f"semi.{k}": v for k, v in base.items()}).semi


def test_module_is_an_rllib_torch_rl_module():
    module = policy_spec(S, stride=4, hidden=16).build()
    assert isinstance(module, TorchRLModule)
    cand, _ = two_discs(3, 0)
    obs = make_obs(cand)
    with torch.no_grad():
        for fwd in (module.forward_inference, module.forward_exploration):
            out = fwd({Columns.OBS: obs})
            assert out[Columns.ACTION_DIST_INPUTS].shape == (3, len(CANDIDATE_NAMES))
            assert out[Columns.ACTIONS]["cand"].shape == (3,)
            assert out[Columns.ACTIONS]["trust"].shape == (3, S, S)
            assert out[Columns.ACTIONS]["trust"].dtype == torch.bool
        out = module.forward_train({Columns.OBS: obs, Columns.ACTIONS: {"cand": torch.tensor([0, 4, 7])}})
        assert out["trust_logits"].shape == (3, S, S)
        assert module.compute_values({Columns.OBS: obs}).shape == (3,)
    dist = module.get_inference_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
    assert dist.sample().shape == (3,)


def test_practice_on_labeled_pairs_learns_the_right_candidate():
    cand, truth = two_discs(16, 1)
    sel = Selector(semi(), S, seed=0)
    held = HeldOutTruth.from_labeled_masks(cand.sent_ids, truth)
    before = sel.candidate_probs(cand)[:, PROP].mean()
    stats = sel.practice(cand, held)
    after = sel.candidate_probs(cand)[:, PROP].mean()
    assert after > before + 0.2, (before, after)
    assert stats["practice/return_last"] > stats["practice/return_first"]
    assert stats["practice/greedy_truth_iou"] > 0.9 and stats["practice/teacher_truth_iou"] == 0.0


def test_select_outputs_the_chosen_labels_and_trust():
    cand, _ = two_discs(6, 2)
    sel = Selector(semi(), S, seed=0)
    pl, rec = sel.select(cand, explore=True)
    keep = (rec.cand != 0) & rec.trust().any((1, 2))
    assert pl.sent_ids.tolist() == cand.sent_ids[keep].tolist()
    chosen = cand.masks()[np.arange(len(cand)), rec.cand]
    assert np.array_equal(pl.label_masks(), chosen[keep])
    assert set(np.unique(pl.weights)) <= {0, 255}
    assert np.array_equal(pl.weights > 0, rec.trust()[keep])
    assert pl.stats["n_pairs"] == 6
    assert sum(v for k, v in pl.stats.items() if k.startswith("cand_share/")) == pytest.approx(1.0)
    assert select_for_method("l2l", cand, Config(), sel, explore=False).stats["explore"] is False


def test_explore_share_samples_some_pairs_and_learns_from_those_only():
    cand, truth = two_discs(40, 4)
    sel = Selector(semi(explore_share=0.25), S, seed=0)
    greedy = sel.act(cand, explore=False)
    rec = sel.act(cand, explore=True)
    assert rec.sampled is not None and 0 < rec.sampled.sum() < len(cand)  # about a quarter of 40
    assert np.array_equal(rec.cand[~rec.sampled], greedy.cand[~rec.sampled])  # the rest act greedily
    sel.select(cand, explore=True)
    stats = sel.feedback(Feedback(cand.sent_ids, truth=HeldOutTruth.from_labeled_masks(cand.sent_ids, truth)))
    assert 0 < stats["selector/update_pairs"] < len(cand)  # the update saw the sampled rows only


def test_feedback_update_raises_the_paid_candidate(tmp_path):
    cand, truth = two_discs(12, 3)
    sel = Selector(semi(selector_update_epochs=2), S, seed=0)
    before = sel.candidate_probs(cand)[:, PROP].mean()
    for _ in range(8):
        sel.select(cand, explore=True)
        stats = sel.feedback(Feedback(cand.sent_ids, truth=HeldOutTruth.from_labeled_masks(cand.sent_ids, truth)))
    assert "reward/truth" in stats and "selector/loss_pg" in stats
    assert sel.candidate_probs(cand)[:, PROP].mean() > before
    # greedy selections are never used for updates; no pending selection -> skipped
    _, rec = sel.select(cand, explore=False)
    assert sel.feedback(Feedback(cand.sent_ids))["selector/update_skipped_no_pending"] == 1.0


def test_checkpoint_round_trip(tmp_path):
    cand, truth = two_discs(8, 4)
    sel = Selector(semi(), S, seed=0)
    sel.practice(cand, HeldOutTruth.from_labeled_masks(cand.sent_ids, truth), steps=3)
    path = tmp_path / "selector.pt"
    sel.save(path)
    other = Selector(semi(), S, seed=123)
    other.load(path)
    assert np.allclose(other.candidate_probs(cand), sel.candidate_probs(cand))
    assert other.n_updates == sel.n_updates == 3
    a, b = sel.act(cand, explore=True), other.act(cand, explore=True)  # same RNG state -> same samples
    assert np.array_equal(a.cand, b.cand) and np.array_equal(a.trust_bits, b.trust_bits)


def test_empty_batches_pass_through():
    cand, truth = two_discs(2, 5)
    empty = cand.slice(slice(0, 0))
    sel = Selector(semi(), S, seed=0)
    pl, rec = sel.select(empty, explore=True)
    assert len(pl) == 0 and len(rec) == 0 and pl.stats["n_pairs"] == 0
    assert sel.feedback(Feedback(empty.sent_ids))["selector/update_pairs"] == 0.0
    assert sel.practice(empty, HeldOutTruth.from_labeled_masks(empty.sent_ids, truth[:0]))["practice/steps"] == 0.0
    for method in ("mean_teacher", "semires"):
        assert len(select_for_method(method, empty, Config())) == 0
