"""Starting or joining Ray, the same way for every ``l2l`` command.

- Submitted as a job (``ray job submit ... -- l2l train ...``) or with ``RAY_ADDRESS`` set: join that
  cluster (``ray.init(address=$RAY_ADDRESS)``); worker logs go to the driver (the job log).
- Otherwise: start a local single-node cluster sized to this machine, without the dashboard.

Environment knobs for the local case (all optional):
    L2L_RAY_NUM_CPUS=2          CPUs Ray may schedule (default: os.cpu_count())
    L2L_RAY_DASHBOARD=1         start the dashboard (needed for the State API / `ray job submit`)
    L2L_RAY_LOG_TO_DRIVER=1     print worker stdout/stderr in this terminal (default off locally)
    L2L_RAY_OBJECT_STORE_MB=N   object store size (default: Ray's, 30% of RAM)
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def ensure_ray(cfg=None, *, num_cpus: int | None = None, include_dashboard: bool | None = None,
               log_to_driver: bool | None = None) -> dict[str, float]:
    """Initialise Ray once (no-op when already initialised) and return the cluster's resources.

    ``cfg`` (a ``Config``) is accepted so every command calls ``ensure_ray(cfg)``; keyword arguments
    override the environment knobs above. Returns e.g. ``{"CPU": 2.0, "memory": ..., ...}``.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, namespace="l2l", ignore_reinit_error=True,
                     log_to_driver=True if log_to_driver is None else log_to_driver)
        else:
            cpus = num_cpus or int(os.environ.get("L2L_RAY_NUM_CPUS", 0)) or os.cpu_count() or 1
            store_mb = int(os.environ.get("L2L_RAY_OBJECT_STORE_MB", 0))
            ray.init(num_cpus=cpus, namespace="l2l", ignore_reinit_error=True,
                     include_dashboard=_env_flag("L2L_RAY_DASHBOARD", False) if include_dashboard is None
                     else include_dashboard,
                     log_to_driver=_env_flag("L2L_RAY_LOG_TO_DRIVER", False) if log_to_driver is None
                     else log_to_driver,
                     object_store_memory=store_mb * 1024**2 if store_mb else None,
                     logging_level=logging.WARNING)
    resources = ray.cluster_resources()
    log.info("ray resources: %s", resources)
    return resources


def quiet_ray_data(progress: bool = False) -> None:
    """Turn off Ray Data's progress bars and execution banners (our commands print their own progress)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    ctx.print_on_execution_start = progress
    ctx.enable_auto_log_stats = False
