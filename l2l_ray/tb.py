"""TensorBoard logging of round and split metrics through the standard writer.

    with TBLogger(cfg.run.dir) as tb:              # event files in <run>/tb
        tb.log_round(r, {"val": {"mIoU": 0.41}, "reward": {"total": 0.3}, "seconds": 12.5})
    tensorboard --logdir runs/                     # every run folder, side by side

Nested dicts become slash-separated tags (``val/mIoU``, ``reward/total``), so users' dashboards and
the TensorBoard UI group them. Only real numbers are logged; strings, lists and None are skipped.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

TB_DIR = "tb"


def scalar_items(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"val": {"mIoU": 0.4}, "n": 3, "note": "x"}`` -> ``{"val/mIoU": 0.4, "n": 3.0}``.

    Bools count as 0/1; NaN is kept (TensorBoard shows it as a gap); non-numbers are dropped.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(scalar_items(value, tag))
        elif isinstance(value, numbers.Real) or _is_numpy_scalar(value):
            out[tag] = float(value)
    return out


def _is_numpy_scalar(value: Any) -> bool:
    return type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and value.dtype.kind in "biuf"


class TBLogger:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``<run_dir>/tb``, one step per round.

    Args:
        run_dir: the run folder (``run.dir``); the event files go to ``<run_dir>/tb``.
        flush_secs: how often the writer flushes to disk, seconds.
    """

    def __init__(self, run_dir: str | os.PathLike, flush_secs: int = 30) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy: only when logging is on

        self.log_dir = str(Path(run_dir) / TB_DIR)
        self.writer = SummaryWriter(log_dir=self.log_dir, flush_secs=flush_secs)

    def log_round(self, round_: int, metrics: dict[str, Any]) -> int:
        """Log every number in ``metrics`` (nested dicts flattened) at step ``round_``; returns how many."""
        items = scalar_items(metrics)
        for tag, value in items.items():
            self.writer.add_scalar(tag, value, global_step=int(round_))
        return len(items)

    def log_splits(self, splits: dict[str, dict[str, Any]], step: int) -> int:
        """Final split metrics (``metrics.json["splits"]``) under ``final/<split>/<metric>``."""
        return self.log_round(step, {"final": splits})

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

    def __enter__(self) -> TBLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Read back ``{tag: [(step, value), ...]}`` from the event files in ``log_dir`` (tests, notebooks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

