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
    """Rank, device, DDP, checkpoints and progress lines through Ray Train v2."""

    def __init__(self, stage_dir: str):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.stage_dir = stage_dir

    def prepare(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU) when world_size > 1

    def restore(self) -> dict | None:
        ckpt = ray.train.get_checkpoint()  # set after a worker-group restart or a re-run of the same run
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)

    def save(self, metrics: dict, state: dict | None, epoch: int) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if state is not None:
                torch.save(state, Path(d) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            # Every rank must call report (a barrier); rank 0 carries the checkpoint.
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")

    def log(self, line: str) -> None:
        # A file the driver echoes (worker stdout is not shown when Ray runs with log_to_driver=False).
        append_progress(self.stage_dir, line)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: config = {"spec": StageSpec, "tables": [ref], "init": [ref] | [], "pseudo": [ref] | []}.

    Refs are wrapped in lists so Ray passes them as refs; each worker resolves them (zero-copy numpy views).
    """
    spec = config["spec"]
    tables = ray.get(config["tables"][0])
    init = ray.get(config["init"][0]) if config["init"] else None
    pseudo = ray.get(config["pseudo"][0]) if config["pseudo"] else None
    train_stage(spec, tables, init, pseudo, RayTrainHooks(spec.stage_dir))
