"""``l2l eval --run DIR [--split val]``: evaluate a run's last checkpoint and merge into its metrics.json.

    l2l eval --run runs/default               # every split of the dataset
    l2l eval --run runs/default --split val
"""

from __future__ import annotations

import logging
from pathlib import Path

from l2l_ray.io import atomic_write_json, read_json

log = logging.getLogger(__name__)


def _priors_for(cfg, used: bool) -> dict | None:
    """The cached priors when the checkpoint was trained with priors, else None."""
    if not used:
        return None
    from l2l_ray.priors.pipeline import load_priors

    return load_priors(cfg, allow_missing=True)


def evaluate_run(run_dir: str, split: str | None = None, which: str = "student") -> dict:
    """Load ``<run_dir>/config.yaml`` and the last finished checkpoint, evaluate ``split`` (default: all),
    merge the results into ``<run_dir>/metrics.json`` under "splits" and return {split: metrics}."""
    from l2l_ray.config import load_config
    from l2l_ray.data import load_dataset
    from l2l_ray.model.text import load_tokenizer
    from l2l_ray.train.fit import CHECKPOINTS, LATEST_FILE, load_checkpoint_state, locate_checkpoint
    from l2l_ray.train.infer import evaluate

    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run_dir} is not a run folder (made by `l2l train`)")
    latest = read_json(run / CHECKPOINTS / LATEST_FILE)
    if not latest:
        raise FileNotFoundError(f"no finished training stage in {run / CHECKPOINTS}; run `l2l train` first")
    cfg = load_config(str(cfg_path))
    data = load_dataset(cfg, run)
    ckpt = locate_checkpoint(run / CHECKPOINTS / latest["stage"], latest["checkpoint"])
    state = load_checkpoint_state(ckpt, load_tokenizer(run))
    splits = evaluate(cfg, state, data, _priors_for(cfg, latest.get("priors", False)),
                      None if split is None else [split], which)
    metrics = read_json(run / "metrics.json", default={}) or {}
    metrics.setdefault("splits", {}).update(splits)
    metrics.setdefault("eval", {}).update({"checkpoint": str(ckpt), "stage": latest["stage"],
                                           "which": which})
    atomic_write_json(run / "metrics.json", metrics)
    return splits
