"""``fit_segmenter``: one training stage on Ray Train (TorchTrainer + DDP), resumable, with per-epoch checkpoints.

    res = fit_segmenter(cfg, run_dir, "warmup", bundle, priors, epochs=cfg.train.epochs)
    res = fit_segmenter(cfg, run_dir, "round_1", bundle, priors, cfg.semi.epochs_per_round,
                        init_state=res.state_ref, pseudo=ray.put(pseudo_label_batch))
    res.state_ref   # ObjectRef of {"student": state_dict, "teacher": state_dict, "tokenizer": tokenizer.json text}
    res.history     # one dict per epoch: epoch, loss, main, aux, steps, samples, time_s, samples_per_s, lr

Folders: ``<run_dir>/tokenizer.json`` (shared by all stages), ``<run_dir>/checkpoints/<stage>/epoch_NNNN/state.pt``
(Ray Train's storage: ``RunConfig(name=stage, storage_path=<run_dir>/checkpoints)``), or with a long-lived
``Learner`` (the driver's way) ``<run_dir>/checkpoints/learner/<stage>-epoch_NNNN/`` while it trains and
``.../<stage>/final/state.pt`` once it finished, ``.../<stage>/progress.log``,
``.../<stage>/done.json`` once the stage finished, ``<run_dir>/checkpoints/latest.json`` (the last finished stage);
both record the checkpoint folder relative to ``<run_dir>``, so a moved or copied run folder uses its own.
Re-running a stage with the same run folder resumes from its last checkpoint (or returns at once if done).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from l2l_ray.io import atomic_write_json, read_json
from l2l_ray.model.presets import resolve_preset
from l2l_ray.model.text import TOKENIZER_FILE, TextTokenizer, build_tokenizer, load_tokenizer
from l2l_ray.train.loop import PROGRESS_FILE, STATE_FILE, LocalHooks, StageSpec, train_stage
from l2l_ray.train.tables import build_train_tables

CHECKPOINTS = "checkpoints"
LATEST_FILE = "latest.json"
DONE_FILE = "done.json"
FINAL_DIR = "final"  # <stage_dir>/final/state.pt: a finished stage's weights when it ran on the long-lived learner


@dataclass
class FitResult:
    state_ref: Any  # ObjectRef of {"student", "teacher", "tokenizer"} (the dict itself when Ray is not running)
    history: list[dict]
    checkpoint_dir: str
    stage: str = ""
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def tokenizer_for(cfg, run_dir: str | Path, data) -> TextTokenizer:
    """The run's tokenizer: ``<run_dir>/tokenizer.json`` if present, else trained on the training sentences
    (labeled + unlabeled texts; no evaluation text) or taken from the pretrained text encoder, and saved."""
    path = Path(run_dir) / TOKENIZER_FILE
    if path.is_file():
        return load_tokenizer(path)
    spec = resolve_preset(cfg.model)
    sentences = [s.text for x in list(data.labeled) + list(data.unlabeled) for s in x.sentences]
    pretrained = spec.text_hub if cfg.model.pretrained and spec.text == "bert" else ""
    return build_tokenizer(sentences, run_dir, vocab_size=spec.vocab_size, max_len=spec.max_tokens,
                           pretrained=pretrained)


def _is_ref(x: Any) -> bool:
    try:
        import ray

        return isinstance(x, ray.ObjectRef)
    except ImportError:  # pragma: no cover
        return False


def resolve(x: Any) -> Any:
    """ObjectRef -> its value (ray.get); anything else as is."""
    if _is_ref(x):
        import ray

        return ray.get(x)
    return x


def _put(x: Any) -> Any:
    import ray

    return ray.put(x) if ray.is_initialized() else x


def load_checkpoint_state(checkpoint_dir: str | Path, tokenizer: TextTokenizer) -> dict:
    """A checkpoint folder -> {"student", "teacher", "tokenizer"} (CPU tensors)."""
    state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=False)
    return {"student": state["student"], "teacher": state["teacher"], "tokenizer": tokenizer.to_json()}


class ProgressEcho:
    """Prints lines appended to ``<stage_dir>/progress.log`` while Ray Train runs (workers write, we print)."""

    def __init__(self, stage_dir: str | Path, interval_s: float = 0.5):
        self.path = Path(stage_dir) / PROGRESS_FILE
        self.interval = interval_s
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="l2l-progress", daemon=True)

    def _flush(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # whole lines only
        self.offset += len(complete)
        if complete:
            print(complete.decode("utf-8", "replace"), end="", flush=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._flush()

    def __enter__(self) -> ProgressEcho:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._flush()


def actor_cpus(cfg) -> float:
    """CPUs the run's long-lived actors reserve: SelectorActors (l2l with RL) and teacher actors."""
    cpus = cfg.semi.teacher_actors * cfg.semi.teacher_cpus if cfg.method != "supervised" else 0.0
    if cfg.method == "l2l" and cfg.semi.use_rl:
        cpus += cfg.semi.selector_workers * cfg.semi.selector_cpus
    return cpus


def check_train_resources(cfg) -> None:
    """Ray Train's workers plus the run's own actors must fit the cluster, or Train waits for ever. On the local
    cluster this is a RuntimeError naming the knobs; on a joined cluster (RAY_ADDRESS, which may autoscale)
    a warning."""
    import ray

    need = cfg.train.num_workers * cfg.train.cpus_per_worker + actor_cpus(cfg)
    total = ray.cluster_resources().get("CPU", 0.0)
    if need <= total + 1e-6:
        return
    msg = (f"Ray Train needs train.num_workers={cfg.train.num_workers} x train.cpus_per_worker="
           f"{cfg.train.cpus_per_worker:g} CPUs next to the run's actors (semi.selector_workers="
           f"{cfg.semi.selector_workers} x semi.selector_cpus={cfg.semi.selector_cpus:g}, semi.teacher_actors="
           f"{cfg.semi.teacher_actors} x semi.teacher_cpus={cfg.semi.teacher_cpus:g}): {need:g} CPUs, but the "
           f"cluster has {total:g}. Lower one of these (e.g. train.cpus_per_worker=0.5) or give Ray more CPUs.")
    if os.environ.get("RAY_ADDRESS"):
        print(f"warning: {msg} Waiting for the cluster to grow.", flush=True)
        return
    raise RuntimeError(msg)


def stage_refs(tables, init_state, pseudo) -> dict:
    """A stage's data as object refs for Train workers: {"tables": [ref], "init": [ref] | [], "pseudo": [ref] | []}
    (boxed in lists so Ray passes them as refs; ``worker.resolve_stage_refs`` gets them back)."""
    import ray

    def boxed(x) -> list:
        return [] if x is None else [x if _is_ref(x) else ray.put(x)]

    return {"tables": boxed(tables), "init": boxed(init_state), "pseudo": boxed(pseudo)}


def _fit_on_learner(learner, spec: StageSpec, tables, init_state, pseudo) -> Path:
    """The stage on the run's long-lived Train run; its last checkpoint is copied to ``<stage_dir>/final`` (the
    Train run keeps only its 2 newest checkpoints across all stages)."""
    with ProgressEcho(spec.stage_dir):
        ckpt = learner.fit(spec, stage_refs(tables, init_state, pseudo))
    final = Path(spec.stage_dir) / FINAL_DIR
    final.mkdir(parents=True, exist_ok=True)
    tmp = final / f".{STATE_FILE}.tmp"
    shutil.copyfile(ckpt / STATE_FILE, tmp)
    os.replace(tmp, final / STATE_FILE)
    return final


def _fit_on_ray(cfg, spec: StageSpec, tables, init_state, pseudo) -> Path:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from l2l_ray.train.worker import train_loop_per_worker

    check_train_resources(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"spec": spec, **stage_refs(tables, init_state, pseudo)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=spec.stage, storage_path=str(Path(spec.stage_dir).parent),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)))
    with ProgressEcho(spec.stage_dir):
        result = trainer.fit()
    if getattr(result, "error", None) is not None:
        raise RuntimeError(f"training stage {spec.stage!r} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training stage {spec.stage!r} produced no checkpoint (see {spec.stage_dir})")
    return Path(result.checkpoint.path)


def record_checkpoint(run_dir: str | Path, ckpt: str | Path) -> str:
    """How done.json / latest.json record a checkpoint: its path relative to the run folder (so a moved or copied
    folder still finds its own checkpoints), or absolute when it lies outside the folder."""
    ckpt, run_dir = Path(ckpt).resolve(), Path(run_dir).resolve()
    return ckpt.relative_to(run_dir).as_posix() if ckpt.is_relative_to(run_dir) else str(ckpt)


def locate_checkpoint(stage_dir: str | Path, recorded: str) -> Path:
    """The checkpoint folder a done.json / latest.json entry names. ``stage_dir`` is ``<run_dir>/checkpoints/<stage>``;
    a relative entry is relative to ``<run_dir>``. An absolute entry (runs recorded before relative paths) is used
    when it still holds a checkpoint, else the folder of the same name under ``stage_dir`` (a moved or copied run)."""
    p = Path(recorded)
    if not p.is_absolute():
        return Path(stage_dir).parent.parent / p
    return p if (p / STATE_FILE).is_file() else Path(stage_dir) / p.name


def _done_checkpoint(stage_dir: Path, epochs: int) -> Path | None:
    done = read_json(stage_dir / DONE_FILE)
    if done and done.get("epochs", -1) >= epochs:
        ckpt = locate_checkpoint(stage_dir, done["checkpoint"])
        if (ckpt / STATE_FILE).is_file():
            return ckpt
    return None


def fit_segmenter(cfg, run_dir, stage: str, data, priors: dict | None, epochs: int, init_state=None,
                  pseudo=None, learner=None) -> FitResult:
    """Train one stage and return its student/teacher weights (see the module docstring).

    data: ``DatasetBundle`` (labeled rows are always trained on); priors: {sent_id: Prior} or None (no prior);
    init_state: ObjectRef (or dict) of {"student", "teacher"[, "tokenizer"]} to start from, else random init /
    pretrained backbone; pseudo: ObjectRef (or object) of a ``PseudoLabelBatch`` at model resolution over
    unlabeled sentences: then each step is half labeled, half pseudo-labelled rows (per-pixel weights, strong
    augmentation, loss weight ``semi.unlabeled_weight``). The EMA teacher (rate ``semi.ema``) moves every step.
    learner: a ``l2l_ray.train.learner.Learner`` to train on (one Train run for every stage, the driver's way);
    None starts a TorchTrainer for this stage alone.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    stage_dir = run_dir / CHECKPOINTS / stage
    tok = tokenizer_for(cfg, run_dir, data)
    ckpt = _done_checkpoint(stage_dir, epochs) if cfg.run.resume else None
    if ckpt is None:
        if not cfg.run.resume and stage_dir.exists():
            shutil.rmtree(stage_dir)
        pseudo_batch = resolve(pseudo)
        tables = build_train_tables(data, tok, priors, cfg.data.image_size,
                                    min(cfg.priors.proposal_size, cfg.data.image_size), pseudo_batch)
        spec = StageSpec(cfg.to_dict(), stage, epochs, str(stage_dir), tok)
        print(f"[{stage}] training {epochs} epochs: {len(tables.labeled)} labeled rows"
              + (f" + {len(tables.pseudo)} pseudo-labelled rows" if tables.pseudo is not None else "")
              + f", {len(tables.images)} images, {cfg.train.num_workers} worker(s)", flush=True)
        if cfg.train.num_workers == 0:
            hooks = LocalHooks(str(stage_dir))
            threads = torch.get_num_threads()  # train_stage sets train.num_threads; give the caller its own back
            try:
                train_stage(spec, tables, resolve(init_state), pseudo_batch, hooks)
            finally:
                torch.set_num_threads(threads)
            ckpt = hooks.checkpoints()[-1]
        else:
            from l2l_ray.ray_utils import ensure_ray

            ensure_ray(cfg)
            ckpt = _fit_on_learner(learner, spec, tables, init_state, pseudo) if learner is not None else \
                _fit_on_ray(cfg, spec, tables, init_state, pseudo)
        atomic_write_json(stage_dir / DONE_FILE, {"epochs": epochs, "checkpoint": record_checkpoint(run_dir, ckpt)})
    state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
    atomic_write_json(run_dir / CHECKPOINTS / LATEST_FILE,
                      {"stage": stage, "checkpoint": record_checkpoint(run_dir, ckpt), "priors": priors is not None})
    out = {"student": state["student"], "teacher": state["teacher"], "tokenizer": tok.to_json()}
    return FitResult(_put(out), list(state["history"]), str(ckpt), stage, round(time.perf_counter() - t0, 3))
