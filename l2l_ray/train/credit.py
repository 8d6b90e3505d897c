"""Held-out credit of pseudo-labels: which labels, trained on, lower the loss on held-out LABELED pairs.

    align = alignment_maps(cfg, state_ref, pairs, priors, heldout_pairs, heldout_masks)  # float16 (N, S, S)
    Feedback(sent_ids, post_probs, align)            # the selector's ``credit`` reward term (rewards.credit_map)

First order at the segmenter's logit head (a 1x1 conv, logits z = w . f + b on features f at 1/4 scale; a
TracIn-style gradient alignment): one BCE step on pixel j of pair i with label y moves (w, b) by
-lr * (p_ij - y) * [f_ij, 1]; the mean held-out BCE changes by -lr * (p_ij - y) * ([f_ij, 1] . g_H), g_H its
gradient. ``align`` holds [f_ij, 1] . g_H / ||g_H|| per pixel, scaled to unit RMS over the round and upsampled
to S x S. The held-out masks come from LABELED pairs only (``HeldOutTruth``); the unlabeled pairs' masks are
never read here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from l2l_ray.train.batches import rows_batch
from l2l_ray.train.infer import _tokenizer, cached_model, inference_threads, pair_rows
from l2l_ray.train.tables import ImageIndex


def head_features(cfg, state_ref, which: str, samples: Sequence[tuple], priors: dict | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, C+1, h, w) at the logit head's input, a constant-1 channel last for its bias;
    probabilities float32 (N, h, w) of the head's own logits) for (sample, Sentence) pairs (plain view)."""
    index = ImageIndex()
    rows = pair_rows(cfg, _tokenizer(state_ref), samples, priors, index)
    model = cached_model(cfg, state_ref, which, torch.device("cpu"))
    head = model.decoder.head[-1]  # the final 1x1 conv: (B, C, h, w) -> (B, 1, h, w)
    got: dict = {}
    hook = head.register_forward_hook(lambda m, inp, out: got.update(f=inp[0], z=out))
    images, feats, probs = index.load(cfg.data.image_size), [], []
    try:
        for a in range(0, len(rows), max(1, cfg.train.eval_batch_size)):
            idx = np.arange(a, min(len(rows), a + cfg.train.eval_batch_size))
            with torch.inference_mode():
                model(rows_batch(images, rows, idx, torch.device("cpu")))
            f = got["f"].float()
            feats.append(torch.cat([f, torch.ones_like(f[:, :1])], 1).contiguous().numpy())  # (b, C+1, h, w)
            probs.append(torch.sigmoid(got["z"].float())[:, 0].numpy())  # (b, h, w)
    finally:
        hook.remove()
    return np.concatenate(feats), np.concatenate(probs)


def heldout_gradient(feats: np.ndarray, probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """float32 (C+1,): gradient of the mean held-out BCE w.r.t. the head's (w, b): mean over pairs and pixels of
    (p - t) * f. feats (M, C+1, h, w); probs (M, h, w); masks bool (M, S, S) true masks, area-averaged to h x w."""
    h = probs.shape[-1]
    t = F.adaptive_avg_pool2d(torch.from_numpy(masks.astype(np.float32))[:, None], h)[:, 0].numpy()  # (M, h, w)
    return np.einsum("mchw,mhw->c", feats, probs - t) / max(1, probs.size)


def alignment_from_features(feats: np.ndarray, grad: np.ndarray, size: int) -> np.ndarray:
    """float16 (N, S, S): [f, 1] . g / ||g|| per pixel, unit RMS over all pairs, bilinearly upsampled to S."""
    g = grad / max(float(np.linalg.norm(grad)), 1e-12)
    a = np.einsum("nchw,c->nhw", feats, g)  # (N, h, w)
    a = a / max(float(np.sqrt(np.mean(a**2))), 1e-12)
    up = F.interpolate(torch.from_numpy(a)[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return up[:, 0].numpy().astype(np.float16)


def alignment_maps(cfg, state_ref, pairs: Sequence[tuple], priors: dict | None, heldout_pairs: Sequence[tuple],
                   heldout_masks: np.ndarray, which: str = "teacher") -> np.ndarray:
    """float16 (N, S, S) alignment maps of ``pairs`` with the held-out labeled gradient of model ``which``.

    heldout_masks: bool (M, S, S), the TRUE masks of ``heldout_pairs`` (LABELED pairs, e.g. ``HeldOutTruth.masks()``).
    """
    with inference_threads(cfg):
        fh, ph = head_features(cfg, state_ref, which, heldout_pairs, priors)
        grad = heldout_gradient(fh, ph, heldout_masks)
        f, _ = head_features(cfg, state_ref, which, pairs, priors)
    return alignment_from_features(f, grad, cfg.data.image_size)
