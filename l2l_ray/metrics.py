"""The field's RES metrics (LAVT / SemiRES protocol).

Per (ref, sentence) pair: I = |pred & gt|, U = |pred | gt|.
mIoU = mean of I/U, oIoU = sum I / sum U, prec@X = share of pairs with IoU >= X, X in 0.5..0.9.
A pair with an empty union (empty prediction *and* empty truth) counts as IoU 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """I and U of two boolean masks of the same shape (H, W)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {gt.shape}")
    pred, gt = pred.astype(bool), gt.astype(bool)
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def batch_intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample I and U of boolean masks (N, H, W) -> two int64 arrays (N,)."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    inter = np.logical_and(pred, gt).reshape(len(pred), -1).sum(1)
    union = np.logical_or(pred, gt).reshape(len(pred), -1).sum(1)
    return inter.astype(np.int64), union.astype(np.int64)


@dataclass
class IoUAccumulator:
    """Accumulates I and U per pair; ``summary()`` gives mIoU, oIoU and prec@X."""

    inters: list[int] = field(default_factory=list)
    unions: list[int] = field(default_factory=list)

    def add(self, inter: int, union: int) -> None:
        self.inters.append(int(inter))
        self.unions.append(int(union))

    def add_batch(self, pred: np.ndarray, gt: np.ndarray) -> None:
        i, u = batch_intersection_union(pred, gt)
        self.inters.extend(i.tolist())
        self.unions.extend(u.tolist())

    def summary(self) -> dict[str, float]:
        return summarize(np.asarray(self.inters, np.int64), np.asarray(self.unions, np.int64))


def summarize(inters: np.ndarray, unions: np.ndarray) -> dict[str, float]:
    """Metrics of per-pair I and U arrays (N,). Empty input gives zeros and n=0."""
    n = len(inters)
    if n == 0:
        return {"mIoU": 0.0, "oIoU": 0.0, **{f"prec@{t}": 0.0 for t in PREC_THRESHOLDS}, "n": 0}
    ious = np.where(unions > 0, inters / np.maximum(unions, 1), 1.0)
    out = {
        "mIoU": float(ious.mean()),
        "oIoU": float(inters.sum() / unions.sum()) if unions.sum() > 0 else 1.0,
    }
    for t in PREC_THRESHOLDS:
        out[f"prec@{t}"] = float((ious >= t).mean())
    out["n"] = int(n)
    return out


SIZE_TERCILES = ("small", "medium", "large")


def size_terciles(inters: np.ndarray, unions: np.ndarray, areas: np.ndarray) -> dict[str, float]:
    """mIoU per referent-size tercile of a split: ``areas`` (N,) = the true mask's share of the image.

    Returns {"mIoU_small", "mIoU_medium", "mIoU_large", "area_tercile_1", "area_tercile_2"} (the two area cuts);
    a tercile is the thirds of the split's pairs sorted by area. Empty input gives {}.
    """
    if len(areas) == 0:
        return {}
    cuts = np.quantile(areas, [1 / 3, 2 / 3])
    which = np.searchsorted(cuts, areas, side="right")  # 0 small, 1 medium, 2 large
    ious = np.where(unions > 0, inters / np.maximum(unions, 1), 1.0)
    out = {f"mIoU_{name}": float(ious[which == k].mean()) if (which == k).any() else 0.0
           for k, name in enumerate(SIZE_TERCILES)}
    out.update(area_tercile_1=float(cuts[0]), area_tercile_2=float(cuts[1]))
    return out
