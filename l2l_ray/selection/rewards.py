"""Rewards for pseudo-label selection: pure functions of arrays (no Ray, no torch).

Pair-level terms (one value per pair, unweighted; the total is the weighted sum, weights from cfg.semi):
- ``prior``: agreement with the multimodal prior, conf * IoU(label, proposal > 0.5), conf = prior score.
- ``consistency``: IoU(label, model prediction after the update > 0.5).
- ``progress``: the round's learning-progress scalar (relative drop of the loss on the held-out labeled
  slice), credited to each pair in proportion to how much more than average of it was trusted.
- ``truth``: IoU(label, TRUE mask), only for held-out LABELED pairs run through the unlabeled pipeline
  (``HeldOutTruth`` can only be built from ``LabeledSample`` or from masks the driver labels as labeled).
A rejected pair is paid ``reject_iou`` in every IoU term (and trusts nothing).

Pixel-level reward (for the per-pixel trust head): trusting a pixel is paid
``w_truth*(+1 right / -wrong_pixel wrong) + w_prior*conf*(1-2|label-q|) + w_cons*(1-2|label-post|)
+ w_prog*progress``; ignoring a pixel is paid 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from l2l_ray.masks import dequantize, unpack_bits
from l2l_ray.records import LabeledSample
from l2l_ray.selection.candidates import PROPOSAL_T, pack_masks


@dataclass(frozen=True)
class RewardWeights:
    truth: float = 2.0
    prior: float = 1.0
    consistency: float = 1.0
    progress: float = 1.0
    wrong_pixel: float = 3.0
    reject_iou: float = 0.3

    @classmethod
    def from_config(cls, semi) -> RewardWeights:
        """From a ``SemiConfig`` (cfg.semi)."""
        return cls(semi.reward_truth, semi.reward_prior, semi.reward_consistency, semi.reward_progress,
                   semi.reward_wrong_pixel, semi.reject_iou)


@dataclass
class HeldOutTruth:
    """TRUE masks of held-out LABELED pairs at model resolution (legitimate supervision for the selector)."""

    sent_ids: np.ndarray  # int64 (N,)
    bits: np.ndarray  # uint8 (N, ceil(S*S/8)) packed bits
    size: int

    @classmethod
    def from_labeled(cls, samples: Sequence[LabeledSample], sent_ids, size: int) -> HeldOutTruth:
        """One ``LabeledSample`` per pair (a ref repeats for each of its sentences), mask resized to size x size.

        Anything but a LabeledSample (e.g. an UnlabeledSample) raises TypeError: unlabeled truth never enters.
        """
        masks = np.empty((len(samples), size, size), bool)
        for i, s in enumerate(samples):
            if not isinstance(s, LabeledSample):
                raise TypeError(f"HeldOutTruth takes LabeledSample only, got {type(s).__name__} "
                                f"(ref {getattr(s, 'ref_id', '?')}): unlabeled pairs have no truth to use")
            m = s.mask().astype(np.uint8)
            masks[i] = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0
        return cls.from_labeled_masks(sent_ids, masks)

    @classmethod
    def from_labeled_masks(cls, sent_ids, masks: np.ndarray) -> HeldOutTruth:
        """From masks of LABELED pairs already at model resolution, bool (N, S, S)."""
        sent_ids = np.asarray(sent_ids, np.int64)
        if len(sent_ids) != len(masks):
            raise ValueError(f"{len(sent_ids)} sent_ids for {len(masks)} masks")
        return cls(sent_ids, pack_masks(masks), masks.shape[-1])

    def masks(self, idx=None) -> np.ndarray:
        """bool (n, S, S)."""
        return unpack_bits(self.bits if idx is None else self.bits[idx], (self.size, self.size))

    def slice(self, idx) -> HeldOutTruth:
        return HeldOutTruth(self.sent_ids[idx], self.bits[idx], self.size)


@dataclass
class Feedback:
    """What is known about a round's selection after the student update, aligned with the selected pairs.

    post_probs: uint8 (N, S, S) = p*255, the model's prediction on the same pairs after the update (the
    next round's teacher prediction serves); None = no consistency term. progress: the round's scalar from
    ``progress_signal`` (None = no progress term). truth: only for held-out LABELED pairs.
    """

    sent_ids: np.ndarray
    post_probs: np.ndarray | None = None
    progress: float | None = None
    truth: HeldOutTruth | None = None

    def __post_init__(self):
        self.sent_ids = np.asarray(self.sent_ids, np.int64)
        if self.truth is not None and not np.array_equal(self.truth.sent_ids, self.sent_ids):
            raise ValueError("Feedback.truth.sent_ids must equal Feedback.sent_ids (same pairs, same order)")
        if self.post_probs is not None and len(self.post_probs) != len(self.sent_ids):
            raise ValueError(f"post_probs has {len(self.post_probs)} rows for {len(self.sent_ids)} sent_ids")

    def slice(self, idx) -> Feedback:
        return Feedback(self.sent_ids[idx], None if self.post_probs is None else self.post_probs[idx],
                        self.progress, None if self.truth is None else self.truth.slice(idx))


def iou(a: np.ndarray, b: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """IoU of bool masks (N, S, S) x (N, S, S) -> float32 (N,); ``empty`` where both masks are empty."""
    inter = (a & b).sum((1, 2))
    union = (a | b).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), empty).astype(np.float32)


def progress_signal(loss_before: float, loss_after: float) -> float:
    """Relative drop of the held-out labeled loss over a round, clipped to [-1, 1] (positive = progress)."""
    if not (np.isfinite(loss_before) and np.isfinite(loss_after)):
        return 0.0
    return float(np.clip((loss_before - loss_after) / max(abs(loss_before), 1e-6), -1.0, 1.0))


def pair_reward_terms(labels: np.ndarray, rejected: np.ndarray, trust_share: np.ndarray, proposal: np.ndarray,
                      prior_score: np.ndarray, post_probs: np.ndarray | None = None,
                      truth: np.ndarray | None = None, progress: float | None = None,
                      reject_iou: float = 0.3) -> dict[str, np.ndarray]:
    """Unweighted per-pair reward terms, each float32 (N,).

    labels bool (N,S,S) chosen labels; rejected bool (N,); trust_share (N,) share of pixels trusted;
    proposal float (N,S,S) soft proposal; prior_score (N,) in [0,1] (0 = no prior); post_probs float
    (N,S,S) or None; truth bool (N,S,S) or None (held-out labeled pairs only); progress scalar or None.
    """
    def paid(v):  # a rejected pair is paid reject_iou in every IoU term
        return np.where(rejected, reject_iou, v).astype(np.float32)

    terms = {"prior": prior_score * paid(iou(labels, proposal > PROPOSAL_T))}
    if post_probs is not None:
        terms["consistency"] = paid(iou(labels, post_probs > 0.5))
    if truth is not None:
        terms["truth"] = paid(iou(labels, truth))
    if progress is not None:
        terms["progress"] = progress_credit(progress, trust_share, rejected)
    return {k: v.astype(np.float32) for k, v in terms.items()}


def progress_credit(progress: float, trust_share: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """float32 (N,): the round's progress scalar times each pair's trusted share minus the round mean."""
    share = np.where(rejected, 0.0, trust_share)
    return (progress * (share - share.mean())).astype(np.float32)


def total_reward(terms: dict[str, np.ndarray], w: RewardWeights) -> np.ndarray:
    """Weighted sum of the available terms, float32 (N,)."""
    scale = {"prior": w.prior, "consistency": w.consistency, "truth": w.truth, "progress": w.progress}
    out = np.zeros(len(next(iter(terms.values()))) if terms else 0, np.float32)
    for k, v in terms.items():
        out += scale[k] * v
    return out


def pixel_trust_reward(labels: np.ndarray, proposal: np.ndarray, prior_score: np.ndarray, w: RewardWeights,
                       post_probs: np.ndarray | None = None, truth: np.ndarray | None = None,
                       progress: float | None = None) -> np.ndarray:
    """float32 (n, S, S): the reward of trusting each pixel with its label (ignoring it is paid 0).

    labels bool (n,S,S); proposal float (n,S,S); prior_score (n,); post_probs float or None; truth bool or
    None (held-out labeled pairs only); progress scalar or None.
    """
    lab = labels.astype(np.float32)
    r = w.prior * prior_score[:, None, None] * (1.0 - 2.0 * np.abs(lab - proposal))
    if post_probs is not None:
        r += w.consistency * (1.0 - 2.0 * np.abs(lab - post_probs))
    if truth is not None:
        r += w.truth * np.where(labels == truth, 1.0, -w.wrong_pixel)
    if progress is not None:
        r += w.progress * progress
    return r.astype(np.float32)


def feedback_arrays(fb: Feedback) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(post_probs float (N,S,S) or None, truth bool (N,S,S) or None) of a Feedback."""
    post = None if fb.post_probs is None else dequantize(fb.post_probs)
    truth = None if fb.truth is None else fb.truth.masks()
    return post, truth


def summarize_terms(terms: dict[str, np.ndarray], total: np.ndarray, prefix: str = "reward") -> dict[str, float]:
    """Means of every term and of the total, for per-round logs."""
    out = {f"{prefix}/{k}": float(np.mean(v)) if len(v) else 0.0 for k, v in terms.items()}
    out[f"{prefix}/total"] = float(np.mean(total)) if len(total) else 0.0
    return out
