"""Methods x label ratios x seeds on the same data, segmenter and evaluation -> ``docs/results.md``.

    l2l experiment --config configs/synthetic.yaml
    l2l experiment --config configs/synthetic.yaml experiment.seeds=[0] experiment.label_ratios=[0.05]

Each run gets its own folder ``<run.dir>/<method>_p<ratio>_s<seed>``; a run whose ``metrics.json``
exists is not run again, so a killed experiment resumes. Every number in the table is read back from
those ``metrics.json`` files; the command that produced them is written above the table.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from l2l_ray.config import Config, apply_overrides
from l2l_ray.io import atomic_write_json, atomic_write_text, read_json


def planned_runs(cfg: Config) -> list[dict[str, Any]]:
    """The grid: every method (guided, and ``<method>_unguided`` with ``experiment.unguided``) and ablation x label
    ratio x seed, the 100% supervised ceiling per seed (both halves), the prior alone, and the bad-prior rows
    ``<row>_c<rate>`` (``experiment.corruption_rates`` at ``corruption_ratio``, ``corruption_seeds``).

    Each run is ``{"row": table row name, "data.label_ratio": p, "seed": s, "overrides": {dotted: value}}``.
    """
    ex = cfg.experiment
    named = {m: {"method": m} for m in ex.methods}
    rows = list(named.items())
    if ex.unguided:
        rows += [(f"{m}_unguided", {"method": m, "model.guidance": False}) for m in ex.methods]
    named.update({n: dict(o) for n, o in ex.ablations.items()})
    rows += [(n, dict(o)) for n, o in ex.ablations.items()]
    runs = [{"row": name, "data.label_ratio": float(p), "seed": int(s), "overrides": ov}
            for p in ex.label_ratios for name, ov in rows for s in ex.seeds]
    if ex.ceiling:
        ceil = [("supervised", {"method": "supervised"})]
        ceil += [("supervised_unguided", {"method": "supervised", "model.guidance": False})] if ex.unguided else []
        runs += [{"row": name, "data.label_ratio": 1.0, "seed": int(s), "overrides": ov}
                 for name, ov in ceil for s in (ex.ceiling_seeds or ex.seeds)]
    if ex.prior_row:  # no training, no labels: seed and ratio do not matter
        runs.append({"row": PRIOR_ROW, "data.label_ratio": 1.0, "seed": 0, "overrides": {}})
    for rate in ex.corruption_rates:
        runs += [{"row": f"{row}_c{rate:g}", "data.label_ratio": float(ex.corruption_ratio), "seed": int(s),
                  "overrides": {**named[row], "priors.corruption": float(rate)}}
                 for row in ex.corruption_rows for s in ex.corruption_seeds]
        if ex.prior_row:
            runs.append({"row": f"{PRIOR_ROW}_c{rate:g}", "data.label_ratio": 1.0, "seed": 0,
                         "overrides": {"priors.corruption": float(rate)}})
    return runs


PRIOR_ROW = "prior_only"


def evaluate_prior(cfg: Config) -> dict[str, Any]:
    """The prior's soft proposal alone as the prediction (> 0.5 at model resolution, no training), scored
    exactly as ``evaluate`` scores the segmenter; a sentence without a prior predicts an empty mask. With
    ``priors.corruption`` the corrupted priors are scored (the same corruption the methods see at seed 0)."""
    from l2l_ray.data.images import load_mask_resized
    from l2l_ray.metrics import size_terciles, summarize
    from l2l_ray.setup import setup_run

    t0 = time.perf_counter()
    inputs = setup_run(cfg, priors=True)
    priors, s, splits = inputs.priors, cfg.data.image_size, {}
    for name, samples in inputs.full.eval.items():
        inters, unions = np.zeros(len(samples), np.int64), np.zeros(len(samples), np.int64)
        areas = np.zeros(len(samples))
        for i, e in enumerate(samples):
            p = priors.get(e.sent_id)
            pred = p.soft_mask(s) > 0.5 if p is not None and p.ok else np.zeros((s, s), bool)
            gt = load_mask_resized(e.mask(), s)
            inters[i], unions[i], areas[i] = (pred & gt).sum(), (pred | gt).sum(), gt.mean()
        splits[name] = {**summarize(inters, unions), **size_terciles(inters, unions, areas)}
    return {"method": PRIOR_ROW, "label_ratio": None, "seed": None, "splits": splits, "rounds": [],
            "timing": {"total_s": round(time.perf_counter() - t0, 2)}, "priors": len(priors),
            "prior_corruption": {"rate": cfg.priors.corruption, **inputs.prior_stats}}


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
        if r["row"].startswith(PRIOR_ROW):
            atomic_write_json(run_dir / "metrics.json", evaluate_prior(apply_overrides(cfg, run_overrides(r, run_dir))))
        else:
            run(apply_overrides(cfg, run_overrides(r, run_dir)))
        print(f"l2l experiment: {run_name(r)} finished in {time.perf_counter() - tic:.0f} s", flush=True)
    command = "l2l " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "l2l experiment"
    plots = write_plots(cfg, _groups(cfg), Path(cfg.experiment.out))
    table = results_table(cfg, command, plots)
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


GUIDED_BASELINES = ("supervised", "mean_teacher", "semires", "l2l_no_rl")


def _vals(groups: dict, row: str, ratio: float) -> list[float]:
    return [m["splits"]["val"]["mIoU"] for m in groups.get((row, ratio), [])]


def comparison(groups: dict[tuple[str, float], list[dict]], method: str = "l2l",
               baselines: tuple[str, ...] = (*GUIDED_BASELINES, PRIOR_ROW)) -> list[str]:
    """Per label ratio: ``method``'s mean val mIoU minus each baseline's (seed means), with the larger seed std of
    the two, and the share of the gap from guided supervised at that ratio to guided supervised at 100% closed."""
    lines = []
    for ratio in sorted({p for _, p in groups if p < 1.0}):
        ours = _vals(groups, method, ratio)
        if not ours:
            continue
        diffs = []
        for b in baselines:
            theirs = _vals(groups, b, 1.0 if b == PRIOR_ROW else ratio)
            if theirs:
                std = 100 * max(np.std(ours), np.std(theirs))
                diffs.append(f"{b} {100 * (np.mean(ours) - np.mean(theirs)):+.1f} (larger std {std:.1f})")
        line = (f"- labels {ratio:g}: {method} val mIoU {100 * np.mean(ours):.1f}; difference to "
                + (", ".join(diffs) if diffs else "(no baseline run finished yet)"))
        low, high = _vals(groups, "supervised", ratio), _vals(groups, "supervised", 1.0)
        if low and high and np.mean(high) > np.mean(low):
            closed = (np.mean(ours) - np.mean(low)) / (np.mean(high) - np.mean(low))
            line += f"; gap from guided supervised to its 100% ceiling closed: {100 * closed:.0f}%"
        lines.append(line)
    return lines


def round_log(groups: dict[tuple[str, float], list[dict]]) -> list[str]:
    """Per-round diagnostics of the semi-supervised runs, averaged over seeds (round 0 = the warm-up)."""
    head = ("| method | labels | round | val mIoU | trusted pixels | rejected pairs | pseudo IoU (diag.) | "
            "reward total | reward prior | reward consistency | reward credit | credit std | reward labeled IoU | "
            "overrule share | overrule right | prior wrong | held-out labeled IoU (teacher) | top candidate |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (row, ratio), ms in groups.items():
        if not any(m.get("rounds") for m in ms):
            continue
        warm = _cell(_mean([(m.get("warmup_val") or {}).get("mIoU") for m in ms]))
        lines.append(f"| {row} | {ratio:g} | 0 (warm-up) | {warm}" + " |" * 15)
        for k in range(max(len(m["rounds"]) for m in ms)):
            rs = [m["rounds"][k] for m in ms if len(m["rounds"]) > k]
            rw = lambda key, rs=rs: _cell(_mean([(x.get("reward") or {}).get(key) for x in rs]))  # noqa: E731
            px = lambda key, rs=rs: _cell(_mean([x.get(f"practice/{key}_before") for x in rs]))  # noqa: E731
            lines.append(
                f"| {row} | {ratio:g} | {k + 1} | {_cell(_mean([x['val']['mIoU'] for x in rs]))} | "
                f"{_cell(_mean([x.get('trusted_pixel_share') for x in rs]))} | "
                f"{_cell(_mean([x.get('rejected_share') for x in rs]))} | "
                f"{_cell(_mean([x.get('pseudo_iou_diag') for x in rs]))} | {rw('total')} | {rw('prior')} | "
                f"{rw('consistency')} | {rw('credit')} | {rw('credit_std')} | {rw('labeled_iou')} | "
                f"{px('overrule_share')} | {px('overrule_right')} | "
                f"{_cell(_mean([x.get('practice/prior_wrong_share') for x in rs]))} | "
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


def _corruption_rows(cfg: Config, groups: dict) -> dict[str, dict[float, list[float]]]:
    """row -> {rate: val mIoUs}; rate 0 is the main grid's row at ``corruption_ratio`` (same seeds only)."""
    ex = cfg.experiment
    out: dict[str, dict[float, list[float]]] = {}
    for row in [*ex.corruption_rows, PRIOR_ROW]:
        ratio = 1.0 if row == PRIOR_ROW else float(ex.corruption_ratio)
        seeds = {0} if row == PRIOR_ROW else set(ex.corruption_seeds)
        clean = [m["splits"]["val"]["mIoU"] for m in groups.get((row, ratio), []) if m.get("seed", 0) in seeds
                 or row == PRIOR_ROW]
        rates = {0.0: clean} if clean else {}
        for rate in ex.corruption_rates:
            vals = _vals(groups, f"{row}_c{rate:g}", ratio)
            if vals:
                rates[float(rate)] = vals
        if len(rates) > 1:
            out[row] = rates
    return out


def corruption_table(cfg: Config, groups: dict) -> list[str]:
    """val mIoU (%) per row against the corruption rate, and each row's loss from rate 0."""
    rows = _corruption_rows(cfg, groups)
    if not rows:
        return []
    rates = sorted({r for v in rows.values() for r in v})
    head = "| method | " + " | ".join(f"corruption {r:g}" for r in rates) + " | loss at the highest rate |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row, by_rate in rows.items():
        cells = [_fmt(by_rate[r]) if r in by_rate else "n/a" for r in rates]
        top = max(by_rate)
        loss = 100 * (np.mean(by_rate[0.0]) - np.mean(by_rate[top])) if 0.0 in by_rate and top > 0 else None
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {'n/a' if loss is None else f'{loss:.1f}'} |")
    return lines


def write_plots(cfg: Config, groups: dict, out: Path) -> list[str]:
    """PNG plots beside the results page: val mIoU per round per method (round 0 = warm-up; one panel per label
    ratio) and val mIoU against the corruption rate. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    ratios = sorted({p for (row, p), ms in groups.items() if p < 1.0 and any(m.get("rounds") for m in ms)})
    if ratios:
        fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4), squeeze=False)
        for ax, ratio in zip(axes[0], ratios, strict=True):
            for (row, p), ms in groups.items():
                if p != ratio or not any(m.get("rounds") for m in ms) or _is_corruption_row(row):
                    continue
                n = max(len(m["rounds"]) for m in ms)
                ys = [_mean([(m.get("warmup_val") or {}).get("mIoU") for m in ms])]
                ys += [_mean([m["rounds"][k]["val"]["mIoU"] for m in ms if len(m["rounds"]) > k]) for k in range(n)]
                ax.plot(range(n + 1), [100 * y if y is not None else np.nan for y in ys], marker="o", label=row)
            ax.set(title=f"labels {ratio:g}", xlabel="round (0 = warm-up)", ylabel="val mIoU (%)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=7)
        names.append(_save_fig(fig, out.with_name(out.stem + "_rounds.png")))
    rows = _corruption_rows(cfg, groups)
    if rows:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for row, by_rate in rows.items():
            rates = sorted(by_rate)
            ax.errorbar(rates, [100 * np.mean(by_rate[r]) for r in rates], yerr=[100 * np.std(by_rate[r])
                        for r in rates], marker="o", capsize=3, label=row)
        ax.set(title=f"bad priors (labels {cfg.experiment.corruption_ratio:g})", xlabel="corruption rate",
               ylabel="val mIoU (%)")
        ax.legend(fontsize=7)
        names.append(_save_fig(fig, out.with_name(out.stem + "_corruption.png")))
    return names


def _save_fig(fig, path: Path) -> str:
    import io

    import matplotlib.pyplot as plt

    from l2l_ray.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def _title(cfg: Config) -> str:
    d = cfg.data
    what = "the built-in synthetic data" if d.dataset == "synthref" else f"{d.dataset} ({d.split_by})"
    return f"# Results on {what} (`{d.root}`, {d.image_size} px)"


def results_table(cfg: Config, command: str, plots: list[str] | None = None) -> str:
    """Markdown: val/test mIoU and oIoU (mean ± std over seeds, in %) per row and label ratio (guided rows, then
    ``*_unguided``), l2l's lead over each baseline, the bad-prior table, the plots and the per-round log; every
    number read from the runs' metrics.json."""
    groups = _groups(cfg)
    splits = sorted({s for ms in groups.values() for m in ms for s in m.get("splits", {})},
                    key=lambda s: (s != "val", s))
    head = "| method | guided | labels | seeds | " + " | ".join(f"{s} mIoU | {s} oIoU" for s in splits) + " | wall s |"
    lines = [
        _title(cfg),
        "",
        f"Produced by `{command}` (config `{cfg.run.dir}/*/config.yaml`); mean ± std over seeds, in %.",
        "Every number is read from the runs' `metrics.json`; nothing here is typed by hand. `wall s`: the runs' "
        "own wall time, mean over seeds (other work on the machine at the time inflates it). Guided: the "
        f"segmenter sees the {cfg.priors.backend} prior (model.guidance); `*_unguided` rows do not.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    main = {k: v for k, v in groups.items() if not _is_corruption_row(k[0])}
    order = sorted(main.items(), key=lambda kv: (kv[0][1], kv[0][0].endswith("_unguided")))
    for (row, ratio), ms in order:
        cells = []
        for s in splits:
            for key in ("mIoU", "oIoU"):
                cells.append(_fmt([m["splits"][s][key] for m in ms if s in m.get("splits", {})]))
        wall = np.mean([m.get("timing", {}).get("total_s", float("nan")) for m in ms])
        labels = "none (no training)" if row == PRIOR_ROW else f"{ratio:g}"
        guided = "-" if row == PRIOR_ROW else ("no" if row.endswith("_unguided") or
                                                any(m.get("guidance") is False for m in ms) else "yes")
        lines.append(f"| {row} | {guided} | {labels} | {len(ms)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    ablations = cfg.experiment.ablations
    if ablations:
        lines += ["", "Ablations (each with these overrides): "
                  + "; ".join(f"`{n}`: " + ", ".join(f"{k}={v}" for k, v in o.items()) for n, o in ablations.items())]
    if (PRIOR_ROW, 1.0) in groups:
        lines += ["", f"`{PRIOR_ROW}`: the {cfg.priors.backend} prior's soft proposal alone (> 0.5) as the prediction, "
                  "no segmenter; what guidance starts from."]
    lead = comparison(groups)
    if lead:
        lines += ["", "## l2l against the guided baselines (val mIoU, mean over seeds, points)", "", *lead]
    bad = corruption_table(cfg, groups)
    if bad:
        lines += ["", f"## Bad priors (labels {cfg.experiment.corruption_ratio:g}, val mIoU %)", "",
                  "`priors.corruption`: that share of sentences gets the prior of another object of the same image "
                  f"({100 * (1 - cfg.priors.corruption_drop):.0f}%) or no prior "
                  f"({100 * cfg.priors.corruption_drop:.0f}%), "
                  "in training, selection and evaluation alike; ids only, no mask is read.", "", *bad]
    for name in plots or []:
        lines += ["", f"![{name}]({name})"]
    log = round_log(groups)
    if len(log) > 2:
        lines += ["", "## Per-round log (mean over seeds)", "",
                  "Trusted pixels: share of pixels of kept pairs with non-zero weight; rejected pairs: share of "
                  "pairs dropped; pseudo IoU: selected pseudo-labels against the hidden truth of their unlabeled "
                  "refs, a diagnostic only (never a training signal); rewards: the selector's terms for the "
                  "previous round's exploratory choices (credit: first-order drop of the held-out labeled loss "
                  "from training on the chosen labels, and its spread over pairs); overrule: share of the "
                  "round's practice pairs (held-out LABELED, before the round's practice) where the selector's "
                  "label is not the prior's region, the share of those where it is closer to the truth than the "
                  "prior, and the share of pairs whose prior is wrong (IoU < 0.5); held-out labeled IoU: the "
                  "teacher on that fold (l2l with RL only).", "", *log]
    return "\n".join(lines) + "\n"


def _is_corruption_row(row: str) -> bool:
    return re.search(r"_c[0-9.]+$", row) is not None
