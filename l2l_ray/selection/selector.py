"""``SelectorActor`` (a thin Ray shell around ``Selector``) and ``SelectorGroup`` (N identical actors).

    group = SelectorGroup(cfg)                       # cfg.semi.selector_workers actors
    group.load(run_dir / "selector.pt")              # resume (no-op if the file is missing)
    group.practice(cand_heldout, truth_heldout)      # held-out LABELED pairs
    pl = group.select(cand_unlabeled, explore=True)  # PseudoLabelBatch; actions stay on the actors
    group.feedback(Feedback(sent_ids, post_probs, align))   # next round, before practice
    group.save(run_dir / "selector.pt")

Candidate batches are pre-sliced (one contiguous slice per actor, ``ray.put`` once per slice); every
``.remote()`` result is gathered with ``ray.get``. After each learning call the actors' policy weights
are averaged and broadcast (one ``ray.put``), so all actors select with the same policy.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import ray

from l2l_ray.io import atomic_write_bytes
from l2l_ray.records import PseudoLabelBatch
from l2l_ray.selection.agent import Selector, state_from_bytes, state_to_bytes
from l2l_ray.selection.candidates import CandidateBatch
from l2l_ray.selection.rewards import Feedback, HeldOutTruth


class SelectorActor:
    """Ray actor shell: one ``Selector`` per process. Built with ``ray.remote(SelectorActor)`` by the group."""

    def __init__(self, semi, size: int, seed: int, threads: int = 0):
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.selector = Selector(semi, size, seed)

    def ping(self) -> bool:
        return True

    def select(self, cand: CandidateBatch, explore: bool, return_record: bool = False):
        """-> (PseudoLabelBatch, ActionRecord or None); the record is also kept here for ``feedback``."""
        pl, rec = self.selector.select(cand, explore)
        return pl, (rec if return_record else None)

    def practice(self, cand: CandidateBatch, truth: HeldOutTruth, steps: int | None = None) -> dict:
        return self.selector.practice(cand, truth, steps)

    def feedback(self, fb: Feedback) -> dict:
        return self.selector.feedback(fb)

    def candidate_probs(self, cand: CandidateBatch) -> np.ndarray:
        return self.selector.candidate_probs(cand)

    def evaluate(self, cand: CandidateBatch, truth: HeldOutTruth) -> dict:
        return self.selector.evaluate(cand, truth)

    def get_state(self) -> dict:
        return self.selector.get_state()

    def get_pending(self):
        return self.selector.get_pending()

    def set_pending(self, pending) -> None:
        self.selector.set_pending(pending)

    def set_state(self, state: dict, weights_only: bool = False) -> None:
        self.selector.set_state(state, weights_only)


def concat_pseudo_labels(batches: list[PseudoLabelBatch]) -> PseudoLabelBatch:
    """Concatenate per-actor pseudo-label batches; stats merged (counts summed, shares weighted by pairs)."""
    if not batches:
        raise ValueError("no pseudo-label batches to concatenate")
    size = batches[0].size
    n = np.array([b.stats.get("n_pairs", len(b)) for b in batches], np.float64)
    stats: dict = {}
    for key, value in batches[0].stats.items():
        vals = [b.stats.get(key, value) for b in batches]
        if key in ("n_pairs", "n_kept"):
            stats[key] = int(sum(vals))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            stats[key] = float(np.dot(vals, n) / max(n.sum(), 1))
        else:
            stats[key] = value
    cat = lambda attr: np.concatenate([getattr(b, attr) for b in batches])  # noqa: E731
    return PseudoLabelBatch(cat("sent_ids"), cat("ref_ids"), cat("labels"), cat("weights"), size, stats)


def _mean_stats(stats: list[dict]) -> dict:
    keys = {k for s in stats for k, v in s.items() if isinstance(v, (int, float))}
    return {k: float(np.mean([s[k] for s in stats if k in s])) for k in sorted(keys)}


class SelectorGroup:
    """``num_actors`` SelectorActors with synchronised policy weights."""

    def __init__(self, cfg, num_actors: int | None = None, size: int | None = None):
        n = int(num_actors or cfg.semi.selector_workers)
        self.size = int(size or cfg.data.image_size)
        remote_cls = ray.remote(SelectorActor).options(num_cpus=cfg.semi.selector_cpus)
        self.actors = [remote_cls.remote(cfg.semi, self.size, cfg.seed * 1000 + i, cfg.semi.selector_threads)
                       for i in range(n)]
        ray.get([a.ping.remote() for a in self.actors])  # surface start-up errors here
        self._bounds: list[int] | None = None  # pair counts per actor of the pending exploratory selection
        self._pending_ids: np.ndarray | None = None
        if n > 1:
            self._broadcast(ray.get(self.actors[0].get_state.remote()), weights_only=True)

    def __len__(self) -> int:
        return len(self.actors)

    def _put_slices(self, cand: CandidateBatch) -> tuple[list, list[int]]:
        parts = cand.split(len(self.actors))
        return [ray.put(p) for p in parts], [len(p) for p in parts]

    def _broadcast(self, state: dict, weights_only: bool) -> None:
        ref = ray.put(state)
        ray.get([a.set_state.remote(ref, weights_only) for a in self.actors])

    def sync_weights(self) -> None:
        """Average the actors' policy weights and broadcast them (no-op with one actor)."""
        if len(self.actors) == 1:
            return
        states = ray.get([a.get_state.remote() for a in self.actors])
        avg = {k: sum(s["module"][k].float() for s in states) / len(states) for k in states[0]["module"]}
        avg = {k: v.to(states[0]["module"][k].dtype) for k, v in avg.items()}
        self._broadcast({"module": avg}, weights_only=True)

    def select(self, cand: CandidateBatch, explore: bool) -> PseudoLabelBatch:
        """Pseudo-labels of the kept pairs, in the order of ``cand``; the action records stay on the actors."""
        refs, counts = self._put_slices(cand)
        results = ray.get([a.select.remote(r, explore) for a, r in zip(self.actors, refs, strict=True)])
        self._bounds = counts if explore else None
        self._pending_ids = cand.sent_ids.copy() if explore else None
        return concat_pseudo_labels([pl for pl, _ in results])

    def practice(self, cand: CandidateBatch, truth: HeldOutTruth, steps: int | None = None) -> dict:
        """Each actor practises on its slice of the held-out LABELED pairs, then weights are averaged."""
        if not np.array_equal(cand.sent_ids, truth.sent_ids):
            raise ValueError("practice: truth.sent_ids must equal cand.sent_ids (same held-out pairs, same order)")
        refs, counts = self._put_slices(cand)
        bounds = np.cumsum([0] + counts)
        truths = [ray.put(truth.slice(slice(a, b))) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        stats = ray.get([a.practice.remote(r, t, steps) for a, r, t in zip(self.actors, refs, truths, strict=True)])
        self.sync_weights()
        return _mean_stats(stats)

    def feedback(self, fb: Feedback) -> dict:
        """Rewards and update for the pending exploratory selection; ``fb`` aligned with that selection."""
        if self._bounds is None:
            return {"selector/update_skipped_no_pending": 1.0}
        if not np.array_equal(fb.sent_ids, self._pending_ids):
            raise ValueError(f"feedback for {len(fb.sent_ids)} pairs does not match the pending selection of "
                             f"{len(self._pending_ids)} pairs: pass Feedback.sent_ids (and post_probs rows) in the "
                             "order of the cand batch given to select(explore=True)")
        bounds = np.cumsum([0] + self._bounds)
        refs = [ray.put(fb.slice(slice(a, b))) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        stats = ray.get([a.feedback.remote(r) for a, r in zip(self.actors, refs, strict=True)])
        self._bounds = self._pending_ids = None
        self.sync_weights()
        return _mean_stats(stats)

    def candidate_probs(self, cand: CandidateBatch) -> np.ndarray:
        """float32 (N, K) candidate-head probabilities (actor 0)."""
        return ray.get(self.actors[0].candidate_probs.remote(cand))

    def get_state(self) -> dict:
        return ray.get(self.actors[0].get_state.remote())

    def set_state(self, state: dict) -> None:
        self._broadcast(state, weights_only=False)

    def save(self, path: str | os.PathLike) -> None:
        """Selector checkpoint: actor 0's full state (weights, optimizer, counters, RNGs), written atomically;
        the pending exploratory selection (candidates + actions of every actor) goes to ``<path>.pending``, so a
        restarted driver still pays last round's choices."""
        atomic_write_bytes(path, state_to_bytes(self.get_state()))
        pending_path = Path(f"{path}.pending")
        if self._bounds is None:
            pending_path.unlink(missing_ok=True)
            return
        parts = ray.get([a.get_pending.remote() for a in self.actors])
        atomic_write_bytes(pending_path, pickle.dumps({"bounds": self._bounds, "sent_ids": self._pending_ids,
                                                       "parts": parts}, protocol=5))

    def load(self, path: str | os.PathLike) -> bool:
        """Restore a checkpoint written by ``save`` into every actor (and its pending selection when the actor
        count is the same); False if there is none."""
        if not Path(path).is_file():
            return False
        try:
            state = state_from_bytes(Path(path).read_bytes())
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"selector checkpoint {path} is unreadable ({e}); delete it to start afresh") from e
        self.set_state(state)
        pending_path = Path(f"{path}.pending")
        if pending_path.is_file():
            try:
                pending = pickle.loads(pending_path.read_bytes())
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{pending_path} is unreadable ({e}); delete it (last round's exploratory "
                                 "choices then go unpaid)") from e
            if len(pending["parts"]) == len(self.actors):
                ray.get([a.set_pending.remote(p) for a, p in zip(self.actors, pending["parts"], strict=True)])
                self._bounds, self._pending_ids = pending["bounds"], np.asarray(pending["sent_ids"])
        return True

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
