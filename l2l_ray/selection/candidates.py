"""Pseudo-label candidates: per-pixel evidence and region candidates for N (ref, sentence) pairs (no Ray).

    cand = build_candidates(teacher, teacher_flip, priors, size=128)   # uint8 (N,S,S) x2, list[Prior]
    cand.masks()        # bool (N, K, S, S): the K region candidates (index 0 = "reject", always empty)
    cand.features       # float32 (N, K, F): per-candidate features, names in FEATURE_NAMES
    cand.planes()       # float32 (N, C, S, S): per-pixel evidence, names in PLANE_NAMES

Only the teacher's predictions and the priors go in; there is no mask argument anywhere on this path,
so a hidden ground-truth mask of an unlabeled pair cannot reach a candidate.

Stored compactly (about 64 KiB per pair at S=128): the teacher probability (mean of the two views), the
view agreement and the soft proposal as uint8 planes, candidate masks as packed bits, box/points/score
as small float arrays. Derived planes (entropy, inside-box, point proximity) are computed on demand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from l2l_ray.masks import dequantize, pack_bits, quantize, unpack_bits
from l2l_ray.records import Prior

CANDIDATE_NAMES = ("reject", "teacher@0.3", "teacher@0.5", "teacher@0.7", "proposal", "intersection", "union",
                   "teacher_parts")
REJECT = 0
K = len(CANDIDATE_NAMES)
PLANE_NAMES = ("teacher", "entropy", "agreement", "proposal", "in_box", "point_proximity")
BASE_FEATURES = ("area", "iou_proposal", "mean_proposal_in", "mean_teacher_in", "mean_teacher_out",
                 "teacher_mass_recall", "mean_agreement_in", "mean_entropy_in", "box_fit", "share_in_box",
                 "points_inside", "prior_score", "prior_ok", "iou_teacher", "empty", "n_components")
FEATURE_NAMES = BASE_FEATURES + tuple(f"is_{n}" for n in CANDIDATE_NAMES)
PART_OVERLAP = 0.25  # "teacher_parts": teacher components with >= this share inside the proposal
# A proposal pixel is "on" above 0.5 plus half a uint8 step, so the uninformative 0.5 map (stored as 128/255)
# is all "off" rather than all "on".
PROPOSAL_T = 0.503
POINT_SIGMA = 0.1  # point proximity plane: exp(-d^2 / 2 sigma^2), d in image-normalised units
_CHUNK = 128


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool (N, H, W) -> uint8 (N, ceil(H*W/8)); also for N = 0 (masks.pack_bits cannot reshape an empty batch)."""
    if len(masks) == 0:
        return np.zeros((0, (masks.shape[-1] * masks.shape[-2] + 7) // 8), np.uint8)
    return pack_bits(masks)


def _rows(idx):
    return slice(None) if idx is None else idx


@dataclass
class CandidateBatch:
    """Candidates for N pairs at model resolution ``size``. One record per boundary (driver -> selectors)."""

    sent_ids: np.ndarray  # int64 (N,)
    ref_ids: np.ndarray  # int64 (N,)
    teacher: np.ndarray  # uint8 (N, S, S): p * 255, mean of the two views
    agreement: np.ndarray  # uint8 (N, S, S): (1 - |p_view1 - p_view2|) * 255
    proposal: np.ndarray  # uint8 (N, S, S): prior soft proposal * 255 (127/128 where there is no prior)
    boxes: np.ndarray  # float32 (N, 4) normalised xyxy, NaN where there is no box
    points: np.ndarray  # float32 (N, P, 2) normalised xy, NaN padded (P >= 1)
    prior_score: np.ndarray  # float32 (N,) prior confidence in [0, 1], 0 where there is no prior
    prior_ok: np.ndarray  # bool (N,)
    cand_bits: np.ndarray  # uint8 (N, K, ceil(S*S/8)) packed candidate masks
    features: np.ndarray  # float32 (N, K, F)
    size: int

    def __len__(self) -> int:
        return len(self.sent_ids)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    def slice(self, idx) -> CandidateBatch:
        """A sub-batch (``idx``: slice, int array or bool mask); arrays are views or copies of rows."""
        kw = {k: (v[idx] if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}
        return CandidateBatch(**kw)

    def split(self, n: int) -> list[CandidateBatch]:
        """``n`` contiguous slices (for pre-slicing per actor); concatenating them restores the order."""
        bounds = np.linspace(0, len(self), n + 1).astype(int)
        return [self.slice(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def masks(self, idx=None) -> np.ndarray:
        """bool (n, K, S, S) candidate masks of the selected rows."""
        bits = self.cand_bits[_rows(idx)]
        n = len(bits)
        flat = unpack_bits(bits.reshape(n * K, bits.shape[-1]), (self.size, self.size))
        return flat.reshape(n, K, self.size, self.size)

    def probs(self, idx=None) -> np.ndarray:
        """float32 (n, S, S) teacher foreground probability (mean of the two views)."""
        return dequantize(self.teacher[_rows(idx)])

    def planes(self, idx=None) -> np.ndarray:
        """float32 (n, C, S, S) evidence planes in [0, 1], channel order PLANE_NAMES."""
        idx = _rows(idx)
        p = dequantize(self.teacher[idx])
        return np.stack([p, binary_entropy(p), dequantize(self.agreement[idx]), dequantize(self.proposal[idx]),
                         box_planes(self.boxes[idx], self.size), point_planes(self.points[idx], self.size)], 1)


def concat_candidates(batches: Sequence[CandidateBatch]) -> CandidateBatch:
    """Concatenate candidate batches of the same size (points padded to the widest)."""
    size = {b.size for b in batches}
    if len(size) != 1:
        raise ValueError(f"cannot concatenate candidate batches of sizes {sorted(size)}")
    width = max(b.points.shape[1] for b in batches)
    pts = [np.pad(b.points, ((0, 0), (0, width - b.points.shape[1]), (0, 0)), constant_values=np.nan)
           for b in batches]
    kw = {k: np.concatenate([getattr(b, k) for b in batches]) for k, v in vars(batches[0]).items()
          if isinstance(v, np.ndarray) and k != "points"}
    return CandidateBatch(points=np.concatenate(pts), size=size.pop(), **kw)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy of Bernoulli(p) in bits (0 at p in {0,1}, 1 at p=0.5); same shape as ``p``."""
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return (-(q * np.log2(q) + (1 - q) * np.log2(1 - q))).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres, normalised
    return c[None, :], c[:, None]  # x (1, S), y (S, 1)


def box_planes(boxes: np.ndarray, size: int) -> np.ndarray:
    """float32 (n, S, S): 1 inside the prior box, 0 outside, 0.5 where there is no box."""
    x, y = _grid(size)
    b = np.nan_to_num(boxes, nan=0.0)[:, :, None, None]  # (n, 4, 1, 1)
    inside = (x >= b[:, 0]) & (x <= b[:, 2]) & (y >= b[:, 1]) & (y <= b[:, 3])
    return np.where(np.isnan(boxes[:, :1, None]), 0.5, inside).astype(np.float32)


def point_planes(points: np.ndarray, size: int) -> np.ndarray:
    """float32 (n, S, S): proximity exp(-d^2/2sigma^2) to the nearest prior point, 0.5 where there are none."""
    x, y = _grid(size)
    px, py = points[:, :, 0, None, None], points[:, :, 1, None, None]  # (n, P, 1, 1)
    d2 = np.nan_to_num((x - px) ** 2 + (y - py) ** 2, nan=np.inf).min(1)  # (n, S, S)
    prox = np.exp(-d2 / (2 * POINT_SIGMA**2))
    return np.where(np.isfinite(d2), prox, 0.5).astype(np.float32)


def _prior_arrays(priors: Sequence[Prior], size: int):
    n = len(priors)
    width = max([1] + [len(p.points) for p in priors if p.ok])
    boxes = np.full((n, 4), np.nan, np.float32)
    points = np.full((n, width, 2), np.nan, np.float32)
    proposal = np.empty((n, size, size), np.uint8)
    score, ok = np.zeros(n, np.float32), np.zeros(n, bool)
    for i, p in enumerate(priors):
        ok[i] = p.ok
        proposal[i] = quantize(p.soft_mask(size) if p.ok else np.full((size, size), 0.5, np.float32))
        if not p.ok:
            continue
        score[i] = float(np.clip(p.score, 0.0, 1.0))
        if p.box is not None:
            boxes[i] = np.clip(np.asarray(p.box, np.float32), 0.0, 1.0)
        if p.points:
            points[i, : len(p.points)] = np.clip(np.asarray(p.points, np.float32).reshape(-1, 2), 0.0, 1.0)
    return proposal, boxes, points, score, ok


def _teacher_parts(t05: np.ndarray, prop: np.ndarray) -> np.ndarray:
    """bool (S, S): the connected components of the teacher mask that lie mostly inside the proposal."""
    n, labels = cv2.connectedComponents(t05.astype(np.uint8), connectivity=8)
    if n <= 1 or not prop.any():
        return np.zeros_like(t05)
    area = np.bincount(labels.ravel(), minlength=n)
    inside = np.bincount(labels[prop], minlength=n)
    keep = inside / np.maximum(area, 1) >= PART_OVERLAP
    keep[0] = False
    return keep[labels]


def region_candidates(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """bool (n, K, S, S) from teacher probs ``p`` and proposal ``q`` (both float (n, S, S)); order CANDIDATE_NAMES."""
    t03, t05, t07, prop = p > 0.3, p > 0.5, p > 0.7, q > PROPOSAL_T
    parts = np.stack([_teacher_parts(a, b) for a, b in zip(t05, prop, strict=True)])
    empty = np.zeros_like(t05)
    return np.stack([empty, t03, t05, t07, prop, t05 & prop, t05 | prop, parts], 1)


def _bbox_fit(m: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of each candidate's bounding box with the prior box, (n, K); 0 for empty masks or no box."""
    s = m.shape[-1]
    rows, cols = m.any(3), m.any(2)  # (n, K, S)
    y1, x1 = rows.argmax(2), cols.argmax(2)
    y2, x2 = s - rows[..., ::-1].argmax(2), s - cols[..., ::-1].argmax(2)
    cb = np.stack([x1, y1, x2, y2], -1).astype(np.float32) / s  # (n, K, 4)
    pb = np.nan_to_num(boxes)[:, None]  # (n, 1, 4)
    iw = np.clip(np.minimum(cb[..., 2], pb[..., 2]) - np.maximum(cb[..., 0], pb[..., 0]), 0, None)
    ih = np.clip(np.minimum(cb[..., 3], pb[..., 3]) - np.maximum(cb[..., 1], pb[..., 1]), 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    union = area(cb) + area(pb) - iw * ih
    fit = np.where(union > 0, iw * ih / np.maximum(union, 1e-9), 0.0)
    return np.where(rows.any(2) & ~np.isnan(boxes[:, None, 0]), fit, 0.0)


def _points_inside(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Share of the prior points that fall inside each candidate, (n, K); 0 without points."""
    s = m.shape[-1]
    valid = ~np.isnan(points[..., 0])  # (n, P)
    idx = np.clip((np.nan_to_num(points) * s).astype(int), 0, s - 1)
    rows = np.arange(len(m))[:, None]
    hits = m[rows, :, idx[..., 1], idx[..., 0]]  # (n, P, K)
    return (hits * valid[..., None]).sum(1) / np.maximum(valid.sum(1, keepdims=True), 1)


def candidate_features(m, p, agree, q, boxes, points, score, ok) -> np.ndarray:
    """float32 (n, K, F) features of candidate masks ``m`` (bool (n, K, S, S)); columns FEATURE_NAMES."""
    n, k, s, _ = m.shape
    mf = m.reshape(n, k, s * s).astype(np.float32)
    count = mf.sum(2)  # (n, K)
    inbox = (box_planes(boxes, s) == 1.0).astype(np.float32)
    prop, t05 = (q > PROPOSAL_T).astype(np.float32), (p > 0.5).astype(np.float32)
    planes = np.stack([p, q, agree, binary_entropy(p), inbox, prop, t05], -1).reshape(n, s * s, 7)
    sums = mf @ planes  # (n, K, 7): sums of each plane inside each candidate (one batched matmul)
    mean_in = sums / np.maximum(count, 1)[..., None]
    total_p = p.reshape(n, -1).sum(1)[:, None]

    def iou_with(col: int, ref: np.ndarray) -> np.ndarray:  # inter = sum of ref inside; union = |m| + |ref| - inter
        union = count + ref.reshape(n, -1).sum(1)[:, None] - sums[..., col]
        return np.where(union > 0, sums[..., col] / np.maximum(union, 1), 0.0)

    ncomp = np.array([[cv2.connectedComponents(mm.astype(np.uint8))[0] - 1 for mm in row] for row in m])
    cols = [count / (s * s), iou_with(5, prop), mean_in[..., 1], mean_in[..., 0],
            (total_p - sums[..., 0]) / np.maximum(s * s - count, 1), sums[..., 0] / np.maximum(total_p, 1e-6),
            mean_in[..., 2], mean_in[..., 3], _bbox_fit(m, boxes), mean_in[..., 4], _points_inside(m, points),
            np.repeat(score[:, None], k, 1), np.repeat(ok[:, None].astype(np.float32), k, 1),
            iou_with(6, t05), (count == 0).astype(np.float32), np.minimum(ncomp, 5) / 5.0]
    base = np.stack(cols, -1).astype(np.float32)  # (n, K, len(BASE_FEATURES))
    onehot = np.broadcast_to(np.eye(k, dtype=np.float32), (n, k, k))
    return np.concatenate([base, onehot], -1)


def _check_inputs(teacher, teacher_flip, priors, size, sent_ids, ref_ids):
    if teacher.dtype != np.uint8 or teacher.ndim != 3 or teacher.shape[1:] != (size, size):
        raise ValueError(f"teacher must be uint8 (N, {size}, {size}) = p*255, got {teacher.dtype} {teacher.shape}")
    if teacher_flip is not None and teacher_flip.shape != teacher.shape:
        raise ValueError(f"teacher_flip shape {teacher_flip.shape} != teacher shape {teacher.shape}")
    if len(priors) != len(teacher):
        raise ValueError(f"{len(priors)} priors for {len(teacher)} teacher predictions: one Prior per pair")
    for name, ids, attr in (("sent_ids", sent_ids, "sent_id"), ("ref_ids", ref_ids, "ref_id")):
        if ids is not None:
            bad = [i for i, (a, p) in enumerate(zip(ids, priors, strict=True)) if int(a) != getattr(p, attr)]
            if bad:
                raise ValueError(f"{name}[{bad[0]}]={ids[bad[0]]} but its Prior has {attr}="
                                 f"{getattr(priors[bad[0]], attr)}: priors must be in the order of the pairs")


def build_candidates(teacher: np.ndarray, teacher_flip: np.ndarray | None, priors: Sequence[Prior], size: int,
                     sent_ids=None, ref_ids=None) -> CandidateBatch:
    """Evidence planes and region candidates for N pairs.

    teacher, teacher_flip: uint8 (N, S, S) = p*255 for the plain view and the horizontally flipped view
    (already flipped back); ``teacher_flip=None`` means a single view (agreement = 1 everywhere).
    priors: one ``Prior`` per pair, same order (ids are taken from them; ``sent_ids``/``ref_ids`` if
    given are checked against them). A no-prior record gives the uninformative 0.5 proposal.
    """
    _check_inputs(teacher, teacher_flip, priors, size, sent_ids, ref_ids)
    n = len(teacher)
    p1 = dequantize(teacher)
    p2 = dequantize(teacher_flip) if teacher_flip is not None else p1
    p = quantize((p1 + p2) / 2)
    agree = quantize(1.0 - np.abs(p1 - p2))
    proposal, boxes, points, score, ok = _prior_arrays(priors, size)
    nbits = (size * size + 7) // 8
    bits = np.empty((n, K, nbits), np.uint8)
    feats = np.empty((n, K, len(FEATURE_NAMES)), np.float32)
    for a in range(0, n, _CHUNK):
        sl = slice(a, min(a + _CHUNK, n))
        pc, qc = dequantize(p[sl]), dequantize(proposal[sl])
        m = region_candidates(pc, qc)  # (c, K, S, S)
        bits[sl] = pack_bits(m.reshape(-1, size, size)).reshape(len(m), K, nbits)
        feats[sl] = candidate_features(m, pc, dequantize(agree[sl]), qc, boxes[sl], points[sl], score[sl], ok[sl])
    return CandidateBatch(np.array([q.sent_id for q in priors], np.int64), np.array([q.ref_id for q in priors],
                          np.int64), p, agree, proposal, boxes, points, score, ok, bits, feats, size)
