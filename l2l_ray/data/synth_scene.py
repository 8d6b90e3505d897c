"""Scenes of the synthetic REFER set: object sampling, placement with occlusion, rendering, masks.

Pure numpy / cv2 / pycocotools, no Ray. Every object's full mask is *defined* as pycocotools'
rasterisation of its (rounded) polygon, so an annotation stored as that polygon decodes to exactly the
pixels the renderer painted. The visible mask is the full mask minus every object drawn above it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from l2l_ray.masks import encode_rle
from l2l_ray.vocab import CATEGORIES, COLOURS

# testA/testB analogue (RefCOCO: people vs other objects): referred objects of an image come from one
# family; testA images refer to "radial" shapes only, testB images to "angular" shapes only.
FAMILIES: dict[str, tuple[str, ...]] = {"radial": ("circle", "ring", "star"), "angular": ("square", "triangle", "bar")}
CATEGORY_NAMES: tuple[str, ...] = tuple(CATEGORIES)
MIN_VISIBLE_FRAC = 0.6  # an occluded object keeps at least this share of its pixels


@dataclass
class SceneObject:
    """One annotated object. Coordinates in pixels of the (size, size) image; masks bool (size, size)."""

    cat: str
    colour: str
    rgb: np.ndarray  # (3,) float32, jittered colour centre
    cx: float
    cy: float
    scale: float  # radius-like size in pixels
    polys: list[list[float]] = field(default_factory=list)  # rounded flat [x0, y0, x1, y1, ...]
    full: np.ndarray | None = None
    visible: np.ndarray | None = None

    @property
    def area(self) -> int:
        return int(self.full.sum())


def shape_polygons(cat: str, cx: float, cy: float, s: float, angle: float) -> list[list[float]]:
    """Outline polygon(s) of a shape, flat [x, y, ...] rounded to 0.01 px. ``ring`` gives [outer, inner]."""

    def ngon(radii: np.ndarray, start: float) -> list[float]:
        t = start + np.arange(len(radii)) * (2 * np.pi / len(radii))
        xy = np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1)  # (N, 2)
        return [round(v, 2) for v in xy.reshape(-1).tolist()]

    if cat == "circle":
        return [ngon(np.full(28, s), angle)]
    if cat == "ring":
        return [ngon(np.full(28, s), angle), ngon(np.full(24, s * 0.55), angle)]
    if cat == "square":
        return [ngon(np.full(4, s * 1.15), angle + np.pi / 4)]
    if cat == "triangle":
        return [ngon(np.full(3, s * 1.2), angle - np.pi / 2)]
    if cat == "star":
        return [ngon(np.tile([s * 1.2, s * 0.5], 5), angle - np.pi / 2)]
    if cat == "bar":
        half_l, half_w = s * 1.3, s * 0.38
        c, si = np.cos(angle), np.sin(angle)
        corners = np.array([[half_l, half_w], [-half_l, half_w], [-half_l, -half_w], [half_l, -half_w]])
        xy = corners @ np.array([[c, si], [-si, c]]) + [cx, cy]  # (4, 2) rotated
        return [[round(v, 2) for v in xy.reshape(-1).tolist()]]
    raise ValueError(f"unknown synthetic category {cat!r}; known: {CATEGORY_NAMES}")


def rasterize(cat: str, polys: list[list[float]], size: int) -> np.ndarray:
    """pycocotools rasterisation of the polygons -> bool (size, size); ring = outer minus inner."""
    m = mask_utils.decode(mask_utils.frPyObjects(polys, size, size)).astype(bool)  # (H, W, n_polys)
    if cat == "ring":
        return m[:, :, 0] & ~m[:, :, 1]
    return m.any(axis=2)


def segmentation(obj: SceneObject) -> dict | list:
    """COCO segmentation of the visible region: the polygon if nothing hides any of it, else compressed RLE."""
    if obj.cat != "ring" and np.array_equal(obj.visible, obj.full):
        return [list(p) for p in obj.polys]
    return encode_rle(obj.visible)


def _object_specs(rng: np.random.Generator, family: str, f: float) -> list[tuple[str, str, float]]:
    """(category, colour name, scale) per object: 1-2 referred categories with 2-3 instances, 1-3 others."""
    palette = list(rng.choice(list(COLOURS), size=int(rng.choice([3, 4], p=[0.6, 0.4])), replace=False))
    ref_cats = rng.choice(FAMILIES[family], size=int(rng.choice([1, 2], p=[0.5, 0.5])), replace=False)
    specs: list[tuple[str, str, float]] = []
    for cat in ref_cats:
        n = int(rng.choice([2, 3], p=[0.55, 0.45]))
        shared = rng.random() < 0.45  # all instances one colour: colour cannot tell them apart
        colours = [rng.choice(palette)] * n if shared else list(rng.choice(palette, size=n))
        if rng.random() < 0.4:  # one clearly bigger or smaller instance, so size words apply
            scales = list(rng.uniform(8, 11.5, size=n))
            scales[int(rng.integers(n))] = rng.uniform(18, 21.5)
            if rng.random() < 0.5:  # one small among big ones instead
                scales = [29.5 - s for s in scales]
        else:
            scales = list(rng.uniform(8, 20, size=n))
        specs += [(str(cat), str(c), float(s) * f) for c, s in zip(colours, scales, strict=True)]
    for _ in range(int(rng.integers(1, 4))):
        specs.append((str(rng.choice(CATEGORY_NAMES)), str(rng.choice(palette)), float(rng.uniform(8, 19)) * f))
    return specs


def _place(rng, cat: str, s: float, size: int, placed: list[SceneObject], occlusion: bool):
    """Try random poses until the new object (drawn on top) leaves every placed object enough visible pixels.

    Without occlusion the bounding circles must keep a gap (cheap test, no rasterising).
    """
    lo, hi = s + 1, size - s - 1
    anchor = placed[int(rng.integers(len(placed)))] if placed and occlusion and rng.random() < 0.6 else None
    for attempt in range(40):
        if anchor is not None and attempt < 10:  # overlap an existing object a little: occlusion
            th, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.7, 1.1) * (anchor.scale + s)
            cx, cy = np.clip([anchor.cx + d * np.cos(th), anchor.cy + d * np.sin(th)], lo, hi)
        else:
            cx, cy = rng.uniform(lo, hi, size=2)
        near = [o for o in placed if np.hypot(o.cx - cx, o.cy - cy) < 1.3 * (o.scale + s) + 3]
        if near and not occlusion:
            continue
        polys = shape_polygons(cat, float(cx), float(cy), s, float(rng.uniform(0, np.pi)))
        full = rasterize(cat, polys, size)
        # cumulative: what stays visible of each object below after this one is drawn
        if full.sum() >= 12 and all((o.visible & ~full).sum() >= MIN_VISIBLE_FRAC * o.full.sum() for o in near):
            return float(cx), float(cy), polys, full
    return None


def sample_scene(rng: np.random.Generator, family: str, size: int) -> list[SceneObject]:
    """Objects in drawing order (later ones on top), with full and visible masks (bool (size, size))."""
    f = size / 128.0
    occlusion = rng.random() < 0.5
    objs: list[SceneObject] = []
    for cat, colour, s in _object_specs(rng, family, f):
        pose = _place(rng, cat, s, size, objs, occlusion)
        if pose is None:
            continue
        cx, cy, polys, full = pose
        for o in objs:
            o.visible = o.visible & ~full
        # jitter: brightness and a small tint, so e.g. black stays black and never turns dark green
        rgb = np.array(COLOURS[colour], np.float32) * rng.uniform(0.9, 1.07) + rng.uniform(-8, 8, size=3)
        rgb = np.clip(rgb, 0, 255)
        objs.append(SceneObject(cat, colour, rgb.astype(np.float32), cx, cy, s, polys, full, full.copy()))
    return objs


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    """(2, size, size) float32: row and column coordinates / size."""
    g = np.mgrid[0:size, 0:size].astype(np.float32) / size
    g.flags.writeable = False
    return g


def _background(rng: np.random.Generator, size: int, palette: list[np.ndarray]) -> np.ndarray:
    """Cluttered texture, planar (3, size, size) float32: gradient, low-frequency noise, stripes, soft blobs, lines.

    Planar layout keeps every numpy op on contiguous (size, size) planes (3x faster than (H, W, 3) broadcasts).
    """
    yy, xx = _grid(size)
    c0, c1 = (rng.uniform(60, 190, size=3).astype(np.float32) for _ in range(2))
    c0, c1 = (0.5 * c + 0.5 * c.mean() for c in (c0, c1))  # muted, so objects stand out by saturation
    th = rng.uniform(0, 2 * np.pi)
    c, s = np.float32(np.cos(th)), np.float32(np.sin(th))
    t = (c * xx + s * yy - min(0, c) - min(0, s)) / (abs(c) + abs(s))  # (H, W) in [0, 1]
    bg = c0[:, None, None] + (c1 - c0)[:, None, None] * t  # (3, H, W)
    low = rng.normal(0, 16, (3, 5, 5)).astype(np.float32)
    for k in range(3):
        bg[k] += cv2.resize(low[k], (size, size), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.6:
        period, phi = rng.uniform(4, 14) * size / 128, rng.uniform(0, np.pi)
        wave = np.sin((2 * np.pi * size / period) * (np.float32(np.cos(phi)) * xx + np.float32(np.sin(phi)) * yy))
        wave = np.sign(wave) if rng.random() < 0.5 else wave
        bg += (rng.uniform(8, 22) * rng.uniform(0.5, 1.0, size=3)).astype(np.float32)[:, None, None] * wave
    # soft, elongated, semi-transparent blobs, mostly in the scene's own colours (clutter for colour priors)
    alpha, layer = np.zeros((size, size), np.float32), np.zeros((3, size, size), np.float32)
    for _ in range(int(rng.integers(2, 7))):
        a = rng.uniform(4, 14) * size / 128
        centre = tuple(int(v) for v in rng.integers(size, size=2))
        axes = (int(a), max(1, int(a * rng.uniform(0.2, 0.5))))
        col = palette[int(rng.integers(len(palette)))] if rng.random() < 0.6 else rng.uniform(0, 255, size=3)
        angle, opacity = rng.uniform(0, 180), rng.uniform(0.35, 0.75)
        cv2.ellipse(alpha, centre, axes, angle, 0, 360, float(opacity), -1)
        for k in range(3):
            cv2.ellipse(layer[k], centre, axes, angle, 0, 360, float(col[k]), -1)
    alpha = cv2.GaussianBlur(alpha, (7, 7), 2.0)
    for k in range(3):
        bg[k] += (cv2.GaussianBlur(layer[k], (7, 7), 2.0) - bg[k]) * alpha
    for _ in range(int(rng.integers(0, 4))):
        p0, p1 = (tuple(int(v) for v in rng.integers(0, size, size=2)) for _ in range(2))
        col, width = rng.uniform(0, 255, size=3), int(rng.integers(1, 3))
        for k in range(3):
            cv2.line(bg[k], p0, p1, float(col[k]), width)
    return bg


def _paint(canvas: np.ndarray, o: SceneObject, rng: np.random.Generator, size: int) -> None:
    """Fill the object's full mask into planar ``canvas`` (3, H, W) within its bounding box; 1-px edge."""
    xy = np.asarray(o.polys[0]).reshape(-1, 2)
    x0, y0 = np.maximum(np.floor(xy.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(xy.max(axis=0)).astype(int) + 2, size)
    m, c = o.full[y0:y1, x0:x1], canvas[:, y0:y1, x0:x1]  # views
    yy, xx = np.nonzero(m)
    gain = np.ones(len(yy), np.float32)
    kind = rng.choice(["flat", "shade", "stripes"], p=[0.5, 0.3, 0.2])
    if kind == "shade":
        th = rng.uniform(0, 2 * np.pi)
        gain += 0.1 * (np.cos(th) * (xx + x0 - o.cx) + np.sin(th) * (yy + y0 - o.cy)) / o.scale
    elif kind == "stripes":
        period = rng.uniform(3, 6) * size / 128
        gain[((xx + yy) // period) % 2 == 1] = 0.84
    c[:, yy, xx] = o.rgb[:, None] * gain  # (3, n_pixels)
    ey, ex = np.nonzero(m & ~cv2.erode(m.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool))
    c[:, ey, ex] = (o.rgb * 0.6 if o.rgb.mean() > 60 else o.rgb + 70)[:, None]


def render(objs: list[SceneObject], rng: np.random.Generator, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): background, objects in order, global lighting and sensor noise."""
    canvas = _background(rng, size, [o.rgb for o in objs])  # (3, H, W)
    for o in objs:
        _paint(canvas, o, rng, size)
    yy, xx = _grid(size)
    th = rng.uniform(0, 2 * np.pi)
    light = 1.0 + 0.14 * (np.float32(np.cos(th)) * (xx - 0.5) + np.float32(np.sin(th)) * (yy - 0.5))  # 0.9..1.1
    canvas *= light
    canvas += np.float32(rng.uniform(3, 8)) * rng.standard_normal((size, size), np.float32)  # sensor (luma) noise
    canvas += 0.5  # round half up on the cast below
    return cv2.merge(list(np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)))
