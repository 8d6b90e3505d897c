"""One long-lived Ray Train run that trains every stage of a run (warm-up, round 1, round 2, ...).

    learner = Learner(cfg, run_dir)                      # starts nothing yet
    ckpt = learner.fit(spec, stage_refs(tables, init, pseudo))   # the first call starts TorchTrainer.fit()
    learner.close()                                      # the workers return, the Train run ends

Ray Train starts its controller and worker group once per run instead of once per stage (about 13 s per
stage on 2 cores, most of a round once the student is fast). Stages reach the workers through a
``StageBoard`` actor: the driver posts a stage (its ``StageSpec`` and the object refs of its tables, initial
weights and pseudo-labels), every worker takes it and runs ``train_stage`` on it, and rank 0 reports the stage's
end. The weights and data never pass through the board by value: only refs.

Fault tolerance stays Ray Train's: a killed worker makes Train restart the worker group (``FailureConfig``);
the new workers ask the board for the stage still open and resume from the run's last checkpoint when it
belongs to that stage (else they start the stage from its initial weights). A killed driver takes the Train run
with it; the same command again resumes, since Train restores a run by its name (``RunConfig(name="learner")``)
and finished stages are recorded per stage (``done.json`` + ``final/state.pt``, written by ``fit_segmenter``).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import ray

from l2l_ray.train.loop import StageSpec

LEARNER_DIR = "learner"  # <run_dir>/checkpoints/learner: the long-lived Train run's own checkpoints
STOP = "stop"
_WAIT_S = 2.0  # the driver checks this often that the Train run is still alive


class StageBoard:
    """Async Ray actor: the open stage (one at a time) and the stages finished so far.

    Workers and the driver block in ``take`` / ``result`` on an ``asyncio.Condition`` (no polling: on 2 cores
    every wake-up of Ray's processes stalls the OpenMP threads of the training step).
    """

    def __init__(self):
        self.seq = 0
        self.open: dict | None = None
        self.finished: dict[int, str] = {}
        self.stopped = False
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # made inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def _changed(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    async def post(self, command: dict) -> int:
        """Open a stage: ``command`` = {"spec": StageSpec, **fit.stage_refs(...)}."""
        self.seq += 1
        self.open = {**command, "seq": self.seq}
        await self._changed()
        return self.seq

    def _next(self, after: int) -> dict | str | None:
        if self.stopped:
            return STOP
        if self.open is not None and self.open["seq"] > after and self.open["seq"] not in self.finished:
            return self.open
        return None

    async def take(self, after: int) -> dict | str:
        """Wait for the open stage newer than ``after`` (a restarted worker passes -1), or STOP."""
        async with self._condition():
            await self._condition().wait_for(lambda: self._next(after) is not None)
        return self._next(after)

    async def finish(self, seq: int, checkpoint: str) -> None:
        self.finished[seq] = checkpoint
        await self._changed()

    async def result(self, seq: int, timeout_s: float) -> str | None:
        """The finished stage's last checkpoint path, or None if it is still running after ``timeout_s``."""
        try:
            async with self._condition():
                await asyncio.wait_for(self._condition().wait_for(lambda: seq in self.finished), timeout_s)
        except asyncio.TimeoutError:
            return None
        return self.finished[seq]

    async def stop(self) -> None:
        self.stopped = True
        await self._changed()


def learner_loop_per_worker(config: dict) -> None:
    """Ray Train entry of the long-lived run: take stages from the board until it says STOP.

    Only the first stage a worker takes after (re)starting may restore a checkpoint: Train's restored
    checkpoint is the run's last one, and it counts only when it was written by that same stage.
    """
    from l2l_ray.train.loop import train_stage
    from l2l_ray.train.worker import RayTrainHooks, resolve_stage_refs

    board = config["board"][0]
    after, first = -1, True
    while True:
        cmd = ray.get(board.take.remote(after))  # blocks until the driver posts a stage (or stops)
        if cmd == STOP:
            return
        spec: StageSpec = cmd["spec"]
        hooks = RayTrainHooks(spec.stage_dir, stage=spec.stage, restore=first)
        train_stage(spec, *resolve_stage_refs(cmd), hooks)
        if hooks.rank == 0:
            ray.get(board.finish.remote(cmd["seq"], hooks.last_checkpoint or ""))
        after, first = cmd["seq"], False


class Learner:
    """The driver's handle on the long-lived Train run (see the module docstring)."""

    def __init__(self, cfg, run_dir: str | Path):
        self.cfg = cfg
        self.storage = Path(run_dir).resolve() / "checkpoints"
        self.board = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _start(self) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from l2l_ray.train.fit import check_train_resources

        check_train_resources(self.cfg)
        if not self.cfg.run.resume and (self.storage / LEARNER_DIR).exists():
            shutil.rmtree(self.storage / LEARNER_DIR)
        self.board = ray.remote(StageBoard).options(num_cpus=0).remote()
        c = self.cfg.train
        trainer = TorchTrainer(
            learner_loop_per_worker, train_loop_config={"board": [self.board]},
            scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                         resources_per_worker={"CPU": c.cpus_per_worker}),
            run_config=RunConfig(name=LEARNER_DIR, storage_path=str(self.storage),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=c.max_failures)))

        def fit() -> None:
            try:
                self.error = getattr(trainer.fit(), "error", None)
            except BaseException as e:  # noqa: BLE001 - handed to the driver thread in fit()
                self.error = e

        self.thread = threading.Thread(target=fit, name="l2l-learner", daemon=True)
        self.thread.start()

    def fit(self, spec: StageSpec, refs: dict) -> Path:
        """Train one stage (``refs`` from ``fit.stage_refs``) on the long-lived run; returns its last checkpoint."""
        if self.thread is None:
            self._start()
        seq = ray.get(self.board.post.remote({"spec": spec, **refs}))
        while True:
            path = ray.get(self.board.result.remote(seq, _WAIT_S))  # blocks up to _WAIT_S
            if path is not None:
                break
            if not self.thread.is_alive():
                raise RuntimeError(f"training stage {spec.stage!r}: the Ray Train run ended: {self.error}") \
                    from self.error
        if not path:
            raise RuntimeError(f"training stage {spec.stage!r} produced no checkpoint (see {spec.stage_dir})")
        return Path(path)

    def close(self) -> None:
        """End the Train run (its workers return) and free its CPUs."""
        if self.thread is None:
            return
        ray.get(self.board.stop.remote())
        self.thread.join()
        ray.kill(self.board)
        self.thread = self.board = None
