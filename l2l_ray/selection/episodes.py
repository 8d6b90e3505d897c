"""One-step selection episodes: what the selector did (``ActionRecord``) and what it earned (``Rewards``).

Pure numpy (no Ray, no torch). ``compute_rewards`` turns a round's ``Feedback`` (post-update predictions,
the held-out credit alignment, and, for held-out LABELED pairs only, their true masks) into per-pair reward terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from l2l_ray.masks import dequantize, unpack_bits
from l2l_ray.selection.candidates import CANDIDATE_NAMES, REJECT, CandidateBatch
from l2l_ray.selection.rewards import (
    Feedback,
    RewardWeights,
    feedback_arrays,
    pair_reward_terms,
    pixel_trust_reward,
    summarize_terms,
    total_reward,
)

_CHUNK = 256


@dataclass
class ActionRecord:
    """The selector's actions on N pairs (aligned with the CandidateBatch it acted on)."""

    key: int  # which selection this is (a counter per Selector); update() checks it
    sent_ids: np.ndarray  # int64 (N,)
    cand: np.ndarray  # int64 (N,) chosen candidate, 0 = reject
    label_bits: np.ndarray  # uint8 (N, ceil(S*S/8)) packed chosen label (empty for rejected pairs)
    trust_bits: np.ndarray  # uint8 (N, ceil(S*S/8)) packed per-pixel trust (all 0 for rejected pairs)
    cand_logp: np.ndarray  # float32 (N,) log-prob of the chosen candidate when it was chosen
    explore: bool
    size: int
    sampled: np.ndarray | None = None  # bool (N,): rows that acted by a sample of the policy (None: all if explore)

    def __len__(self) -> int:
        return len(self.sent_ids)

    def trust(self, idx=None) -> np.ndarray:
        """bool (n, S, S)."""
        return unpack_bits(self.trust_bits if idx is None else self.trust_bits[idx], (self.size, self.size))

    def slice(self, idx) -> ActionRecord:
        return ActionRecord(self.key, self.sent_ids[idx], self.cand[idx], self.label_bits[idx], self.trust_bits[idx],
                            self.cand_logp[idx], self.explore, self.size,
                            None if self.sampled is None else self.sampled[idx])

    def labels(self, idx=None) -> np.ndarray:
        """bool (n, S, S) chosen labels."""
        return unpack_bits(self.label_bits if idx is None else self.label_bits[idx], (self.size, self.size))


@dataclass
class Rewards:
    """Per-pair rewards of an ActionRecord plus what is needed for the per-pixel trust rewards."""

    pair: np.ndarray  # float32 (N,) weighted total
    terms: dict[str, np.ndarray]  # unweighted terms, each float32 (N,)
    feedback: Feedback
    weights: RewardWeights
    stats: dict = field(default_factory=dict)

    def pixel(self, cand: CandidateBatch, record: ActionRecord, idx) -> np.ndarray:
        """float32 (n, S, S) reward of trusting each pixel of rows ``idx`` (rejected rows: zeros)."""
        labels = record.labels(idx)
        fb = self.feedback.slice(idx)
        post, truth, align = feedback_arrays(fb)
        r = pixel_trust_reward(labels, dequantize(cand.proposal[idx]), cand.prior_score[idx], self.weights,
                               post, truth, align)
        return np.where((record.cand[idx] != REJECT)[:, None, None], r, 0.0).astype(np.float32)


def chosen_labels(cand: CandidateBatch, choice: np.ndarray, idx=None) -> np.ndarray:
    """bool (n, S, S): the chosen candidate's mask for rows ``idx`` (empty for reject)."""
    masks = cand.masks(idx)  # (n, K, S, S)
    return masks[np.arange(len(masks)), choice]


def check_aligned(cand: CandidateBatch, record: ActionRecord | None, fb: Feedback | None) -> None:
    for name, ids in (("record", None if record is None else record.sent_ids),
                      ("feedback", None if fb is None else fb.sent_ids)):
        if ids is not None and not np.array_equal(ids, cand.sent_ids):
            raise ValueError(f"{name}.sent_ids do not match the candidate batch's sent_ids: pass the feedback for "
                             f"the same pairs, in the order of the selection")


def compute_rewards(cand: CandidateBatch, record: ActionRecord, fb: Feedback, w: RewardWeights) -> Rewards:
    """Per-pair reward terms of the chosen labels (chunks of 256 pairs; no masks leave this function)."""
    check_aligned(cand, record, fb)
    terms: dict[str, list] = {}
    for a in range(0, len(cand), _CHUNK):
        sl = slice(a, a + _CHUNK)
        post, truth, align = feedback_arrays(fb.slice(sl))
        t = pair_reward_terms(record.labels(sl), record.cand[sl] == REJECT, record.trust(sl),
                              dequantize(cand.proposal[sl]), cand.prior_score[sl], post, truth, align, w.reject_iou)
        for k, v in t.items():
            terms.setdefault(k, []).append(v)
    out = {k: np.concatenate(v) for k, v in terms.items()}
    total = total_reward(out, w)
    return Rewards(total, out, fb, w, summarize_terms(out, total))


def candidate_reward_table(cand: CandidateBatch, fb: Feedback, w: RewardWeights) -> np.ndarray:
    """float32 (N, K): the pair reward every candidate would have earned, every pixel trusted.

    Used on held-out LABELED pairs, where the truth makes each candidate's reward computable at once.
    """
    check_aligned(cand, None, fb)
    n, k = len(cand), len(CANDIDATE_NAMES)
    table = np.empty((n, k), np.float32)
    for a in range(0, n, _CHUNK // k + 1):
        sl = slice(a, min(a + _CHUNK // k + 1, n))
        m = cand.masks(sl)  # (c, K, S, S)
        c, s = len(m), cand.size
        sub = fb.slice(sl)
        rep = lambda x: None if x is None else np.repeat(x, k, 0)  # noqa: E731
        post, truth, align = feedback_arrays(sub)
        t = pair_reward_terms(m.reshape(c * k, s, s), np.tile(np.arange(k) == REJECT, c), None,
                              rep(dequantize(cand.proposal[sl])), rep(cand.prior_score[sl]), rep(post), rep(truth),
                              rep(align), w.reject_iou)
        table[sl] = total_reward(t, w).reshape(c, k)
    return table
