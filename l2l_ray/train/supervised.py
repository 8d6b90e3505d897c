"""The supervised baseline: train on the labeled part only, then evaluate every split.

    l2l train --config configs/synthetic.yaml method=supervised data.label_ratio=0.05
    l2l train --config configs/synthetic.yaml method=supervised data.label_ratio=1.0   # the ceiling

(the driver calls ``run_supervised(cfg)`` for ``method=supervised``). Writes ``<run.dir>/config.yaml`` and
``<run.dir>/metrics.json`` = {"method", "label_ratio", "splits": {split: metrics}, "rounds": [], "timing",
"history", "data"}. Re-running with the same run folder resumes training from the last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from l2l_ray.io import atomic_write_json

STAGE = "supervised"


def run_supervised(cfg, priors: dict | None = None) -> dict:
    """Fit on labeled samples for ``cfg.train.epochs``, evaluate all splits, write metrics.json; returns it.

    ``priors``: {sent_id: Prior} to guide the segmenter with, or None (every sample gets "no prior").
    """
    from l2l_ray.data import ensure_data, load_dataset
    from l2l_ray.train.fit import fit_segmenter
    from l2l_ray.train.infer import evaluate

    t0 = time.perf_counter()
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    ensure_data(cfg)
    data = load_dataset(cfg, run_dir)
    t_data = time.perf_counter()
    fit = fit_segmenter(cfg, run_dir, STAGE, data, priors, cfg.train.epochs)
    t_fit = time.perf_counter()
    splits = evaluate(cfg, fit.state_ref, data, priors)
    t_eval = time.perf_counter()
    trained = [h for h in fit.history if h.get("time_s")]
    samples = sum(h["samples"] for h in trained)
    train_s = sum(h["time_s"] for h in trained)
    metrics = {
        "method": "supervised", "label_ratio": cfg.data.label_ratio, "seed": cfg.seed, "preset": cfg.model.preset,
        "splits": splits, "rounds": [],
        "timing": {"data_s": round(t_data - t0, 3), "fit_s": round(t_fit - t_data, 3),
                   "eval_s": round(t_eval - t_fit, 3), "total_s": round(t_eval - t0, 3),
                   "train_loop_s": round(train_s, 3),
                   "train_samples_per_s": round(samples / train_s, 2) if train_s else None},
        "history": fit.history, "checkpoint": fit.checkpoint_dir, "data": data.stats,
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    for name, m in splits.items():
        print(f"[{STAGE}] {name}: mIoU {m['mIoU']:.4f} oIoU {m['oIoU']:.4f} prec@0.5 {m['prec@0.5']:.4f} "
              f"(n={m['n']})", flush=True)
    return metrics
