"""Hand-crafted pseudo-label selection rules on the same candidates (no Ray, no torch).

    pl = RULES["semires"](cand, cfg.semi)     # -> PseudoLabelBatch of the pairs kept

- ``mean_teacher``: fixed confidence threshold t on the teacher, no priors: label p > 0.5, pixels with
  p > t or p < 1 - t trusted (weight 1), the band in between ignored.
- ``semires``: SemiRES (IOM + PWA, ``nini0919/SemiRES`` train_semi_IOM.py): if IoU(teacher mask, proposal)
  > 0.5 the proposal is the label (weight 1 everywhere); otherwise the teacher mask with the PWA
  weight w = 1.3 - N(p; 0.5, var=0.1). SemiRES matches against all SAM masks of the image; this project
  has one soft proposal per sentence (from the priors) instead of SAM, so the match is against that.
- ``fixed_rule``: the no-RL L2L ablation: label = teacher AND proposal; the pixels where teacher and
  proposal agree (both foreground or both background) are trusted, the rest ignored; a pair whose
  intersection is empty is rejected. Without a prior the pair falls back to the mean-teacher band.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from l2l_ray.records import PseudoLabelBatch
from l2l_ray.selection.candidates import PROPOSAL_T, CandidateBatch, pack_masks
from l2l_ray.selection.rewards import iou

RULES: dict[str, Callable[[CandidateBatch, object], PseudoLabelBatch]] = {}
_CHUNK = 256


def register(name: str):
    """``@register("semires")`` on a rule ``(CandidateBatch, SemiConfig) -> PseudoLabelBatch``."""

    def deco(fn):
        RULES[name] = fn
        return fn

    return deco


def pwa_weight(p: np.ndarray, var: float = 0.1) -> np.ndarray:
    """SemiRES PWA per-pixel weight 1.3 - N(p; 0.5, var), float32, same shape as ``p``.

    SemiRES's ``bce_weight`` names the parameter ``sigma1 = 0.1`` but uses it as a variance
    (``1/(sqrt(2pi)*sqrt(sigma1)) * exp(-(p-0.5)^2 / (2*sigma1))``): w(0.5) = 0.038, w(0) = w(1) = 0.939.
    Read as sigma = 0.1 the weights would be negative (w(0.5) = -2.69); we follow the code.
    """
    dens = np.exp(-((p - 0.5) ** 2) / (2 * var)) / (math.sqrt(2 * math.pi) * math.sqrt(var))
    return (1.3 - dens).astype(np.float32)


def selection_stats(trusted: np.ndarray, keep: np.ndarray, kept_weights: np.ndarray, method: str,
                    **extra) -> dict:
    """Per-round stats from trusted (N,) share of each pair's pixels with weight > 0 (0 for rejected pairs),
    keep bool (N,) and the kept pairs' uint8 weights: reject share, trusted share over all pairs' pixels."""
    n = len(keep)
    stats = {"method": method, "n_pairs": int(n), "n_kept": int(keep.sum()),
             "reject_share": float(1 - keep.mean()) if n else 0.0,
             "trusted_share": float(trusted.mean()) if n else 0.0,
             "weight_mean_trusted": float(kept_weights[kept_weights > 0].mean() / 255) if kept_weights.any() else 0.0}
    stats.update(extra)
    return stats


def _apply(cand: CandidateBatch, fn, method: str) -> PseudoLabelBatch:
    """Run ``fn(cand_chunk) -> (labels bool, weights float, keep bool, extra: dict of (n,) arrays)`` in chunks."""
    bits, weights, keep, trusted, extras = [], [], [], [], {}
    for a in range(0, len(cand), _CHUNK):
        lab, w, k, extra = fn(cand.slice(slice(a, a + _CHUNK)))
        w8 = np.clip(np.rint(np.where(k[:, None, None], w, 0.0) * 255), 0, 255).astype(np.uint8)
        k = k & (w8 > 0).any((1, 2))
        trusted.append((w8 > 0).mean((1, 2)))
        keep.append(k)
        bits.append(pack_masks(lab[k]))
        weights.append(w8[k])
        for key, v in extra.items():
            extras.setdefault(key, []).append(v)
    s, nbits = cand.size, (cand.size * cand.size + 7) // 8
    keep = np.concatenate(keep) if keep else np.zeros(0, bool)
    w8 = np.concatenate(weights) if weights else np.zeros((0, s, s), np.uint8)
    stats = selection_stats(np.concatenate(trusted) if trusted else np.zeros(0), keep, w8, method,
                            **{k: float(np.concatenate(v).mean()) for k, v in extras.items()})
    labels = np.concatenate(bits) if bits else np.zeros((0, nbits), np.uint8)
    return PseudoLabelBatch(cand.sent_ids[keep], cand.ref_ids[keep], labels, w8, s, stats)


def _band(p: np.ndarray, t: float) -> np.ndarray:
    return ((p > t) | (p < 1 - t)).astype(np.float32)


@register("mean_teacher")
def mean_teacher(cand: CandidateBatch, semi) -> PseudoLabelBatch:
    """Fixed confidence threshold ``semi.threshold`` on the teacher; no priors."""

    def fn(c):
        p = c.probs()
        return p > 0.5, _band(p, semi.threshold), np.ones(len(c), bool), {}

    return _apply(cand, fn, "mean_teacher")


@register("semires")
def semires(cand: CandidateBatch, semi) -> PseudoLabelBatch:
    """SemiRES IOM (proposal when IoU > semi.semires_iou) else teacher mask with PWA weights."""

    def fn(c):
        p = c.probs()
        teacher, prop = p > 0.5, c.proposal.astype(np.float32) / 255.0 > PROPOSAL_T
        matched = (iou(teacher, prop) > semi.semires_iou) & c.prior_ok
        lab = np.where(matched[:, None, None], prop, teacher)
        w = np.where(matched[:, None, None], 1.0, pwa_weight(p, semi.semires_pwa_var))
        return lab, w, np.ones(len(c), bool), {"matched_share": matched.astype(np.float32)}

    return _apply(cand, fn, "semires")


@register("fixed_rule")
def fixed_rule(cand: CandidateBatch, semi) -> PseudoLabelBatch:
    """No-RL ablation: teacher AND proposal as label, agreement region trusted, empty intersection rejected."""

    def fn(c):
        p = c.probs()
        teacher, prop = p > 0.5, c.proposal.astype(np.float32) / 255.0 > PROPOSAL_T
        ok = c.prior_ok[:, None, None]
        lab = np.where(ok, teacher & prop, teacher)
        w = np.where(ok, (teacher == prop).astype(np.float32), _band(p, semi.threshold))
        keep = ~c.prior_ok | (teacher & prop).any((1, 2))
        return lab, w, keep, {}

    return _apply(cand, fn, "fixed_rule")
