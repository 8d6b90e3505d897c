"""Where one L2L round's time goes, on Ray and in one process.

    python bench/round_overhead.py                                  # 600-image set, 300 unlabeled pairs
    python bench/round_overhead.py --images 1000 --unlabeled 600 --steps 40

Both paths run the driver's own ``run_round`` on the same data, priors, warm-up weights and config:

- ``ray``: the driver's layout: SelectorActors (a ``SelectorGroup``), teacher inference on a
  ``TeacherPool`` of ``--teacher-actors`` actors (0: in the driver, the 2-core default), the student on
  Ray Train (the driver's long-lived ``Learner`` run, started before the round as the warm-up starts it in the
  main job; ``--keep-learner 0``: a TorchTrainer for the round alone), pseudo-labels and weights as refs.
- ``one process``: the same round's work without actors or Ray Train: an in-process ``Selector`` and
  in-process training (``train.num_workers=0``). (``run_round`` still ``ray.put``s the pseudo-label
  batch once; a local put of a few MB.)

Printed per path: teacher inference + candidates, selection (incl. the selector's practice on held-out
labeled pairs), training, evaluation, round total; for Ray also the start-up of the SelectorActors
and teacher actors (once per run, not per round) and the Ray Train overhead (stage wall time minus
the worker's own epoch time, which both paths spend). The last line is the ratio Ray round /
one-process round. The warm-up weights come from one short in-process stage so both paths start from
the same teacher. Wall clock on this machine: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from l2l_ray.config import apply_overrides, load_config

KEYS = ("teacher_and_candidates_s", "selection_s", "train_s", "eval_s")


def _config(args, root: Path):
    return load_config(args.config, [
        f"data.root={root / 'data'}", f"data.synth_images={args.images}", f"data.label_ratio={args.label_ratio}",
        f"run.dir={root / 'warmup'}", "train.epochs=1", f"train.steps_per_epoch={args.steps}",
        f"train.batch_size={args.batch}", f"train.num_threads={args.threads}", "semi.rounds=1",
        "semi.epochs_per_round=1", f"semi.unlabeled_per_round={args.unlabeled}", "method=l2l",
        "run.resume=false"])


def _context(cfg, run_dir: Path, data, full, priors, heldout, selector, teacher, learner):
    from l2l_ray.driver import RoundContext

    pairs = [(smp, s) for smp in data.unlabeled for s in smp.sentences]
    return RoundContext(cfg, run_dir, data, full, priors, priors, pairs, heldout, selector, teacher, learner)


def _started_learner(cfg, run_dir: Path, data, priors):
    """The driver's long-lived Ray Train run, started as the main job starts it: by its first stage (here one
    step, timed as start-up: once per run, not per round)."""
    from l2l_ray.train import fit_segmenter
    from l2l_ray.train.learner import Learner

    learner = Learner(cfg, run_dir)
    fit_segmenter(apply_overrides(cfg, {"train.steps_per_epoch": 1}), run_dir, "start", data, priors, 1,
                  learner=learner)
    return learner


def _one_round(cfg, run_dir: Path, warm_dir: Path, data, full, priors, heldout, state, make_actors) -> dict:
    from l2l_ray.driver import run_round

    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(warm_dir / "tokenizer.json", run_dir / "tokenizer.json")  # same tokenizer, same model
    tic = time.perf_counter()
    selector, teacher, learner = make_actors(run_dir)
    start_s = time.perf_counter() - tic
    tic = time.perf_counter()
    ctx = _context(cfg, run_dir, data, full, priors, heldout, selector, teacher, learner)
    new_state, out = run_round(1, ctx, state)
    total = time.perf_counter() - tic
    worker_s = sum(h["time_s"] for h in new_state.history[-cfg.semi.epochs_per_round:])
    for group in (selector, teacher):
        if hasattr(group, "shutdown"):
            group.shutdown()
    if learner is not None:
        learner.close()
    return {**out["timing"], "round_s": total, "actor_start_s": start_s, "worker_epoch_s": worker_s,
            "val_mIoU": out["val"]["mIoU"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/synthetic.yaml")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--label-ratio", type=float, default=0.05)
    ap.add_argument("--unlabeled", type=int, default=300)
    ap.add_argument("--steps", type=int, default=30, help="training steps of the warm-up and of the round")
    ap.add_argument("--batch", type=int, default=16, help="per Ray Train worker (one process: x workers)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per Ray Train worker (one process: x workers, the same cores)")
    ap.add_argument("--teacher-actors", type=int, default=1,
                    help="TeacherPool actors on the Ray path (0: teacher in the driver, the 2-core default)")
    ap.add_argument("--keep-learner", type=int, default=1,
                    help="1: the student trains on the driver's long-lived Train run (started before the round); "
                         "0: a TorchTrainer for the round's stage alone (start-up inside the round)")
    ap.add_argument("--root", default="", help="work folder (default: a temporary one, removed at the end)")
    args = ap.parse_args()

    from l2l_ray.data import ensure_data, load_dataset
    from l2l_ray.driver import _priors, _split_heldout, _teacher_pool
    from l2l_ray.ray_utils import ensure_ray
    from l2l_ray.selection.agent import Selector
    from l2l_ray.selection.selector import SelectorGroup
    from l2l_ray.train import fit_segmenter

    root = Path(args.root or tempfile.mkdtemp(prefix="l2l_round_overhead_"))
    try:
        cfg = _config(args, root)
        ensure_ray(cfg)
        ensure_data(cfg)
        warm_dir = root / "warmup"
        full = load_dataset(cfg, warm_dir)
        priors = _priors(cfg)
        data, heldout = _split_heldout(cfg, full)
        workers = max(1, cfg.train.num_workers)  # the same work in one process: one worker's threads and batch x N
        local = apply_overrides(cfg, {"train.num_workers": 0, "train.num_threads": args.threads * workers,
                                      "train.batch_size": args.batch * workers})
        print(f"warm-up: {args.steps} steps in process ...", flush=True)
        state = fit_segmenter(local, warm_dir, "warmup", data, priors, 1)

        ray_cfg = apply_overrides(cfg, {"train.num_workers": workers,
                                        "semi.teacher_actors": args.teacher_actors})
        print(f"round on Ray (SelectorActors, {args.teacher_actors} teacher actor(s), Ray Train) ...", flush=True)
        on_ray = _one_round(ray_cfg, root / "ray", warm_dir, data, full, priors, heldout, state,
                            lambda d: (SelectorGroup(ray_cfg), _teacher_pool(ray_cfg),
                                       _started_learner(ray_cfg, d, data, priors) if args.keep_learner else None))
        print("the same round in one process ...", flush=True)
        alone = _one_round(local, root / "local", warm_dir, data, full, priors, heldout, state,
                           lambda d: (Selector(local.semi, local.data.image_size, local.seed * 1000), None, None))
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    n_unl = min(args.unlabeled, sum(len(s.sentences) for s in data.unlabeled))
    print(f"\none L2L round: {args.images} images, {n_unl} unlabeled pairs, {len(heldout)} held-out labeled pairs, "
          f"{args.steps} training steps x batch {args.batch} x {workers} worker(s) ({args.threads} torch thread(s) "
          f"each; one process: {args.threads * workers} threads, batch {args.batch * workers})")
    print(f"{'seconds':32s} {'ray':>8s} {'one process':>12s} {'ratio':>7s}")
    for k in KEYS + ("round_s",):
        print(f"{k:32s} {on_ray[k]:8.2f} {alone[k]:12.2f} {on_ray[k] / max(alone[k], 1e-9):7.2f}")
    trainer_overhead = on_ray["train_s"] - on_ray["worker_epoch_s"]
    print(f"{'  of which worker epoch time':32s} {on_ray['worker_epoch_s']:8.2f} {alone['worker_epoch_s']:12.2f}")
    print(f"{'Ray Train overhead (start etc.)':32s} {trainer_overhead:8.2f} "
          f"{alone['train_s'] - alone['worker_epoch_s']:12.2f}")
    print(f"{'actor + learner start (per run)':32s} {on_ray['actor_start_s']:8.2f} {alone['actor_start_s']:12.2f}")
    extra = on_ray["round_s"] - alone["round_s"]
    print(f"Ray's share of the round: {extra:.2f} s of {on_ray['round_s']:.2f} s "
          f"({100 * extra / on_ray['round_s']:.1f}%); ratio ray / one process = "
          f"{on_ray['round_s'] / alone['round_s']:.2f}")
    print(f"val mIoU after the round: ray {on_ray['val_mIoU']:.4f}, one process {alone['val_mIoU']:.4f}")


if __name__ == "__main__":
    main()
