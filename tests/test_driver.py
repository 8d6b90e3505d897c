"""The driver (``l2l_ray.driver.run`` / ``run_round``) end to end on a tiny synthetic set on the local Ray cluster.

One L2L round with the student on Ray Train and the selector on SelectorActors, then a rerun of the same
run folder (resume: nothing retrained, same metrics); one round of each baseline (in-process training, the
cheap setting); and the proof that pseudo-labels never read a hidden mask: the same two rounds on a copy of
the dataset whose unlabeled refs' masks are replaced by garbage give bit-identical pseudo-labels, selector
and student, and only the clearly named diagnostic sees the difference.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from l2l_ray import driver
from l2l_ray.config import load_config
from l2l_ray.data import ensure_data, load_dataset
from l2l_ray.data.refer import ReferDataset
from l2l_ray.errors import DataError, UserError
from l2l_ray.priors.base import PriorRequest
from l2l_ray.records import LabeledSample, UnlabeledSample
from l2l_ray.tb import read_scalars

# 40 images at 64 px, 25% of the training images labeled; 2 steps per stage; 16 unlabeled pairs per round.
TINY = ["data.image_size=64", "data.synth_images=40", "data.synth_seed=0", "data.label_ratio=0.25",
        "train.batch_size=4", "train.steps_per_epoch=2", "train.num_threads=1", "train.log_every_s=0",
        "train.eval_batch_size=32", "train.cpus_per_worker=0.5", "train.epochs=1", "semi.rounds=1",
        "semi.epochs_per_round=1", "semi.unlabeled_per_round=16", "semi.selector_practice_steps=3",
        "semi.gallery_size=2", "semi.selector_minibatch=16"]
SPLIT_KEYS = {"mIoU", "oIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9", "n", "mIoU_small",
              "mIoU_medium", "mIoU_large", "area_tercile_1", "area_tercile_2"}
TINY_DIR = "l2l_tiny_synthref"  # under pytest's base temp; test_e2e.py reuses it when it exists


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, ray_session) -> str:
    """ONE tiny synthetic set with its priors computed once (Ray Data, lexical backend) for every run here."""
    from l2l_ray.priors.pipeline import run_priors

    root = tmp_path_factory.getbasetemp() / TINY_DIR
    cfg = load_config(None, [f"data.root={root}", *TINY])
    ensure_data(cfg)
    summary = run_priors(cfg)
    assert summary, "run_priors returned no summary"
    return str(root)


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """In-process training (train.num_workers=0) sets torch's thread count; give the rest of the session its own."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cfg(root: str, run_dir: Path, *extra: str):
    return load_config(None, [f"data.root={root}", f"run.dir={run_dir}", *TINY, *extra])


def _stage_files(run_dir: Path) -> dict[str, int]:
    """mtime (ns) of every file a finished stage or round leaves (latest.json is rewritten on purpose)."""
    files = [p for p in (run_dir / "checkpoints").rglob("*") if p.is_file() and p.name != "latest.json"]
    files += [run_dir / "selector.pt", run_dir / "rounds.json"]
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in files}


def _check_split_metrics(metrics: dict, eval_pairs: dict) -> None:
    assert set(metrics["splits"]) == {"val", "testA", "testB"}
    for name, m in metrics["splits"].items():
        assert set(m) == SPLIT_KEYS, name
        assert m["n"] == eval_pairs[name] > 0
        assert all(0.0 <= m[k] <= 1.0 for k in SPLIT_KEYS - {"n"})
        assert m["prec@0.5"] >= m["prec@0.7"] >= m["prec@0.9"]


@pytest.mark.ray
def test_l2l_round_on_ray_then_rerun_resumes_without_retraining(tiny_root, tmp_path):
    run_dir = tmp_path / "l2l"
    cfg = _cfg(tiny_root, run_dir, "method=l2l", "train.num_workers=1",  # student on Ray Train,
               "semi.teacher_actors=1", "semi.teacher_cpus=0.5")  # teacher on an actor
    seen: list[int] = []
    m = driver.run(cfg, on_round=lambda r, x: seen.append(r))

    assert seen == [0, 1]  # warm-up val, then round 1
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert m["method"] == "l2l" and m["label_ratio"] == 0.25 and m["seed"] == 0
    _check_split_metrics(m, m["data"]["eval_pairs"])
    assert set(m["warmup_val"]) == SPLIT_KEYS
    assert {"setup_s", "warmup_s", "final_eval_s", "total_s"} <= set(m["timing"])
    assert m["practice_folds"] and sum(m["practice_folds"]) > 0 and m["priors"] > 0 and m["guidance"] is True

    (r1,) = m["rounds"]
    assert r1["round"] == 1 and r1["method"] == "l2l" and r1["explore"] is False  # the last round is greedy
    assert r1["n_pairs"] == 16 and 0 <= r1["n_kept"] <= 16
    assert 0.0 <= r1["trusted_pixel_share"] <= 1.0 and r1["trusted_pixel_share"] == r1["trusted_share"]
    assert 0.0 <= r1["reward"]["labeled_iou"] <= 1.0  # practice on held-out labeled pairs
    assert r1["pseudo_iou_diag"] is None or 0.0 <= r1["pseudo_iou_diag"] <= 1.0
    assert set(r1["val"]) == SPLIT_KEYS and r1["val"]["n"] == m["splits"]["val"]["n"]
    assert {"teacher_and_candidates_s", "selection_s", "train_s", "eval_s"} <= set(r1["timing"])
    assert json.loads((run_dir / "rounds.json").read_text())["rounds"] == m["rounds"]
    for f in ("selector.pt", "config.yaml", "gallery.npz", "label_split.json", "tokenizer.json",
              "checkpoints/warmup/done.json", "checkpoints/round_1/done.json"):
        assert (run_dir / f).is_file(), f
    tb = read_scalars(run_dir / "tb")  # nested round dicts flattened to slash tags; the warm-up is step 0
    assert [step for step, _ in tb["val/mIoU"]] == [0, 1] and tb["val/mIoU"][0][1] == pytest.approx(
        m["warmup_val"]["mIoU"])
    assert {"reward/labeled_iou", "timing/train_s", "trusted_pixel_share", "final/testB/oIoU"} <= set(tb)

    before = _stage_files(run_dir)
    m2 = driver.run(cfg)  # same command, same run folder
    assert _stage_files(run_dir) == before  # no stage retrained, no round redone, selector untouched
    assert m2["splits"] == m["splits"] and m2["rounds"] == m["rounds"] and m2["warmup_val"] == m["warmup_val"]
    assert m2["timing"]["warmup_s"] < m["timing"]["warmup_s"]


@pytest.mark.ray
@pytest.mark.parametrize("method", ["mean_teacher", "semires", "supervised"])
def test_baselines_run_in_the_same_loop(tiny_root, tmp_path, method):
    m = driver.run(_cfg(tiny_root, tmp_path, f"method={method}", "train.num_workers=0"))
    assert m["method"] == method
    _check_split_metrics(m, m["data"]["eval_pairs"])
    assert not (tmp_path / "selector.pt").exists()
    assert m["practice_folds"] == []  # only L2L (with RL) practises a selector on labeled folds
    assert m["guidance"] is True
    stage = "supervised" if method == "supervised" else "round_1"  # the segmenter trained with its prompt encoder
    done = json.loads((tmp_path / "checkpoints" / stage / "done.json").read_text())
    student = torch.load(tmp_path / done["checkpoint"] / "state.pt", weights_only=False)["student"]
    assert any(k.startswith("prompt.") for k in student)
    assert m["priors"] is not None  # model.guidance (on by default): every method's segmenter sees the prior
    gallery = np.load(tmp_path / "gallery.npz")
    assert gallery["pseudo"].shape == (2, 64, 64)
    if method == "supervised":
        assert m["rounds"] == [] and m["warmup_val"] is None
        assert (gallery["pseudo"] == 128).all()  # no pseudo-labels at all: every pixel "ignored"
        with pytest.raises(UserError, match="data.label_ratio"):  # same run folder, another label split
            driver.run(_cfg(tiny_root, tmp_path, f"method={method}", "train.num_workers=0", "data.label_ratio=0.5"))
        kept = (tmp_path / "metrics.json").read_bytes()
        with pytest.raises(UserError, match='method: "supervised" -> "semires"'):  # or another method
            driver.run(_cfg(tiny_root, tmp_path, "method=semires", "train.num_workers=0"))
        assert (tmp_path / "metrics.json").read_bytes() == kept  # nothing written over the finished run
        assert load_config(tmp_path / "config.yaml").data.label_ratio == 0.25  # the checkpoints' config is kept
        return
    (r1,) = m["rounds"]
    assert r1["method"] == method and r1["n_pairs"] == 16
    assert 0.0 <= r1["trusted_share"] <= 1.0 and "pseudo_iou_diag" in r1
    assert (tmp_path / "checkpoints/round_1/done.json").is_file()


@pytest.mark.ray
def test_restart_between_exploring_rounds_continues_with_the_next_round(tiny_root, tmp_path):
    """A run stopped right after round 1 (an exploratory selection whose rewards round 2 pays) continues with
    round 2 on rerun; round 1 and its checkpoint are kept as they were."""
    cfg = _cfg(tiny_root, tmp_path, "method=l2l", "train.num_workers=0", "semi.rounds=2")

    def stop_after_round_1(r, m):
        if r == 1:
            raise KeyboardInterrupt  # as if the process were stopped once round 1 is on disk

    with pytest.raises(KeyboardInterrupt):
        driver.run(cfg, on_round=stop_after_round_1)
    saved = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1] and saved["rounds"][0]["explore"] is True
    assert saved["carry"]["pending_ids"]  # the exploratory choices still to be paid
    before = {k: v for k, v in _stage_files(tmp_path).items() if "round_1" in k or "warmup" in k}

    m = driver.run(cfg)
    assert [r["round"] for r in m["rounds"]] == [1, 2] and m["rounds"][0] == saved["rounds"][0]
    assert {k: v for k, v in _stage_files(tmp_path).items() if k in before} == before
    r2 = m["rounds"][1]
    # round 1's exploratory actions were saved beside selector.pt, so the restarted actors still pay them
    assert "reward/total" in r2 and "selector/update_skipped_no_pending" not in r2
    assert r2["selector/update_pairs"] > 0
    assert not (tmp_path / "selector.pt.pending").exists()  # round 2 was greedy: nothing left to pay
    assert (tmp_path / "checkpoints/round_2/done.json").is_file()


def _calibrate_batchnorm(model, tok, size: int) -> None:
    """Random init + eval-mode BatchNorm (running stats 0/1) shrinks activations layer by layer until the output
    is a constant; one train-mode pass over random images gives BN real statistics, so outputs vary by input."""
    from l2l_ray.model import make_batch

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the statistics
    tokens, mask = tok.encode(["the left red circle", "big blue box", "star on the right", "the ring"])
    images = torch.randint(0, 255, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        model(make_batch(images, tokens, mask))
    model.eval()


@pytest.mark.ray
def test_teacher_pool_matches_in_process_inference(tiny_root, tmp_path):
    """Teacher inference on two Ray actors (weights sent once as an object ref) = the in-process result."""
    import ray

    from l2l_ray.model import build_segmenter
    from l2l_ray.train import predict_samples, tokenizer_for
    from l2l_ray.train.teacher_pool import TeacherPool

    cfg = _cfg(tiny_root, tmp_path, "semi.teacher_actors=2", "semi.teacher_cpus=0.5")
    data = load_dataset(cfg)
    tok = tokenizer_for(cfg, tmp_path, data)
    torch.manual_seed(0)
    model = build_segmenter(cfg, tok)
    _calibrate_batchnorm(model, tok, 64)
    weights = model.state_dict()
    state = ray.put({"student": weights, "teacher": weights, "tokenizer": tok.to_json()})
    pairs = [(smp, s) for smp in data.unlabeled for s in smp.sentences][:11]  # 11 rows: uneven slices
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors' thread count: same float path, same bytes
    try:
        want = predict_samples(cfg, state, "teacher", pairs, None)
        want_flip = predict_samples(cfg, state, "teacher", pairs, None, flip=True)
    finally:
        torch.set_num_threads(threads)
    pool = TeacherPool(cfg)
    try:
        assert len(pool) == 2
        got = predict_samples(cfg, state, "teacher", pairs, None, pool=pool)
        version = pool.version
        got_flip = predict_samples(cfg, state, "teacher", pairs, None, flip=True, pool=pool)
        assert pool.version == version == 1  # the same weights were not sent twice
        assert got.shape == (11, 64, 64) and got.dtype == np.uint8
        assert np.array_equal(got, want) and np.array_equal(got_flip, want_flip)
        assert not np.array_equal(got, got_flip)
        both = predict_samples(cfg, state, "teacher", pairs, None, pool=pool, two_views=True)
        assert both.shape == (2, 11, 64, 64)
        assert np.abs(both[0].astype(int) - want).max() <= 1 and np.abs(both[1].astype(int) - want_flip).max() <= 1
    finally:
        pool.shutdown()


@pytest.mark.ray
def test_prior_only_row_scores_the_proposals(tiny_root, tmp_path):
    """The results table's `prior_only` row: the cached priors' proposals scored like the segmenter."""
    from l2l_ray.data.images import load_mask_resized
    from l2l_ray.experiment import evaluate_prior
    from l2l_ray.priors.pipeline import load_priors

    cfg = _cfg(tiny_root, tmp_path)
    m = evaluate_prior(cfg)
    data = load_dataset(cfg)
    _check_split_metrics(m, {k: len(v) for k, v in data.eval.items()})
    priors = load_priors(cfg, allow_missing=True)
    ious = []
    for e in data.eval["testB"]:
        p = priors.get(e.sent_id)
        pred = p.soft_mask(64) > 0.5 if p is not None else np.zeros((64, 64), bool)
        gt = load_mask_resized(e.mask(), 64)
        union = (pred | gt).sum()
        ious.append((pred & gt).sum() / union if union else 1.0)
    assert m["splits"]["testB"]["mIoU"] == pytest.approx(float(np.mean(ious)))
    assert m["splits"]["val"]["mIoU"] > 0.2  # the lexical prior finds most targets on the synthetic set


# --- pseudo-labels never read a hidden mask ------------------------------------------------------------


def test_unlabeled_records_carry_no_mask():
    names = {f.name for f in dataclasses.fields(UnlabeledSample)}
    assert not names & {"mask", "mask_rle", "segmentation", "truth"}
    assert not hasattr(UnlabeledSample, "mask")
    assert hasattr(LabeledSample, "mask")  # the type, not a flag, tells the two apart
    assert not {f.name for f in dataclasses.fields(PriorRequest)} & {"mask", "mask_rle", "segmentation"}


def _hide_truth(src_root: str, dst_root: Path, unlabeled_ref_ids: set[int]) -> int:
    """Copy the REFER files with every unlabeled ref's mask replaced by an 8x8 corner square (images linked);
    returns how many annotations were changed."""
    src, dst = Path(src_root) / "synthref", dst_root / "synthref"
    dst.mkdir(parents=True)
    (dst / "images").symlink_to(src / "images")
    (dst / "refs(unc).p").write_bytes((src / "refs(unc).p").read_bytes())
    refs = pickle.loads((src / "refs(unc).p").read_bytes())
    hidden = {r["ann_id"] for r in refs if r["ref_id"] in unlabeled_ref_ids}
    assert not hidden & {r["ann_id"] for r in refs if r["ref_id"] not in unlabeled_ref_ids}  # no shared ann
    inst = json.loads((src / "instances.json").read_text())
    for ann in inst["annotations"]:
        if ann["id"] in hidden:
            ann["segmentation"] = [[0.0, 0.0, 8.0, 0.0, 8.0, 8.0, 0.0, 8.0]]
            ann["bbox"], ann["area"] = [0.0, 0.0, 8.0, 8.0], 64.0
    (dst / "instances.json").write_text(json.dumps(inst))
    return len(hidden)


class _Spy:
    """Records what crosses the driver's boundaries while calling the real functions."""

    def __init__(self, monkeypatch, unlabeled_ref_ids: set[int]):
        import l2l_ray.train as train

        self.unlabeled = unlabeled_ref_ids
        self.pseudo: dict[str, tuple] = {}  # stage -> (sent_ids, label bits, weights)
        self.final_student: dict | None = None
        self.ctx_pairs: list = []
        self.truth_reads: list[tuple[int, bool]] = []  # (ref_id, inside the diagnostic)
        real_fit, real_round, real_mask = train.fit_segmenter, driver.run_round, ReferDataset.mask_rle

        def fit(cfg, run_dir, stage, data, priors, epochs, init_state=None, pseudo=None, learner=None):
            if pseudo is not None:
                pl = train.fit.resolve(pseudo)
                self.pseudo[stage] = (pl.sent_ids.copy(), pl.labels.copy(), pl.weights.copy())
            res = real_fit(cfg, run_dir, stage, data, priors, epochs, init_state=init_state, pseudo=pseudo,
                           learner=learner)
            self.final_student = train.fit.resolve(res.state_ref)["student"]
            return res

        def run_round(r, ctx, state):
            self.ctx_pairs += list(ctx.pairs)
            return real_round(r, ctx, state)

        def mask_rle(ds, ref_id):
            if ref_id in self.unlabeled:
                frame, inside = sys._getframe(1), False
                while frame is not None and not inside:
                    inside, frame = frame.f_code.co_name == "_diagnostic_pseudo_iou", frame.f_back
                self.truth_reads.append((ref_id, inside))
            return real_mask(ds, ref_id)

        monkeypatch.setattr(train, "fit_segmenter", fit)
        monkeypatch.setattr(driver, "run_round", run_round)
        monkeypatch.setattr(ReferDataset, "mask_rle", mask_rle)


@pytest.mark.ray
def test_pseudo_labels_never_read_a_hidden_mask(tiny_root, tmp_path, monkeypatch):
    """Two L2L rounds (the first explores, the second pays its rewards) on the real set and on a copy whose
    unlabeled masks are garbage: everything but the diagnostic is bit-identical, so no truth reaches
    selection, rewards or training; the diagnostic is the only reader of unlabeled masks."""
    base = _cfg(tiny_root, tmp_path / "real", "method=l2l", "train.num_workers=0", "semi.rounds=2")
    unlabeled = {s.ref_id for s in load_dataset(base).unlabeled}
    hidden_root = tmp_path / "hidden_data"
    assert _hide_truth(tiny_root, hidden_root, unlabeled) == len(unlabeled) > 0

    runs = {}
    for name, root in (("real", tiny_root), ("hidden", str(hidden_root))):
        if name == "hidden":  # same tokenizer (made from the training sentences): WordPiece training in the
            #                   `tokenizers` library numbers its "##x" tokens differently from run to run
            (tmp_path / name).mkdir()
            shutil.copy(tmp_path / "real" / "tokenizer.json", tmp_path / name / "tokenizer.json")
        spy = _Spy(monkeypatch, unlabeled)
        cfg = _cfg(root, tmp_path / name, "method=l2l", "train.num_workers=0", "semi.rounds=2",
                   f"priors.cache_dir={base.priors_cache_dir}",  # priors are made from image + text only
                   "priors.corruption=0.5")  # and corrupted from ids only: the hidden masks still cannot matter
        runs[name] = (driver.run(cfg), spy, torch.load(tmp_path / name / "selector.pt", weights_only=True))
        monkeypatch.undo()  # the next spy wraps the real functions again
    (m, spy, sel), (mh, spyh, selh) = runs["real"], runs["hidden"]

    # the unlabeled path holds UnlabeledSample records only (no mask field to read)
    assert spy.ctx_pairs and all(type(smp) is UnlabeledSample for smp, _ in spy.ctx_pairs)
    # pseudo-labels for unlabeled sentences only, and identical whatever the hidden masks are
    assert set(spy.pseudo) == set(spyh.pseudo) == {"round_1", "round_2"}
    unlabeled_sents = {s.sent_id for smp, _ in spy.ctx_pairs for s in smp.sentences}
    for stage, (ids, bits, weights) in spy.pseudo.items():
        ids_h, bits_h, weights_h = spyh.pseudo[stage]
        assert len(ids) > 0 and set(ids.tolist()) <= unlabeled_sents
        assert np.array_equal(ids, ids_h) and np.array_equal(bits, bits_h) and np.array_equal(weights, weights_h)
    # selector (policy after the reward-paid update) and student identical
    assert sel["module"].keys() == selh["module"].keys()
    assert all(torch.equal(sel["module"][k], selh["module"][k]) for k in sel["module"])
    assert all(torch.equal(spy.final_student[k], spyh.final_student[k]) for k in spy.final_student)
    # every logged number identical except the diagnostic and wall times
    strip = lambda r: {k: v for k, v in r.items() if k not in ("pseudo_iou_diag", "timing")}  # noqa: E731
    assert [strip(r) for r in m["rounds"]] == [strip(r) for r in mh["rounds"]]
    assert m["splits"] == mh["splits"]
    # round 2 paid round 1's exploratory choices: every reward term is logged
    assert {"prior", "consistency", "credit", "credit_std", "total", "labeled_iou"} <= set(m["rounds"][1]["reward"])
    assert m["rounds"][1]["reward"]["credit_std"] > 0  # the credit differs from pair to pair
    assert m["prior_corruption"]["corrupted_swapped"] + m["prior_corruption"]["corrupted_dropped"] > 0
    assert m["rounds"][0]["explore"] is True and m["rounds"][1]["selector/update_pairs"] > 0
    # ... while the diagnostic does see the hidden truth, and is the only reader of it
    assert [r["pseudo_iou_diag"] for r in m["rounds"]] != [r["pseudo_iou_diag"] for r in mh["rounds"]]
    for s in (spy, spyh):
        assert s.truth_reads and all(inside for _, inside in s.truth_reads)


def test_corrupt_image_is_refused_before_ray_and_training(tiny_root, tmp_path):
    """A truncated image is named, with what to do, before any training (it used to surface after the warm-up)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns("priors"))
    bad = sorted((root / "synthref" / "images").glob("*"))[3]
    bad.write_bytes(bad.read_bytes()[:40])  # a cut-short file
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=bad.name) as e:
        driver.run(_cfg(str(root), run_dir, "method=supervised", "train.num_workers=0"))
    assert "intact copy" in str(e.value)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()
