"""Ray Tune searches over L2L hyperparameters, written with the config's dotted keys.

    l2l tune --config configs/tune/synthetic.yaml [k=v ...]

Each trial runs the same loop as ``l2l train`` (``l2l_ray.driver.run``) in its own run folder and
reports val mIoU after the warm-up and after every round, so ASHA stops poor trials early. The search
resumes after an interruption through Tune's own restore; the best trial's full config is written to
``<run.dir>/best.yaml``, a file ``l2l train --config`` accepts as it is.

Search space (``tune.space`` in the YAML), one entry per dotted key:
    semi.ema: {type: uniform, low: 0.95, high: 0.999}
    train.lr: {type: loguniform, low: 5.0e-4, high: 5.0e-3}
    semi.reward_prior: [0.5, 1.0, 2.0]          # a list is a grid / choice
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from l2l_ray.config import Config, ConfigError, all_keys, apply_overrides

METRIC = "val_mIoU"
_DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


def build_space(space: dict[str, Any]) -> dict[str, Any]:
    """Dotted-key search space from config -> Tune's param_space (flat dict of dotted keys)."""
    from ray import tune

    valid = set(all_keys())
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if key not in valid:
            apply_overrides(Config(), {key: None})  # raises ConfigError naming the closest keys
        if isinstance(spec, list):
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


def _trial_fn(base: dict[str, Any]):
    def trainable(params: dict[str, Any]) -> None:
        from ray import tune

        from l2l_ray.driver import run

        ctx = tune.get_context()
        trial_dir = Path(base["run"]["dir"]) / "trials" / ctx.get_trial_id()
        cfg = apply_overrides(Config.from_dict(base), {**params, "run.dir": str(trial_dir)})

        def on_round(round_idx: int, metrics: dict[str, Any]) -> None:
            tune.report({METRIC: metrics["val"]["mIoU"], "val_oIoU": metrics["val"]["oIoU"], "round": round_idx})

        run(cfg, on_round=on_round)

    return trainable


def run_tune(cfg: Config) -> str:
    """Run (or resume) the search; write ``best.yaml``; return its path."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from l2l_ray.ray_utils import ensure_ray

    ensure_ray(cfg, include_dashboard=True)  # Train's placement-group cleanup after early stops needs it
    run_dir = Path(cfg.run.dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    base = apply_overrides(cfg, {"run.dir": str(run_dir), "tune.space": {}}).to_dict()
    trainable = tune.with_resources(_trial_fn(base), {"cpu": cfg.tune.cpus_per_trial})
    exp_path = run_dir / "tune"
    if tune.Tuner.can_restore(str(exp_path)):
        print(f"l2l tune: resuming the search in {exp_path}", flush=True)
        tuner = tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=build_space(cfg.tune.space),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=cfg.tune.num_samples,
                max_concurrent_trials=cfg.tune.max_concurrent,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.semi.rounds + 1,
                                        grace_period=cfg.tune.grace_period,
                                        reduction_factor=cfg.tune.reduction_factor),
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(run_dir),
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    results = tuner.fit()
    best = results.get_best_result(metric=METRIC, mode="max", scope="all")
    best_cfg = apply_overrides(Config.from_dict(base), {**best.config, "run.dir": str(run_dir / "best")})
    path = run_dir / "best.yaml"
    best_cfg.save(path)
    summary = {"best_val_mIoU": best.metrics.get(METRIC) if best.metrics else None, "best_params": best.config,
               "trials": len(results), "stopped_early": sum(
                   1 for r in results if r.metrics and r.metrics.get("training_iteration", 0) < cfg.semi.rounds + 1)}
    from l2l_ray.io import atomic_write_json

    atomic_write_json(run_dir / "tune_summary.json", summary)
    print(f"l2l tune: {summary}", flush=True)
    return str(path)
