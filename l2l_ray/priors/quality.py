"""How good are the priors where the truth is known (labeled and evaluation samples)? No Ray imports.

    q = prior_quality(priors, bundle.labeled + bundle.eval["val"], image_size=cfg.priors.proposal_size)
    print(format_quality(q))

For every sentence of a sample with a mask: the prior's box IoU against the true mask's bounding box,
and the soft proposal's IoU (proposal > 0.5 against the truth, both at ``image_size`` x ``image_size``
over the square-resized image), beside two trivial baselines that use neither the image nor the
sentence: a centred box covering the middle 50% of each side, and the whole image. A sentence whose
prior is missing or not "ok" scores 0 for the prior (its proposal is the uninformative 0.5 map, which is
empty at > 0.5); ``prior_ok_only`` gives the prior's numbers over the covered sentences alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import cv2
import numpy as np

from l2l_ray.metrics import summarize
from l2l_ray.records import EvalSample, LabeledSample, Prior

CENTRE_BOX = (0.25, 0.25, 0.75, 0.75)
WHOLE_BOX = (0.0, 0.0, 1.0, 1.0)
METHODS = ("prior", "centre_box", "whole_image")


def box_iou(a, b) -> float:
    """IoU of two normalised xyxy boxes (0 when either is None or the union is empty)."""
    if a is None or b is None:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Normalised xyxy bounding box of a bool mask (H, W) (pixel edges, so one pixel has a non-zero box)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)


def box_mask(box, size: int) -> np.ndarray:
    """bool (size, size): pixels whose centres lie inside the normalised box."""
    c = (np.arange(size) + 0.5) / size
    return ((c[:, None] >= box[1]) & (c[:, None] <= box[3])) & ((c[None, :] >= box[0]) & (c[None, :] <= box[2]))


def truth_at(mask: np.ndarray, size: int) -> np.ndarray:
    """bool (size, size): the true mask square-resized by area averaging, kept where >= half covered."""
    if mask.shape == (size, size):
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) >= 0.5


def _sentences(sample) -> list[int]:
    if isinstance(sample, EvalSample):
        return [sample.sent_id]
    return [s.sent_id for s in sample.sentences]


def prior_quality(priors: Mapping[int, Prior], samples: Iterable[LabeledSample | EvalSample],
                  image_size: int = 64) -> dict:
    """Quality table of priors against known masks (see the module docstring).

    priors: sent_id -> Prior. samples: LabeledSample / EvalSample (anything with ``mask()``).
    Returns {"n", "coverage", "failures": {reason: n}, "box_iou": {method: mean}, "box_prec@0.5": {...},
    "proposal_mIoU": {...}, "proposal_oIoU": {...}, "proposal_prec@0.5": {...}, "prior_ok_only": {...},
    "size", "skipped_empty_truth"}; methods are "prior", "centre_box", "whole_image".
    """
    size = int(image_size)
    boxes: dict[str, list[float]] = {m: [] for m in METHODS}
    inter: dict[str, list[int]] = {m: [] for m in METHODS}
    union: dict[str, list[int]] = {m: [] for m in METHODS}
    status: Counter = Counter()
    ok_idx: list[int] = []
    skipped = 0
    fixed = {"centre_box": (CENTRE_BOX, box_mask(CENTRE_BOX, size)),
             "whole_image": (WHOLE_BOX, np.ones((size, size), bool))}
    for sample in samples:
        full = sample.mask()
        true_box = mask_box(full)
        if true_box is None:
            skipped += len(_sentences(sample))
            continue
        truth = truth_at(full, size)
        for sent_id in _sentences(sample):
            prior = priors.get(sent_id)
            st = "missing" if prior is None else prior.status
            status[st] += 1
            ok = st == "ok"
            if ok:
                ok_idx.append(len(boxes["prior"]))
            pred = prior.soft_mask(size) > 0.5 if ok else np.zeros((size, size), bool)
            preds = {"prior": (prior.box if ok else None, pred), **fixed}
            for m, (box, mask) in preds.items():
                boxes[m].append(box_iou(box, true_box))
                inter[m].append(int((mask & truth).sum()))
                union[m].append(int((mask | truth).sum()))
    n = sum(status.values())
    out: dict = {"n": n, "size": size, "coverage": round(status["ok"] / n, 4) if n else 0.0,
                 "failures": {k: v for k, v in sorted(status.items()) if k != "ok"}, "skipped_empty_truth": skipped}
    for key in ("box_iou", "box_prec@0.5", "proposal_mIoU", "proposal_oIoU", "proposal_prec@0.5"):
        out[key] = {}
    for m in METHODS:
        b = np.asarray(boxes[m], np.float64)
        s = summarize(np.asarray(inter[m], np.int64), np.asarray(union[m], np.int64))
        out["box_iou"][m] = round(float(b.mean()), 4) if n else 0.0
        out["box_prec@0.5"][m] = round(float((b >= 0.5).mean()), 4) if n else 0.0
        out["proposal_mIoU"][m] = round(s["mIoU"], 4)
        out["proposal_oIoU"][m] = round(s["oIoU"], 4)
        out["proposal_prec@0.5"][m] = round(s["prec@0.5"], 4)
    idx = np.asarray(ok_idx, np.int64)
    ok_inter, ok_union = np.asarray(inter["prior"], np.int64)[idx], np.asarray(union["prior"], np.int64)[idx]
    out["prior_ok_only"] = {"n": len(idx),
                            "box_iou": round(float(np.asarray(boxes["prior"])[idx].mean()), 4) if len(idx) else 0.0,
                            "proposal_mIoU": round(summarize(ok_inter, ok_union)["mIoU"], 4)}
    return out


def format_quality(q: dict) -> str:
    """A small text table of ``prior_quality``'s result."""
    lines = [f"prior quality on {q['n']} sentences with known masks (proposals at {q['size']} px): "
             f"coverage {q['coverage']:.1%}, failures {q['failures'] or 'none'}",
             f"{'':14s}{'box IoU':>9s}{'box P@0.5':>11s}{'prop mIoU':>11s}{'prop oIoU':>11s}{'prop P@0.5':>12s}"]
    for m in METHODS:
        lines.append(f"{m:14s}{q['box_iou'][m]:9.3f}{q['box_prec@0.5'][m]:11.3f}{q['proposal_mIoU'][m]:11.3f}"
                     f"{q['proposal_oIoU'][m]:11.3f}{q['proposal_prec@0.5'][m]:12.3f}")
    ok = q["prior_ok_only"]
    lines.append(f"prior, ok only ({ok['n']}): box IoU {ok['box_iou']:.3f}, proposal mIoU {ok['proposal_mIoU']:.3f}")
    return "\n".join(lines)
