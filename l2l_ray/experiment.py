"""Methods x label ratios x seeds on the same data, segmenter and evaluation -> ``docs/results.md``.

    l2l experiment --config configs/synthetic.yaml
    l2l experiment --config configs/synthetic.yaml experiment.seeds=[0] experiment.label_ratios=[0.05]

Each run gets its own folder ``<run.dir>/<method>_p<ratio>_s<seed>``; a run whose ``metrics.json``
exists is not run again, so a killed experiment resumes. Every number in the table is read back from
those ``metrics.json`` files; the command that produced them is written above the table.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from l2l_ray.config import Config, apply_overrides
from l2l_ray.io import atomic_write_json, atomic_write_text, read_json


def planned_runs(cfg: Config) -> list[dict[str, Any]]:
    """The grid: every method and ablation x label ratio x seed, plus the 100% supervised ceiling per seed.

    Each run is ``{"row": table row name, "data.label_ratio": p, "seed": s, "overrides": {dotted: value}}``.
    """
    ex = cfg.experiment
    rows = [(m, {"method": m}) for m in ex.methods] + [(n, dict(o)) for n, o in ex.ablations.items()]
    runs = [{"row": name, "data.label_ratio": float(p), "seed": int(s), "overrides": ov}
            for p in ex.label_ratios for name, ov in rows for s in ex.seeds]
    if ex.ceiling:
        runs += [{"row": "supervised", "data.label_ratio": 1.0, "seed": int(s), "overrides": {"method": "supervised"}}
                 for s in ex.seeds]
    if ex.prior_row:  # no training, no labels: seed and ratio do not matter
        runs.append({"row": PRIOR_ROW, "data.label_ratio": 1.0, "seed": 0, "overrides": {}})
    return runs


PRIOR_ROW = "prior_only"


def evaluate_prior(cfg: Config) -> dict[str, Any]:
    """The prior's soft proposal alone as the prediction (> 0.5 at model resolution, no training), scored
    exactly as ``evaluate`` scores the segmenter; a sentence without a prior predicts an empty mask."""
    from l2l_ray.data import ensure_data, load_dataset
    from l2l_ray.data.images import load_mask_resized
    from l2l_ray.metrics import size_terciles, summarize
    from l2l_ray.priors.pipeline import load_priors, run_priors
    from l2l_ray.ray_utils import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(cfg)
    ensure_data(cfg)
    run_priors(cfg)  # computes only what the cache lacks
    priors = load_priors(cfg, allow_missing=True)
    bundle = load_dataset(cfg)
    s, splits = cfg.data.image_size, {}
    for name, samples in bundle.eval.items():
        inters, unions = np.zeros(len(samples), np.int64), np.zeros(len(samples), np.int64)
        areas = np.zeros(len(samples))
        for i, e in enumerate(samples):
            p = priors.get(e.sent_id)
            pred = p.soft_mask(s) > 0.5 if p is not None else np.zeros((s, s), bool)
            gt = load_mask_resized(e.mask(), s)
            inters[i], unions[i], areas[i] = (pred & gt).sum(), (pred | gt).sum(), gt.mean()
        splits[name] = {**summarize(inters, unions), **size_terciles(inters, unions, areas)}
    return {"method": PRIOR_ROW, "label_ratio": None, "seed": None, "splits": splits, "rounds": [],
            "timing": {"total_s": round(time.perf_counter() - t0, 2)}, "priors": len(priors)}


def run_name(r: dict[str, Any]) -> str:
    return f"{r['row']}_p{r['data.label_ratio']:g}_s{r['seed']}"


def run_overrides(r: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return {**r["overrides"], "data.label_ratio": r["data.label_ratio"], "seed": r["seed"], "run.dir": str(run_dir)}


def run_experiment(cfg: Config) -> str:
    """Run every planned run that has no ``metrics.json`` yet, then write the table; return its path."""
    from l2l_ray.driver import run

    base = Path(cfg.run.dir)
    for r in planned_runs(cfg):
        run_dir = base / run_name(r)
        if (run_dir / "metrics.json").exists():
            print(f"l2l experiment: {run_name(r)} already done, skipping", flush=True)
            continue
        print(f"l2l experiment: running {run_name(r)}", flush=True)
        tic = time.perf_counter()
        if r["row"] == PRIOR_ROW:
            atomic_write_json(run_dir / "metrics.json", evaluate_prior(apply_overrides(cfg, run_overrides(r, run_dir))))
        else:
            run(apply_overrides(cfg, run_overrides(r, run_dir)))
        print(f"l2l experiment: {run_name(r)} finished in {time.perf_counter() - tic:.0f} s", flush=True)
    command = "l2l " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "l2l experiment"
    table = results_table(cfg, command)
    atomic_write_text(cfg.experiment.out, table)
    print(table, flush=True)
    return cfg.experiment.out


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    arr = np.asarray(values) * 100
    return f"{arr.mean():.1f} ± {arr.std():.1f}" if len(arr) > 1 else f"{arr.mean():.1f}"


def _groups(cfg: Config) -> dict[tuple[str, float], list[dict]]:
    """(row, label ratio) -> the finished runs' metrics, in the order of the plan."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in planned_runs(cfg):
        m = read_json(Path(cfg.run.dir) / run_name(r) / "metrics.json")
        if m is not None:
            groups.setdefault((r["row"], r["data.label_ratio"]), []).append(m)
    return dict(sorted(groups.items(), key=lambda kv: kv[0][1]))  # stable: plan order within a ratio


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _cell(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}"


def comparison(groups: dict[tuple[str, float], list[dict]], method: str = "l2l",
               baselines: tuple[str, ...] = ("supervised", "mean_teacher", "semires", PRIOR_ROW)) -> list[str]:
    """One line per label ratio: ``method``'s mean val mIoU minus each baseline's (seed means)."""
    lines = []
    for ratio in sorted({p for _, p in groups if p < 1.0}):
        ours = _mean([m["splits"]["val"]["mIoU"] for m in groups.get((method, ratio), [])])
        if ours is None:
            continue
        diffs = []
        for b in baselines:
            theirs = _mean([m["splits"]["val"]["mIoU"] for m in groups.get((b, 1.0 if b == PRIOR_ROW else ratio), [])])
            if theirs is not None:
                diffs.append(f"{b} {100 * (ours - theirs):+.1f}")
        lines.append(f"- labels {ratio:g}: {method} val mIoU {100 * ours:.1f}; difference to "
                     + (", ".join(diffs) if diffs else "(no baseline run finished yet)"))
    return lines


def round_log(groups: dict[tuple[str, float], list[dict]]) -> list[str]:
    """Per-round diagnostics of the semi-supervised runs, averaged over seeds."""
    head = ("| method | labels | round | val mIoU | trusted pixels | rejected pairs | pseudo IoU (diag.) | "
            "reward total | reward prior | reward consistency | reward progress | reward labeled IoU | "
            "held-out labeled IoU (teacher) | top candidate |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (row, ratio), ms in groups.items():
        if not any(m.get("rounds") for m in ms):
            continue
        warm = _cell(_mean([(m.get("warmup_val") or {}).get("mIoU") for m in ms]))
        lines.append(f"| {row} | {ratio:g} | 0 (warm-up) | {warm}" + " |" * 11)
        for k in range(max(len(m["rounds"]) for m in ms)):
            rs = [m["rounds"][k] for m in ms if len(m["rounds"]) > k]
            rw = lambda key, rs=rs: _cell(_mean([(x.get("reward") or {}).get(key) for x in rs]))  # noqa: E731
            lines.append(
                f"| {row} | {ratio:g} | {k + 1} | {_cell(_mean([x['val']['mIoU'] for x in rs]))} | "
                f"{_cell(_mean([x.get('trusted_pixel_share') for x in rs]))} | "
                f"{_cell(_mean([x.get('rejected_share') for x in rs]))} | "
                f"{_cell(_mean([x.get('pseudo_iou_diag') for x in rs]))} | {rw('total')} | {rw('prior')} | "
                f"{rw('consistency')} | {rw('progress')} | {rw('labeled_iou')} | "
                f"{_cell(_mean([x.get('heldout_teacher_iou') for x in rs]))} | {_top_candidate(rs)} |")
    return lines


def _top_candidate(rs: list[dict]) -> str:
    shares: dict[str, list[float]] = {}
    for x in rs:
        for k, v in x.items():
            if k.startswith("cand_share/"):
                shares.setdefault(k.split("/", 1)[1], []).append(float(v))
    if not shares:
        return ""
    name, vals = max(shares.items(), key=lambda kv: np.mean(kv[1]))
    return f"{name} {np.mean(vals):.2f}"


def results_table(cfg: Config, command: str) -> str:
    """Markdown: val/test mIoU and oIoU (mean ± std over seeds, in %) per row and label ratio, l2l's lead
    over each baseline, and the per-round diagnostics; every number read from the runs' metrics.json."""
    groups = _groups(cfg)
    splits = sorted({s for ms in groups.values() for m in ms for s in m.get("splits", {})},
                    key=lambda s: (s != "val", s))
    head = "| method | labels | seeds | " + " | ".join(f"{s} mIoU | {s} oIoU" for s in splits) + " | wall s |"
    lines = [
        "# Results on the built-in synthetic data",
        "",
        f"Produced by `{command}` (config `{cfg.run.dir}/*/config.yaml`); mean ± std over seeds, in %.",
        "Every number is read from the runs' `metrics.json`; nothing here is typed by hand. `wall s`: the runs' "
        "own wall time, mean over seeds (other work on the machine at the time inflates it).",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for (row, ratio), ms in groups.items():
        cells = []
        for s in splits:
            for key in ("mIoU", "oIoU"):
                cells.append(_fmt([m["splits"][s][key] for m in ms if s in m.get("splits", {})]))
        wall = np.mean([m.get("timing", {}).get("total_s", float("nan")) for m in ms])
        labels = "none (no training)" if row == PRIOR_ROW else f"{ratio:g}"
        lines.append(f"| {row} | {labels} | {len(ms)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    ablations = cfg.experiment.ablations
    if ablations:
        lines += ["", "Ablations (each l2l with these overrides): "
                  + "; ".join(f"`{n}`: " + ", ".join(f"{k}={v}" for k, v in o.items()) for n, o in ablations.items())]
    if (PRIOR_ROW, 1.0) in groups:
        lines += ["", f"`{PRIOR_ROW}`: the {cfg.priors.backend} prior's soft proposal alone (> 0.5) as the prediction, "
                  "no segmenter; what guidance starts from."]
    lead = comparison(groups)
    if lead:
        lines += ["", "## l2l against the baselines (val mIoU, mean over seeds, points)", "", *lead]
    log = round_log(groups)
    if len(log) > 2:
        lines += ["", "## Per-round log (mean over seeds)", "",
                  "Trusted pixels: share of pixels of kept pairs with non-zero weight; rejected pairs: share of "
                  "pairs dropped; pseudo IoU: selected pseudo-labels against the hidden truth of their unlabeled "
                  "refs, a diagnostic only (never a training signal); rewards: the selector's terms for the "
                  "previous round's exploratory choices; held-out labeled IoU: the teacher on the labeled "
                  "pairs kept out of training (l2l with RL only).", "", *log]
    return "\n".join(lines) + "\n"
