"""Training, inference and evaluation: the pure parts in-process, then Ray Train on the local cluster
(2 DDP workers with a crash retried by FailureConfig; a killed driver process resumed by re-running)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from l2l_ray.commands.evaluate import evaluate_run
from l2l_ray.config import load_config
from l2l_ray.data import load_dataset
from l2l_ray.data.images import load_mask_resized
from l2l_ray.metrics import IoUAccumulator
from l2l_ray.model import build_tokenizer, make_batch
from l2l_ray.records import PseudoLabelBatch, Sentence
from l2l_ray.train import evaluate, fit_segmenter, predict_samples
from l2l_ray.train.batches import epoch_plan, flip_batch, strong_augment
from l2l_ray.train.loop import EmaTeacher, lr_lambda
from l2l_ray.train.tables import flip_token_map, swap_left_right

TINY = ["data.image_size=64", "data.synth_images=24", "data.label_ratio=0.5", "train.batch_size=4",
        "train.steps_per_epoch=2", "train.num_threads=1", "train.log_every_s=0", "train.eval_batch_size=16"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    from l2l_ray.data.synth import write_synthetic

    root = str(tmp_path_factory.mktemp("synth"))
    write_synthetic(root, 24, 0, 64)
    return root


def _cfg(root: str, run_dir: Path, *extra: str):
    return load_config(None, [f"data.root={root}", f"run.dir={run_dir}", *TINY, *extra])


def test_epoch_plan_splits_ranks_evenly_and_mixes_pseudo_rows():
    a = epoch_plan(10, 0, 4, 2, 0, 0, seed=3)
    b = epoch_plan(10, 0, 4, 2, 1, 0, seed=3)
    assert len(a) == len(b) == 2  # ceil(10 / (4 * 2))
    first = np.concatenate([a[0][0], b[0][0]])
    assert len(set(first.tolist())) == 8  # the two ranks take disjoint rows of one permutation
    assert epoch_plan(10, 0, 4, 2, 0, 0, seed=3)[1][0].tolist() == a[1][0].tolist()  # seeded: replays on resume
    mixed = epoch_plan(3, 9, 4, 1, 0, 0, seed=0)
    assert len(mixed) == 5 and all(len(li) == 2 and len(pi) == 2 for li, pi in mixed)  # ceil(9 / 2)
    assert len(epoch_plan(3, 0, 4, 1, 0, 7, seed=0)) == 7  # train.steps_per_epoch fixes the length


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(total=100, warmup=10, power=1.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.5) and f(100) == 0.0


def test_ema_teacher_moves_towards_the_student():
    student = torch.nn.Linear(2, 1)
    ema = EmaTeacher(student)
    before = ema.model.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.update(student, 0.75)
    assert torch.allclose(ema.model.weight, before + 0.25)
    assert not ema.model.weight.requires_grad


def test_swap_left_right_and_strong_augment():
    assert swap_left_right("Left cup, rightmost one on the right") == "right cup, leftmost one on the left"
    assert swap_left_right("leftover bright") == "leftover bright"
    x = strong_augment(torch.full((2, 3, 8, 8), 128, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0


def test_flip_batch_mirrors_chosen_rows_and_swaps_left_and_right():
    tok = build_tokenizer(["the left ring", "rightmost star", "leftmost one on the right"], None, vocab_size=100,
                          max_len=8)
    tokens, mask = tok.encode(["the left ring", "the leftmost ring"])
    img = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    img[..., 0] = 255  # the left column is white
    target = torch.zeros(2, 4, 4)
    target[..., 0] = 1
    b = make_batch(img, tokens, mask, box=torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 2),
                   prior_valid=torch.tensor([True, True]), points=torch.tensor([[[0.25, 0.5]] * 4] * 2),
                   point_valid=torch.tensor([[True, False, False, False]] * 2), target=target)
    f = flip_batch(b, torch.tensor([True, False]), torch.from_numpy(flip_token_map(tok)))
    assert f["target"][0, :, 3].all() and not f["target"][0, :, 0].any()  # mirrored
    assert torch.equal(f["target"][1], b["target"][1]) and torch.equal(f["image"][1], b["image"][1])  # untouched
    assert f["image"][0, :, :, 3].min() > f["image"][0, :, :, 0].max()
    assert f["box"][0].tolist() == pytest.approx([0.7, 0.2, 0.9, 0.4]) and f["box"][1].tolist() == pytest.approx(
        [0.1, 0.2, 0.3, 0.4])
    assert f["points"][0, :, 0].tolist() == [0.75, 0.25, 0.25, 0.25]  # only the valid point moves
    assert torch.equal(f["tokens"][0], tok.encode(["the right ring"])[0][0])
    assert torch.equal(f["tokens"][1], tokens[1])


def test_in_process_stages_resume_use_pseudo_labels_and_evaluate(data_root, tmp_path):
    """train.num_workers=0 (no Ray): resume by stage, a pseudo-label round from init_state, parity of evaluate."""
    cfg = _cfg(data_root, tmp_path, "train.num_workers=0")
    data = load_dataset(cfg, tmp_path)
    first = fit_segmenter(cfg, tmp_path, "warmup", data, None, 1)
    longer = fit_segmenter(cfg, tmp_path, "warmup", data, None, 2)  # same stage, more epochs: continues
    assert [h["epoch"] for h in longer.history] == [0, 1] and longer.history[0] == first.history[0]
    assert "resumed from the checkpoint of epoch 1/2" in (tmp_path / "checkpoints/warmup/progress.log").read_text()
    assert fit_segmenter(cfg, tmp_path, "warmup", data, None, 2).history == longer.history  # done: no training
    pairs = [(u, s) for u in data.unlabeled[:3] for s in u.sentences]
    probs = predict_samples(cfg, longer.state_ref, "teacher", pairs, None)
    flipped = predict_samples(cfg, longer.state_ref, "teacher", pairs, None, flip=True)
    assert probs.shape == flipped.shape == (len(pairs), 64, 64) and probs.dtype == np.uint8
    # the teacher's batched two-view pass (plain + mirrored rows in one forward) = the two separate passes; a
    # batch of 2b rows may take another oneDNN kernel, so allow one quantisation step (p*255) of float noise
    both = predict_samples(cfg, longer.state_ref, "teacher", pairs, None, two_views=True)
    assert both.shape == (2, len(pairs), 64, 64) and both.dtype == np.uint8
    assert np.abs(both[0].astype(int) - probs).max() <= 1 and np.abs(both[1].astype(int) - flipped).max() <= 1
    assert (both[0] == probs).mean() > 0.99 and (both[1] == flipped).mean() > 0.99
    assert not np.array_equal(both[0], both[1])  # the views differ: the flip is real
    pseudo = PseudoLabelBatch.from_masks([s.sent_id for _, s in pairs], [u.ref_id for u, _ in pairs], probs > 127,
                                         np.full(probs.shape, 0.5, np.float32))
    rnd = fit_segmenter(cfg, tmp_path, "round_1", data, None, 1, init_state=longer.state_ref, pseudo=pseudo)
    assert rnd.history[0]["samples"] == 2 * 4  # 2 steps x (2 labeled + 2 pseudo rows)
    # evaluate() == metrics of predict_samples() on the same pairs, thresholded at 0.5 (p*255 > 127.5)
    ev = data.eval["val"]
    got = evaluate(cfg, rnd.state_ref, data, None, splits=["val"], which="teacher")["val"]
    p = predict_samples(cfg, rnd.state_ref, "teacher", [(e, Sentence(e.sent_id, e.sentence)) for e in ev], None)
    acc = IoUAccumulator()
    acc.add_batch(p > 127, np.stack([load_mask_resized(e.mask(), 64) for e in ev]))
    assert {k: got[k] for k in acc.summary()} == pytest.approx(acc.summary())
    assert min(got["mIoU_small"], got["mIoU_medium"], got["mIoU_large"]) >= 0 and got["area_tercile_1"] > 0
    assert set(evaluate(cfg, rnd.state_ref, data, None)) == set(data.eval) == {"val", "testA", "testB"}
    # `l2l eval --run DIR`: the last finished stage, merged into metrics.json; works on a moved run folder too
    cfg.save(tmp_path / "config.yaml")
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    shutil.copytree(tmp_path, moved)
    assert evaluate_run(str(moved), "val", which="teacher")["val"] == pytest.approx(got)
    assert json.loads((moved / "metrics.json").read_text())["splits"]["val"] == pytest.approx(got)


DRIVER = textwrap.dedent("""
    import sys, ray
    from l2l_ray.config import load_config
    from l2l_ray.data import load_dataset
    from l2l_ray.train import fit_segmenter
    from l2l_ray.train.learner import Learner
    ray.init(address=sys.argv[1], log_to_driver=False)
    cfg = load_config(None, sys.argv[3:])
    learner = Learner(cfg, sys.argv[2]) if cfg.train.keep_learner else None
    fit_segmenter(cfg, sys.argv[2], "warmup", load_dataset(cfg, sys.argv[2]), None, 4, learner=learner)
""")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _run_driver_until(address: str, run_dir: Path, overrides: list[str], snapshot: Path, needle: str) -> None:
    """Run DRIVER in a subprocess (joined to the test cluster) and SIGKILL it once Ray Train's checkpoint
    snapshot mentions ``needle`` (its Ray job's actors and workers die with it)."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, address, str(run_dir), *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline and needle not in _read(snapshot):
            time.sleep(0.2)
        assert needle in _read(snapshot), f"the driver never registered {needle} (see {snapshot.parent})"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def _settled(path: Path, quiet_s: float = 3.0, timeout_s: float = 60.0) -> str:
    """The file's text once it has stopped growing for ``quiet_s`` seconds."""
    deadline, text, since = time.time() + timeout_s, path.read_text(), time.time()
    while time.time() < deadline and time.time() - since < quiet_s:
        time.sleep(0.2)
        now = path.read_text()
        if now != text:
            text, since = now, time.time()
    return text


@pytest.mark.ray
@pytest.mark.parametrize("keep_learner", [True, False], ids=["long-lived learner", "trainer per stage"])
def test_ray_train_two_workers_retry_a_crash_and_a_killed_driver_resumes(ray_session, data_root, tmp_path,
                                                                         keep_learner):
    """2 DDP workers at 0.5 CPU each. Rank 0 raises once at the start of epoch 1 (FailureConfig retries the
    group from the epoch-0 checkpoint); the driver process is then killed mid-run, and re-running the same
    fit in a new process continues from the last registered checkpoint, not from epoch 0. Both on the driver's
    long-lived learner (Train restores the run "learner" by name) and on a TorchTrainer per stage."""
    from l2l_ray.train.learner import Learner

    overrides = [f"data.root={data_root}", f"run.dir={tmp_path}", *TINY, "train.num_workers=2",
                 "train.cpus_per_worker=0.5", "train.steps_per_epoch=4", "train.inject_failure_epoch=1",
                 "train.max_failures=1", f"train.keep_learner={str(keep_learner).lower()}"]
    stage = tmp_path / "checkpoints" / "warmup"
    train_run = tmp_path / "checkpoints" / ("learner" if keep_learner else "warmup")
    snapshot = train_run / "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it has
    _run_driver_until(ray_session.get_runtime_context().gcs_address, tmp_path, overrides, snapshot, "epoch_0001")
    first_log = _settled(stage / "progress.log")  # the dead driver's workers may still write a line
    assert (stage / ".injected_failure_epoch1").exists()  # rank 0 raised at the start of epoch 1 ...
    assert "resumed from the checkpoint of epoch 1/4" in first_log, first_log  # ... the retried group went on
    assert first_log.count("epoch 1/4 step") == 4, first_log  # epoch 0 was not redone
    assert not (stage / "done.json").exists(), first_log
    last = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
    assert 1 <= last < 3, (last, first_log)

    cfg = load_config(None, overrides)
    learner = Learner(cfg, tmp_path) if keep_learner else None
    try:
        res = fit_segmenter(cfg, tmp_path, "warmup", load_dataset(cfg, tmp_path), None, 4, learner=learner)
    finally:
        if learner is not None:
            learner.close()
    log = (stage / "progress.log").read_text()[len(first_log):]
    assert f"resumed from the checkpoint of epoch {last + 1}/4" in log, (last, first_log, log)
    assert "epoch 1/4 step" not in log and log.count("epoch 4/4 step") == 4, log
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert res.history[-1]["samples"] == 4 * 2 * 4  # steps x workers x batch
    state = ray_session.get(res.state_ref)
    assert set(state) == {"student", "teacher", "tokenizer"}
    assert Path(res.checkpoint_dir).name == ("final" if keep_learner else "epoch_0003")


@pytest.mark.ray
def test_train_that_cannot_fit_the_local_cluster_is_a_clear_error(ray_session, monkeypatch, capsys):
    """Ray Train workers + the run's actors over the cluster's CPUs would wait for ever: name the knobs instead."""
    from l2l_ray.train.fit import actor_cpus, check_train_resources

    cfg = load_config(None, ["method=l2l", "train.num_workers=2", "train.cpus_per_worker=1",
                             "semi.teacher_actors=1", "semi.teacher_cpus=0.5", "semi.selector_cpus=0.5"])
    assert actor_cpus(cfg) == 1.0
    assert actor_cpus(load_config(None, ["method=supervised", "semi.teacher_actors=2"])) == 0.0
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RuntimeError, match=r"3 CPUs, but the cluster has 2.*train.cpus_per_worker=0.5"):
        check_train_resources(cfg)
    check_train_resources(load_config(None, ["method=l2l", "train.num_workers=1", "train.cpus_per_worker=1"]))
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a joined cluster may autoscale: warn, do not fail
    check_train_resources(cfg)
    assert "Waiting for the cluster to grow" in capsys.readouterr().out
