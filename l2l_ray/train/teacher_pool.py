"""Teacher inference on a pool of Ray actors (``semi.teacher_actors`` > 0).

    pool = TeacherPool(cfg)                      # actors start once per run
    pool.set_weights(state_ref, "teacher")       # once per round: every actor gets the weights by reference
    probs = predict_samples(cfg, state_ref, "teacher", pairs, priors, pool=pool)   # uint8 (N, S, S)
    pool.shutdown()

Each actor builds the segmenter once and loads the round's weights from one ObjectRef (the driver never
copies them per call). A call puts the images once, sends each actor a contiguous slice of the rows and
concatenates the results in order. With ``train.use_gpu`` every actor holds one GPU. On the 2-core CPU
default the teacher runs in the driver process instead (``semi.teacher_actors=0``): ``bench/round_overhead.py``
measures both.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import ray
import torch

from l2l_ray.train.tables import RowTable


def slice_rows(rows: RowTable, a: int, b: int) -> RowTable:
    """Rows ``a:b`` of ``rows`` (every per-row array sliced; image indices still point at the same images)."""
    out = {}
    for f in dataclasses.fields(rows):
        v = getattr(rows, f.name)
        out[f.name] = v if f.name == "labels" or v is None else v[a:b]
    return RowTable(**out)


class TeacherActor:
    """Ray actor shell around ``predict_rows``: one segmenter per process, weights swapped per round."""

    def __init__(self, cfg: dict, threads: int = 0):
        from l2l_ray.config import Config

        if threads > 0:
            torch.set_num_threads(threads)
        self.cfg = Config.from_dict(cfg)
        self.model = None
        self.version = None

    def set_weights(self, state_box: list, which: str, version: int) -> int:
        """``state_box``: [ObjectRef of {"student", "teacher", "tokenizer"}] (boxed so Ray passes the reference)."""
        from l2l_ray.train.infer import load_model

        device = torch.device("cuda" if self.cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model(self.cfg, ray.get(state_box[0]), which, device)
        self.version = version
        return version

    def predict(self, images: np.ndarray, rows: RowTable, flip: bool, version: int,
                mirrored: RowTable | None = None) -> np.ndarray:
        from l2l_ray.train.infer import predict_rows

        if self.model is None or version != self.version:
            raise RuntimeError(f"TeacherActor holds weights version {self.version}, asked for {version}: "
                               "call TeacherPool.set_weights first")
        return predict_rows(self.cfg, self.model, images, rows, None, flip, mirrored)


class TeacherPool:
    """``semi.teacher_actors`` TeacherActors; ``predict`` splits rows across them."""

    def __init__(self, cfg, num_actors: int | None = None):
        n = int(num_actors or cfg.semi.teacher_actors)
        if n < 1:
            raise ValueError("TeacherPool needs at least one actor (semi.teacher_actors >= 1)")
        opts = {"num_cpus": cfg.semi.teacher_cpus, "num_gpus": 1 if cfg.train.use_gpu else 0}
        remote_cls = ray.remote(TeacherActor).options(**opts)
        self.actors = [remote_cls.remote(cfg.to_dict(), cfg.semi.teacher_threads) for _ in range(n)]
        self.key = None  # (hex of the state's ObjectRef, which) the actors hold
        self.version = 0

    def __len__(self) -> int:
        return len(self.actors)

    def set_weights(self, state_ref, which: str) -> None:
        """Load ``state_ref[which]`` in every actor (skipped when they already hold that ObjectRef's weights;
        a plain dict is always sent)."""
        is_ref = isinstance(state_ref, ray.ObjectRef)
        key = (state_ref.hex(), which) if is_ref else None
        if key is not None and key == self.key:
            return
        ref = state_ref if is_ref else ray.put(state_ref)
        self.version += 1
        ray.get([a.set_weights.remote([ref], which, self.version) for a in self.actors])
        self.key = key

    def predict(self, state_ref, which: str, images: np.ndarray, rows: RowTable, flip: bool = False,
                mirrored: RowTable | None = None) -> np.ndarray:
        """uint8 (N, S, S) probabilities * 255 for every row, in order ((2, N, S, S) with ``mirrored``)."""
        self.set_weights(state_ref, which)
        n = len(rows)
        bounds = np.linspace(0, n, min(len(self.actors), max(n, 1)) + 1).astype(int)
        images_ref = ray.put(images)
        refs = [a.predict.remote(images_ref, slice_rows(rows, lo, hi), flip, self.version,
                                 None if mirrored is None else slice_rows(mirrored, lo, hi))
                for a, lo, hi in zip(self.actors, bounds[:-1], bounds[1:], strict=False)]
        parts = ray.get(refs)
        s = images.shape[-1]
        if not parts:
            return np.zeros((0, s, s) if mirrored is None else (2, 0, s, s), np.uint8)
        return np.concatenate(parts, axis=0 if mirrored is None else 1)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
