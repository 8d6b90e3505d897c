"""The driver: one loop for every method (supervised, mean_teacher, semires, l2l).

    l2l train --config configs/synthetic.yaml                                   # L2L, built-in data
    l2l train --config configs/synthetic.yaml method=supervised data.label_ratio=0.05
    ray job submit --working-dir . -- l2l train --config configs/refcoco_1pct.yaml

The driver only calls the compute functions of the worker groups (Ray Train workers, the teacher,
SelectorActors) and passes object refs between them. Resume: every stage (warm-up, each round) keeps
its own Ray Train checkpoints, ``<run.dir>/rounds.json`` records finished rounds and what the next round
needs (``Carry``), ``<run.dir>/selector.pt`` the selector, so re-running the same command continues where a
killed run stopped.

The selector's practice slice (l2l with RL) rotates: the labeled images are cut into folds; round r practises on
fold r on a teacher whose last stage did not train on it, and every other stage trains on it, so no labeled
image is lost to the student (``semi.practice_rotation``; the last round trains on all of them).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from l2l_ray import gallery
from l2l_ray.config import Config
from l2l_ray.io import atomic_write_json, read_json
from l2l_ray.run_folder import claim_run_dir
from l2l_ray.selection import Feedback, HeldOutTruth, build_candidates, select_for_method
from l2l_ray.selection.rewards import iou
from l2l_ray.setup import RunInputs, setup_run

RoundCallback = Callable[[int, dict[str, Any]], None]


@contextmanager
def timed(log: dict[str, float], key: str) -> Iterator[None]:
    """``with timed(t, "train_s"): ...`` -> t["train_s"] = the block's wall seconds."""
    tic = time.perf_counter()
    try:
        yield
    finally:
        log[key] = time.perf_counter() - tic


@dataclass
class Carry:
    """What one round hands the next (saved in rounds.json): the exploratory selection awaiting its rewards."""

    pending_ids: np.ndarray | None = None  # int64 sent_ids of the last exploratory selection, in its order

    def to_json(self) -> dict:
        return {"pending_ids": None if self.pending_ids is None else self.pending_ids.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> Carry:
        ids = d.get("pending_ids")
        return cls(None if ids is None else np.asarray(ids, np.int64))


@dataclass
class RoundContext:
    """What every round needs; built once by ``run``."""

    cfg: Config
    run_dir: Path
    inputs: RunInputs  # full data, priors (selection), guide (the segmenter's guidance)
    pairs: list  # the unlabeled (UnlabeledSample, Sentence) pairs
    folds: list[set]  # labeled image ids per practice fold (l2l with RL), else []
    selector: Any = None  # SelectorGroup (l2l with RL) or None
    teacher: Any = None  # TeacherPool (semi.teacher_actors > 0) or None
    learner: Any = None  # Learner: the long-lived Ray Train run every stage trains on (None: per stage)
    carry: Carry = field(default_factory=Carry)


def run_round(r: int, ctx: RoundContext, state: Any) -> tuple[Any, dict[str, Any]]:
    """One self-evolving round: teacher -> candidates -> (selector feedback, practice) -> selection -> student
    update -> evaluation."""
    import ray

    from l2l_ray.train import evaluate, fit_segmenter

    cfg, guide, t, out = ctx.cfg, ctx.inputs.guide, {}, {"round": r}
    with timed(t, "teacher_and_candidates_s"):
        pairs = _round_pairs(ctx)
        cand = _candidates(ctx, state, pairs)  # 1-2. teacher (two views) -> candidates
    with timed(t, "selection_s"):
        if ctx.selector is not None:  # the selector learns from what it knows by now
            out.update(_selector_learns(ctx, r, state, pairs, cand))
        explore = r < cfg.semi.rounds
        pseudo = select_for_method(cfg.method, cand, cfg, ctx.selector, explore=explore)  # 3. selection
        ctx.carry.pending_ids = cand.sent_ids if (ctx.selector is not None and explore) else None
    out.update(pseudo.stats)
    out["trusted_pixel_share"], out["rejected_share"] = pseudo.stats.get("trusted_share"), pseudo.stats.get(
        "reject_share")
    out["reward"] = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("reward/")}
    if "practice/greedy_truth_iou" in out:
        out["reward"]["labeled_iou"] = out["practice/greedy_truth_iou"]
    out["pseudo_iou_diag"] = _diagnostic_pseudo_iou(cfg, pseudo)
    with timed(t, "train_s"):  # 4. student update
        new_state = fit_segmenter(cfg, ctx.run_dir, f"round_{r}", _stage_data(ctx, r + 1), guide,
                                  cfg.semi.epochs_per_round, init_state=state.state_ref, pseudo=ray.put(pseudo),
                                  learner=ctx.learner)
    with timed(t, "eval_s"):  # 5. evaluation
        out["val"] = evaluate(cfg, new_state.state_ref, ctx.inputs.full, guide, splits=["val"])["val"]
    out["timing"] = {k: round(v, 2) for k, v in t.items()}
    return new_state, out


def _selector_learns(ctx: RoundContext, r: int, state, pairs: list, cand) -> dict[str, Any]:
    """Pay last round's exploratory choices (consistency with the updated teacher + held-out credit), then
    practise on this round's fold of held-out LABELED pairs (true masks: legitimate supervision)."""
    from l2l_ray.train.credit import alignment_maps

    cfg, out = ctx.cfg, {}
    held = _practice_pairs(ctx, r)
    cand_h = _candidates(ctx, state, held)
    truth = HeldOutTruth.from_labeled([s for s, _ in held], cand_h.sent_ids, cfg.data.image_size)
    masks = truth.masks()  # bool (M, S, S)
    out["heldout_teacher_iou"] = float(iou(cand_h.teacher >= 128, masks).mean())
    pending = ctx.carry.pending_ids
    if pending is not None and np.array_equal(cand.sent_ids, pending):
        align = alignment_maps(cfg, state.state_ref, pairs, ctx.inputs.guide, held, masks)
        out.update(ctx.selector.feedback(Feedback(cand.sent_ids, cand.teacher, align)))
    out.update(ctx.selector.practice(cand_h, truth))
    return out


def _round_pairs(ctx: RoundContext) -> list:
    """A seeded subset of the unlabeled pairs (all when unlabeled_per_round is 0). The same pairs every round, so
    round r's teacher output is also round r-1's "prediction after the update" for the selector's reward."""
    k = ctx.cfg.semi.unlabeled_per_round
    if k <= 0 or k >= len(ctx.pairs):
        return ctx.pairs
    idx = np.random.default_rng(ctx.cfg.seed).choice(len(ctx.pairs), size=k, replace=False)
    return [ctx.pairs[i] for i in np.sort(idx)]


def _candidates(ctx: RoundContext, state, pairs: list):
    from l2l_ray.train import predict_samples

    cfg = ctx.cfg
    t1, t2 = predict_samples(cfg, state.state_ref, "teacher", pairs, ctx.inputs.guide, pool=ctx.teacher,
                             two_views=True)  # plain + mirrored view in one batched pass
    prior_list = [gallery.prior_for(ctx.inputs.priors, s.sent_id, smp.ref_id) for smp, s in pairs]
    return build_candidates(t1, t2, prior_list, cfg.data.image_size,
                            sent_ids=[s.sent_id for _, s in pairs], ref_ids=[smp.ref_id for smp, _ in pairs])


def _diagnostic_pseudo_iou(cfg: Config, pseudo) -> float | None:
    """DIAGNOSTIC ONLY (logged, never a training signal): IoU of the selected pseudo-labels with the hidden truth
    of their unlabeled refs, read from the annotation files here and nowhere else."""
    if pseudo is None or len(pseudo) == 0:
        return None
    from l2l_ray.data.images import load_mask_resized
    from l2l_ray.data.refer import ReferDataset
    from l2l_ray.masks import decode_rle

    ds = ReferDataset(cfg.data.root, cfg.data.dataset, cfg.data.split_by, cfg.data.images)
    rles = [ds.mask_rle(int(r)) for r in pseudo.ref_ids]  # None: a bad segmentation (counted by ds), left out
    s = pseudo.size
    truth = np.stack([load_mask_resized(decode_rle(r), s) if r is not None else np.zeros((s, s), bool)
                      for r in rles])  # resized as evaluate() resizes
    kept = (pseudo.weights.reshape(len(pseudo), -1).max(1) > 0) & np.array([r is not None for r in rles])
    return float(iou(pseudo.label_masks()[kept], truth[kept]).mean()) if kept.any() else None


def practice_folds(cfg: Config, data) -> list[set]:
    """Labeled image ids cut into round(1 / semi.selector_heldout) seeded folds (l2l with RL; [] otherwise).
    Without ``semi.practice_rotation`` one fixed fold of that share is held out of every stage."""
    if not (cfg.method == "l2l" and cfg.semi.use_rl) or cfg.semi.selector_heldout <= 0:
        return []
    images = sorted({s.image_id for s in data.labeled})
    k = max(2, int(round(1 / cfg.semi.selector_heldout)))
    if len(images) < k:
        return [set(images[:1])] if images else []  # too few images to spare: practise on one, seen by the student
    order = np.random.default_rng(cfg.seed).permutation(images).tolist()
    return [set(order[i::k]) for i in range(k)]


def _fold(ctx: RoundContext, r: int) -> set:
    """The labeled images round ``r`` practises on (r >= 1): fold (r - 1) mod K; the fixed fold 0 without rotation."""
    if not ctx.folds:
        return set()
    return ctx.folds[(r - 1) % len(ctx.folds) if ctx.cfg.semi.practice_rotation else 0]


def _stage_data(ctx: RoundContext, next_round: int):
    """The stage before round ``next_round`` trains on every labeled image but that round's practice fold (the
    last round's update, with no practice after it, on all of them; without rotation the fixed fold is kept out)."""
    last = next_round > ctx.cfg.semi.rounds
    if len(ctx.folds) < 2 or (last and ctx.cfg.semi.practice_rotation):  # < 2 folds: too few labeled images
        return ctx.inputs.full
    held = _fold(ctx, next_round)
    return dataclasses.replace(ctx.inputs.full, labeled=[s for s in ctx.inputs.full.labeled
                                                         if s.image_id not in held])


def _practice_pairs(ctx: RoundContext, r: int) -> list:
    held = _fold(ctx, r)
    return [(s, sent) for s in ctx.inputs.full.labeled if s.image_id in held for sent in s.sentences]


def supervised_epochs(cfg: Config) -> int:
    """Epochs of the first stage. ``supervised`` trains as long as the semi-supervised methods do in all
    (warm-up + every round), on labeled data only, so no method wins by training longer."""
    if cfg.method == "supervised":
        return cfg.train.epochs + cfg.semi.rounds * cfg.semi.epochs_per_round
    return cfg.train.epochs


def run(cfg: Config, on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` end to end; write ``<run.dir>/metrics.json``; return it."""
    with claim_run_dir(cfg) as folder:  # before Ray starts: one process per run folder, one config per folder
        return _run(cfg, folder.path.resolve(), on_round or (lambda r, m: None))


def _run(cfg: Config, run_dir: Path, on_round: RoundCallback) -> dict[str, Any]:
    from l2l_ray.train import evaluate, fit_segmenter

    t0, timing = time.perf_counter(), {}
    inputs = setup_run(cfg, run_dir)
    cfg.save(run_dir / "config.yaml")  # only now: `l2l eval --run` must keep the config of the checkpoints
    full, guide = inputs.full, inputs.guide
    pairs = [(smp, s) for smp in full.unlabeled for s in smp.sentences]
    ctx = RoundContext(cfg, run_dir, inputs, pairs, practice_folds(cfg, full))
    timing["setup_s"] = time.perf_counter() - t0
    rounds: list[dict] = []
    val0 = None
    ctx.learner = _learner(cfg, run_dir)
    try:
        with timed(timing, "warmup_s"):
            state = fit_segmenter(cfg, run_dir, "warmup" if cfg.method != "supervised" else "supervised",
                                  _stage_data(ctx, 1), guide, supervised_epochs(cfg), learner=ctx.learner)
        if cfg.method != "supervised":
            val0 = evaluate(cfg, state.state_ref, full, guide, splits=["val"])["val"]
            on_round(0, {"round": 0, "val": val0})
            ctx.selector = _selector(cfg, run_dir) if ctx.folds else None
            ctx.teacher = _teacher_pool(cfg)
            state, rounds = _rounds(ctx, state, on_round)
        with timed(timing, "final_eval_s"):
            splits = evaluate(cfg, state.state_ref, full, guide)  # every split of the scheme
        if cfg.method == "supervised":
            on_round(0, {"round": 0, "val": splits["val"]})
        gallery.save_run_gallery(cfg, run_dir, full, inputs.priors, guide, state, ctx.selector)
    finally:
        for group in (ctx.selector, ctx.teacher):  # free the actors' CPUs for whatever runs next in this process
            if group is not None:
                group.shutdown()
        if ctx.learner is not None:
            ctx.learner.close()
    timing["total_s"] = time.perf_counter() - t0
    metrics = {"method": cfg.method, "label_ratio": cfg.data.label_ratio, "seed": cfg.seed,
               "guidance": bool(cfg.model.guidance), "splits": splits,
               "rounds": rounds, "timing": {k: round(v, 2) for k, v in timing.items()},
               "warmup_history": state.history if not rounds else None, "warmup_val": val0, "data": full.stats,
               "practice_folds": [len(f) for f in ctx.folds], "priors": None if inputs.priors is None else
               len(inputs.priors), "prior_corruption": {"rate": cfg.priors.corruption, **inputs.prior_stats}}
    atomic_write_json(run_dir / "metrics.json", metrics)
    _log_tb(run_dir, rounds, splits, val0)
    print(_summary(metrics), flush=True)
    return metrics


def _selector(cfg: Config, run_dir: Path):
    """The SelectorGroup, restored from ``<run_dir>/selector.pt`` when a previous run left one (and run.resume)."""
    from l2l_ray.selection.selector import SelectorGroup  # imports Ray and RLlib

    selector = SelectorGroup(cfg)
    if cfg.run.resume:
        selector.load(run_dir / "selector.pt")
    return selector


def _learner(cfg: Config, run_dir: Path):
    """The long-lived Ray Train run every stage trains on (``train.keep_learner``), or None (in-process training
    with ``train.num_workers=0``, or a TorchTrainer per stage). It starts on the first stage that needs it."""
    if cfg.train.num_workers <= 0 or not cfg.train.keep_learner:
        return None
    from l2l_ray.train.learner import Learner

    return Learner(cfg, run_dir)


def _teacher_pool(cfg: Config):
    if cfg.semi.teacher_actors <= 0:
        return None
    from l2l_ray.train.teacher_pool import TeacherPool

    return TeacherPool(cfg)


def _rounds(ctx: RoundContext, state, on_round: RoundCallback):
    from l2l_ray.train import fit_segmenter
    from l2l_ray.train.fit import CHECKPOINTS, DONE_FILE

    cfg, run_dir = ctx.cfg, ctx.run_dir
    fresh = {"rounds": [], "carry": {}}
    saved = read_json(run_dir / "rounds.json", default=fresh) if cfg.run.resume else fresh  # resume=false: redo all
    ctx.carry = Carry.from_json(saved.get("carry", {}))
    rounds = list(saved["rounds"])
    if rounds:  # finished before a restart: continue from the last finished round's checkpoint
        stage_dir = run_dir / CHECKPOINTS / f"round_{len(rounds)}"
        if not (stage_dir / DONE_FILE).is_file():
            raise FileNotFoundError(f"{run_dir / 'rounds.json'} lists round {len(rounds)} as finished but "
                                    f"{stage_dir / DONE_FILE} is missing; delete rounds.json and selector.pt "
                                    "there to redo the rounds, or use a new run.dir")
        state = fit_segmenter(cfg, run_dir, f"round_{len(rounds)}", _stage_data(ctx, len(rounds) + 1),
                              ctx.inputs.guide, cfg.semi.epochs_per_round, learner=ctx.learner)
    for r in range(len(rounds) + 1, cfg.semi.rounds + 1):
        state, m = run_round(r, ctx, state)
        rounds.append(m)
        if ctx.selector is not None:
            ctx.selector.save(run_dir / "selector.pt")
        atomic_write_json(run_dir / "rounds.json", {"rounds": rounds, "carry": ctx.carry.to_json()})
        print(f"[round {r}] val mIoU {m['val']['mIoU']:.4f} oIoU {m['val']['oIoU']:.4f} "
              f"trusted {m.get('trusted_share', float('nan')):.3f} pseudo IoU (diag) {m['pseudo_iou_diag']}",
              flush=True)
        on_round(r, m)
    return state, rounds


def _log_tb(run_dir: Path, rounds: list[dict], splits: dict, val0: dict | None = None) -> None:
    from l2l_ray.tb import TBLogger

    with TBLogger(run_dir) as tb:
        if val0 is not None:  # the warm-up's val metrics: round 0 of the curves
            tb.log_round(0, {"val": val0})
        for m in rounds:
            tb.log_round(m["round"], {k: v for k, v in m.items() if k != "round"})
        tb.log_splits(splits, len(rounds))


def _summary(metrics: dict) -> str:
    lines = [f"== {metrics['method']} (labels {metrics['label_ratio']:g}, seed {metrics['seed']}) "
             f"in {metrics['timing']['total_s']:.0f} s =="]
    lines.append(f"{'split':8s} {'mIoU':>7s} {'oIoU':>7s} {'P@0.5':>7s} {'P@0.7':>7s} {'P@0.9':>7s} {'n':>6s}")
    for name, m in metrics["splits"].items():
        lines.append(f"{name:8s} {m['mIoU']:7.4f} {m['oIoU']:7.4f} {m['prec@0.5']:7.4f} {m['prec@0.7']:7.4f} "
                     f"{m['prec@0.9']:7.4f} {m['n']:6d}")
    for m in metrics["rounds"]:
        lines.append(f"round {m['round']}: val mIoU {m['val']['mIoU']:.4f}, trusted {m.get('trusted_share', 0):.3f}, "
                     f"pseudo IoU (diagnostic) {m.get('pseudo_iou_diag')}")
    return "\n".join(lines)
