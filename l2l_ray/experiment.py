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
from l2l_ray.io import atomic_write_text, read_json


def planned_runs(cfg: Config) -> list[dict[str, Any]]:
    """The (method, label_ratio, seed) grid, plus the 100% supervised ceiling per seed."""
    ex = cfg.experiment
    runs = [{"method": m, "data.label_ratio": float(p), "seed": int(s)}
            for p in ex.label_ratios for m in ex.methods for s in ex.seeds]
    if ex.ceiling:
        runs += [{"method": "supervised", "data.label_ratio": 1.0, "seed": int(s)} for s in ex.seeds]
    return runs


def run_name(r: dict[str, Any]) -> str:
    return f"{r['method']}_p{r['data.label_ratio']:g}_s{r['seed']}"


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
        run(apply_overrides(cfg, {**r, "run.dir": str(run_dir)}))
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


def results_table(cfg: Config, command: str) -> str:
    """Markdown table of val/test mIoU and oIoU (mean ± std over seeds, in %), from the runs' metrics."""
    base = Path(cfg.run.dir)
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in planned_runs(cfg):
        m = read_json(base / run_name(r) / "metrics.json")
        if m is not None:
            groups.setdefault((r["method"], r["data.label_ratio"]), []).append(m)
    splits = sorted({s for ms in groups.values() for m in ms for s in m.get("splits", {})},
                    key=lambda s: (s != "val", s))
    head = "| method | labels | seeds | " + " | ".join(f"{s} mIoU | {s} oIoU" for s in splits) + " | wall s |"
    lines = [
        "# Results on the built-in synthetic data",
        "",
        f"Produced by `{command}` (config `{cfg.run.dir}/*/config.yaml`); mean ± std over seeds, in %.",
        "Every number is read from the runs' `metrics.json`; nothing here is typed by hand.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for (method, ratio), ms in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for s in splits:
            for key in ("mIoU", "oIoU"):
                cells.append(_fmt([m["splits"][s][key] for m in ms if s in m.get("splits", {})]))
        wall = np.mean([m.get("timing", {}).get("total_s", float("nan")) for m in ms])
        lines.append(f"| {method} | {ratio:g} | {len(ms)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    return "\n".join(lines) + "\n"
