"""The Ray Train shell around ``l2l_ray.train.loop.train_stage``: ``train_loop_per_worker`` and its hooks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from l2l_ray.train.loop import STATE_FILE, append_progress, train_stage


class RayTrainHooks:
    """Rank, device, DDP, checkpoints and progress lines through Ray Train v2.

    ``stage``: set when one Train run trains several stages (``l2l_ray.train.learner``): checkpoints are named
    ``<stage>-epoch_NNNN`` and restored only when written by this stage, and only if ``restore`` (the first stage
    a worker takes after starting). ``last_checkpoint``: the folder of this worker's last reported checkpoint.
    """

    def __init__(self, stage_dir: str, stage: str = "", restore: bool = True):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.stage_dir = stage_dir
        self.stage, self.may_restore = stage, restore
        self.last_checkpoint: str | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU) when world_size > 1

    def restore(self) -> dict | None:
        ckpt = ray.train.get_checkpoint() if self.may_restore else None  # set after a restart or a re-run
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        if self.stage and state.get("stage") != self.stage:
            if self.rank == 0:
                self.log(f"[{self.stage}] the last checkpoint ({Path(ckpt.path).name}) is another stage's: "
                         "starting this stage from its initial weights")
            return None
        return state

    def save(self, metrics: dict, state: dict | None, epoch: int) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if state is not None:
                torch.save(state, Path(d) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            name = f"{self.stage}-epoch_{epoch:04d}" if self.stage else f"epoch_{epoch:04d}"
            # Every rank must call report (a barrier); rank 0 carries the checkpoint.
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
            if ckpt is not None:  # persisted as <storage_path>/<run name>/<name> by the time report returns
                self.last_checkpoint = ray.train.get_context().get_storage().build_checkpoint_path_from_name(name)

    def log(self, line: str) -> None:
        # A file the driver echoes (worker stdout is not shown when Ray runs with log_to_driver=False).
        append_progress(self.stage_dir, line)


def resolve_stage_refs(refs: dict) -> tuple:
    """``fit.stage_refs``' boxed refs -> (tables, init or None, pseudo or None) (zero-copy numpy views)."""
    return tuple(ray.get(refs[k][0]) if refs[k] else None for k in ("tables", "init", "pseudo"))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: config = {"spec": StageSpec, **fit.stage_refs(...)}."""
    spec = config["spec"]
    train_stage(spec, *resolve_stage_refs(config), RayTrainHooks(spec.stage_dir))
