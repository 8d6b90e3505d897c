"""Ray Tune searches over L2L hyperparameters, written with the config's dotted keys.

    l2l tune --config configs/tune/synthetic.yaml [k=v ...]

Each trial runs the same loop as ``l2l train`` (``l2l_ray.driver.run``) in its own run folder
``<run.dir>/trials/<trial_id>`` and reports val mIoU after the warm-up (iteration 1) and after every
round (iteration r + 1), so ASHA stops poor trials early. Data and priors are made once before the
search, so trials only read the cache. The search resumes after an interruption (Tune's own restore of
``<run.dir>/tune``; a restarted trial resumes its run folder through the driver's own resume and
reports its finished rounds again). The best trial's full config is written to ``<run.dir>/best.yaml``,
a file ``l2l train --config`` accepts as it is, and a summary to ``<run.dir>/tune_summary.json``.

Search space (``tune.space`` in the YAML), one entry per dotted key:
    semi.ema: {type: uniform, low: 0.95, high: 0.999}
    train.lr: {type: loguniform, low: 5.0e-4, high: 5.0e-3}
    semi.reward_prior: [0.5, 1.0, 2.0]          # a list is a random choice
    train.epochs: {type: grid, values: [2, 4]}  # every value (times num_samples)

CPU budget: a trial holds ``tune.cpus_per_trial`` (its driver: inference, candidates) plus what the loop
asks for (``train.num_workers`` x ``train.cpus_per_worker`` Ray Train workers, ``semi.selector_workers`` x
``semi.selector_cpus`` SelectorActors); ``tune.max_concurrent`` trials of that must fit the cluster, or
Train workers wait for CPUs until they time out, so ``run_tune`` refuses such a config up front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from l2l_ray.config import Config, ConfigError, all_keys, apply_overrides

METRIC = "val_mIoU"
TRIALS = "trials"
EXPERIMENT = "tune"
_DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
_FIXED_SECTIONS = ("data", "priors", "run", "tune", "experiment")


def build_space(space: dict[str, Any]) -> dict[str, Any]:
    """Dotted-key search space from config -> Tune's param_space (flat dict of dotted keys)."""
    from ray import tune

    valid = set(all_keys())
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if key not in valid:
            apply_overrides(Config(), {key: None})  # raises ConfigError naming the closest keys
        if key.split(".")[0] in _FIXED_SECTIONS:
            raise ConfigError(f"tune.space.{key}: {', '.join(_FIXED_SECTIONS)} keys are fixed for the whole search "
                              "(data and priors are prepared once before the trials); search model, train and semi "
                              "keys, or run one search per value")
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"tune.space.{key}: an empty list; give the values to choose from")
            out[key] = tune.choice(spec)
            continue
        if not isinstance(spec, dict) or spec.get("type") not in _DISTRIBUTIONS:
            raise ConfigError(f"tune.space.{key}: expected a list or {{type: one of {_DISTRIBUTIONS}, ...}}")
        kind = spec["type"]
        if kind in ("choice", "grid"):
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"tune.space.{key}: type {kind} needs a non-empty 'values' list")
            out[key] = tune.grid_search(values) if kind == "grid" else tune.choice(values)
        else:
            try:
                out[key] = getattr(tune, kind)(spec["low"], spec["high"])
            except KeyError as e:
                raise ConfigError(f"tune.space.{key}: type {kind} needs 'low' and 'high'") from e
    return out


def trial_cpus(cfg: Config) -> float:
    """CPUs one trial holds at its peak: its driver, its Ray Train workers and its SelectorActors."""
    from l2l_ray.train.fit import actor_cpus

    return cfg.tune.cpus_per_trial + cfg.train.num_workers * cfg.train.cpus_per_worker + actor_cpus(cfg)


def trial_resources(cfg: Config):
    """The trial's placement group: its driver's bundle, plus one bundle per SelectorActor (Tune places the
    actors a trial starts inside the trial's group). Ray Train workers get their own group from Train."""
    from ray import tune

    bundles = [{"CPU": cfg.tune.cpus_per_trial}]
    if cfg.method == "l2l" and cfg.semi.use_rl:
        bundles += [{"CPU": cfg.semi.selector_cpus}] * cfg.semi.selector_workers
    if cfg.method != "supervised" and cfg.semi.teacher_actors > 0:
        bundles += [{"CPU": cfg.semi.teacher_cpus, "GPU": 1.0 if cfg.train.use_gpu else 0.0}] * cfg.semi.teacher_actors
    return tune.PlacementGroupFactory(bundles)


def check_budget(cfg: Config, cluster_cpus: float) -> None:
    """ConfigError when ``tune.max_concurrent`` trials do not fit ``cluster_cpus`` (they would hang)."""
    need = trial_cpus(cfg)
    if cfg.tune.max_concurrent * need > cluster_cpus + 1e-9:
        raise ConfigError(
            f"tune: {cfg.tune.max_concurrent} concurrent trial(s) x {need:g} CPUs (tune.cpus_per_trial "
            f"{cfg.tune.cpus_per_trial:g} + train.num_workers x train.cpus_per_worker "
            f"{cfg.train.num_workers}x{cfg.train.cpus_per_worker:g} + selector actors "
            f"{cfg.semi.selector_workers}x{cfg.semi.selector_cpus:g} + teacher actors "
            f"{cfg.semi.teacher_actors}x{cfg.semi.teacher_cpus:g}) exceed the cluster's {cluster_cpus:g} CPUs: "
            "lower tune.max_concurrent or the per-trial CPUs")


def _absolute(cfg: Config) -> Config:
    """Paths made absolute: Tune runs trials with the trial folder as their working directory.

    ``priors.cache_dir`` is pinned to where ``_prepare_shared`` fills it (``cfg.priors_cache_dir``: by default under
    ``$L2L_CACHE`` or ``~/.cache`` of this driver), so trials read that cache whatever their own environment. On a
    multi-node cluster it must then be shared storage, like data.root and run.dir (docs/cluster.md); a trial on a
    node that does not see it would compute the priors again.
    """
    over: dict[str, Any] = {"data.root": str(Path(cfg.data.root).absolute()),
                            "run.dir": str(Path(cfg.run.dir).absolute()),
                            "priors.cache_dir": str(Path(cfg.priors_cache_dir).expanduser().absolute())}
    if cfg.data.image_dir:
        over["data.image_dir"] = str(Path(cfg.data.image_dir).absolute())
    for key, value in (("model.backbone", cfg.model.backbone), ("model.text_encoder", cfg.model.text_encoder),
                       ("priors.model", cfg.priors.model)):
        if value and Path(value).exists():  # a local path (a hub id stays as it is)
            over[key] = str(Path(value).absolute())
    return apply_overrides(cfg, over)


def _trial_fn(base: dict[str, Any]):
    """The trainable: one ``driver.run`` per trial, reporting val mIoU after the warm-up and every round."""

    def trainable(params: dict[str, Any]) -> None:
        from ray import tune

        from l2l_ray.driver import run
        from l2l_ray.io import read_json

        trial_dir = Path(base["run"]["dir"]) / TRIALS / tune.get_context().get_trial_id()
        cfg = apply_overrides(Config.from_dict(base), {**params, "run.dir": str(trial_dir)})
        # A restarted trial (Tune restore, trial retry) resumes its run folder: the driver skips the rounds
        # it finished, so they are reported again here, after the warm-up's, to keep iteration = round + 1.
        done = read_json(trial_dir / "rounds.json", default={"rounds": []})["rounds"] if cfg.run.resume else []

        def report(metrics: dict[str, Any]) -> None:
            tune.report({METRIC: metrics["val"]["mIoU"], "val_oIoU": metrics["val"]["oIoU"], "round": metrics["round"]})

        def on_round(round_idx: int, metrics: dict[str, Any]) -> None:
            report({**metrics, "round": round_idx})
            if round_idx == 0:
                for m in done[: cfg.semi.rounds]:
                    report(m)

        run(cfg, on_round=on_round)

    return trainable


def _prepare_shared(cfg: Config) -> None:
    """Data and priors once, before the trials (they then read the cache: no Ray Data inside trials)."""
    from l2l_ray.setup import prepare_inputs

    prepare_inputs(cfg)


def _max_t(cfg: Config) -> int:
    """Reports per trial: the warm-up's, then one per round (supervised: one)."""
    return cfg.semi.rounds + 1 if cfg.method != "supervised" else 1


def _tuner(cfg: Config, trainable, exp_path: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if tune.Tuner.can_restore(str(exp_path)):
        print(f"l2l tune: resuming the search in {exp_path}", flush=True)
        return tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=build_space(cfg.tune.space),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=cfg.tune.num_samples,
            # Seeded samples (the same trials on a re-run); max_concurrent must be given here: Tune ignores
            # TuneConfig.max_concurrent_trials when a searcher instance is passed.
            search_alg=BasicVariantGenerator(max_concurrent=cfg.tune.max_concurrent, random_state=cfg.seed),
            # stop_last_trials=False: a trial that reaches the last round finishes its run (final evaluation
            # on every split, metrics.json) instead of being stopped right after its last report.
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=_max_t(cfg),
                                    grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor,
                                    stop_last_trials=False)),
        run_config=tune.RunConfig(name=exp_path.name, storage_path=str(exp_path.parent),
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


def summarize(results, max_t: int) -> dict[str, Any]:
    """Per trial: params, iterations, last / best val mIoU, status; and the best *finished* trial.

    The best trial is the one with the highest last val mIoU among the trials that ran every iteration
    (``max_t``): its config is the one ``l2l train`` reproduces. If none finished, among all trials.
    """
    trials = []
    for r in results:
        m = r.metrics or {}
        hist = r.metrics_dataframe
        vals = [] if hist is None or METRIC not in hist else [float(v) for v in hist[METRIC].dropna()]
        trials.append({"trial_id": m.get("trial_id", Path(r.path).name), "path": r.path, "params": r.config,
                       "iterations": int(m.get("training_iteration", 0)), "last_val_mIoU": m.get(METRIC),
                       "best_val_mIoU": max(vals) if vals else None,
                       "error": None if r.error is None else repr(r.error)})
    ok = [t for t in trials if t["error"] is None and t["last_val_mIoU"] is not None]
    finished = [t for t in ok if t["iterations"] >= max_t]
    best = max(finished or ok, key=lambda t: t["last_val_mIoU"], default=None)
    return {"trials": len(trials), "finished": len(finished), "errors": sum(t["error"] is not None for t in trials),
            "stopped_early": sum(1 for t in ok if t["iterations"] < max_t), "max_iterations": max_t,
            "best": best, "all": trials}


def write_best(cfg: Config, best: dict[str, Any], path: Path) -> Config:
    """``best.yaml``: the user's config (paths as given) + the best trial's params, run.dir ``<run.dir>/best``."""
    import yaml

    from l2l_ray.io import atomic_write_text

    best_cfg = apply_overrides(cfg, {**best["params"], "run.dir": str(Path(cfg.run.dir) / "best"),
                                     "tune.space": {}})
    head = (f"# l2l train --config {path}\n"
            f"# Best trial {best['trial_id']} of `l2l tune` in {cfg.run.dir}: val mIoU {best['last_val_mIoU']:.4f} "
            f"after {best['iterations']} reports; searched keys: {best['params']}\n")
    atomic_write_text(path, head + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    return best_cfg


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_same_search(cfg: Config, run_dir: Path) -> None:
    """A search is resumed with the config it was started with (Tune restores its own space and samples);
    a different config on the same run.dir is a ConfigError naming the keys that differ."""
    from l2l_ray.config import load_config

    old_file = run_dir / "config.yaml"
    if not (old_file.is_file() and (run_dir / EXPERIMENT).is_dir()):
        return
    old, new = load_config(old_file), cfg
    diff = [k for k in all_keys() if _get(old, k) != _get(new, k)]
    if diff:
        raise ConfigError(f"{run_dir} holds a search started with another config (differs in {', '.join(diff[:8])}): "
                          "re-run it with the same config and overrides to resume it, or choose a new run.dir")


def run_tune(cfg: Config) -> str:
    """Run (or resume) the search; write ``best.yaml`` and ``tune_summary.json``; return best.yaml's path."""
    import time

    from l2l_ray.io import atomic_write_json
    from l2l_ray.ray_utils import ensure_ray

    t0 = time.perf_counter()
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: give at least one dotted key to search, e.g. "
                          "tune.space: {train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}}")
    build_space(cfg.tune.space)  # validate before starting anything
    # With Ray Train workers in the trials, Train's placement-group cleanup after an early stop queries the
    # State API: the dashboard must run (docs/tune.md). In-process training (num_workers=0) does not need it.
    resources = ensure_ray(cfg, include_dashboard=True if cfg.train.num_workers > 0 else None)
    check_budget(cfg, resources.get("CPU", 0.0))
    run_dir = Path(cfg.run.dir).absolute()
    _check_same_search(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    shared = _absolute(apply_overrides(cfg, {"tune.space": {}}))
    _prepare_shared(shared)
    from ray import tune

    trainable = tune.with_resources(_trial_fn(shared.to_dict()), trial_resources(cfg))
    results = _tuner(cfg, trainable, run_dir / EXPERIMENT).fit()
    summary = summarize(results, _max_t(cfg))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if summary["best"] is None:
        atomic_write_json(run_dir / "tune_summary.json", summary)
        raise RuntimeError(f"l2l tune: no trial reported {METRIC} (errors: {summary['errors']}); see {run_dir}")
    path = run_dir / "best.yaml"
    write_best(cfg, summary["best"], path)
    summary["best_yaml"] = str(path)
    atomic_write_json(run_dir / "tune_summary.json", summary)
    b = summary["best"]
    print(f"l2l tune: {summary['trials']} trials ({summary['stopped_early']} stopped early, {summary['errors']} "
          f"errors) in {summary['seconds']:.0f} s; best {b['trial_id']} val mIoU {b['last_val_mIoU']:.4f} "
          f"with {b['params']}", flush=True)
    return str(path)
