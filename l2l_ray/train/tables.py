"""Samples -> compact arrays, built once in the driver and shipped to workers with one ``ray.put``
(no Ray imports here; workers never re-read image files).

A ``RowTable`` has one row per (sample, sentence) pair; images are stored once per image in a shared
uint8 array (N_img, 3, S, S) and rows index into it. Labels are packed bits at model resolution.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from l2l_ray.masks import pack_bits
from l2l_ray.model.inputs import MAX_POINTS, prior_arrays

_IMAGE_CACHE: dict[tuple[str, int], np.ndarray] = {}
_IMAGE_CACHE_BYTES = int(os.environ.get("L2L_IMAGE_CACHE_MB", "2048")) * 1024**2


@dataclass
class RowTable:
    """Rows ready for batching; every array has N rows. ``labels`` / ``label_idx`` only for labeled rows."""

    image_idx: np.ndarray  # int32 (N,) index into the image array
    tokens: np.ndarray  # int32 (N, T)
    token_mask: np.ndarray  # bool (N, T)
    prior: np.ndarray  # uint8 (N, P, P), 255 = 1.0 (P = 1 when no row has a prior)
    box: np.ndarray  # float32 (N, 4) normalised xyxy, zeros = none
    prior_valid: np.ndarray  # bool (N,)
    points: np.ndarray  # float32 (N, K, 2)
    point_valid: np.ndarray  # bool (N, K)
    sent_ids: np.ndarray  # int64 (N,)
    ref_ids: np.ndarray  # int64 (N,)
    label_idx: np.ndarray | None = None  # int32 (N,) index into ``labels``
    labels: np.ndarray | None = None  # uint8 (M, ceil(S*S/8)) packed bits at model resolution

    def __len__(self) -> int:
        return len(self.sent_ids)


@dataclass
class TrainTables:
    """What a training worker needs: images, labeled rows, optional pseudo-labelled rows (their labels and
    weights stay in the ``PseudoLabelBatch`` object ref, row i = pseudo-label i)."""

    images: np.ndarray  # uint8 (N_img, 3, S, S)
    labeled: RowTable
    pseudo: RowTable | None
    size: int
    flip_map: np.ndarray | None = None  # int64 (V,) token id -> mirrored token id (train.hflip)


def swap_left_right(text: str) -> str:
    """"the left cup, rightmost" -> "the right cup, leftmost" (for horizontally flipped inputs)."""
    table = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
    return re.sub(r"\b(leftmost|rightmost|left|right)\b", lambda m: table[m.group(1).lower()], text,
                  flags=re.IGNORECASE)


def flip_token_map(tokenizer) -> np.ndarray:
    """int64 (V,): token id -> the id of its mirror word ("left" <-> "right", "leftmost" <-> "rightmost");
    identity elsewhere. WordPiece splits like "left ##most" are covered by the "left" <-> "right" swap."""
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    out = np.arange(max(tokenizer.vocab_size, max(vocab.values(), default=0) + 1), dtype=np.int64)
    for a, b in (("left", "right"), ("leftmost", "rightmost"), ("lefthand", "righthand")):
        if a in vocab and b in vocab:
            out[vocab[a]], out[vocab[b]] = vocab[b], vocab[a]
    return out


def load_images(paths: Sequence[str], size: int) -> np.ndarray:
    """Unique image paths -> uint8 (N, 3, size, size), threaded decode, cached in this process."""
    from l2l_ray.data.images import load_image

    missing = [p for p in dict.fromkeys(paths) if (p, size) not in _IMAGE_CACHE]
    if missing:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            loaded = list(pool.map(lambda p: load_image(p, size).transpose(2, 0, 1), missing))  # (3, S, S)
        if sum(a.nbytes for a in _IMAGE_CACHE.values()) + sum(a.nbytes for a in loaded) > _IMAGE_CACHE_BYTES:
            _IMAGE_CACHE.clear()
        _IMAGE_CACHE.update({(p, size): a for p, a in zip(missing, loaded, strict=True)})
    out = np.empty((len(paths), 3, size, size), np.uint8)
    for i, p in enumerate(paths):
        out[i] = _IMAGE_CACHE[(p, size)] if (p, size) in _IMAGE_CACHE else load_image(p, size).transpose(2, 0, 1)
    return out


class ImageIndex:
    """Assigns each distinct image path an index, in first-seen order."""

    def __init__(self):
        self.index: dict[str, int] = {}

    def __call__(self, path: str) -> int:
        return self.index.setdefault(path, len(self.index))

    def load(self, size: int) -> np.ndarray:
        return load_images(list(self.index), size)


def make_rows(pairs: list[tuple], tokenizer, priors: dict | None, size: int, prior_size: int, images: ImageIndex,
              flip: bool = False) -> RowTable:
    """(sample, sent_id, text) triples -> RowTable (labels not filled). ``flip`` swaps left/right words."""
    texts = [swap_left_right(t) if flip else t for _, _, t in pairs]
    tokens, token_mask = tokenizer.encode_numpy(texts)
    plist = [priors.get(sid) if priors else None for _, sid, _ in pairs]
    psize = prior_size if any(p is not None and p.ok for p in plist) else 1
    pa = prior_arrays(plist, psize, MAX_POINTS)
    return RowTable(
        image_idx=np.asarray([images(s.image_path) for s, _, _ in pairs], np.int32).reshape(-1),
        tokens=tokens, token_mask=token_mask, prior=pa["prior"], box=pa["box"], prior_valid=pa["prior_valid"],
        points=pa["points"], point_valid=pa["point_valid"],
        sent_ids=np.asarray([sid for _, sid, _ in pairs], np.int64).reshape(-1),
        ref_ids=np.asarray([s.ref_id for s, _, _ in pairs], np.int64).reshape(-1))


def labeled_rows(samples, tokenizer, priors, size: int, prior_size: int, images: ImageIndex) -> RowTable:
    """LabeledSample list -> rows (one per sentence) with packed masks at ``size`` (nearest resize, as LAVT)."""
    from l2l_ray.data.images import load_mask_resized

    pairs, label_idx = [], []
    for i, s in enumerate(samples):
        for sent in s.sentences:
            pairs.append((s, sent.sent_id, sent.text))
            label_idx.append(i)
    rows = make_rows(pairs, tokenizer, priors, size, prior_size, images)
    masks = np.stack([load_mask_resized(s.mask(), size) for s in samples]) if samples else \
        np.zeros((0, size, size), bool)
    rows.labels = pack_bits(masks)
    rows.label_idx = np.asarray(label_idx, np.int32)
    return rows


def pseudo_rows(pseudo, unlabeled, tokenizer, priors, size: int, prior_size: int, images: ImageIndex) -> RowTable:
    """Rows for a ``PseudoLabelBatch`` (row i = its pseudo-label i), looked up in the unlabeled samples."""
    if pseudo.size != size:
        raise ValueError(f"PseudoLabelBatch.size={pseudo.size} but the model resolution is data.image_size={size}")
    by_sent = {sent.sent_id: (s, sent.text) for s in unlabeled for sent in s.sentences}
    missing = [int(i) for i in pseudo.sent_ids if int(i) not in by_sent]
    if missing:
        raise KeyError(f"{len(missing)} pseudo-label sent_ids are not unlabeled training sentences "
                       f"(e.g. {missing[:5]}); pseudo-labels must come from data.unlabeled")
    pairs = [(by_sent[int(i)][0], int(i), by_sent[int(i)][1]) for i in pseudo.sent_ids]
    return make_rows(pairs, tokenizer, priors, size, prior_size, images)


def build_train_tables(data, tokenizer, priors: dict | None, size: int, prior_size: int,
                       pseudo=None) -> TrainTables:
    """DatasetBundle (+ optional PseudoLabelBatch) -> TrainTables (images loaded once)."""
    if not data.labeled:
        raise ValueError("no labeled training samples: check data.label_ratio and the dataset's train split")
    images = ImageIndex()
    lab = labeled_rows(data.labeled, tokenizer, priors, size, prior_size, images)
    ps = pseudo_rows(pseudo, data.unlabeled, tokenizer, priors, size, prior_size, images) \
        if pseudo is not None and len(pseudo) else None
    return TrainTables(images=images.load(size), labeled=lab, pseudo=ps, size=size,
                       flip_map=flip_token_map(tokenizer))
