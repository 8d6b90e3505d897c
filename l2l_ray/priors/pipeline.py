"""``l2l priors``: every sentence's prior and soft proposal, computed once into the on-disk cache.

    l2l priors --config configs/synthetic.yaml                         # lexical backend, local Ray
    l2l priors --config configs/synthetic.yaml priors.concurrency=2 priors.batch_size=64
    RAY_ADDRESS=auto l2l priors --config configs/refcoco.yaml priors.backend=vllm \
        priors.model=Qwen/Qwen2.5-VL-7B-Instruct priors.concurrency=2

Dataflow: data -> ``PriorRequest`` per sentence -> drop cached ids -> Ray Data (``from_items`` ->
``map_batches(PriorActor)``, an actor pool that builds the backend once per actor) -> each finished batch
is written to the cache as it arrives -> summary. A run killed halfway keeps its finished batches and
the next run skips them. The ``vllm`` backend brings its own ``ray.data.llm`` processor (an engine actor
pool on GPUs), so it gets the request dataset directly instead of being wrapped in ``map_batches``.

Training reads priors with ``load_priors(cfg, sent_ids)``; it never computes them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa

from l2l_ray.config import Config, PriorsConfig
from l2l_ray.priors.base import PriorBackend, PriorRequest, build_backend
from l2l_ray.priors.cache import SCHEMA, PriorCache, priors_to_table, table_to_priors
from l2l_ray.records import Prior

log = logging.getLogger(__name__)

BackendFactory = Callable[[PriorsConfig], PriorBackend]
# CPUs per prior actor by backend (capped so the whole pool fits the cluster: an actor pool that cannot
# be placed hangs silently on a small machine). openai only waits on HTTP; hf/lexical compute.
_ACTOR_CPUS = {"openai": 0.25}
# Backends that parallelise inside one actor (openai: a thread pool of priors.concurrency requests), so
# the pool has one actor instead of priors.concurrency (which would put concurrency**2 requests in flight).
_SINGLE_ACTOR = {"openai"}


class CacheMissError(FileNotFoundError):
    """Priors are missing from the cache; the message names the folder and the command that fills it."""


def requests_from_bundle(bundle, include_eval: bool) -> list[PriorRequest]:
    """One ``PriorRequest`` per sentence: unlabeled training refs, plus labeled and evaluation refs when
    ``include_eval``; the first occurrence of a ``sent_id`` wins."""
    reqs = [PriorRequest(s.sent_id, u.ref_id, u.image_path, u.width, u.height, s.text)
            for u in bundle.unlabeled for s in u.sentences]
    if include_eval:
        reqs += [PriorRequest(s.sent_id, lab.ref_id, lab.image_path, lab.width, lab.height, s.text)
                 for lab in bundle.labeled for s in lab.sentences]
        reqs += [PriorRequest(e.sent_id, e.ref_id, e.image_path, e.width, e.height, e.sentence)
                 for split in bundle.eval.values() for e in split]
    seen: set[int] = set()
    return [r for r in reqs if not (r.sent_id in seen or seen.add(r.sent_id))]


def _requests_from_table(batch: pa.Table) -> list[PriorRequest]:
    cols = [batch[f.name].to_pylist() for f in dataclasses.fields(PriorRequest)]
    return [PriorRequest(*row) for row in zip(*cols, strict=True)]


def run_backend_batch(backend: PriorBackend, requests: list[PriorRequest]) -> list[Prior]:
    """Call the backend on one batch. A backend exception becomes a ``model_error`` prior per request
    (counted, and retried by the next run); a wrong number or order of answers is a bug and raises."""
    try:
        priors = backend(requests)
    except Exception as e:  # untrusted model/runtime: never lose the whole run to one batch
        log.warning("prior backend %s failed on a batch of %d: %r", backend.name, len(requests), e)
        return [Prior(r.sent_id, r.ref_id, status="model_error", raw_text=f"{type(e).__name__}: {e}"[:500],
                      backend=backend.name, model=backend.model) for r in requests]
    got = [p.sent_id for p in priors]
    if got != [r.sent_id for r in requests]:
        raise RuntimeError(f"prior backend {backend.name!r} answered sent_ids {got[:5]}... for requests "
                           f"{[r.sent_id for r in requests][:5]}...: it must return one Prior per request, in order")
    return priors


class PriorActor:
    """Ray Data UDF (run in an actor pool): builds the backend once, then maps request batches to
    cache rows. ``__call__``: Arrow table of ``PriorRequest`` columns (B rows) -> Arrow table in the
    cache ``SCHEMA`` (B rows)."""

    def __init__(self, priors_cfg: PriorsConfig, backend_factory: BackendFactory = build_backend):
        self.backend = backend_factory(priors_cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return priors_to_table(run_backend_batch(self.backend, _requests_from_table(batch)))


class _Progress:
    """Prints ``done/total`` and proposals/s to stderr at most every ``every_s`` seconds."""

    def __init__(self, total: int, cached: int, every_s: float = 2.0):
        self.total, self.done, self.new, self.every_s = total, cached, 0, every_s
        self.t0 = self.last = time.perf_counter()
        self.first: float | None = None  # seconds to the first finished batch (start-up latency)

    def update(self, n: int) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        self.done += n
        self.new += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            print(f"priors: {self.done}/{self.total} done, {self.rate():.1f} proposals/s", file=sys.stderr, flush=True)

    def rate(self) -> float:
        return self.new / max(time.perf_counter() - self.t0, 1e-9)


def _actor_resources(pcfg: PriorsConfig, total_cpus: float) -> dict:
    """``num_cpus`` / ``num_gpus`` per prior actor and the pool size; the pool fits ``total_cpus``."""
    pool = 1 if pcfg.backend in _SINGLE_ACTOR else max(1, pcfg.concurrency)
    cpus = min(_ACTOR_CPUS.get(pcfg.backend, 1.0), max(total_cpus, 0.25) / pool)
    return {"num_cpus": round(cpus, 3), "num_gpus": pcfg.num_gpus or None, "pool_size": pool}


def _compute_ray(todo: list[PriorRequest], pcfg: PriorsConfig, backend_factory: BackendFactory
                 ) -> Iterable[pa.Table]:
    """Ray Data: request rows -> actor pool -> finished batches (Arrow, cache SCHEMA) as they complete."""
    import ray

    from l2l_ray.ray_utils import quiet_ray_data

    quiet_ray_data()
    rows = [dataclasses.asdict(r) for r in todo]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / pcfg.batch_size)))
    if pcfg.backend == "vllm":
        # ray.data.llm runs its own engine actor pool (GPUs, tensor-parallel placement groups): hand it
        # the rows; its postprocess emits cache rows (l2l_ray.priors.cache.prior_to_row).
        out = backend_factory(pcfg).process_dataset(ds)
    else:
        res = _actor_resources(pcfg, ray.cluster_resources().get("CPU", 1.0))
        out = ds.map_batches(PriorActor, fn_constructor_args=(pcfg, backend_factory), batch_size=pcfg.batch_size,
                             batch_format="pyarrow", zero_copy_batch=True, num_cpus=res["num_cpus"],
                             num_gpus=res["num_gpus"], compute=ray.data.ActorPoolStrategy(size=res["pool_size"]))
    yield from out.iter_batches(batch_size=None, batch_format="pyarrow")


def _compute_local(todo: list[PriorRequest], pcfg: PriorsConfig, backend_factory: BackendFactory
                   ) -> Iterable[pa.Table]:
    """The same batches in this process (no Ray): the baseline of the benchmark, and for debugging."""
    backend = backend_factory(pcfg)
    for i in range(0, len(todo), pcfg.batch_size):
        yield priors_to_table(run_backend_batch(backend, todo[i: i + pcfg.batch_size]))


def _former_default(cfg: Config, cache: PriorCache) -> str:
    """A hint when an empty default cache has a filled twin at the former default, ``<data.root>/<dataset>/priors``
    (written there before the cache moved to ``$L2L_CACHE``): reusing it saves recomputing every prior."""
    if cfg.priors.cache_dir or cache.parts():
        return ""
    old = Path(cfg.data.root) / cfg.data.dataset / "priors"
    if not any((old / cache.dir.relative_to(cache.root)).glob("part-*.parquet")):
        return ""
    return f"; priors of this key are at the former default {old}: pass priors.cache_dir={old} to reuse them"


def compute_priors(cfg: Config, requests: list[PriorRequest], *, use_ray: bool = True,
                   backend_factory: BackendFactory = build_backend, compact_above: int = 64) -> dict:
    """Compute the priors of ``requests`` not yet in the cache and write them, batch by batch.

    Returns ``{"requested", "cached_before", "computed", "seconds", "samples_per_s", "first_batch_s",
    "cache_dir", "quarantined_parts"}`` (``first_batch_s``: start-up latency, Ray Data planning and actor start
    included; ``quarantined_parts``: unreadable part files moved aside, whose batches are computed again).
    With ``use_ray`` the batches run in a Ray Data actor pool (``ensure_ray`` joins or starts Ray when
    there is work); otherwise in this process. The cache is compacted at the end when it holds more
    than ``compact_above`` parts.
    """
    cache = PriorCache(cfg)
    done = cache.done_ids()
    todo = [r for r in requests if r.sent_id not in done]
    print(f"priors: backend={cfg.priors.backend} cache={cache.dir}: {len(requests)} sentences, "
          f"{len(requests) - len(todo)} cached, {len(todo)} to compute{_former_default(cfg, cache)}",
          file=sys.stderr, flush=True)
    if todo and use_ray:
        from l2l_ray.ray_utils import ensure_ray

        ensure_ray(cfg)  # only when there is work: a fully cached run never starts Ray
    progress = _Progress(len(requests), len(requests) - len(todo))  # rates exclude Ray's own start
    if todo:
        compute = _compute_ray if use_ray else _compute_local
        for table in compute(todo, cfg.priors, backend_factory):
            cache.write_table(table)
            progress.update(table.num_rows)
    seconds = time.perf_counter() - progress.t0
    if len(cache.parts()) > compact_above:
        cache.compact()
    return {"requested": len(requests), "cached_before": len(requests) - len(todo), "computed": len(todo),
            "seconds": round(seconds, 3), "samples_per_s": round(len(todo) / seconds, 2) if todo else None,
            "first_batch_s": None if progress.first is None else round(progress.first, 3), "cache_dir": str(cache.dir),
            "quarantined_parts": len(cache.quarantined)}


def load_priors(cfg: Config, sent_ids: Iterable[int] | None = None, *, allow_missing: bool = False
                ) -> dict[int, Prior]:
    """Read priors for training from the cache of ``cfg`` (never computes them): ``{sent_id: Prior}``.

    A failed prior is returned as it is (``status`` != "ok", ``soft_mask()`` is the uninformative 0.5).
    A sentence with no row at all is a ``CacheMissError`` naming the cache folder and the command that
    fills it (``l2l priors`` computes exactly the missing ones); with ``allow_missing=True`` missing ids
    are left out of the dict and their count is logged instead.
    """
    cache = PriorCache(cfg)
    cmd = f"`l2l priors --config <your config>` (priors.backend={cfg.priors.backend}, model={cfg.priors.model!r})"
    if not cache.parts():
        raise CacheMissError(f"no priors cached in {cache.dir}; run {cmd} first")
    wanted = None if sent_ids is None else list(sent_ids)
    priors = table_to_priors(cache.table(wanted))
    missing = [] if wanted is None else sorted(set(wanted) - priors.keys())
    if missing and not allow_missing:
        raise CacheMissError(f"{len(missing)} of {len(set(wanted))} sentences have no prior in {cache.dir} "
                             f"(e.g. sent_id {missing[:5]}); run {cmd} to fill them")
    if missing:
        log.warning("load_priors: %d sentences have no cached prior in %s", len(missing), cache.dir)
    return priors


def summarize(priors: dict[int, Prior], requested: list[PriorRequest]) -> dict:
    """Coverage (share of requested sentences with an ok prior) and failures by reason."""
    statuses = Counter(priors[r.sent_id].status if r.sent_id in priors else "not_cached" for r in requested)
    n = max(len(requested), 1)
    return {"coverage": round(statuses.get("ok", 0) / n, 4),
            "failures": dict(sorted((k, v) for k, v in statuses.items() if k != "ok"))}


def quality_for(priors: dict[int, Prior], bundle, image_size: int) -> dict:
    """``prior_quality`` on every sample whose mask is known (labeled training refs and evaluation pairs),
    proposals and truth compared at ``image_size`` x ``image_size`` (the proposals' own size by default)."""
    from l2l_ray.priors.quality import prior_quality

    samples = list(bundle.labeled) + [e for split in bundle.eval.values() for e in split]
    return prior_quality(priors, samples, image_size=image_size)


def format_summary(summary: dict) -> str:
    """Human-readable summary: the run's numbers, failures by reason, and (when present) the quality table
    of ``l2l_ray.priors.quality.format_quality`` (the prior beside the centred-box and whole-image baselines)."""
    lines = [f"priors summary ({summary['backend']}{', ' + summary['model'] if summary['model'] else ''})",
             f"  sentences {summary['requested']}: {summary['cached_before']} cached before, {summary['computed']} "
             f"computed in {summary['seconds']:.1f} s ({summary['samples_per_s'] or 0:.1f} samples/s)",
             f"  coverage (ok priors) {summary['coverage']:.1%}",
             "  failures by reason: " + (", ".join(f"{k} {v}" for k, v in summary["failures"].items()) or "none")]
    if summary.get("quarantined_parts"):
        lines.append(f"  unreadable cache parts moved aside (*.corrupt-*, batches recomputed): "
                     f"{summary['quarantined_parts']}")
    if t := summary.get("timing"):
        lines.append(f"  time: data {t['data_s']} s, priors {t['compute_s']} s, summary {t['summary_s']} s")
    if summary.get("quality"):
        from l2l_ray.priors.quality import format_quality

        lines += ["  " + line for line in format_quality(summary["quality"]).splitlines()]
    return "\n".join(lines)


def run_priors(cfg: Config, *, use_ray: bool = True, backend_factory: BackendFactory = build_backend) -> dict:
    """``l2l priors``: load the data, fill the cache, print and return the summary (JSON-serialisable)."""
    from l2l_ray.data import ensure_data, load_dataset

    t0 = time.perf_counter()
    ensure_data(cfg)
    bundle = load_dataset(cfg)
    requests = requests_from_bundle(bundle, cfg.priors.include_eval)
    t1 = time.perf_counter()
    run = compute_priors(cfg, requests, use_ray=use_ray, backend_factory=backend_factory)
    t2 = time.perf_counter()
    cache = PriorCache(cfg)
    priors = cache.load([r.sent_id for r in requests])
    summary = {"backend": cfg.priors.backend, "model": cfg.priors.model, **run, **summarize(priors, requested=requests)}
    summary["quarantined_parts"] = run["quarantined_parts"] + len(cache.quarantined)
    if cfg.priors.include_eval:
        summary["quality"] = quality_for(priors, bundle, cfg.priors.proposal_size)
    summary["timing"] = {"data_s": round(t1 - t0, 2), "compute_s": round(t2 - t1, 2),
                         "summary_s": round(time.perf_counter() - t2, 2)}
    print(format_summary(summary), file=sys.stderr, flush=True)
    return summary


__all__ = ["SCHEMA", "CacheMissError", "PriorActor", "compute_priors", "load_priors", "requests_from_bundle",
           "run_backend_batch", "run_priors", "summarize"]
