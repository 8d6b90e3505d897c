"""The run's gallery: fixed val pairs with prior, proposal, teacher, the pseudo-label the method would select,
prediction and truth (``report.save_gallery`` draws it; column titles in ``report.GALLERY_COLUMNS``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l2l_ray.config import Config, apply_overrides
from l2l_ray.records import Prior
from l2l_ray.selection import build_candidates, select_for_method


@dataclass(frozen=True)
class _Sent:
    sent_id: int
    text: str


def prior_for(priors: dict | None, sent_id: int, ref_id: int) -> Prior:
    """``priors[sent_id]``, or a no-prior record (disabled: no priors in this run; model_error: missing)."""
    if priors is None:
        return Prior(sent_id=sent_id, ref_id=ref_id, status="disabled")
    return priors.get(sent_id) or Prior(sent_id=sent_id, ref_id=ref_id, status="model_error")


def save_run_gallery(cfg: Config, run_dir: Path, full, priors: dict | None, guide: dict | None, state,
                     selector=None) -> None:
    """``<run_dir>/gallery.png``: ``semi.gallery_size`` val pairs spread over the split. The pseudo-label column
    is what the method would select now (greedy; none for supervised: all ignored)."""
    from l2l_ray.data.images import load_image, load_mask_resized
    from l2l_ray.report import save_gallery
    from l2l_ray.train import predict_samples

    val = full.eval.get("val", [])[:: max(1, len(full.eval.get("val", [])) // max(cfg.semi.gallery_size, 1))]
    val = val[: cfg.semi.gallery_size]
    if not val:
        return
    s = cfg.data.image_size
    pairs = [(e, _Sent(e.sent_id, e.sentence)) for e in val]
    pred = predict_samples(cfg, state.state_ref, "student", pairs, guide)
    teacher, flip = predict_samples(cfg, state.state_ref, "teacher", pairs, guide, two_views=True)
    plist = [prior_for(priors, e.sent_id, e.ref_id) for e in val]
    cand = build_candidates(teacher, flip, plist, s, sent_ids=[e.sent_id for e in val], ref_ids=[e.ref_id for e in val])
    use_rl = cfg.method == "l2l" and cfg.semi.use_rl
    rule_cfg = apply_overrides(cfg, {"semi.use_rl": False}) if use_rl and selector is None else cfg  # fixed rule
    pl = select_for_method(cfg.method, cand, rule_cfg, selector, explore=False)  # None for supervised
    pseudo = np.full((len(val), s, s), 128, np.uint8)  # 128 = ignored (not trained on)
    if pl is not None:
        rows = {int(i): k for k, i in enumerate(pl.sent_ids)}
        labels, weights = pl.label_masks(), pl.weights
        for k, e in enumerate(val):
            if e.sent_id in rows:
                j = rows[e.sent_id]
                pseudo[k] = np.where(weights[j] > 0, np.where(labels[j], 255, 0), 128)
    boxes = np.array([p.box if p.box is not None else (np.nan,) * 4 for p in plist], np.float32)
    save_gallery(run_dir, np.stack([load_image(e.image_path, s) for e in val]), [e.sentence for e in val], boxes,
                 np.stack([(p.soft_mask(s) * 255).astype(np.uint8) for p in plist]), teacher, pseudo,
                 ((pred >= 128) * 255).astype(np.uint8),
                 np.stack([load_mask_resized(e.mask(), s).astype(np.uint8) * 255 for e in val]))
