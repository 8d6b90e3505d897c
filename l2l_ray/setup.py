"""What every run needs before it trains: data on disk, priors in the cache, both loaded. One sequence for the
driver (``l2l train``), the experiment runner (``prior_only``) and Tune (once, before the trials).

    prepare_inputs(cfg)                  # data written/checked, priors cache filled (Tune: before the trials)
    run_inputs = setup_run(cfg, run_dir) # the above, then the dataset and the (optionally corrupted) priors loaded
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l2l_ray.config import Config


def needs_priors(cfg: Config) -> bool:
    """Priors serve selection (semires, l2l) and guidance (any method with ``model.guidance``)."""
    return cfg.semi.use_priors and (cfg.method in ("semires", "l2l") or cfg.model.guidance)


@dataclass
class RunInputs:
    """The loaded inputs of one run."""

    full: Any  # DatasetBundle: every labeled / unlabeled sample and every evaluation split
    priors: dict | None  # sent_id -> Prior (corrupted when priors.corruption > 0); None: no priors for this run
    guide: dict | None  # the priors the segmenter sees (model.guidance), else None
    prior_stats: dict = field(default_factory=dict)  # corruption counts


def _check_images(full) -> None:
    """Every image the run will read decodes, checked before any training (a bad file otherwise surfaces only
    when its batch is first built, minutes in)."""
    import os

    from l2l_ray.data.check import FIX_HINT, check_images
    from l2l_ray.errors import DataError

    bad = check_images(full, threads=min(8, os.cpu_count() or 1))
    if bad:
        listed = "; ".join(f"{p}: {why}" for p, why in bad[:20]) + (f"; ... {len(bad) - 20} more" if len(bad) > 20
                                                                      else "")
        raise DataError(f"{len(bad)} image(s) of this dataset cannot be read: {listed}. {FIX_HINT}")


def prepare_inputs(cfg: Config, priors: bool | None = None) -> None:
    """Write/check the data and fill the priors cache (Ray Data; computes only what the cache lacks).

    ``priors``: None = when the run needs them (``needs_priors``), True/False to force."""
    from l2l_ray.data import ensure_data

    ensure_data(cfg)
    if needs_priors(cfg) if priors is None else priors:
        from l2l_ray.priors.pipeline import run_priors

        run_priors(cfg)


def setup_run(cfg: Config, run_dir: str | Path | None = None, priors: bool | None = None) -> RunInputs:
    """The data written/checked and loaded (label split checked against ``run_dir``'s, every image decoded) before
    Ray starts; then Ray, the priors cache filled and loaded and, with ``priors.corruption`` > 0, corrupted
    (``l2l_ray.priors.corrupt``: ids only). ``priors``: as in ``prepare_inputs``."""
    from l2l_ray.data import ensure_data, load_dataset
    from l2l_ray.ray_utils import ensure_ray

    ensure_data(cfg)
    full = load_dataset(cfg, run_dir)  # refuses a run folder made with another label split
    _check_images(full)
    ensure_ray(cfg)
    want = needs_priors(cfg) if priors is None else priors
    loaded, stats = None, {}
    if want:
        from l2l_ray.priors.corrupt import corrupt_priors, sentence_refs
        from l2l_ray.priors.pipeline import load_priors

        prepare_inputs(cfg, priors=True)  # fills what the priors cache lacks (the data check is a no-op by now)
        loaded = load_priors(cfg, allow_missing=True)
        if cfg.priors.corruption > 0:
            loaded, stats = corrupt_priors(loaded, sentence_refs(full), cfg.priors.corruption,
                                           cfg.priors.corruption_drop, cfg.seed)
            print(f"priors corrupted on purpose (priors.corruption={cfg.priors.corruption:g}): {stats}", flush=True)
    return RunInputs(full, loaded, loaded if cfg.model.guidance else None, stats)
