"""`ray job submit` against a real head node started by the test (not the session's ``ray_session``).

The head runs on 127.0.0.1 with its own free ports, temp dir and auth token, so it coexists with
the in-process ``ray.init()`` cluster of the other tests. Ray >= 2.59 authenticates local clusters
with a token (``ray.init()`` by default; ``ray start`` when a token exists or the mode is set). Here
it is explicit, so the outcome does not depend on ``~/.ray/auth_token``: ``RAY_AUTH_MODE=token`` plus
``RAY_AUTH_TOKEN_PATH`` (a token file the test writes) for the head and every CLI call.

The head is started with ``ray start --head --block`` as a child process and stopped by signalling
that process (``ray stop`` would kill every Ray process on the machine, other users' included).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"


def data_job(out: Path) -> tuple[list[str], str]:
    """Make a 20-image synthetic set and its stats: the stand-in until training exists."""
    cmd = (f"python -m l2l_ray data synth --out {out}/data --images 20 && "
           f"python -m l2l_ray data stats --root {out}/data --dataset synthref --split-by unc > {out}/stats.json")
    return ["bash", "-c", cmd], str(out / "stats.json")


def train_job(out: Path) -> tuple[list[str], str]:
    """A tiny L2L run (warm-up + 1 round, one Ray Train worker, a SelectorActor) on the built-in data, written by
    the job itself; its metrics.json is checked."""
    return (["python", "-m", "l2l_ray", "train", "--config", "configs/synthetic.yaml", f"run.dir={out}/run",
             f"data.root={out}/data", "data.synth_images=24", "data.label_ratio=0.5", "data.image_size=64",
             "train.epochs=1", "train.steps_per_epoch=2", "train.batch_size=8", "train.warmup_steps=0",
             "train.cpus_per_worker=0.5", "semi.rounds=1", "semi.epochs_per_round=1", "semi.unlabeled_per_round=16",
             "semi.selector_practice_steps=2", "semi.selector_cpus=0.25", "semi.gallery_size=2"],
            str(out / "run" / "metrics.json"))


JOB = train_job  # data_job: the quick stand-in used before training existed


def check_output(path: str) -> None:
    """What the job wrote, checked by kind (stats of the data job, or a training run's metrics)."""
    out = json.loads(Path(path).read_text())
    if path.endswith("stats.json"):
        assert out["images"] == 20 and out["image_files_found"] == 20
        assert set(out["splits"]) == {"train", "val", "testA", "testB"}
    else:
        val = out["splits"]["val"]
        assert 0.0 <= val["mIoU"] <= 1.0 and val["n"] > 0
        assert out["method"] == "l2l" and [r["round"] for r in out["rounds"]] == [1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _env(token_file: Path, dashboard: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing from the session cluster
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_ADDRESS=dashboard,
               RAY_API_SERVER_ADDRESS=dashboard, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               RAY_USAGE_STATS_ENABLED="0", RAY_DASHBOARD_STARTUP_TIMEOUT_S="180",  # a busy 2-core box: > 60 s seen
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _wait_for_dashboard(url: str, token: str, head: subprocess.Popen, log: Path, timeout: float = 150.0) -> None:
    """Poll the dashboard's /api/version with the bearer token (without it the answer is 401)."""
    req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # connection refused while starting (HTTPError is an OSError too)
            time.sleep(0.5)
    pytest.fail(f"dashboard {url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop_head(head: subprocess.Popen, tmp: Path) -> None:
    """SIGTERM the `ray start --block` process (it stops its GCS, raylet and workers), then make sure."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its own session: only processes this test started
            head.wait(timeout=10)
    for pid in _pids_using(tmp):  # stragglers of this head (their command line names our temp dir)
        os.kill(pid, signal.SIGKILL)


def _pids_using(tmp: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(tmp).encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def _start_head(tmp: Path, env: dict, log_file, dash: int) -> subprocess.Popen:
    """`ray start --head --block` on 127.0.0.1 with free ports, 2 CPUs, its own temp dir, in its own session."""
    gcs, client, agent = _free_ports(3)
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--num-cpus=2",
           "--num-gpus=0", f"--object-store-memory={200 * 1024**2}", f"--temp-dir={tmp / 'ray'}",
           "--disable-usage-stats"]
    head_env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.Popen(cmd, cwd=REPO, env=head_env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not RAY.exists(), reason=f"no `ray` CLI next to {sys.executable}")
def test_ray_job_submit_on_a_local_head(tmp_path):
    tmp = Path(tempfile.mkdtemp(prefix="l2ljob", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    (dash,) = _free_ports(1)
    url = f"http://127.0.0.1:{dash}"
    env = _env(token, url)
    log = tmp / "head.log"
    with open(log, "w") as log_file:
        head = _start_head(tmp, env, log_file, dash)
        try:
            _wait_for_dashboard(url, token.read_text(), head, log)
            _submit_and_check(tmp, env, tmp_path)
        finally:
            _stop_head(head, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    assert head.returncode is not None


def _submit_and_check(tmp: Path, env: dict, out: Path) -> None:
    entrypoint, result = JOB(out)
    sid = f"l2l-test-{secrets.token_hex(4)}"
    sub = _ray(["job", "submit", "--submission-id", sid, "--runtime-env", "cluster/runtime_env.yaml",
                "--entrypoint-num-cpus", "0", "--", *entrypoint], env, timeout=420)
    assert sub.returncode == 0, f"ray job submit failed:\n{sub.stdout[-3000:]}\n{sub.stderr[-3000:]}"
    assert f"Job '{sid}' succeeded" in sub.stdout + sub.stderr
    status = _ray(["job", "status", sid], env, timeout=30)
    assert status.returncode == 0 and f"Job '{sid}' succeeded" in status.stdout + status.stderr
    check_output(result)
    # token auth is really on: the same call with another token is refused
    wrong = tmp / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    denied = _ray(["job", "status", sid], {**env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=30)
    assert denied.returncode != 0 and "Invalid authentication token" in denied.stdout + denied.stderr
