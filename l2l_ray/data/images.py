"""Image and mask loading at model resolution (no Ray, no torch).

LAVT / SemiRES resize the image (bilinear) and the ground-truth mask (nearest) to a square
(480 x 480 there; ``data.image_size`` here), ignoring the aspect ratio. Pillow does both, as
torchvision's ``Resize`` on PIL images does in LAVT.

    img = load_image(path, 128)                 # uint8 (128, 128, 3) RGB
    m = load_mask_resized(sample.mask(), 128)   # bool (128, 128)
    loader = SafeImageLoader(128); img = loader(path)   # None (counted) on a bad file, mid-run
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image, UnidentifiedImageError

from l2l_ray.errors import DataError

MAX_FAILED_PATHS = 20


class ImageError(DataError):
    """A missing or unreadable image file; the message names the file."""


def load_image(path: str, size: int | None = None) -> np.ndarray:
    """RGB image -> uint8 (size, size, 3), square bilinear resize; (H, W, 3) when ``size`` is None.

    Grayscale / CMYK / palette files (COCO has some) are converted to RGB. Raises ImageError.
    """
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            rgb = im.convert("RGB")
    except FileNotFoundError as e:
        raise ImageError(f"image file not found: {path}; check data.image_dir") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"image file {path} is corrupt or not an image ({e})") from e
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def load_mask_resized(mask: np.ndarray, size: int) -> np.ndarray:
    """bool / {0,1} mask (H, W) -> bool (size, size), nearest-neighbour (as LAVT resizes its target)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.shape == (size, size):
        return mask.astype(bool)
    im = Image.fromarray(mask.astype(bool).astype(np.uint8) * 255)  # 2-D uint8 -> mode "L"
    return np.asarray(im.resize((size, size), Image.Resampling.NEAREST)) > 127


class SafeImageLoader:
    """``load_image`` for use during a run: a bad file gives None and is counted, never raises.

    ``failures`` counts by reason ("missing", "corrupt"); ``failed_paths`` keeps the first files;
    ``report()`` is one line for the log.
    """

    def __init__(self, size: int | None = None):
        self.size = size
        self.failures: Counter = Counter()
        self.failed_paths: list[str] = []

    def __call__(self, path: str) -> np.ndarray | None:
        try:
            return load_image(path, self.size)
        except ImageError as e:
            self.failures["missing" if isinstance(e.__cause__, FileNotFoundError) else "corrupt"] += 1
            if len(self.failed_paths) < MAX_FAILED_PATHS:
                self.failed_paths.append(path)
            return None

    @property
    def num_failed(self) -> int:
        return sum(self.failures.values())

    def report(self) -> str:
        if not self.num_failed:
            return "images: no failures"
        return (f"images: {self.num_failed} skipped ({dict(self.failures)}), e.g. "
                f"{', '.join(self.failed_paths[:3])}")
