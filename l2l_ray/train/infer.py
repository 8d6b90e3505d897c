"""Batched inference: teacher/student predictions for (sample, sentence) pairs, and evaluation on every split.

    probs = predict_samples(cfg, res.state_ref, "teacher", [(sample, sentence), ...], priors)  # uint8 (N,S,S)
    splits = evaluate(cfg, res.state_ref, bundle, priors)      # {"val": {"mIoU", "oIoU", "prec@0.5", ...}, ...}

On CPU (``train.use_gpu=false``) inference runs in the calling process; with ``train.use_gpu=true`` and Ray
running it runs as one Ray task holding a GPU (bf16 autocast with ``train.amp``). The state is an ObjectRef
(or a dict) of {"student", "teacher", "tokenizer"} as returned by ``fit_segmenter``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from l2l_ray.masks import pack_bits, quantize, unpack_bits
from l2l_ray.metrics import size_terciles, summarize
from l2l_ray.model import build_segmenter
from l2l_ray.model.text import TextTokenizer
from l2l_ray.train.batches import concat_batches, flip_batch, rows_batch
from l2l_ray.train.fit import resolve
from l2l_ray.train.tables import ImageIndex, RowTable, make_rows

WHICH = ("student", "teacher")


def load_model(cfg, state: dict, which: str, device: torch.device):
    """Build the segmenter from ``cfg`` and load ``state[which]``; eval mode on ``device``."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}: choose 'student' or 'teacher'")
    model = build_segmenter(cfg, TextTokenizer.from_json(state["tokenizer"]))
    model.load_state_dict(state[which])
    return model.to(device).eval().fuse_batchnorm()  # BatchNorm folded into its conv: inference only


_MODEL_CACHE: dict = {}  # (state ObjectRef hex, which, device) -> model: built once per inference stage


def cached_model(cfg, state, which: str, device: torch.device):
    """``load_model`` once per (weights ObjectRef, which): the teacher's two views, the held-out pairs and every
    evaluation split of a round reuse one model. A plain dict state is loaded every call (no stable key)."""
    from l2l_ray.train.fit import _is_ref

    if not _is_ref(state):
        return load_model(cfg, state, which, device)
    key = (state.hex(), which, str(device), repr(cfg.model), cfg.data.image_size)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model at a time: the previous round's weights are not needed again
        _MODEL_CACHE[key] = load_model(cfg, resolve(state), which, device)
    return _MODEL_CACHE[key]


def infer_rows(cfg, state, which: str, images: np.ndarray, rows: RowTable, truth: np.ndarray | None = None,
               flip: bool = False, mirrored: RowTable | None = None):
    """Predict every row. Without ``truth``: uint8 (N,S,S) probabilities*255. With ``truth`` (packed bits
    (N, ceil(S*S/8))): (I, U) int64 arrays (N,) of the thresholded (p > 0.5) masks. ``flip``: images, priors
    and boxes are mirrored left-right (rows must hold the swapped sentences) and outputs mirrored back.
    ``mirrored``: the same rows with the swapped sentences: both views run as one batch, uint8 (2,N,S,S)."""
    from l2l_ray.config import Config

    cfg = Config.from_dict(cfg) if isinstance(cfg, dict) else cfg
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    model = cached_model(cfg, state, which, device)
    return predict_rows(cfg, model, images, rows, truth, flip, mirrored)


def predict_rows(cfg, model, images: np.ndarray, rows: RowTable, truth: np.ndarray | None = None,
                 flip: bool = False, mirrored: RowTable | None = None):
    """``infer_rows`` with an already loaded ``model`` (eval mode, on its device).

    With ``mirrored`` each step stacks b plain rows and the same b rows mirrored (image, prior, box, points
    flipped; sentences from ``mirrored``) into one forward pass of 2b rows; returns uint8 (2, N, S, S):
    [plain, mirrored view flipped back]. Eval-mode BatchNorm makes every row independent of the others.
    """
    device = next(model.parameters()).device
    s, n, bs = images.shape[-1], len(rows), max(1, cfg.train.eval_batch_size)
    views = 2 if mirrored is not None else 1
    probs = np.zeros((0 if truth is not None else views * n, s, s), np.uint8)
    inters, unions = np.zeros(n, np.int64), np.zeros(n, np.int64)
    amp = cfg.train.amp and device.type == "cuda"
    for i in range(0, n, bs):
        idx = np.arange(i, min(n, i + bs))
        batch = rows_batch(images, rows, idx, device)
        if flip:  # the rows already hold the mirrored sentences
            batch = flip_batch(batch, torch.ones(len(idx), dtype=torch.bool, device=device))
        if mirrored is not None:
            second = flip_batch(rows_batch(images, mirrored, idx, device),
                                torch.ones(len(idx), dtype=torch.bool, device=device))
            batch = concat_batches(batch, second)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            p = model.predict(batch)  # (views * b, S, S)
        if flip:
            p = p.flip(-1)
        if mirrored is not None:
            p = torch.cat([p[: len(idx)], p[len(idx):].flip(-1)])
        if truth is None:
            q = quantize(p.float().cpu().numpy())
            for v in range(views):
                probs[v * n + idx] = q[v * len(idx):(v + 1) * len(idx)]
        else:
            pred = (p > 0.5).cpu().numpy()
            gt = unpack_bits(truth[idx], (s, s))
            inters[idx] = (pred & gt).reshape(len(idx), -1).sum(1)
            unions[idx] = (pred | gt).reshape(len(idx), -1).sum(1)
    if truth is not None:
        return inters, unions
    return probs.reshape(2, n, s, s) if views == 2 else probs


def _run(cfg, state_ref, which: str, images: np.ndarray, rows: RowTable, truth=None, flip: bool = False,
         mirrored: RowTable | None = None):
    """In-process on CPU; a GPU Ray task when ``train.use_gpu`` and Ray is running."""
    import ray

    if cfg.train.use_gpu and ray.is_initialized():
        task = ray.remote(num_gpus=1, num_cpus=1)(infer_rows)
        return ray.get(task.remote(cfg.to_dict(), state_ref, which, ray.put(images), rows, truth, flip, mirrored))
    with inference_threads(cfg):
        return infer_rows(cfg, state_ref, which, images, rows, truth, flip, mirrored)


@contextlib.contextmanager
def inference_threads(cfg) -> Iterator[None]:
    """Torch threads for inference in the driver: the training workers' threads, which idle meanwhile (more would
    spin); the caller's count is restored after."""
    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads * max(1, cfg.train.num_workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tokenizer(state_ref) -> TextTokenizer:
    return TextTokenizer.from_json(resolve(state_ref)["tokenizer"])


def pair_rows(cfg, tok: TextTokenizer, samples: Sequence[tuple], priors: dict | None, index: ImageIndex,
              flip: bool = False) -> RowTable:
    """RowTable of (sample, Sentence) pairs with the run's tokenizer; images registered in ``index``."""
    triples = [(smp, sent.sent_id, sent.text) for smp, sent in samples]
    s = cfg.data.image_size
    return make_rows(triples, tok, priors, s, min(cfg.priors.proposal_size, s), index, flip=flip)


def predict_samples(cfg, state_ref, which: str, samples: Sequence[tuple], priors: dict | None,
                    flip: bool = False, pool=None, two_views: bool = False) -> np.ndarray:
    """Probabilities for (sample, Sentence) pairs -> uint8 (N, S, S) (p * 255), row i = pair i.

    ``sample`` is any record with ``image_path`` and ``ref_id`` (UnlabeledSample, LabeledSample); the prior of
    row i is ``priors[sentence.sent_id]`` (uninformative if missing). ``flip=True`` predicts on the mirrored
    image with "left"/"right" swapped in the sentence and mirrors the result back (a consistency view).
    For very large sets call it in chunks (the result is N*S*S bytes). ``pool``: a ``TeacherPool`` of Ray
    actors to spread the rows over (``semi.teacher_actors``); None runs as ``_run`` does. ``two_views=True``:
    the plain and the mirrored view in one batched pass, uint8 (2, N, S, S) = [plain, mirrored back].
    """
    s, tok = cfg.data.image_size, _tokenizer(state_ref)
    index = ImageIndex()
    rows = pair_rows(cfg, tok, samples, priors, index, flip=flip)
    mirrored = pair_rows(cfg, tok, samples, priors, index, flip=True) if two_views else None
    if not len(rows):
        return np.zeros((2, 0, s, s) if two_views else (0, s, s), np.uint8)
    if pool is not None:
        return pool.predict(state_ref, which, index.load(s), rows, flip, mirrored)
    return _run(cfg, state_ref, which, index.load(s), rows, None, flip, mirrored)


def evaluate(cfg, state_ref, data, priors: dict | None, splits: Sequence[str] | None = None,
             which: str = "student") -> dict[str, dict]:
    """mIoU, oIoU, prec@0.5..0.9, n and mIoU per referent-size tercile (``metrics.size_terciles``) per split, at
    model resolution (S x S; truth resized nearest, as LAVT)."""
    from l2l_ray.data.images import load_mask_resized

    state = resolve(state_ref)
    tok = _tokenizer(state)
    s = cfg.data.image_size
    names = list(data.eval) if splits is None else list(splits)
    unknown = [n for n in names if n not in data.eval]
    if unknown:
        raise ValueError(f"unknown eval split(s) {unknown}; this dataset has {sorted(data.eval)}")
    out = {}
    for name in names:
        samples = data.eval[name]
        index = ImageIndex()
        rows = make_rows([(e, e.sent_id, e.sentence) for e in samples], tok, priors, s,
                         min(cfg.priors.proposal_size, s), index)
        if not len(rows):
            out[name] = summarize(np.zeros(0, np.int64), np.zeros(0, np.int64))
            continue
        masks = np.stack([load_mask_resized(e.mask(), s) for e in samples])  # (N, S, S) bool
        inters, unions = _run(cfg, state_ref, which, index.load(s), rows, pack_bits(masks))
        out[name] = {**summarize(inters, unions), **size_terciles(inters, unions, masks.mean((1, 2)))}
    return out
