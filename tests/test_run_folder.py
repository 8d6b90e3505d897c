"""Run folders: usable or a clear refusal, one process at a time (stale locks taken over), one config per folder
(fingerprint), and checkpoint paths recorded relative to the folder so a copied run uses its own."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from l2l_ray.config import load_config
from l2l_ray.errors import UserError
from l2l_ray.run_folder import FINGERPRINT_FILE, LOCK_FILE, RunFolderError, claim_run_dir, fingerprint

REPO = Path(__file__).resolve().parents[1]


def _cfg(run_dir: Path, *extra: str):
    return load_config(None, [f"run.dir={run_dir}", *extra])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no process has it (a reuse within this test is vanishingly unlikely)


def test_claim_locks_records_and_releases(tmp_path):
    run = tmp_path / "a" / "run"
    with claim_run_dir(_cfg(run)) as folder:
        assert folder.path == run.resolve() and run.is_dir()
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        assert json.loads((run / FINGERPRINT_FILE).read_text()) == folder.fingerprint
    assert not (run / LOCK_FILE).exists()
    with claim_run_dir(_cfg(run)):  # the same config again: a resume
        pass


def test_fingerprint_keeps_what_shapes_the_result_only():
    fp = fingerprint(load_config(None))
    for key in ("method", "seed", "data.dataset", "data.root", "data.split_by", "data.label_ratio", "data.image_size",
                "data.synth_images", "model.preset", "model.guidance", "train.epochs", "train.steps_per_epoch",
                "train.batch_size", "train.num_workers", "train.lr", "semi.rounds", "semi.epochs_per_round",
                "priors.backend", "priors.proposal_method"):
        assert key in fp, key
    for key in ("run.dir", "run.resume", "train.num_threads", "train.cpus_per_worker", "train.log_every_s",
                "priors.cache_dir", "semi.teacher_actors", "semi.selector_cpus"):
        assert key not in fp, key
    assert not [k for k in fp if k.startswith(("tune.", "experiment."))]
    json.dumps(fp)  # recordable as is


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from l2l_ray.config import load_config
        from l2l_ray.run_folder import claim_run_dir
        with claim_run_dir(load_config(None, ["run.dir={run}"])):
            print("claimed", flush=True)
            sys.stdin.readline()
        """)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(RunFolderError, match=rf"{run} is in use by pid {holder.pid} on {socket.gethostname()}"):
            claim_run_dir(_cfg(run))
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    with claim_run_dir(_cfg(run)) as folder:  # released when the holder finished
        assert folder.notes == []


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    pid = _dead_pid()
    (run / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    with claim_run_dir(_cfg(run)) as folder:
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"took over the stale lock on {run} left by pid {pid}" in capsys.readouterr().out
    assert "that process is gone" in folder.notes[0]


def test_a_lock_from_another_host_is_refused_with_the_file_to_delete(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 123, "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(RunFolderError, match=rf"locked by pid 123 on elsewhere.*delete {run / LOCK_FILE}"):
        claim_run_dir(_cfg(run))


def test_another_config_on_a_used_folder_is_refused_listing_the_keys(tmp_path):
    run = tmp_path / "run"
    with claim_run_dir(_cfg(run, "method=l2l")):
        (run / "metrics.json").write_text("{}")  # a finished run
    with pytest.raises(RunFolderError) as err:
        claim_run_dir(_cfg(run, "method=mean_teacher", "train.lr=0.1", "train.num_threads=2"))
    msg = str(err.value)
    assert isinstance(err.value, UserError)  # the CLI prints it as one line, exit code 2
    assert 'method: "l2l" -> "mean_teacher"' in msg and "train.lr: 0.002 -> 0.1" in msg
    assert "num_threads" not in msg and "choose a new run.dir" in msg
    assert not (run / LOCK_FILE).exists()  # the refusal released the lock
    # operational keys may change between a run and its resume
    with claim_run_dir(_cfg(run, "method=l2l", "train.num_threads=2", "run.resume=false", "semi.teacher_actors=1")):
        pass


def test_a_folder_without_results_takes_the_new_fingerprint(tmp_path):
    run = tmp_path / "run"
    with claim_run_dir(_cfg(run, "data.root=typo")):
        pass  # e.g. the run failed on its data before writing anything
    with claim_run_dir(_cfg(run, "data.root=data")) as folder:
        assert "fingerprint was replaced" in folder.notes[0] and "data.root" in folder.notes[0]
    assert json.loads((run / FINGERPRINT_FILE).read_text())["data.root"] == "data"


def test_an_unreadable_fingerprint_is_refused_naming_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / FINGERPRINT_FILE).write_text("{torn")
    with pytest.raises(RunFolderError, match=rf"{run / FINGERPRINT_FILE} is unreadable.*delete it"):
        claim_run_dir(_cfg(run))


def test_a_folder_made_before_fingerprints_is_judged_by_its_config_yaml(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _cfg(run, "method=l2l").save(run / "config.yaml")
    (run / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r'config.yaml differs in method: "l2l" -> "mean_teacher"'):
        claim_run_dir(_cfg(run, "method=mean_teacher"))
    with claim_run_dir(_cfg(run, "method=l2l")):
        assert (run / FINGERPRINT_FILE).is_file()


def test_a_run_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(RunFolderError, match=rf"run.dir={tmp_path / 'plain' / 'run'}: {tmp_path / 'plain'} is a file"):
        claim_run_dir(_cfg(tmp_path / "plain" / "run"))


def test_a_read_only_run_dir_is_refused_naming_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder answers
    with pytest.raises(RunFolderError, match=rf"run.dir={run} is not writable.*chmod u\+w {run}"):
        claim_run_dir(_cfg(run))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod does not stop root from writing (the os.access test covers it)")
def test_a_read_only_run_dir_is_refused_for_real(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        with pytest.raises(RunFolderError, match=rf"run.dir={run} is not writable"):
            claim_run_dir(_cfg(run))
        with pytest.raises(RunFolderError, match=r"cannot be created"):
            claim_run_dir(_cfg(run / "sub"))
    finally:
        run.chmod(0o755)


def test_checkpoint_paths_are_relative_to_the_run_folder(tmp_path):
    from l2l_ray.train.fit import locate_checkpoint, record_checkpoint

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "warmup" / "epoch_0003"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"")
    assert record_checkpoint(run, ckpt) == "checkpoints/warmup/epoch_0003"
    assert record_checkpoint(run, tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(run)
    stage = copy / "checkpoints" / "warmup"
    assert locate_checkpoint(stage, "checkpoints/warmup/epoch_0003") == stage / "epoch_0003"
    # done.json / latest.json of older runs hold absolute paths: used while they exist, else the same name here
    assert locate_checkpoint(stage, str(ckpt)) == stage / "epoch_0003"
    assert locate_checkpoint(stage, str(stage / "epoch_0003")) == stage / "epoch_0003"


def test_a_copied_finished_run_resolves_its_own_checkpoint(tmp_path):
    """A real (tiny, in-process) training stage; the copied folder's done.json / latest.json lead into the copy."""
    from l2l_ray.data import load_dataset
    from l2l_ray.data.synth import write_synthetic
    from l2l_ray.train import fit_segmenter
    from l2l_ray.train.fit import locate_checkpoint

    root, run, copy = tmp_path / "data", tmp_path / "run", tmp_path / "moved" / "run"
    write_synthetic(str(root), 24, 0, 64)
    cfg = load_config(None, [f"data.root={root}", f"run.dir={run}", "data.image_size=64", "data.synth_images=24",
                             "data.label_ratio=0.5", "train.batch_size=4", "train.steps_per_epoch=1",
                             "train.num_threads=1", "train.log_every_s=0", "train.num_workers=0", "model.width=16"])
    first = fit_segmenter(cfg, run, "warmup", load_dataset(cfg, run), None, 1)
    done = json.loads((run / "checkpoints" / "warmup" / "done.json").read_text())
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert done["checkpoint"] == latest["checkpoint"] == Path(first.checkpoint_dir).relative_to(run).as_posix()
    shutil.copytree(run, copy)
    shutil.rmtree(run)

    again = fit_segmenter(cfg, copy, "warmup", load_dataset(cfg, copy), None, 1)  # done: no training
    assert Path(again.checkpoint_dir).is_relative_to(copy) and again.history == first.history
    latest = json.loads((copy / "checkpoints" / "latest.json").read_text())
    found = locate_checkpoint(copy / "checkpoints" / latest["stage"], latest["checkpoint"])
    assert found.is_relative_to(copy) and (found / "state.pt").is_file()
