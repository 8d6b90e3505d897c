"""Building the segmenter's batch dict from compact arrays (no Ray imports).

Batch keys (tensors, S = model input side):
- "image" (B,3,S,S) float, normalised with ImageNet mean/std; "tokens" (B,T) long; "token_mask" (B,T) bool;
- "prior" (B,1,P,P) float in [0,1] at the proposal's own side P (0.5 = uninformative);
  "box" (B,4) normalised xyxy (zeros if none);
  "prior_valid" (B,) bool; optional "points" (B,K,2) normalised xy and "point_valid" (B,K) bool;
- for losses: "target" (B,S,S) float {0,1}; "weight" (B,S,S) float >= 0 (0 = ignored pixel); optional
  "sample_weight" (B,) float (e.g. ``semi.unlabeled_weight`` on pseudo-labelled rows).
"""

from __future__ import annotations

import numpy as np
import torch

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
MAX_POINTS = 4  # point slots per sample (unused slots are masked)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float-in-[0,1] (B,3,S,S) -> float (B,3,S,S) normalised with ImageNet mean/std."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _t(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def make_batch(images, tokens, token_mask, prior=None, box=None, prior_valid=None, points=None, point_valid=None,
               target=None, weight=None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Arrays or tensors -> the batch dict on ``device``; missing priors become "no prior".

    images: uint8 (B,3,S,S) (or float in [0,1]); tokens (B,T) int; token_mask (B,T) bool;
    prior: uint8 (B,P,P) (255 = 1.0) or float (B,P,P) / (B,1,P,P) in [0,1], any P (kept at P);
    box (B,4); prior_valid (B,); points (B,K,2); point_valid (B,K); target (B,S,S) {0,1}; weight (B,S,S).
    """
    img = normalize_images(_t(images).to(device))
    b, _, s, _ = img.shape
    batch = {"image": img, "tokens": _t(tokens).to(device).long(), "token_mask": _t(token_mask).to(device).bool()}
    if prior is None:
        batch["prior"] = torch.full((b, 1, s // 4, s // 4), 0.5, device=device)
    else:
        p = _t(prior).to(device)
        p = p.float() / 255.0 if p.dtype == torch.uint8 else p.float()
        p = p.view(b, 1, p.shape[-2], p.shape[-1])  # (B, 1, P, P)
        batch["prior"] = p  # kept at its own side: the model rasterises it at each scale it uses
    batch["box"] = torch.zeros(b, 4, device=device) if box is None else _t(box).to(device).float()
    batch["prior_valid"] = (torch.zeros(b, dtype=torch.bool, device=device) if prior_valid is None
                            else _t(prior_valid).to(device).bool())
    batch["points"] = (torch.zeros(b, MAX_POINTS, 2, device=device) if points is None
                       else _t(points).to(device).float())
    batch["point_valid"] = (torch.zeros(b, batch["points"].shape[1], dtype=torch.bool, device=device)
                            if point_valid is None else _t(point_valid).to(device).bool())
    if target is not None:
        batch["target"] = _t(target).to(device).float()
        batch["weight"] = torch.ones_like(batch["target"]) if weight is None else _t(weight).to(device).float()
    return batch


def prior_arrays(priors: list, size: int, max_points: int = MAX_POINTS) -> dict[str, np.ndarray]:
    """``records.Prior`` (or None = no prior) per row -> compact arrays for ``make_batch``.

    Returns {"prior": uint8 (N,size,size) (128 where no prior), "box": float32 (N,4), "prior_valid": bool (N,),
    "points": float32 (N,K,2), "point_valid": bool (N,K)}.
    """
    from l2l_ray.masks import quantize

    n = len(priors)
    out = {"prior": np.full((n, size, size), 128, np.uint8), "box": np.zeros((n, 4), np.float32),
           "prior_valid": np.zeros(n, bool), "points": np.zeros((n, max_points, 2), np.float32),
           "point_valid": np.zeros((n, max_points), bool)}
    for i, p in enumerate(priors):
        if p is None or not p.ok:
            continue
        out["prior_valid"][i] = True
        out["prior"][i] = quantize(p.soft_mask(size))
        if p.box is not None:
            out["box"][i] = np.clip(np.asarray(p.box, np.float32), 0.0, 1.0)
        pts = list(p.points)[:max_points]
        if pts:
            out["points"][i, : len(pts)] = np.clip(np.asarray(pts, np.float32), 0.0, 1.0)
            out["point_valid"][i, : len(pts)] = True
    return out
