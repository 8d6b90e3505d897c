"""The driver: one loop for every method (supervised, mean_teacher, semires, l2l).

    l2l train --config configs/synthetic.yaml                                   # L2L, built-in data
    l2l train --config configs/synthetic.yaml method=supervised data.label_ratio=0.05
    ray job submit --working-dir . -- l2l train --config configs/refcoco_1pct.yaml

The driver only calls the compute functions of the worker groups (Ray Train workers, the teacher,
SelectorActors) and passes object refs between them. Resume: every stage (warm-up, each round) keeps
its own Ray Train checkpoints, ``<run.dir>/rounds.json`` records finished rounds and
``<run.dir>/selector.pt`` the selector, so re-running the same command continues where a killed run
stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from l2l_ray.config import Config
from l2l_ray.io import atomic_write_json, read_json

RoundCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class RoundContext:
    """What every round needs; built once by ``run``."""

    cfg: Config
    run_dir: Path
    data: Any  # DatasetBundle the student trains on (held-out labeled images removed for l2l)
    full: Any  # the whole DatasetBundle (evaluation)
    priors: dict | None  # sent_id -> Prior used in selection (None: uninformative everywhere)
    guide: dict | None  # priors the segmenter sees as guidance (any method, with model.guidance)
    pairs: list  # all unlabeled (UnlabeledSample, Sentence) pairs
    heldout: list  # held-out labeled (LabeledSample, Sentence) pairs: the selector's practice set
    selector: Any = None  # SelectorGroup (l2l with RL) or None
    teacher: Any = None  # TeacherPool (semi.teacher_actors > 0) or None: teacher inference in this process
    learner: Any = None  # Learner: the long-lived Ray Train run every stage trains on (None: in-process / per stage)
    carry: dict = field(default_factory=dict)  # values handed to the next round (progress, held-out IoU)


def run_round(r: int, ctx: RoundContext, state: Any) -> tuple[Any, dict[str, Any]]:
    """One self-evolving round: teacher -> candidates -> selection -> student update -> evaluation."""
    import ray

    from l2l_ray.selection import Feedback, HeldOutTruth, build_candidates, progress_signal, select_for_method
    from l2l_ray.train import evaluate, fit_segmenter

    cfg, t, out = ctx.cfg, {}, {"round": r}
    tic = time.perf_counter()
    pairs = _round_pairs(ctx, r)
    cand = _candidates(ctx, state, pairs, build_candidates)  # 1-2. teacher (two views) -> candidates
    t["teacher_and_candidates_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    if ctx.selector is not None:  # the selector learns from what it knows by now
        cand_h = _candidates(ctx, state, ctx.heldout, build_candidates)
        truth = HeldOutTruth.from_labeled([s for s, _ in ctx.heldout], cand_h.sent_ids, cfg.data.image_size)
        iou_h = float(_iou(cand_h.teacher >= 128, truth.masks()).mean())
        progress = progress_signal(1.0 - ctx.carry["heldout_iou"], 1.0 - iou_h) if "heldout_iou" in ctx.carry else None
        if ctx.carry.get("pending_ids") is not None:  # reward last round's exploratory choices
            if np.array_equal(cand.sent_ids, ctx.carry["pending_ids"]):
                out.update(ctx.selector.feedback(Feedback(cand.sent_ids, cand.teacher, progress)))
        out.update(ctx.selector.practice(cand_h, truth))
        out["heldout_teacher_iou"], ctx.carry["heldout_iou"] = iou_h, iou_h
    explore = r < cfg.semi.rounds
    pseudo = select_for_method(cfg.method, cand, cfg, ctx.selector, explore=explore)  # 3. selection
    ctx.carry["pending_ids"] = cand.sent_ids if (ctx.selector is not None and explore) else None
    t["selection_s"] = time.perf_counter() - tic
    out.update(pseudo.stats)
    out["trusted_pixel_share"] = pseudo.stats.get("trusted_share")
    out["rejected_share"] = pseudo.stats.get("reject_share")
    out["reward"] = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("reward/")}
    if "practice/greedy_truth_iou" in out:
        out["reward"]["labeled_iou"] = out["practice/greedy_truth_iou"]
    out["pseudo_iou_diag"] = _diagnostic_pseudo_iou(cfg, pseudo)

    tic = time.perf_counter()
    new_state = fit_segmenter(cfg, ctx.run_dir, f"round_{r}", ctx.data, ctx.guide,  # 4. student update
                              cfg.semi.epochs_per_round, init_state=state.state_ref, pseudo=ray.put(pseudo),
                              learner=ctx.learner)
    t["train_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    out["val"] = evaluate(cfg, new_state.state_ref, ctx.full, ctx.guide, splits=["val"])["val"]  # 5. evaluation
    t["eval_s"] = time.perf_counter() - tic
    out["timing"] = {k: round(v, 2) for k, v in t.items()}
    return new_state, out


def _round_pairs(ctx: RoundContext, r: int) -> list:
    """A seeded subset of the unlabeled pairs (all when unlabeled_per_round is 0). The same pairs every round, so
    round r's teacher output is also round r-1's "prediction after the update" for the selector's reward."""
    k = ctx.cfg.semi.unlabeled_per_round
    if k <= 0 or k >= len(ctx.pairs):
        return ctx.pairs
    idx = np.random.default_rng(ctx.cfg.seed).choice(len(ctx.pairs), size=k, replace=False)
    return [ctx.pairs[i] for i in np.sort(idx)]


def _candidates(ctx: RoundContext, state, pairs: list, build_candidates):
    from l2l_ray.train import predict_samples

    cfg = ctx.cfg
    t1, t2 = predict_samples(cfg, state.state_ref, "teacher", pairs, ctx.guide, pool=ctx.teacher,
                             two_views=True)  # plain + mirrored view in one batched pass
    prior_list = [_prior_for(ctx.priors, s.sent_id, smp.ref_id) for smp, s in pairs]
    return build_candidates(t1, t2, prior_list, cfg.data.image_size,
                            sent_ids=[s.sent_id for _, s in pairs], ref_ids=[smp.ref_id for smp, _ in pairs])


def _prior_for(priors: dict | None, sent_id: int, ref_id: int):
    from l2l_ray.records import Prior

    if priors is None:
        return Prior(sent_id=sent_id, ref_id=ref_id, status="disabled")
    return priors.get(sent_id) or Prior(sent_id=sent_id, ref_id=ref_id, status="model_error")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from l2l_ray.selection.rewards import iou

    return iou(a.astype(bool), b.astype(bool))


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
    return float(_iou(pseudo.label_masks()[kept], truth[kept]).mean()) if kept.any() else None


def _split_heldout(cfg: Config, data) -> tuple[Any, list]:
    """Keep ``semi.selector_heldout`` of the labeled images out of student training (the selector's practice)."""
    import dataclasses

    images = sorted({s.image_id for s in data.labeled})
    n = int(round(cfg.semi.selector_heldout * len(images)))
    if n == 0 or n >= len(images):
        return data, [(s, sent) for s in data.labeled[:1] for sent in s.sentences]
    held = set(np.random.default_rng(cfg.seed).choice(images, size=n, replace=False).tolist())
    train = [s for s in data.labeled if s.image_id not in held]
    heldout = [(s, sent) for s in data.labeled if s.image_id in held for sent in s.sentences]
    return dataclasses.replace(data, labeled=train), heldout


def _priors(cfg: Config) -> dict | None:
    if not cfg.semi.use_priors or not (cfg.method in ("semires", "l2l") or cfg.model.guidance):
        return None  # priors serve selection (semires, l2l) and guidance (any method with model.guidance)
    from l2l_ray.priors.pipeline import load_priors, run_priors

    run_priors(cfg)  # computes only what the cache lacks
    return load_priors(cfg, allow_missing=True)


def supervised_epochs(cfg: Config) -> int:
    """Epochs of the first stage. ``supervised`` trains as long as the semi-supervised methods do in all
    (warm-up + every round), on labeled data only, so no method wins by training longer."""
    if cfg.method == "supervised":
        return cfg.train.epochs + cfg.semi.rounds * cfg.semi.epochs_per_round
    return cfg.train.epochs


def run(cfg: Config, on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` end to end; write ``<run.dir>/metrics.json``; return it."""
    from l2l_ray.data import ensure_data, load_dataset
    from l2l_ray.ray_utils import ensure_ray
    from l2l_ray.train import evaluate, fit_segmenter

    t0 = time.perf_counter()
    on_round = on_round or (lambda r, m: None)
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray(cfg)
    ensure_data(cfg)
    full = load_dataset(cfg, run_dir)  # refuses a run folder made with another label split
    cfg.save(run_dir / "config.yaml")  # only now: `l2l eval --run` must keep the config of the checkpoints
    priors = _priors(cfg)
    guide = priors if cfg.model.guidance else None  # guidance is the segmenter's, for every method
    use_rl = cfg.method == "l2l" and cfg.semi.use_rl
    data, heldout = _split_heldout(cfg, full) if use_rl else (full, [])
    timing = {"setup_s": time.perf_counter() - t0}

    tic = time.perf_counter()
    stage = "warmup" if cfg.method != "supervised" else "supervised"
    rounds: list[dict] = []
    val0 = selector = teacher = None
    learner = _learner(cfg, run_dir)
    try:
        state = fit_segmenter(cfg, run_dir, stage, data, guide, supervised_epochs(cfg), learner=learner)
        timing["warmup_s"] = time.perf_counter() - tic
        if cfg.method != "supervised":
            val0 = evaluate(cfg, state.state_ref, full, guide, splits=["val"])["val"]
            on_round(0, {"round": 0, "val": val0})
            selector = _selector(cfg, run_dir) if use_rl else None
            teacher = _teacher_pool(cfg)
            state, rounds = _rounds(cfg, run_dir, full, data, priors, guide, heldout, state, selector, teacher,
                                    learner, on_round)

        tic = time.perf_counter()
        splits = evaluate(cfg, state.state_ref, full, guide)  # every split of the scheme
        timing["final_eval_s"] = time.perf_counter() - tic
        if cfg.method == "supervised":
            on_round(0, {"round": 0, "val": splits["val"]})
        _save_gallery(cfg, run_dir, full, priors, guide, state, selector)
    finally:
        for group in (selector, teacher):  # free the actors' CPUs for whatever runs next in this process
            if group is not None:
                group.shutdown()
        if learner is not None:
            learner.close()
    timing["total_s"] = time.perf_counter() - t0
    metrics = {"method": cfg.method, "label_ratio": cfg.data.label_ratio, "seed": cfg.seed, "splits": splits,
               "rounds": rounds, "timing": {k: round(v, 2) for k, v in timing.items()},
               "warmup_history": state.history if not rounds else None, "warmup_val": val0, "data": full.stats,
               "heldout_pairs": len(heldout), "priors": None if priors is None else len(priors)}
    atomic_write_json(run_dir / "metrics.json", metrics)
    _log_tb(run_dir, rounds, splits, val0)
    print(_summary(metrics), flush=True)
    return metrics


def _selector(cfg: Config, run_dir: Path):
    """The SelectorGroup, restored from ``<run_dir>/selector.pt`` when a previous run left one (and run.resume)."""
    from l2l_ray.selection.selector import SelectorGroup

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


def _rounds(cfg, run_dir, full, data, priors, guide, heldout, state, selector, teacher, learner, on_round):
    from l2l_ray.train import fit_segmenter
    from l2l_ray.train.fit import CHECKPOINTS, DONE_FILE

    pairs = [(smp, s) for smp in data.unlabeled for s in smp.sentences]
    fresh = {"rounds": [], "carry": {}}
    saved = read_json(run_dir / "rounds.json", default=fresh) if cfg.run.resume else fresh  # resume=false: redo all
    ctx = RoundContext(cfg, run_dir, data, full, priors, guide, pairs, heldout, selector, teacher, learner,
                       _load_carry(saved))
    rounds = list(saved["rounds"])[: cfg.semi.rounds]  # a rerun with fewer rounds stops at its own last one
    if rounds:  # finished before a restart: continue from the last finished round's checkpoint
        stage_dir = run_dir / CHECKPOINTS / f"round_{len(rounds)}"
        if not (stage_dir / DONE_FILE).is_file():
            raise FileNotFoundError(f"{run_dir / 'rounds.json'} lists round {len(rounds)} as finished but "
                                    f"{stage_dir / DONE_FILE} is missing; delete rounds.json and selector.pt "
                                    "there to redo the rounds, or use a new run.dir")
        state = fit_segmenter(cfg, run_dir, f"round_{len(rounds)}", data, guide, cfg.semi.epochs_per_round,
                              learner=learner)
    for r in range(len(rounds) + 1, cfg.semi.rounds + 1):
        state, m = run_round(r, ctx, state)
        rounds.append(m)
        if selector is not None:
            selector.save(run_dir / "selector.pt")
        atomic_write_json(run_dir / "rounds.json", {"rounds": rounds, "carry": _dump_carry(ctx.carry)})
        print(f"[round {r}] val mIoU {m['val']['mIoU']:.4f} oIoU {m['val']['oIoU']:.4f} "
              f"trusted {m.get('trusted_share', float('nan')):.3f} pseudo IoU (diag) {m['pseudo_iou_diag']}",
              flush=True)
        on_round(r, m)
    return state, rounds


def _load_carry(saved: dict) -> dict:
    carry = dict(saved.get("carry", {}))
    if carry.get("pending_ids") is not None:
        carry["pending_ids"] = np.asarray(carry["pending_ids"], np.int64)
    return carry


def _dump_carry(carry: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in carry.items()}


def _save_gallery(cfg, run_dir, full, priors, guide, state, selector=None) -> None:
    """Fixed val pairs with prior, proposal, teacher, the pseudo-label the method would select (greedy; none for
    supervised: all ignored), prediction, truth."""
    from l2l_ray.data.images import load_image, load_mask_resized
    from l2l_ray.report import save_gallery
    from l2l_ray.selection import build_candidates, select_for_method
    from l2l_ray.train import predict_samples

    val = full.eval.get("val", [])[:: max(1, len(full.eval.get("val", [])) // max(cfg.semi.gallery_size, 1))]
    val = val[: cfg.semi.gallery_size]
    if not val:
        return
    s = cfg.data.image_size
    pairs = [(e, _Sent(e.sent_id, e.sentence)) for e in val]
    pred = predict_samples(cfg, state.state_ref, "student", pairs, guide)
    teacher, flip = predict_samples(cfg, state.state_ref, "teacher", pairs, guide, two_views=True)
    plist = [_prior_for(priors, e.sent_id, e.ref_id) for e in val]
    cand = build_candidates(teacher, flip, plist, s, sent_ids=[e.sent_id for e in val], ref_ids=[e.ref_id for e in val])
    use_rl = cfg.method == "l2l" and cfg.semi.use_rl
    pl = select_for_method(cfg.method, cand, _no_rl(cfg) if use_rl and selector is None else cfg, selector,
                           explore=False)  # None for supervised
    pseudo = np.full((len(val), s, s), 128, np.uint8)  # 128 = ignored (not trained on)
    if pl is not None:
        rows = {int(i): k for k, i in enumerate(pl.sent_ids)}
        labels, weights = pl.label_masks(), pl.weights
        for k, e in enumerate(val):
            if e.sent_id in rows:
                j = rows[e.sent_id]
                pseudo[k] = np.where(weights[j] > 0, np.where(labels[j], 255, 0), 128)
    boxes = np.array([p.box if p.box is not None else (np.nan,) * 4 for p in plist], np.float32)
    save_gallery(run_dir, np.stack([load_image(e.image_path, s) for e in val]), [e.sentence for e in val], boxes,
                 np.stack([(p.soft_mask(s) * 255).astype(np.uint8) for p in plist]), teacher, pseudo,
                 ((pred >= 128) * 255).astype(np.uint8),
                 np.stack([load_mask_resized(e.mask(), s).astype(np.uint8) * 255 for e in val]))


@dataclass(frozen=True)
class _Sent:
    sent_id: int
    text: str


def _no_rl(cfg: Config) -> Config:
    """L2L's fixed rule on the same candidates (the gallery's fallback when no selector is at hand)."""
    from l2l_ray.config import apply_overrides

    return apply_overrides(cfg, {"semi.use_rl": False})


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
