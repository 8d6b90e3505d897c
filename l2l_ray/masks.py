"""Compact mask codecs (no Ray imports).

- COCO RLE (pycocotools) for binary masks at any resolution: ``encode_rle`` / ``decode_rle``.
- Packed bits for fixed-size binary masks moving between actors: ``pack_bits`` / ``unpack_bits``.
- Soft masks in [0, 1] quantised to uint8: ``quantize`` / ``dequantize``.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict:
    """Binary mask (H, W) -> COCO RLE ``{"size": [H, W], "counts": str}`` (JSON/pickle safe)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (counts as str or bytes) -> bool mask (H, W)."""
    counts = rle["counts"]
    r = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(r).astype(bool)


def pack_bits(masks: np.ndarray) -> np.ndarray:
    """Binary masks (N, H, W) -> uint8 (N, ceil(H*W/8))."""
    n = len(masks)
    return np.packbits(masks.reshape(n, masks.shape[-2] * masks.shape[-1]).astype(bool), axis=1)


def unpack_bits(packed: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (N, ceil(H*W/8)) -> bool (N, H, W)."""
    h, w = size
    return np.unpackbits(packed, axis=1, count=h * w).reshape(len(packed), h, w).astype(bool)


def quantize(soft: np.ndarray) -> np.ndarray:
    """Float mask in [0, 1] (any shape) -> uint8 (same shape), 255 = 1.0."""
    return np.clip(np.rint(np.asarray(soft, np.float32) * 255.0), 0, 255).astype(np.uint8)


def dequantize(q: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return q.astype(np.float32) / 255.0
