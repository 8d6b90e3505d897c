"""The SemiRES label split (pure Python): which training refs are labeled.

A seeded sample of floor(p x N) of the N training *images* (at least one) is labeled; every ref on a
sampled image is labeled and every other training ref is unlabeled (SemiRES
``split_dataset_select.py``: ``random.seed(0)``, ``random.sample`` of image ids). Image ids are
sorted before sampling, so the split depends only on the set of training images, the ratio and the
seed, not on the order of the refs file.

    s = label_split([(ref_id, image_id), ...], ratio=0.01, seed=0)
    s.labeled_ref_ids, s.unlabeled_ref_ids
    write_split(run_dir / "label_split.json", s, dataset="refcoco", split_by="unc")
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass

from l2l_ray.io import atomic_write_json, read_json

SPLIT_FILE = "label_split.json"


@dataclass(frozen=True)
class LabelSplit:
    ratio: float
    seed: int
    num_train_images: int
    labeled_image_ids: tuple[int, ...]  # sorted
    labeled_ref_ids: tuple[int, ...]  # in input order
    unlabeled_ref_ids: tuple[int, ...]  # in input order


def num_labeled_images(ratio: float, num_images: int) -> int:
    """floor(ratio x N), at least 1 (when N > 0). A tiny epsilon keeps e.g. 0.29 x 100 at 29, not 28."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"label ratio {ratio} must be in (0, 1], e.g. 0.01 or 0.05")
    if num_images <= 0:
        return 0
    return min(num_images, max(1, math.floor(ratio * num_images + 1e-9)))


def label_split(train_refs: Iterable[tuple[int, int]], ratio: float, seed: int) -> LabelSplit:
    """Split training refs given as ``(ref_id, image_id)`` pairs into labeled and unlabeled refs."""
    pairs = [(int(r), int(i)) for r, i in train_refs]
    images = sorted({i for _, i in pairs})
    k = num_labeled_images(ratio, len(images))
    chosen = set(random.Random(seed).sample(images, k))
    return LabelSplit(
        ratio=float(ratio),
        seed=int(seed),
        num_train_images=len(images),
        labeled_image_ids=tuple(sorted(chosen)),
        labeled_ref_ids=tuple(r for r, i in pairs if i in chosen),
        unlabeled_ref_ids=tuple(r for r, i in pairs if i not in chosen),
    )


def split_to_dict(split: LabelSplit, **meta) -> dict:
    """JSON-ready dict: counts first, then the labeled image ids and ref ids (unlabeled = the rest)."""
    return {
        **meta,
        "label_ratio": split.ratio,
        "seed": split.seed,
        "num_train_images": split.num_train_images,
        "num_labeled_images": len(split.labeled_image_ids),
        "num_labeled_refs": len(split.labeled_ref_ids),
        "num_unlabeled_refs": len(split.unlabeled_ref_ids),
        "labeled_image_ids": list(split.labeled_image_ids),
        "labeled_ref_ids": list(split.labeled_ref_ids),
    }


def write_split(path: str | os.PathLike, split: LabelSplit, **meta) -> None:
    """Write the split as JSON, atomically. ``meta`` (e.g. dataset, split_by) is stored alongside."""
    atomic_write_json(path, split_to_dict(split, **meta))


def read_split(path: str | os.PathLike) -> dict | None:
    """The dict ``write_split`` wrote, or None when there is no file."""
    return read_json(path)
