"""Image side of the lexical prior: named-colour regions and their shape cues (pure numpy / OpenCV).

    regions = ImageRegions(load_image("img.png", 128, 128, work_size=128))
    for r in regions.of_colours(("red",)):
        r.box, r.cx, r.area, r.shape_prob("circle")     # normalised box, centre x, area share, P(circle)

Every pixel of a lightly denoised copy gets its nearest colour of ``vocab.COLOURS`` in CIE Lab (a
32x32x32 lookup table, built once), or none when it is far from all of them. Connected pixels of one
colour form a ``Region``. Shape features (fill of the minimum-area rectangle, solidity, elongation,
holes) are compared to one prototype per synthetic category; real photos get the same treatment, which
is crude there but still uses the colour words.
"""

from __future__ import annotations

from functools import cached_property

import cv2
import numpy as np

from l2l_ray.vocab import COLOURS

COLOUR_NAMES = tuple(COLOURS)
ACHROMATIC = {"white", "black", "gray"}
MAX_LAB_DIST = 38.0  # pixels farther than this from every named colour get no colour
MIN_AREA = 0.0007  # regions smaller than this share of the image are noise
MAX_AREA = 0.6  # larger ones are background
# prototype (rect_fill, solidity, log elongation, hole share) per category: medians of the matched true regions
# of 200 synthetic images (seed 0, 128 px; re-measure with bench/prior_quality.py --fit-shapes), and spreads
PROTOTYPES = {
    "circle": (0.79, 0.98, 0.03, 0.0),
    "ring": (0.79, 0.98, 0.02, 0.49),
    "square": (0.90, 0.95, 0.0, 0.0),
    "triangle": (0.56, 0.93, 0.12, 0.0),
    "star": (0.43, 0.61, 0.04, 0.0),
    "bar": (0.84, 0.91, 1.36, 0.0),
}
SPREAD = np.array([0.07, 0.05, 0.15, 0.1])


def _lut() -> np.ndarray:
    """int8 (32, 32, 32): colour index of each RGB bin (by its centre), -1 = no named colour."""
    centres = (np.arange(32, dtype=np.float32) * 8 + 4) / 255.0
    grid = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), -1).reshape(-1, 1, 3)  # (32768, 1, 3)
    lab = cv2.cvtColor(grid, cv2.COLOR_RGB2Lab).reshape(-1, 3)
    pal = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32).reshape(-1, 1, 3) / 255.0
    pal_lab = cv2.cvtColor(pal, cv2.COLOR_RGB2Lab).reshape(-1, 3)
    d = np.linalg.norm(lab[:, None, :] - pal_lab[None, :, :], axis=2)  # (32768, n_colours)
    idx = d.argmin(1).astype(np.int8)
    idx[d.min(1) > MAX_LAB_DIST] = -1
    return idx.reshape(32, 32, 32)


_LUT: np.ndarray | None = None


def colour_labels(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> int8 (H, W): index into COLOUR_NAMES, -1 = none."""
    global _LUT
    if _LUT is None:
        _LUT = _lut()
    q = image >> 3
    return _LUT[q[..., 0], q[..., 1], q[..., 2]]


def dark_outline(image: np.ndarray, ratio: float = 0.7, step: float = 15.0) -> np.ndarray:
    """bool (H, W): pixels much darker than their brightest 3x3 neighbour (object outlines, thin dark gaps).

    No blur on purpose: a 1-px outline survives only at full resolution.
    """
    lum = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    top = cv2.dilate(lum, np.ones((3, 3), np.uint8))
    return (lum < ratio * top) & (top - lum > step)


def load_image(path: str, width: int, height: int, work_size: int) -> np.ndarray | None:
    """Read an image as RGB uint8 (work_size, work_size, 3) (square-resized); None if it cannot be read.

    Large photos are decoded at 1/2, 1/4 or 1/8 scale by libjpeg/libpng directly (``IMREAD_REDUCED_*``).
    """
    factor = min(width, height) / max(work_size, 1) if width and height else 1
    flag = cv2.IMREAD_COLOR
    for f, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                       (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if factor >= f:
            flag = reduced
            break
    try:
        bgr = cv2.imread(str(path), flag)
    except (cv2.error, OSError):
        bgr = None
    if bgr is None or bgr.ndim != 3 or min(bgr.shape[:2]) < 2:
        return None
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    if rgb.shape[:2] != (work_size, work_size):
        rgb = cv2.resize(rgb, (work_size, work_size), interpolation=cv2.INTER_AREA)
    return rgb


class Region:
    """One connected region of one named colour. Coordinates normalised to the image."""

    def __init__(self, colour: str, crop: np.ndarray, stats: np.ndarray, centroid: np.ndarray, n: int) -> None:
        x, y, w, h, a = (int(v) for v in stats)
        self.colour = colour
        self.crop = crop  # uint8 (h, w) over the region's bounding box, 1 = this region
        self.origin = (x, y)
        self.n = n
        # one pixel of padding: painted objects have a dark 1-px outline that matches no named colour
        self.box = (max(x - 1, 0) / n, max(y - 1, 0) / n, min(x + w + 1, n) / n, min(y + h + 1, n) / n)
        self.cx, self.cy = float(centroid[0] + 0.5) / n, float(centroid[1] + 0.5) / n
        self.area = a / (n * n)

    @cached_property
    def features(self) -> np.ndarray:
        """(rect_fill, solidity, log elongation, hole share), float64 (4,)."""
        crop = np.pad(self.crop, 1)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        c = max(contours, key=cv2.contourArea)
        filled = np.zeros_like(crop)
        cv2.drawContours(filled, [c], -1, 1, -1)
        hole = 1.0 - float(self.crop.sum()) / max(float(filled.sum()), 1.0)
        # contour areas run through pixel centres; add half a pixel of perimeter so small shapes are fair
        area = cv2.contourArea(c) + 0.5 * cv2.arcLength(c, True)
        hull = cv2.convexHull(c)
        hull_area = cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True)
        (_, _), (rw, rh), _ = cv2.minAreaRect(c)
        rw, rh = rw + 1.0, rh + 1.0
        return np.array([area / (rw * rh), area / max(hull_area, 1.0), np.log(max(rw, rh) / min(rw, rh)), hole])

    @cached_property
    def shape_likelihoods(self) -> dict[str, float]:
        f = self.features
        return {k: float(np.exp(-0.5 * (((f - np.array(p)) / SPREAD) ** 2).sum())) for k, p in PROTOTYPES.items()}

    def shape_prob(self, category: str) -> float:
        """P(category | shape) among the synthetic categories, with a floor so no shape is impossible."""
        lik = self.shape_likelihoods
        return (lik.get(category, 0.0) + 0.01) / (sum(lik.values()) + 0.01 * len(lik))

    @cached_property
    def objectness(self) -> float:
        """How much the region looks like one painted object (any known shape, not tiny), in (0, 1]."""
        fit = max(self.shape_likelihoods.values())
        size = min(1.0, self.area / (4 * MIN_AREA))
        colour = 0.6 if self.colour in ACHROMATIC else 1.0
        return float(max(fit, 0.02) * size * colour)

    @cached_property
    def point(self) -> tuple[float, float]:
        """The most interior pixel (distance-transform maximum), normalised (x, y); inside even for rings."""
        dist = cv2.distanceTransform(np.pad(self.crop, 1), cv2.DIST_L2, 3)
        y, x = np.unravel_index(int(dist.argmax()), dist.shape)
        return ((self.origin[0] + x - 1 + 0.5) / self.n, (self.origin[1] + y - 1 + 0.5) / self.n)


class ImageRegions:
    """Candidate regions of one square image (RGB uint8 (n, n, 3)), computed per colour on demand.

    Two sources: connected pixels of one named colour, and areas enclosed by dark outlines (named by
    their median colour), which finds objects whose colour is also the background's (gray on gray).
    """

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.n = image.shape[0]
        self.outline = dark_outline(image)
        self.labels = colour_labels(cv2.medianBlur(image, 3))
        self.labels[self.outline] = -1  # outlines separate touching regions of one colour
        self._counts = np.bincount(self.labels.ravel() + 1, minlength=len(COLOUR_NAMES) + 1)[1:]  # pixels per colour
        self._by_colour: dict[str, list[Region]] = {}
        self._enclosed: dict[str, list[Region]] | None = None

    def regions(self, colour: str) -> list[Region]:
        if colour not in self._by_colour:
            idx = COLOUR_NAMES.index(colour) if colour in COLOURS else -1
            present = idx >= 0 and self._counts[idx] >= MIN_AREA * self.n * self.n
            own = self._components(self.labels == idx, colour) if present else []
            extra = self.enclosed().get(colour, [])
            self._by_colour[colour] = own + [r for r in extra if all(_box_iou(r.box, o.box) < 0.6 for o in own)]
        return self._by_colour[colour]

    def enclosed(self) -> dict[str, list[Region]]:
        """Areas enclosed by outlines, by the name of their median colour."""
        if self._enclosed is None:
            self._enclosed = {}
            for r in self._components(~self.outline, ""):
                ys, xs = np.nonzero(r.crop)
                med = np.median(self.image[ys + r.origin[1], xs + r.origin[0]], axis=0).astype(np.uint8)
                idx = int(colour_labels(med.reshape(1, 1, 3))[0, 0])
                if idx >= 0:
                    r.colour = COLOUR_NAMES[idx]
                    self._enclosed.setdefault(r.colour, []).append(r)
        return self._enclosed

    def _components(self, mask: np.ndarray, colour: str) -> list[Region]:
        n_lab, lab, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
        total = self.n * self.n
        out = []
        for i in range(1, n_lab):
            x, y, w, h, area = stats[i]
            if MIN_AREA * total <= area <= MAX_AREA * total:
                crop = (lab[y:y + h, x:x + w] == i).astype(np.uint8)
                out.append(Region(colour, crop, stats[i], cents[i], self.n))
        return out

    def of_colours(self, colours: tuple[str, ...]) -> list[Region]:
        return [r for c in colours for r in self.regions(c)]

    def all_regions(self) -> list[Region]:
        return self.of_colours(COLOUR_NAMES)


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
