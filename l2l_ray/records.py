"""One small record type per boundary (no Ray imports).

Samples (the data layer -> everything else):
- ``LabeledSample``: a training ref with its mask (RLE at the image's own resolution).
- ``UnlabeledSample``: a training ref with *no mask field at all* (a different type, not a flag), so
  pseudo-labelling code cannot read a hidden mask by mistake.
- ``EvalSample``: one (ref, sentence) pair of an evaluation split, with its mask.

Priors (prior backends -> cache -> training and selection): ``Prior``.
Pseudo-labels (SelectorActor -> Ray Train workers): ``PseudoLabelBatch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from l2l_ray.masks import decode_rle, dequantize, pack_bits, unpack_bits


@dataclass(frozen=True)
class Sentence:
    sent_id: int
    text: str


@dataclass(frozen=True)
class LabeledSample:
    """A labeled training ref: all its sentences share one mask."""

    ref_id: int
    image_id: int
    image_path: str
    width: int
    height: int
    sentences: tuple[Sentence, ...]
    mask_rle: dict  # COCO RLE, size [height, width]
    category: str = ""

    def mask(self) -> np.ndarray:
        """bool (height, width)."""
        return decode_rle(self.mask_rle)


@dataclass(frozen=True)
class UnlabeledSample:
    """An unlabeled training ref: image and sentences only. There is deliberately no mask here."""

    ref_id: int
    image_id: int
    image_path: str
    width: int
    height: int
    sentences: tuple[Sentence, ...]


@dataclass(frozen=True)
class EvalSample:
    """One (ref, sentence) pair of an evaluation split."""

    ref_id: int
    sent_id: int
    image_id: int
    image_path: str
    width: int
    height: int
    sentence: str
    mask_rle: dict
    split: str = "val"

    def mask(self) -> np.ndarray:
        return decode_rle(self.mask_rle)


NO_PRIOR_REASONS = (
    "empty_answer",
    "malformed_json",
    "no_box",
    "box_out_of_range",
    "empty_box",
    "timeout",
    "http_error",
    "empty_sentence",
    "image_error",
    "model_error",
    "disabled",
    "corrupted",  # l2l_ray.priors.corrupt (the priors.corruption experiment knob)
)


@dataclass
class Prior:
    """A semantic-spatial prior for one sentence, and its soft proposal.

    ``status`` is "ok" or one of ``NO_PRIOR_REASONS``; a no-prior record keeps ``raw_text`` and
    has ``box=None`` and ``proposal=None`` (consumers then use the uninformative 0.5 map, never zeros).
    """

    sent_id: int
    ref_id: int
    status: str = "ok"
    box: tuple[float, float, float, float] | None = None  # normalised (x1, y1, x2, y2) in [0, 1]
    points: tuple[tuple[float, float], ...] = ()  # normalised (x, y)
    score: float = 0.0
    category: str = ""
    attributes: tuple[str, ...] = ()
    spatial: tuple[str, ...] = ()
    raw_text: str = ""
    proposal: np.ndarray | None = None  # uint8 (S, S) soft mask over the whole (square-resized) image
    backend: str = ""
    model: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def soft_mask(self, size: int) -> np.ndarray:
        """float32 (size, size) in [0, 1]; 0.5 everywhere when there is no prior."""
        if self.proposal is None:
            return np.full((size, size), 0.5, np.float32)
        soft = dequantize(self.proposal)
        if soft.shape != (size, size):
            import cv2

            soft = cv2.resize(soft, (size, size), interpolation=cv2.INTER_LINEAR)
        return soft.astype(np.float32)


@dataclass
class PseudoLabelBatch:
    """Selected pseudo-labels for N unlabeled sentences at model resolution (size x size).

    labels: uint8 (N, ceil(size*size/8)) packed bits of the chosen binary label.
    weights: uint8 (N, size, size) per-pixel loss weight * 255; 0 means the pixel is ignored.
    """

    sent_ids: np.ndarray  # int64 (N,)
    ref_ids: np.ndarray  # int64 (N,)
    labels: np.ndarray
    weights: np.ndarray
    size: int
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_masks(cls, sent_ids, ref_ids, labels: np.ndarray, weights: np.ndarray, **stats) -> PseudoLabelBatch:
        """labels: bool (N, S, S); weights: float (N, S, S) in [0, 1]."""
        size = labels.shape[-1]
        w = np.clip(np.rint(weights * 255), 0, 255).astype(np.uint8)
        return cls(np.asarray(sent_ids, np.int64), np.asarray(ref_ids, np.int64), pack_bits(labels), w, size, stats)

    def label_masks(self) -> np.ndarray:
        """bool (N, size, size)."""
        return unpack_bits(self.labels, (self.size, self.size))

    def weight_maps(self) -> np.ndarray:
        """float32 (N, size, size) in [0, 1]."""
        return self.weights.astype(np.float32) / 255.0

    def __len__(self) -> int:
        return len(self.sent_ids)

    def slice(self, idx: np.ndarray) -> PseudoLabelBatch:
        return PseudoLabelBatch(self.sent_ids[idx], self.ref_ids[idx], self.labels[idx], self.weights[idx],
                                self.size, self.stats)
