"""Fault tolerance on the local cluster: every test kills a real process and then checks that nothing was lost.

(a) A Ray Train worker process is SIGKILLed mid-epoch: FailureConfig restarts the worker group, which
    resumes from the last registered epoch checkpoint (earlier epochs are not redone), and the stage completes.
(b) A prior actor kills its own process (os._exit) mid-pipeline: Ray Data restarts the actor and retries
    the batch; every prior is in the cache exactly once.
(c) ``python -m l2l_ray train`` (its own local Ray cluster) is SIGKILLed while round 2 trains; re-running
    the same command resumes at round 2 from the saved selector (selector.pt) and teacher (round 1's
    checkpoint) and round 2's last epoch checkpoint; round 1 is not rerun; metrics.json is written.

Only processes these tests started are killed: (a) a descendant of this pytest process, (b) the actor
itself, (c) the subprocess's own process group plus stragglers whose command line names its temp dir.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from l2l_ray.config import Config, PriorsConfig, load_config
from l2l_ray.priors.base import PriorRequest
from l2l_ray.records import Prior

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=64", "data.synth_images=24", "data.label_ratio=0.5", "train.batch_size=4",
        "train.num_threads=1", "train.log_every_s=0", "train.eval_batch_size=32", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    from l2l_ray.data.synth import write_synthetic

    root = str(tmp_path_factory.mktemp("ftdata"))
    write_synthetic(root, 24, 0, 64)
    return root


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        kids = _children(todo.pop())
        seen += kids
        todo += kids
    return seen


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- (a) a Ray Train worker killed mid-epoch -------------------------------------------------------------

EPOCHS, STEPS = 4, 12


def _registered_epoch(snapshot: Path, stage: str = "") -> int | None:
    """The last epoch (0-based) whose checkpoint Ray Train's controller has registered, or None. ``stage``: on
    the long-lived learner's run only a checkpoint of that stage (dir name ``<stage>-epoch_NNNN``) counts."""
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(latest, dict) or (stage and not str(latest.get("checkpoint_dir_name", "")).startswith(
            f"{stage}-")):
        return None
    return latest.get("metrics", {}).get("epoch")


def _kill_train_worker_mid_epoch(stage: Path, train_run: Path, out: dict, timeout: float = 150.0,
                                 prefix: str = "") -> None:
    """SIGKILL this test's Ray Train worker (a descendant of pytest) inside an epoch that comes after the last
    checkpoint Ray Train has registered. (The controller registers a reported checkpoint when it next polls the
    workers, every 2 s: a worker lost before that restarts from the previous one.)"""
    log, snapshot = stage / "progress.log", train_run / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        last, lines = _registered_epoch(snapshot, prefix), _read(log).splitlines()
        m = re.search(r"epoch (\d+)/\d+ step (\d+)/(\d+)", lines[-1]) if lines else None
        if last is not None and m and int(m[1]) >= last + 2 and int(m[2]) < int(m[3]):
            workers = [p for p in _descendants(os.getpid()) if "RayTrainWorker" in _cmdline(p)]
            out["workers"] = workers
            if len(workers) == 1:
                os.kill(workers[0], signal.SIGKILL)
                out.update(killed=workers[0], registered=last, epoch=int(m[1]), log_at_kill="\n".join(lines))
            return
        time.sleep(0.02)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("keep_learner", [True, False], ids=["long-lived learner", "trainer per stage"])
def test_killed_train_worker_resumes_from_the_last_epoch_checkpoint(ray_session, data_root, tmp_path, keep_learner):
    """Both ways of running a stage on Ray Train: the driver's long-lived learner (its second stage is killed, so
    the restarted workers must pick the open stage and its own checkpoint) and a TorchTrainer per stage."""
    from l2l_ray.data import load_dataset
    from l2l_ray.train import fit_segmenter
    from l2l_ray.train.learner import Learner

    cfg = load_config(None, [f"data.root={data_root}", f"run.dir={tmp_path}", *TINY, f"train.steps_per_epoch={STEPS}",
                             "train.batch_size=8", "train.num_workers=1", "train.cpus_per_worker=0.5",
                             "train.max_failures=1"])
    data = load_dataset(cfg, tmp_path)
    stage = tmp_path / "checkpoints" / "warmup"
    learner = Learner(cfg, tmp_path) if keep_learner else None
    got: dict = {}
    try:
        if learner is not None:  # a first stage on the same Train run: its checkpoints must not be restored later
            first = fit_segmenter(cfg, tmp_path, "first", data, None, 1, learner=learner)
            assert Path(first.checkpoint_dir) == tmp_path / "checkpoints" / "first" / "final"
        train_run = tmp_path / "checkpoints" / ("learner" if keep_learner else "warmup")
        killer = threading.Thread(target=_kill_train_worker_mid_epoch,
                                  args=(stage, train_run, got, 150.0, "warmup" if keep_learner else ""))
        killer.start()
        try:
            res = fit_segmenter(cfg, tmp_path, "warmup", data, None, EPOCHS, learner=learner)
        finally:
            killer.join()
    finally:
        if learner is not None:
            learner.close()
    assert "killed" in got, f"no single Train worker to kill mid-epoch (found {got.get('workers')})"
    assert not _alive(got["killed"])
    text, last, killed_in = (stage / "progress.log").read_text(), got["registered"], got["epoch"]
    # The new worker group restored the last registered checkpoint (not epoch 0) ...
    assert f"resumed from the checkpoint of epoch {last + 1}/{EPOCHS}" in text
    for e in range(1, last + 2):  # ... so the epochs up to it ran once ...
        assert text.count(f"epoch {e}/{EPOCHS} step") == STEPS
    assert text.count(f"epoch {killed_in}/{EPOCHS} step 1/") == 2  # ... and the interrupted one started again
    assert [h["epoch"] for h in res.history] == list(range(EPOCHS))  # nothing lost, nothing duplicated
    assert all(h["steps"] == STEPS and h["samples"] == STEPS * 8 for h in res.history)
    assert Path(res.checkpoint_dir).name == ("final" if keep_learner else f"epoch_{EPOCHS - 1:04d}")
    assert json.loads((stage / "done.json").read_text())["epochs"] == EPOCHS


# --- (b) a prior actor killed mid-pipeline ---------------------------------------------------------------

class DyingBackend:
    """A real (tiny) backend: a box on the left half for "left" sentences, else ``no_box``. The process
    that serves batch number ``die_at`` (counted across processes with a file) exits hard, once."""

    name, model = "dying", ""

    def __init__(self, pcfg: PriorsConfig, counter: str, die_at: int):
        self.counter, self.die_at = Path(counter), die_at

    def __call__(self, requests: list[PriorRequest]) -> list[Prior]:
        with open(self.counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        lines = self.counter.read_text().split()
        if len(lines) == self.die_at and not self.counter.with_suffix(".died").exists():
            self.counter.with_suffix(".died").write_text(str(os.getpid()))
            os._exit(1)  # the actor's process dies with this batch in flight
        return [Prior(r.sent_id, r.ref_id, box=(0.0, 0.0, 0.5, 1.0), score=0.9, backend=self.name)
                if "left" in r.sentence else Prior(r.sent_id, r.ref_id, status="no_box", backend=self.name)
                for r in requests]


@pytest.mark.ray
def test_killed_prior_actor_is_restarted_and_no_prior_is_lost_or_duplicated(tmp_path, by_value):
    from l2l_ray.priors.cache import PriorCache
    from l2l_ray.priors.pipeline import compute_priors

    cfg = Config()
    cfg.priors.cache_dir, cfg.priors.batch_size, cfg.priors.concurrency = str(tmp_path / "cache"), 8, 1
    reqs = [PriorRequest(i, 100 + i, "/x.png", 64, 64, ["the left one", "something"][i % 2]) for i in range(60)]
    counter = tmp_path / "calls.txt"
    factory = functools.partial(DyingBackend, counter=str(counter), die_at=3)
    run = compute_priors(cfg, reqs, backend_factory=factory)

    died = int(counter.with_suffix(".died").read_text())
    assert not _alive(died)  # the actor process really exited mid-pipeline
    calls = counter.read_text().split()
    assert len(calls) == 8 + 1  # 8 batches of <= 8 requests, the one in flight at the crash asked again ...
    assert str(died) in calls and len(set(calls)) == 2  # ... by a restarted actor (a new process)
    assert run["computed"] == 60 and run["cached_before"] == 0
    parts = PriorCache(cfg).parts()
    ids = np.concatenate([pq.read_table(p, columns=["sent_id"])["sent_id"].to_numpy() for p in parts])
    assert sorted(ids.tolist()) == list(range(60))  # every prior once on disk: none lost, none written twice
    priors = PriorCache(cfg).load()
    assert priors[0].box == (0.0, 0.0, 0.5, 1.0) and priors[1].status == "no_box"
    again = compute_priors(cfg, reqs, backend_factory=factory)  # a re-run finds everything cached
    assert again["computed"] == 0 and again["cached_before"] == 60


# --- (c) the driver killed mid-round, then the same command again -----------------------------------------

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stop_group(proc: subprocess.Popen, tmp: Path) -> None:
    """SIGKILL the driver's process group, then any straggler whose command line names our temp dir."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for _ in range(50):
        left = [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and str(tmp) in _cmdline(int(p.name)) and int(p.name) != os.getpid()]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _driver_env(tmp: Path, address: str) -> dict:
    """The CLI joins the test session's cluster (RAY_ADDRESS), as a driver submitted to a running cluster does:
    a second local cluster started on 2 busy cores can time out at start-up."""
    env = dict(os.environ)
    env.update(RAY_ADDRESS=address, RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="60", PYTHONUNBUFFERED="1")
    return env


def _selector_counters(path: Path) -> tuple[int, int]:
    from l2l_ray.selection.agent import state_from_bytes

    state = state_from_bytes(path.read_bytes())
    return int(state["n_select"]), int(state["n_updates"])


def _epochs_on_disk(stage: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in stage.glob("epoch_*") if (p / "state.pt").is_file())


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_killed_driver_rerun_resumes_at_the_same_round(ray_session, data_root, tmp_path):
    """The CLI with in-process training (``train.num_workers=0``: the same driver, rounds.json, selector.pt and
    per-stage epoch checkpoints; without Ray Train's ~15 s start per stage). A killed driver whose stage runs on
    Ray Train resumes through Train's own restore: tests/test_train.py kills one mid-stage."""
    tmp = Path(tempfile.mkdtemp(prefix="l2lft", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "l2l_ray", "train", f"data.root={data_root}", f"run.dir={run}", *TINY,
           "train.epochs=1", "train.steps_per_epoch=3", "semi.rounds=2", "semi.epochs_per_round=3",
           "semi.unlabeled_per_round=0", "semi.selector_practice_steps=2", "semi.gallery_size=2",
           "train.num_workers=0", "semi.selector_cpus=0.25"]
    r2_dir = run / "checkpoints" / "round_2"
    first = tmp_path / "first.log"
    address = ray_session.get_runtime_context().gcs_address
    try:
        with open(first, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_driver_env(tmp, address), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline and not _epochs_on_disk(r2_dir):
                time.sleep(0.05)
            assert _epochs_on_disk(r2_dir), f"round 2 never checkpointed:\n{_read(first)[-3000:]}"
            _stop_group(proc, tmp)  # SIGKILL while round 2 trains (after its first epoch's checkpoint)
        assert ray_session.cluster_resources().get("CPU") == 2 and len(ray_session.nodes()) == 1
        assert not (run / "metrics.json").exists() and not (r2_dir / "done.json").exists()
        at_kill = json.loads((run / "rounds.json").read_text())
        assert [m["round"] for m in at_kill["rounds"]] == [1]
        last = _epochs_on_disk(r2_dir)[-1]  # round 2's last epoch checkpoint (0-based)
        sel_at_kill = _selector_counters(run / "selector.pt")
        teacher = run / json.loads((run / "checkpoints" / "round_1" / "done.json").read_text())["checkpoint"]
        teacher_sha = _sha(teacher / "state.pt")
        logs = {s: _read(run / "checkpoints" / s / "progress.log") for s in ("warmup", "round_1", "round_2")}

        env = _driver_env(tmp, address)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    metrics = json.loads((run / "metrics.json").read_text())
    assert [m["round"] for m in metrics["rounds"]] == [1, 2] and metrics["splits"]["val"]["n"] > 0
    assert metrics["rounds"][0] == at_kill["rounds"][0]  # round 1 was not rerun: its record is the saved one
    # Warm-up and round 1 were not retrained; the teacher of round 2 is round 1's checkpoint, unchanged.
    for stage in ("warmup", "round_1"):
        assert _read(run / "checkpoints" / stage / "progress.log") == logs[stage]
    assert _sha(teacher / "state.pt") == teacher_sha
    # Round 2 resumed from its last epoch checkpoint: the epochs saved before the kill were not redone.
    r2 = _read(run / "checkpoints" / "round_2" / "progress.log")
    assert r2.startswith(logs["round_2"]) and f"resumed from the checkpoint of epoch {last + 1}/3" in r2
    for e in range(1, last + 2):
        assert r2.count(f"[round_2] epoch {e}/3 step") == logs["round_2"].count(f"[round_2] epoch {e}/3 step") >= 1
    assert "[round_2] epoch 3/3 step 3/3" in r2
    # The selector continued from selector.pt: one more selection on top of the saved count (a fresh
    # selector would be at 1), and round 2's practice steps on top of its saved updates.
    n_select, n_updates = _selector_counters(run / "selector.pt")
    assert n_select == sel_at_kill[0] + 1 == 2
    assert n_updates >= sel_at_kill[1] + 2
