"""Rewards for pseudo-label selection: pure functions of arrays (no Ray, no torch).

Pair-level terms (one value per pair, unweighted; the total is the weighted sum, weights from cfg.semi):
- ``prior``: agreement with the multimodal prior, conf * IoU(label, proposal > 0.5), conf = prior score.
- ``consistency``: IoU(label, model prediction after the update > 0.5).
- ``credit``: how much training on the pair's trusted labels lowers the loss on the held-out LABELED slice,
  to first order at the segmenter's logit head (TracIn-style gradient alignment; ``credit_map``): mean over the
  trusted pixels of clip((p - label) * a, -3, 3), ``a`` the alignment map of ``Feedback.align``. It differs
  from pair to pair and pixel to pixel in every round (the old round-level "progress" scalar, credited by
  trusted share minus the round mean, cancelled out when every pixel was trusted).
- ``truth``: IoU(label, TRUE mask), only for held-out LABELED pairs run through the unlabeled pipeline
  (``HeldOutTruth`` can only be built from ``LabeledSample`` or from masks the driver labels as labeled).
A rejected pair is paid ``reject_iou`` in every IoU term (and trusts nothing).

Pixel-level reward (for the per-pixel trust head): trusting a pixel is paid
``w_truth*(+1 right / -wrong_pixel wrong) + w_prior*conf*(1-2|label-q|) + w_cons*(1-2|label-post|)
+ w_credit*clip((post-label)*align, -3, 3)``; ignoring a pixel is paid 0.
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
    credit: float = 1.0
    wrong_pixel: float = 3.0
    reject_iou: float = 0.3

    @classmethod
    def from_config(cls, semi) -> RewardWeights:
        """From a ``SemiConfig`` (cfg.semi)."""
        return cls(semi.reward_truth, semi.reward_prior, semi.reward_consistency, semi.reward_credit,
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
    next round's teacher prediction serves); None = no consistency term. align: float16 (N, S, S), the
    alignment of each pixel's logit-head features with the held-out labeled loss gradient, unit RMS over the
    round (``l2l_ray.train.credit``); needs post_probs; None = no credit term. truth: only for held-out
    LABELED pairs.
    """

    sent_ids: np.ndarray
    post_probs: np.ndarray | None = None
    align: np.ndarray | None = None
    truth: HeldOutTruth | None = None

    def __post_init__(self):
        self.sent_ids = np.asarray(self.sent_ids, np.int64)
        if self.truth is not None and not np.array_equal(self.truth.sent_ids, self.sent_ids):
            raise ValueError("Feedback.truth.sent_ids must equal Feedback.sent_ids (same pairs, same order)")
        for name in ("post_probs", "align"):
            v = getattr(self, name)
            if v is not None and len(v) != len(self.sent_ids):
                raise ValueError(f"{name} has {len(v)} rows for {len(self.sent_ids)} sent_ids")
        if self.align is not None and self.post_probs is None:
            raise ValueError("Feedback.align needs post_probs (the credit of a label is (p - label) * align)")

    def slice(self, idx) -> Feedback:
        row = lambda v: None if v is None else v[idx]  # noqa: E731
        return Feedback(self.sent_ids[idx], row(self.post_probs), row(self.align),
                        None if self.truth is None else self.truth.slice(idx))


def iou(a: np.ndarray, b: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """IoU of bool masks (N, S, S) x (N, S, S) -> float32 (N,); ``empty`` where both masks are empty."""
    inter = (a & b).sum((1, 2))
    union = (a | b).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), empty).astype(np.float32)


CREDIT_CLIP = 3.0


def credit_map(labels: np.ndarray, post_probs: np.ndarray, align: np.ndarray) -> np.ndarray:
    """float32 (N, S, S): per-pixel credit clip((p - label) * align, -3, 3) of training on ``labels``.

    One gradient step on a pixel with label y moves the logit head's weights by -lr * (p - y) * f (BCE);
    the held-out labeled loss then changes by -lr * (p - y) * (f . g_H). ``align`` = f . g_H / RMS, so a
    positive credit means that label, trained on, lowers the held-out loss; a label the model already
    predicts (p = y) earns 0. labels bool (N,S,S); post_probs float (N,S,S) in [0, 1]; align float (N,S,S).
    """
    c = (post_probs.astype(np.float32) - labels.astype(np.float32)) * align.astype(np.float32)
    return np.clip(c, -CREDIT_CLIP, CREDIT_CLIP)


def pair_reward_terms(labels: np.ndarray, rejected: np.ndarray, trust: np.ndarray | None, proposal: np.ndarray,
                      prior_score: np.ndarray, post_probs: np.ndarray | None = None,
                      truth: np.ndarray | None = None, align: np.ndarray | None = None,
                      reject_iou: float = 0.3) -> dict[str, np.ndarray]:
    """Unweighted per-pair reward terms, each float32 (N,).

    labels bool (N,S,S) chosen labels; rejected bool (N,); trust bool (N,S,S) trusted pixels (None = all);
    proposal float (N,S,S) soft proposal; prior_score (N,) in [0,1] (0 = no prior); post_probs float
    (N,S,S) or None; truth bool (N,S,S) or None (held-out labeled pairs only); align float (N,S,S) or None
    (with post_probs: the ``credit`` term, mean credit over the trusted pixels, 0 for a rejected pair).
    """
    def paid(v):  # a rejected pair is paid reject_iou in every IoU term
        return np.where(rejected, reject_iou, v).astype(np.float32)

    terms = {"prior": prior_score * paid(iou(labels, proposal > PROPOSAL_T))}
    if post_probs is not None:
        terms["consistency"] = paid(iou(labels, post_probs > 0.5))
    if truth is not None:
        terms["truth"] = paid(iou(labels, truth))
    if align is not None and post_probs is not None:
        t = np.ones_like(labels, dtype=bool) if trust is None else trust
        c = (credit_map(labels, post_probs, align) * t).sum((1, 2)) / np.maximum(t.sum((1, 2)), 1)
        terms["credit"] = np.where(rejected, 0.0, c)
    return {k: v.astype(np.float32) for k, v in terms.items()}


def total_reward(terms: dict[str, np.ndarray], w: RewardWeights) -> np.ndarray:
    """Weighted sum of the available terms, float32 (N,)."""
    scale = {"prior": w.prior, "consistency": w.consistency, "truth": w.truth, "credit": w.credit}
    out = np.zeros(len(next(iter(terms.values()))) if terms else 0, np.float32)
    for k, v in terms.items():
        out += scale[k] * v
    return out


def pixel_trust_reward(labels: np.ndarray, proposal: np.ndarray, prior_score: np.ndarray, w: RewardWeights,
                       post_probs: np.ndarray | None = None, truth: np.ndarray | None = None,
                       align: np.ndarray | None = None) -> np.ndarray:
    """float32 (n, S, S): the reward of trusting each pixel with its label (ignoring it is paid 0).

    labels bool (n,S,S); proposal float (n,S,S); prior_score (n,); post_probs float or None; truth bool or
    None (held-out labeled pairs only); align float (n,S,S) or None (credit term, needs post_probs).
    """
    lab = labels.astype(np.float32)
    r = w.prior * prior_score[:, None, None] * (1.0 - 2.0 * np.abs(lab - proposal))
    if post_probs is not None:
        r += w.consistency * (1.0 - 2.0 * np.abs(lab - post_probs))
    if truth is not None:
        r += w.truth * np.where(labels == truth, 1.0, -w.wrong_pixel)
    if align is not None and post_probs is not None:
        r += w.credit * credit_map(labels, post_probs, align)
    return r.astype(np.float32)


def feedback_arrays(fb: Feedback) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(post_probs float (N,S,S) or None, truth bool (N,S,S) or None, align float32 (N,S,S) or None)."""
    post = None if fb.post_probs is None else dequantize(fb.post_probs)
    truth = None if fb.truth is None else fb.truth.masks()
    align = None if fb.align is None else fb.align.astype(np.float32)
    return post, truth, align


def summarize_terms(terms: dict[str, np.ndarray], total: np.ndarray, prefix: str = "reward") -> dict[str, float]:
    """Means of every term and of the total, for per-round logs."""
    out = {f"{prefix}/{k}": float(np.mean(v)) if len(v) else 0.0 for k, v in terms.items()}
    if "credit" in terms:  # the spread is the point: a term that is the same for every pair carries no signal
        out[f"{prefix}/credit_std"] = float(np.std(terms["credit"])) if len(terms["credit"]) else 0.0
    out[f"{prefix}/total"] = float(np.mean(total)) if len(total) else 0.0
    return out
