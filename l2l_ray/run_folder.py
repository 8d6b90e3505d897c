"""A run folder holds one run: one process at a time, one config for its whole life.

    with claim_run_dir(cfg) as folder:   # before Ray starts: refuses at once, in one line, when it must
        ...                              # train into folder.path

``claim_run_dir`` makes ``run.dir`` (or says why it cannot), takes ``<run.dir>/run.lock`` (an exclusive
``flock``; the file names the holder's pid, host and start time, for the message a second process gets) and
compares the config's **fingerprint** with ``<run.dir>/fingerprint.json``: every key that shapes the result
(method, seed, data, priors, model, schedule, ...) but not the operational ones (``OPERATIONAL``: paths of
caches, CPUs, threads, retries, logging, ``run.*``, ``tune.*``, ``experiment.*``). The first claim records it;
a later claim with another fingerprint is refused, listing each differing key with its old and new value, so a
finished L2L folder re-run with ``method=mean_teacher`` never mixes its checkpoints into another method's
metrics. A lock left by a process that died on this host is taken over, with a note. Pure Python: no Ray.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from l2l_ray.config import Config, all_keys
from l2l_ray.errors import UserError
from l2l_ray.io import atomic_write_json, read_json

LOCK_FILE = "run.lock"
FINGERPRINT_FILE = "fingerprint.json"
LEGACY_CONFIG = "config.yaml"  # the driver's resolved config: the fingerprint of folders made before this file
# Keys that change how a run executes, not what it computes (same math up to float rounding), so a resume may
# change them: where caches live, CPUs / GPUs / threads / actors, retries and time-outs, logging, test hooks.
OPERATIONAL = frozenset({
    "priors.cache_dir", "priors.endpoint", "priors.api_key_env", "priors.timeout_s", "priors.max_retries",
    "priors.retry_backoff_s", "priors.concurrency", "priors.batch_size", "priors.num_gpus",
    "priors.tensor_parallel_size", "priors.gpu_memory_utilization", "priors.accelerator_type",
    "train.keep_learner", "train.cpus_per_worker", "train.use_gpu", "train.amp", "train.compile",
    "train.max_failures", "train.eval_batch_size", "train.num_threads", "train.log_every_s",
    "train.inject_failure_epoch",
    "semi.gallery_size", "semi.selector_cpus", "semi.selector_threads", "semi.teacher_actors", "semi.teacher_cpus",
    "semi.teacher_threads",
})
OPERATIONAL_SECTIONS = ("run.", "tune.", "experiment.")


class RunFolderError(UserError):
    """The run folder cannot be used (not writable, in use, made by another config); the message says why."""


def fingerprint(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every key that shapes the run's result (all but ``OPERATIONAL`` and its sections)."""
    out = {}
    for key in all_keys(cfg):
        if key in OPERATIONAL or key.startswith(OPERATIONAL_SECTIONS):
            continue
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass
class RunFolder:
    """A claimed run folder; ``release()`` (or leaving the ``with`` block) frees its lock."""

    path: Path
    fingerprint: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what the claim printed (a stale lock taken over, ...)
    _fd: int | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # unlink while still locked: a waiter that opened this inode sees it is gone and retries
            os.unlink(self.path / LOCK_FILE)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(cfg: Config, path: str | os.PathLike | None = None) -> RunFolder:
    """Make, lock and fingerprint ``path`` (default ``cfg.run.dir``); RunFolderError when it cannot be used.

    Raises RunFolderError when the folder cannot be created or written, when another live process holds it
    (naming its pid, host and start time) and when it was made by a config with another fingerprint (naming
    every differing key, old and new value). The returned RunFolder holds the lock until ``release()``.
    """
    run_dir = _usable_dir(Path(path if path is not None else cfg.run.dir).resolve())
    fd, notes = _lock(run_dir)
    folder = RunFolder(run_dir, fingerprint(cfg), notes, fd)
    try:
        folder.notes += _check_fingerprint(run_dir, folder.fingerprint)
    except BaseException:
        folder.release()
        raise
    for note in folder.notes:
        print(f"note: {note}", flush=True)
    return folder


def _usable_dir(run_dir: Path) -> Path:
    """``run_dir`` created if need be, or RunFolderError naming it and what to do."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), run_dir)
        raise RunFolderError(f"run.dir={run_dir}: {blocker} is a file, not a folder; choose another run.dir") from None
    except OSError as e:
        raise RunFolderError(f"run.dir={run_dir} cannot be created ({e.strerror}); choose a run.dir you can "
                             "write to, e.g. run.dir=runs/<name>, or fix the permissions of its parent") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise _not_writable(run_dir)
    return run_dir


def _not_writable(run_dir: Path) -> RunFolderError:
    return RunFolderError(f"run.dir={run_dir} is not writable by this user; choose a run.dir you can write to, e.g. "
                          f"run.dir=runs/<name>, or make it writable (chmod u+w {run_dir})")


def _holder_text(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock file is unreadable)"
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def _read_holder(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _lock(run_dir: Path) -> tuple[int, list[str]]:
    """An exclusive flock on ``<run_dir>/run.lock`` holding this process's pid, host and start time.

    The kernel frees a flock when its process dies, so a lock file nobody holds is stale: taken over with a
    note when its process ran on this host and is gone. One written on another host is refused (its process
    may still run there, on a file system whose flock does not span hosts) with the file to delete.
    """
    lock, host = run_dir / LOCK_FILE, socket.gethostname()
    for _ in range(10):  # retried only when the lock file is replaced between our open and our flock
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise _not_writable(run_dir) from None
        except OSError as e:
            raise RunFolderError(f"run.dir={run_dir}: cannot create {lock} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"run.dir={run_dir} is in use by {_holder_text(_read_holder(lock))}: wait for it "
                                 "to finish (or stop it), or choose another run.dir") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released and unlinked by its holder between our open and our flock
            os.close(fd)
            continue
        notes = []
        old = _read_holder(lock) if os.fstat(fd).st_size else None
        if old is not None:
            if old.get("host") != host:
                os.close(fd)
                raise RunFolderError(f"run.dir={run_dir} is locked by {_holder_text(old)}: if that run has stopped, "
                                     f"delete {lock} and re-run; else choose another run.dir")
            if _pid_alive(old.get("pid")) and old.get("pid") != os.getpid():
                note = "its pid is alive but holds no lock (a reused pid)"
            else:
                note = "that process is gone"
            notes.append(f"took over the stale lock on {run_dir} left by {_holder_text(old)}; {note}")
        me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)  # in place, not an atomic replace: the flock belongs to this inode
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        return fd, notes
    raise RunFolderError(f"run.dir={run_dir}: {lock} keeps changing; is another run starting there?")


def _check_fingerprint(run_dir: Path, new: dict[str, Any]) -> list[str]:
    """Record ``new`` in a fresh folder; compare it with the recorded one otherwise (RunFolderError on a mismatch)."""
    path = run_dir / FINGERPRINT_FILE
    try:
        old, source = read_json(path), path
    except (OSError, ValueError) as e:
        raise RunFolderError(f"run.dir={run_dir}: {path} is unreadable ({e}); delete it to record this run's "
                             "config anew, or choose a new run.dir") from None
    if old is None and (run_dir / LEGACY_CONFIG).is_file():  # a folder made before fingerprints: its config
        old, source = _legacy_fingerprint(run_dir / LEGACY_CONFIG), run_dir / LEGACY_CONFIG
    if old is None:
        atomic_write_json(path, new)
        return []
    diff = _differences(old, new)
    if not diff:
        if source != path or old != new:  # record it (legacy folder; keys added to the config since)
            atomic_write_json(path, new)
        return []
    lines = "; ".join(f"{k}: {_show(old.get(k, '(not set)'))} -> {_show(new.get(k))}" for k in diff)
    if not _has_results(run_dir):  # the run that recorded it never got going: nothing to protect
        atomic_write_json(path, new)
        return [f"{run_dir} held no results; its fingerprint was replaced ({lines})"]
    raise RunFolderError(f"run.dir={run_dir} holds a run made with another config ({source.name} differs in "
                         f"{lines}). A run folder holds one run: choose a new run.dir, or delete {run_dir} to "
                         "start this run over")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ. A key the old record lacks (added to the config since) counts as its default;
    a key the config no longer has is ignored."""
    default = fingerprint(Config())
    return [k for k, v in new.items() if _norm(old.get(k, default.get(k))) != _norm(v)]


def _norm(value: Any) -> Any:
    """JSON round trip, so 0.003 and tuples compare as the recorded file reads them back."""
    return json.loads(json.dumps(value))


def _show(value: Any) -> str:
    return json.dumps(value)


def _has_results(run_dir: Path) -> bool:
    return any(p.name not in (LOCK_FILE, FINGERPRINT_FILE) and not p.name.startswith(".") for p in run_dir.iterdir())


def _legacy_fingerprint(config_file: Path) -> dict[str, Any] | None:
    """The fingerprint keys of a saved config.yaml, read as plain YAML (keys renamed since are simply absent)."""
    try:
        raw = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    flat: dict[str, Any] = {}
    for section, value in raw.items():
        if isinstance(value, dict):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[str(section)] = value
    keys = fingerprint(Config())
    return {k: v for k, v in flat.items() if k in keys}
