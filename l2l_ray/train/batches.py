"""Batches from ``RowTable`` rows, the per-epoch index plan, and strong augmentation (no Ray imports)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from l2l_ray.masks import unpack_bits
from l2l_ray.model.inputs import make_batch
from l2l_ray.train.tables import RowTable


def strong_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Colour jitter (brightness, contrast, saturation; no hue: colour words must stay true) + Gaussian noise.

    uint8 (B,3,S,S) -> float (B,3,S,S) in [0, 1].
    """
    x = images.float() / 255.0
    b = x.shape[0]

    def factor(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen)).to(x.device)

    x = x * factor(0.7, 1.3)  # brightness
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * factor(0.7, 1.3) + mean  # contrast
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (B, 1, S, S)
    x = (x - gray) * factor(0.7, 1.3) + gray  # saturation
    x = x + 0.03 * torch.randn(x.shape, generator=gen).to(x.device)
    return x.clamp(0.0, 1.0)


def rows_batch(images: np.ndarray, rows: RowTable, idx: np.ndarray, device, *, labels: np.ndarray | None = None,
               weights: np.ndarray | None = None, augment: torch.Generator | None = None,
               sample_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Batch of rows ``idx``. Targets: ``rows.labels`` (labeled) or ``labels``/``weights`` (pseudo, row-aligned,
    packed bits / uint8 weights*255). ``augment``: a generator -> strong augmentation of the images."""
    img = torch.from_numpy(images[rows.image_idx[idx]])  # (b, 3, S, S) uint8
    if augment is not None:
        img = strong_augment(img, augment)
    s = images.shape[-1]
    target = weight = None
    if rows.labels is not None:
        target = unpack_bits(rows.labels[rows.label_idx[idx]], (s, s))  # (b, S, S) bool
    elif labels is not None:
        target = unpack_bits(labels[idx], (s, s))
        weight = weights[idx].astype(np.float32) / 255.0 if weights is not None else None
    batch = make_batch(img, rows.tokens[idx], rows.token_mask[idx], rows.prior[idx], rows.box[idx],
                       rows.prior_valid[idx], rows.points[idx], rows.point_valid[idx],
                       target=None if target is None else target.astype(np.float32), weight=weight, device=device)
    if target is not None:
        batch["sample_weight"] = torch.full((len(idx),), float(sample_weight), device=device)
    return batch


def flip_batch(batch: dict[str, torch.Tensor], rows: torch.Tensor, token_map: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """Mirror the rows where ``rows`` (B,) is true left-right: image, prior, target, weight, box and points;
    ``token_map`` (V,) maps token ids to their mirrored words ("left" <-> "right"; None = tokens unchanged)."""
    out = dict(batch)
    m4 = rows[:, None, None, None]
    for k in ("image", "prior"):
        out[k] = torch.where(m4, batch[k].flip(-1), batch[k])
    for k in ("target", "weight"):
        if k in batch:
            out[k] = torch.where(rows[:, None, None], batch[k].flip(-1), batch[k])
    box = batch["box"]
    mirrored = torch.stack([1 - box[:, 2], box[:, 1], 1 - box[:, 0], box[:, 3]], 1)
    out["box"] = torch.where(rows[:, None] & (box.abs().sum(1, keepdim=True) > 0), mirrored, box)
    pts = batch["points"]
    px = torch.where(rows[:, None] & batch["point_valid"], 1 - pts[..., 0], pts[..., 0])
    out["points"] = torch.stack([px, pts[..., 1]], -1)
    if token_map is not None:
        out["tokens"] = torch.where(rows[:, None], token_map.to(batch["tokens"].device)[batch["tokens"]],
                                    batch["tokens"])
    return out


def concat_batches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate two batch dicts along the batch axis (same keys)."""
    return {k: torch.cat([a[k], b[k]], 0) for k in a}


def index_stream(n: int, seed: int) -> Iterator[int]:
    """Endless concatenation of seeded permutations of range(n)."""
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.permutation(n).tolist()


def epoch_plan(n_labeled: int, n_pseudo: int, batch_size: int, world: int, rank: int, steps_per_epoch: int,
               seed: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """This rank's (labeled indices, pseudo indices or None) per step of one epoch.

    Without pseudo rows a step takes ``batch_size`` labeled rows per worker and an epoch is one pass over them;
    with pseudo rows a step takes half pseudo, half labeled rows and an epoch is one pass over the pseudo rows
    (the labeled rows are cycled). ``steps_per_epoch`` > 0 fixes the length. Every rank gets the same number of
    steps (DDP needs that); the global order depends only on ``seed``, so a resumed epoch replays exactly.
    """
    b_u = max(1, batch_size // 2) if n_pseudo else 0
    b_l = batch_size - b_u
    steps = math.ceil((n_pseudo / (b_u * world)) if n_pseudo else (n_labeled / (b_l * world)))
    steps = steps_per_epoch if steps_per_epoch > 0 else max(1, steps)
    lab = index_stream(n_labeled, seed)
    pse = index_stream(n_pseudo, seed + 1) if n_pseudo else None
    plan = []
    for _ in range(steps):
        g = [next(lab) for _ in range(b_l * world)]
        li = np.asarray(g[rank * b_l:(rank + 1) * b_l], np.int64)
        pi = None
        if pse is not None:
            gp = [next(pse) for _ in range(b_u * world)]
            pi = np.asarray(gp[rank * b_u:(rank + 1) * b_u], np.int64)
        plan.append((li, pi))
    return plan
