"""Soft segmentation proposals from a prior's box and points (pure numpy / OpenCV, no Ray).

Every backend (lexical, hf, openai, vllm) turns its box and points into a soft mask over the whole
(square-resized) image with ``soft_proposal``:

    soft = soft_proposal(image, box=(0.1, 0.2, 0.5, 0.7), points=[(0.3, 0.45)], size=64, params=params)
    soft.shape, soft.dtype  # (64, 64), uint8; 255 = surely the referred object, 128 = no idea

Methods (``priors.proposal_method``):
- ``box``: a smooth box prior only: ~1 well inside the box, 0.5 on its edge, falling off outside.
- ``grabcut`` (default): box-initialised GrabCut on a window around the box, at most ``work_size`` px
  a side (the box interior is "probably foreground", a margin around it "probably background", the
  rest background, points are sure foreground), blended with the smooth box prior, so the mask follows
  colour edges inside the box while the box still dominates where GrabCut is unsure. Measured with
  ``bench/prior_quality.py`` on the synthetic set (400 images, proposals from the *true* boxes):
  mIoU 0.77 for GrabCut vs 0.61 for the box alone, at ~1-7 ms vs ~0.1-0.4 ms per proposal (one core).
  Deterministic: OpenCV's RNG is re-seeded before every GrabCut call.

A ``None`` box with no points is *not* an error: the result is the uninformative map (128 everywhere),
the same value consumers use for a missing prior. Points without a box make a box of
``point_radius`` around them. Inverted boxes are reordered, boxes are clipped to the image, a box
thinner than one output pixel counts as a point at its centre, and NaN coordinates count as no box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from l2l_ray.config import ConfigError, PriorsConfig

PROPOSAL_METHODS = ("grabcut", "box")
UNINFORMATIVE = 128  # uint8 value of p = 0.5


@dataclass(frozen=True)
class ProposalParams:
    """Soft-proposal parameters (the ``priors.proposal_*`` config fields)."""

    method: str = "grabcut"  # grabcut | box
    grabcut_iters: int = 1  # GrabCut EM iterations (2-3 measured no better on the synthetic set)
    work_size: int = 48  # GrabCut's window around the box is downscaled to at most this many px a side
    blend: float = 0.6  # weight of GrabCut's mask vs the smooth box prior (0 = box only)
    softness: float = 0.08  # box prior edge falloff, as a fraction of the box side
    margin: float = 0.1  # "probably background" band around the box, fraction of the box side
    point_radius: float = 0.04  # normalised radius of sure-foreground point seeds / point-only boxes
    point_boost: float = 0.5  # how far a point pulls its neighbourhood towards 1

    def __post_init__(self) -> None:
        if self.method not in PROPOSAL_METHODS:
            raise ConfigError(f"priors.proposal_method={self.method!r}: choose one of {', '.join(PROPOSAL_METHODS)}")
        if not 0.0 <= self.blend <= 1.0:
            raise ConfigError(f"priors.proposal_blend={self.blend}: must be in [0, 1]")
        if self.work_size < 16 or self.grabcut_iters < 1:
            raise ConfigError("priors.proposal_work_size must be >= 16 and priors.proposal_grabcut_iters >= 1")
        if self.softness <= 0 or self.margin < 0 or self.point_radius <= 0:
            raise ConfigError("priors.proposal_softness and proposal_point_radius must be > 0, proposal_margin >= 0")

    @classmethod
    def from_config(cls, cfg: PriorsConfig) -> ProposalParams:
        return cls(method=cfg.proposal_method, grabcut_iters=cfg.proposal_grabcut_iters,
                   work_size=cfg.proposal_work_size, blend=cfg.proposal_blend, softness=cfg.proposal_softness,
                   margin=cfg.proposal_margin, point_radius=cfg.proposal_point_radius,
                   point_boost=cfg.proposal_point_boost)


def clean_box(box: Sequence[float] | None) -> tuple[float, float, float, float] | None:
    """Normalised xyxy -> reordered, clipped to [0, 1]; None for None / NaN / wrong length."""
    if box is None or len(box) != 4:
        return None
    b = np.asarray(box, np.float64)
    if not np.all(np.isfinite(b)):
        return None
    x1, x2 = sorted((float(b[0]), float(b[2])))
    y1, y2 = sorted((float(b[1]), float(b[3])))
    return (min(max(x1, 0.0), 1.0), min(max(y1, 0.0), 1.0), min(max(x2, 0.0), 1.0), min(max(y2, 0.0), 1.0))


def _points_box(points: Sequence[tuple[float, float]], r: float) -> tuple[float, float, float, float] | None:
    pts = np.asarray([p for p in points if len(p) == 2 and np.all(np.isfinite(p))], np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return None
    lo, hi = pts.min(0) - 2 * r, pts.max(0) + 2 * r
    return clean_box((lo[0], lo[1], hi[0], hi[1]))


def _widen(box: tuple[float, float, float, float], min_side: float) -> tuple[float, float, float, float]:
    """Widen a box to at least ``min_side`` per axis around its centre (kept inside [0, 1])."""
    x1, y1, x2, y2 = box
    out = []
    for a, b in ((x1, x2), (y1, y2)):
        if b - a < min_side:
            c = min(max((a + b) / 2, min_side / 2), 1 - min_side / 2)
            a, b = c - min_side / 2, c + min_side / 2
        out.append((a, b))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def box_prior(box: tuple[float, float, float, float], size: int, softness: float) -> np.ndarray:
    """Smooth box prior, float32 (size, size): product of two logistic ramps per axis, 0.5 on the edges."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in [0, 1]
    axes = []
    for lo, hi in ((box[0], box[2]), (box[1], box[3])):
        t = max(softness * (hi - lo), 0.5 / size)  # falloff never sharper than half a pixel
        inside = np.minimum(coords - lo, hi - coords) / t  # > 0 inside, < 0 outside
        axes.append(1.0 / (1.0 + np.exp(-np.clip(inside, -30, 30))))
    return (axes[1][:, None] * axes[0][None, :]).astype(np.float32)  # (size, size): rows = y


def grabcut_window(image: np.ndarray, box: tuple[float, float, float, float],
                   points: Sequence[tuple[float, float]], params: ProposalParams):
    """Box-initialised GrabCut on a window around the box.

    The window is the box, a "probably background" band of ``margin`` box sides around it and as much
    context again (sure background), cut from the full image and downscaled so its longer side is at
    most ``work_size`` px: the cost is bounded whatever the image or box size.
    Returns (float32 (h, w) in {0, 1}, window (x1, y1, x2, y2) normalised) or None if it cannot run.
    """
    H, W = image.shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    mx, my = params.margin * bw + 1.0 / W, params.margin * bh + 1.0 / H  # band widths, normalised
    win = (max(box[0] - 2 * mx, 0.0), max(box[1] - 2 * my, 0.0), min(box[2] + 2 * mx, 1.0), min(box[3] + 2 * my, 1.0))
    px1, py1 = int(np.floor(win[0] * W)), int(np.floor(win[1] * H))
    px2, py2 = max(int(np.ceil(win[2] * W)), px1 + 2), max(int(np.ceil(win[3] * H)), py1 + 2)
    crop = image[py1:py2, px1:px2]
    scale = min(1.0, params.work_size / max(crop.shape[:2]))
    w, h = max(2, int(round(crop.shape[1] * scale))), max(2, int(round(crop.shape[0] * scale)))
    if (w, h) != (crop.shape[1], crop.shape[0]):
        crop = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
    win = (px1 / W, py1 / H, px2 / W, py2 / H)  # the window actually cut, normalised

    def to_win(x: float, y: float) -> tuple[int, int]:  # normalised -> window pixel
        return (int(round((x - win[0]) / (win[2] - win[0]) * w)), int(round((y - win[1]) / (win[3] - win[1]) * h)))

    mask = np.full((h, w), cv2.GC_BGD, np.uint8)
    (ax, ay), (bx, by) = to_win(box[0] - mx, box[1] - my), to_win(box[2] + mx, box[3] + my)
    mask[max(ay, 0):by, max(ax, 0):bx] = cv2.GC_PR_BGD
    (ax, ay), (bx, by) = to_win(box[0], box[1]), to_win(box[2], box[3])
    mask[ay:max(by, ay + 1), ax:max(bx, ax + 1)] = cv2.GC_PR_FGD
    if not (mask != cv2.GC_PR_FGD).any():  # the box is the whole image: keep a 1-px border as background
        mask[[0, -1], :] = cv2.GC_PR_BGD
        mask[:, [0, -1]] = cv2.GC_PR_BGD
    rad = max(1, int(round(params.point_radius * max(w, h) * 0.5)))
    for px, py in points:
        cv2.circle(mask, to_win(px, py), rad, cv2.GC_FGD, -1)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's k-means init draws from OpenCV's thread RNG: same input -> same mask
    try:
        cv2.grabCut(np.ascontiguousarray(crop), mask, None, bgd, fgd, params.grabcut_iters, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # e.g. a flat window where a colour model cannot be fitted
        return None
    return ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.float32), win


def _paste(cut: np.ndarray, win: tuple[float, float, float, float], size: int) -> np.ndarray:
    """A window mask (h, w) -> float32 (size, size) over the whole image, 0 outside the window."""
    out = np.zeros((size, size), np.float32)
    x1, y1 = int(round(win[0] * size)), int(round(win[1] * size))
    x2, y2 = max(int(round(win[2] * size)), x1 + 1), max(int(round(win[3] * size)), y1 + 1)
    out[y1:y2, x1:x2] = cv2.resize(cut, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    return out


def _point_map(points: Sequence[tuple[float, float]], size: int, radius: float) -> np.ndarray:
    """max over points of a Gaussian bump (sigma = radius), float32 (size, size) in [0, 1]."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    out = np.zeros((size, size), np.float32)
    for px, py in points:
        if np.isfinite(px) and np.isfinite(py):
            g = np.exp(-((coords[None, :] - px) ** 2 + (coords[:, None] - py) ** 2) / (2 * radius**2))
            out = np.maximum(out, g)
    return out


def soft_proposal(image: np.ndarray, box: Sequence[float] | None, points: Sequence[tuple[float, float]] = (),
                  size: int = 64, params: ProposalParams | None = None) -> np.ndarray:
    """A soft mask of the referred object over the whole image.

    image: uint8 (H, W, 3) RGB. box: normalised (x1, y1, x2, y2) or None. points: normalised (x, y).
    Returns uint8 (size, size), 255 = 1.0; 128 everywhere when there is neither a box nor a point.
    """
    params = params or ProposalParams()
    points = [(min(max(float(p[0]), 0.0), 1.0), min(max(float(p[1]), 0.0), 1.0))
              for p in points if len(p) == 2 and np.all(np.isfinite(np.asarray(p, np.float64)))]
    box = clean_box(box)
    if box is not None and min(box[2] - box[0], box[3] - box[1]) < 1.0 / size:  # a line or a dot: a point
        points.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
        box = None
    box = box or _points_box(points, params.point_radius)
    if box is None:
        return np.full((size, size), UNINFORMATIVE, np.uint8)
    box = _widen(box, 2.0 / size)  # at least 2 output px, so the box shows
    soft = box_prior(box, size, params.softness)
    if params.method == "grabcut" and params.blend > 0 and image is not None and image.ndim == 3:
        got = grabcut_window(image, box, points, params)
        if got is not None:
            soft = params.blend * _paste(*got, size) + (1.0 - params.blend) * soft
    if points and params.point_boost > 0:
        soft = soft + (1.0 - soft) * params.point_boost * _point_map(points, size, params.point_radius)
    return np.clip(np.rint(soft * 255.0), 0, 255).astype(np.uint8)
