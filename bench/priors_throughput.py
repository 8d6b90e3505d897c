"""Prior throughput on this machine: proposals/s of the lexical backend, direct loop vs the Ray Data
pipeline, and the cache read rate (records/s) as training reads it.

    python bench/priors_throughput.py                         # 300 synthetic images, 2 CPUs, 1 then 2 actors
    python bench/priors_throughput.py --images 600 --concurrency 2 --batch-size 32 --read-rows 20000

1. direct: one process, ``backend(batch)`` in a loop (no cache, no Ray): the baseline.
2. pipeline: ``compute_priors`` on a fresh cache (Ray Data actor pool + batch-by-batch cache writes),
   after ``ray.init`` (timed apart), once per ``--concurrency``; ``over_direct`` = pipeline / direct
   proposals/s (actor start-up included: ``first_batch_s`` shows it).
3. cache read: ``load_priors(cfg, ids)`` (Arrow read + dedupe + ``Prior`` objects) and the Arrow table
   alone, on the cache just written and on a ``--read-rows`` copy of it (its rows repeated, new ids).
Prints a JSON document (also written to ``--out`` if given). Timings on a shared 2-core box are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from l2l_ray.config import Config, apply_overrides
from l2l_ray.io import atomic_write_text
from l2l_ray.priors.base import build_backend
from l2l_ray.priors.cache import PriorCache
from l2l_ray.priors.pipeline import compute_priors, load_priors, requests_from_bundle


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300, help="synthetic images (about 3 sentences each)")
    p.add_argument("--max-requests", type=int, default=0, help="cap on sentences (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", default="1,2", help="prior actors in the Ray Data pool (comma list: one run each)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs for the local Ray cluster")
    p.add_argument("--read-rows", type=int, default=20000, help="rows of the enlarged cache for the read test")
    p.add_argument("--root", default="", help="work folder (default: a temp folder, deleted at the end)")
    p.add_argument("--out", default="", help="also write the JSON here")
    return p.parse_args(argv)


def make_cfg(root: Path, args) -> Config:
    return apply_overrides(Config(), {"data.root": str(root / "data"), "data.synth_images": args.images,
                                      "priors.cache_dir": str(root / "cache"), "priors.batch_size": args.batch_size,
                                      "priors.include_eval": True})


def bench_direct(cfg: Config, reqs) -> dict:
    backend = build_backend(cfg.priors)
    t0 = time.perf_counter()
    for i in range(0, len(reqs), cfg.priors.batch_size):
        backend(reqs[i: i + cfg.priors.batch_size])
    s = time.perf_counter() - t0
    return {"n": len(reqs), "seconds": round(s, 3), "proposals_per_s": round(len(reqs) / s, 2)}


def bench_pipeline(cfg: Config, reqs, num_cpus: int) -> dict:
    """``compute_priors`` on an empty cache (``first_batch_s``: planning + actor start-up latency)."""
    from l2l_ray.ray_utils import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(cfg, num_cpus=num_cpus)
    init_s = time.perf_counter() - t0
    run = compute_priors(cfg, reqs)
    return {"concurrency": cfg.priors.concurrency, "n": run["computed"], "seconds": run["seconds"],
            "proposals_per_s": run["samples_per_s"], "first_batch_s": run["first_batch_s"],
            "ray_init_seconds": round(init_s, 3)}


def _time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_read(cfg: Config, ids: list[int]) -> dict:
    cache = PriorCache(cfg)
    s_load = _time(lambda: load_priors(cfg, ids))
    s_table = _time(lambda: cache.table(ids))
    return {"records": len(ids), "parts": len(cache.parts()), "load_priors_records_per_s": round(len(ids) / s_load),
            "arrow_table_records_per_s": round(len(ids) / s_table)}


def enlarge_cache(cfg: Config, rows: int, root: Path) -> Config:
    """A copy of the cache with ``rows`` rows (existing rows repeated under new sent_ids), in 32-row parts."""
    big = apply_overrides(cfg, {"priors.cache_dir": str(root / "cache_big")})
    src = PriorCache(cfg).table()
    reps = -(-rows // src.num_rows)
    table = pa.concat_tables([src] * reps).slice(0, rows)
    table = table.set_column(0, "sent_id", pa.array(np.arange(rows, dtype=np.int64)))
    cache = PriorCache(big)
    for i in range(0, rows, 32):
        cache.write_table(table.slice(i, 32))
    return big


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="l2l_bench_priors_"))
    try:
        from l2l_ray.data import ensure_data, load_dataset

        cfg = make_cfg(root, args)
        ensure_data(cfg)
        reqs = requests_from_bundle(load_dataset(cfg), include_eval=True)
        reqs = reqs[: args.max_requests] if args.max_requests else reqs
        shutil.rmtree(cfg.priors_cache_dir, ignore_errors=True)
        out = {"machine_cpus": os.cpu_count(), "batch_size": args.batch_size, "direct": bench_direct(cfg, reqs),
               "pipeline": []}
        for c in [int(x) for x in args.concurrency.split(",")]:
            run_cfg = apply_overrides(cfg, {"priors.concurrency": c, "priors.cache_dir": str(root / f"cache_c{c}")})
            out["pipeline"].append(bench_pipeline(run_cfg, reqs, args.num_cpus))
            out["pipeline"][-1]["over_direct"] = round(
                out["pipeline"][-1]["proposals_per_s"] / out["direct"]["proposals_per_s"], 3)
        cfg = run_cfg  # the cache the read test uses
        ids = [r.sent_id for r in reqs]
        out["read_small"] = bench_read(cfg, ids)
        big = enlarge_cache(cfg, args.read_rows, root)
        out["read_big_uncompacted"] = bench_read(big, list(range(args.read_rows)))
        PriorCache(big).compact()
        out["read_big_compacted"] = bench_read(big, list(range(args.read_rows)))
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
