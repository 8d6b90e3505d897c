"""The per-worker training loop (pure PyTorch, no Ray imports).

``train_stage`` runs one stage (e.g. "supervised", "warmup", "round_1"): build the segmenter, restore the
last checkpoint if there is one, then per epoch: labeled (+ pseudo-labelled, strongly augmented) batches,
AdamW with warm-up + poly decay, an EMA teacher updated every step, and a checkpoint at the end of every
epoch. Everything that depends on where it runs (rank, device, DDP, checkpoint storage, logging) comes
through a ``Hooks`` object: ``l2l_ray.train.worker`` implements it on Ray Train, ``LocalHooks`` in-process.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from l2l_ray.config import Config
from l2l_ray.model import build_segmenter
from l2l_ray.model.text import TextTokenizer
from l2l_ray.train.batches import concat_batches, epoch_plan, flip_batch, rows_batch
from l2l_ray.train.tables import TrainTables

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.log"


@dataclass
class StageSpec:
    """What the driver sends every worker besides the data refs."""

    cfg: dict  # Config.to_dict()
    stage: str
    epochs: int
    stage_dir: str  # <run_dir>/checkpoints/<stage>
    tokenizer: TextTokenizer


class Hooks(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module: ...  # e.g. DDP wrap
    def restore(self) -> dict | None: ...  # the last checkpoint's state, or None
    def save(self, metrics: dict, state: dict | None, epoch: int) -> None: ...  # every rank; state on rank 0
    def log(self, line: str) -> None: ...  # a progress line (rank 0)


class EmaTeacher:
    """A frozen copy of the student, updated as teacher = ema * teacher + (1 - ema) * student every step."""

    def __init__(self, student: nn.Module, state: dict | None = None):
        self.model = copy.deepcopy(student).eval()
        if state is not None:
            self.model.load_state_dict(state)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, ema: float) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in student.parameters()], 1.0 - ema)
        for t, s in zip(self.model.buffers(), student.buffers(), strict=True):
            t.copy_(s)


def lr_lambda(total: int, warmup: int, power: float):
    """Linear warm-up over ``warmup`` steps, then (1 - step/total) ** power (LAVT's poly schedule)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1.0 - step / max(1, total)) ** power

    return f


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict on CPU, unwrapped from DDP / torch.compile."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _maybe_inject_failure(cfg: Config, spec: StageSpec, hooks: Hooks, epoch: int) -> None:
    """The fault-tolerance check (``train.inject_failure_epoch``): rank 0 raises once, then a marker file says so."""
    if cfg.train.inject_failure_epoch != epoch or hooks.rank != 0:
        return
    marker = Path(spec.stage_dir) / f".injected_failure_epoch{epoch}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise RuntimeError(f"injected failure at the start of epoch {epoch} (train.inject_failure_epoch)")


def run_epoch(ctx: dict[str, Any], epoch: int) -> dict[str, float]:
    """One epoch over this rank's plan; returns the epoch's metrics (rank-local loss means)."""
    cfg, hooks, tables, pseudo = ctx["cfg"], ctx["hooks"], ctx["tables"], ctx["pseudo"]
    net, model, ema, opt, sched = ctx["net"], ctx["model"], ctx["ema"], ctx["opt"], ctx["sched"]
    dev = hooks.device
    amp = cfg.train.amp and dev.type == "cuda"
    seed = cfg.seed * 100_003 + epoch
    plan = epoch_plan(len(tables.labeled), len(tables.pseudo) if tables.pseudo is not None else 0,
                      cfg.train.batch_size, hooks.world_size, hooks.rank, cfg.train.steps_per_epoch, seed)
    gen = torch.Generator().manual_seed(seed * 7 + hooks.rank)
    net.train()
    sums = {"loss": 0.0, "main": 0.0, "aux": 0.0}
    t0 = last = time.perf_counter()
    samples = 0
    flip_map = torch.from_numpy(tables.flip_map) if tables.flip_map is not None else None
    for step, (li, pi) in enumerate(plan):
        batch = rows_batch(tables.images, tables.labeled, li, dev)
        if pi is not None:
            pb = rows_batch(tables.images, tables.pseudo, pi, dev, labels=pseudo.labels, weights=pseudo.weights,
                            augment=gen, sample_weight=cfg.semi.unlabeled_weight)
            batch = concat_batches(batch, pb)
        if cfg.train.hflip > 0 and flip_map is not None:  # mirror rows, "left" <-> "right" in their sentences
            batch = flip_batch(batch, (torch.rand(len(batch["tokens"]), generator=gen) < cfg.train.hflip).to(dev),
                               flip_map)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = net(batch)
        loss, parts = model.loss_from_outputs(out, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        ema.update(model, cfg.semi.ema)
        for k in sums:
            sums[k] += float(parts[k])
        samples += len(batch["tokens"]) * hooks.world_size
        now = time.perf_counter()
        if hooks.rank == 0 and (now - last >= cfg.train.log_every_s or step == len(plan) - 1):
            last = now
            hooks.log(f"[{ctx['stage']}] epoch {epoch + 1}/{ctx['epochs']} step {step + 1}/{len(plan)} "
                      f"loss {sums['loss'] / (step + 1):.4f} lr {sched.get_last_lr()[0]:.2e} "
                      f"{samples / (now - t0):.1f} samples/s")
    secs = time.perf_counter() - t0
    n = max(1, len(plan))
    return {"epoch": epoch, **{k: v / n for k, v in sums.items()}, "steps": len(plan), "samples": samples,
            "time_s": round(secs, 3), "samples_per_s": round(samples / max(secs, 1e-9), 2),
            "lr": float(sched.get_last_lr()[0])}


def train_stage(spec: StageSpec, tables: TrainTables, init: dict | None, pseudo, hooks: Hooks) -> list[dict]:
    """Train ``spec.epochs`` epochs (continuing after the last checkpoint); returns the full history."""
    cfg = Config.from_dict(spec.cfg)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.seed * 1009 + hooks.rank)
    model = build_segmenter(cfg, spec.tokenizer)
    if init is not None:
        model.load_state_dict(init["student"])
    model.to(hooks.device)
    ema = EmaTeacher(model, init["teacher"] if init is not None else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps = len(epoch_plan(len(tables.labeled), len(tables.pseudo) if tables.pseudo is not None else 0,
                           cfg.train.batch_size, hooks.world_size, 0, cfg.train.steps_per_epoch, 0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps * spec.epochs, cfg.train.warmup_steps,
                                                             cfg.train.poly_power))
    start, history = 0, []
    state = hooks.restore()
    if state is not None:
        model.load_state_dict(state["student"])
        ema.model.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = state["epoch"] + 1, list(state["history"])
        if hooks.rank == 0:
            hooks.log(f"[{spec.stage}] resumed from the checkpoint of epoch {state['epoch'] + 1}/{spec.epochs}")
    net = hooks.prepare(model)
    if cfg.train.compile:
        net = torch.compile(net)
    ctx = {"cfg": cfg, "hooks": hooks, "tables": tables, "pseudo": pseudo, "net": net, "model": model, "ema": ema,
           "opt": opt, "sched": sched, "stage": spec.stage, "epochs": spec.epochs}
    for epoch in range(start, spec.epochs):
        _maybe_inject_failure(cfg, spec, hooks, epoch)
        stats = run_epoch(ctx, epoch)
        history.append(stats)
        state = None
        if hooks.rank == 0:
            state = {"student": cpu_state(model), "teacher": cpu_state(ema.model), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch, "epochs": spec.epochs, "history": history,
                     "stage": spec.stage}
        hooks.save(stats, state, epoch)
    return history


class LocalHooks:
    """In-process training (``train.num_workers=0``): one rank, checkpoints as <stage_dir>/epoch_NNNN/state.pt."""

    rank, world_size = 0, 1

    def __init__(self, stage_dir: str, keep: int = 2, echo: bool = True):
        self.dir = Path(stage_dir)
        self.keep, self.echo = keep, echo
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("epoch_*") if (p / STATE_FILE).is_file())

    def restore(self) -> dict | None:
        ckpts = self.checkpoints()
        return torch.load(ckpts[-1] / STATE_FILE, map_location="cpu", weights_only=False) if ckpts else None

    def save(self, metrics: dict, state: dict | None, epoch: int) -> None:
        final = self.dir / f"epoch_{epoch:04d}"
        tmp = self.dir / f".tmp_epoch_{epoch:04d}_{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():  # a re-run of the same epoch: replace the file atomically
            os.replace(tmp / STATE_FILE, final / STATE_FILE)
            tmp.rmdir()
        else:
            os.replace(tmp, final)
        for old in self.checkpoints()[: -self.keep]:
            (old / STATE_FILE).unlink()
            old.rmdir()

    def log(self, line: str) -> None:
        append_progress(self.dir, line)
        if self.echo:
            print(line, flush=True)


def append_progress(stage_dir: str | Path, line: str) -> None:
    p = Path(stage_dir) / PROGRESS_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(line + "\n")
