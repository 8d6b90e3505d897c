"""``l2l tune``: the search space from dotted keys, the CPU budget check, and the CLI end to end (ASHA stops a
trial early, the search is SIGKILLed and resumed by Tune's restore, best.yaml trains with ``l2l train``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from l2l_ray.config import ConfigError, load_config
from l2l_ray.tune import build_space, check_budget, summarize, trial_cpus

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "configs" / "tune" / "synthetic.yaml"


def test_the_shipped_search_config_is_valid_and_fits_two_cpus():
    assert YAML.read_text().startswith("# l2l tune --config configs/tune/synthetic.yaml")
    cfg = load_config(YAML)
    space = build_space(cfg.tune.space)
    assert set(space) == set(cfg.tune.space) and "train.lr" in space
    assert trial_cpus(cfg) == 0.5 + 1 * 0.25 + 1 * 0.25  # driver + Train worker + SelectorActor
    check_budget(cfg, 2.0)  # 2 concurrent trials x 1.0 CPU fit 2 CPUs
    with pytest.raises(ConfigError, match="exceed the cluster's 1 CPUs"):
        check_budget(cfg, 1.0)


def test_space_errors_name_the_key():
    from ray import tune

    space = build_space({"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}, "semi.ema": [0.9, 0.99],
                         "train.epochs": {"type": "grid", "values": [2, 4]}})
    assert isinstance(space["train.lr"], tune.search.sample.Float) and space["train.epochs"] == {
        "grid_search": [2, 4]}
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        build_space({"train.lrr": [1, 2]})
    with pytest.raises(ConfigError, match="tune.space.train.lr: type uniform needs 'low' and 'high'"):
        build_space({"train.lr": {"type": "uniform", "low": 1}})
    with pytest.raises(ConfigError, match="tune.space.priors.backend: .*fixed for the whole search"):
        build_space({"priors.backend": ["lexical", "hf"]})
    with pytest.raises(ConfigError, match="tune.space.semi.ema: expected a list"):
        build_space({"semi.ema": 0.9})


def test_a_search_folder_resumes_only_with_its_own_config(tmp_path):
    from l2l_ray.config import apply_overrides
    from l2l_ray.tune import _check_same_search

    cfg = load_config(YAML, [f"run.dir={tmp_path}"])
    _check_same_search(cfg, tmp_path)  # nothing there yet
    cfg.save(tmp_path / "config.yaml")
    (tmp_path / "tune").mkdir()
    _check_same_search(cfg, tmp_path)  # the same config: resume
    with pytest.raises(ConfigError, match="another config .differs in train.lr, tune.space.*new run.dir"):
        _check_same_search(apply_overrides(cfg, {"train.lr": 0.1, "tune.space": {"semi.ema": [0.9]}}), tmp_path)


class _Result:
    """The fields of ``ray.tune.Result`` that ``summarize`` reads."""

    def __init__(self, tid, it, vals, params, error=None):
        import pandas as pd

        self.metrics = {"trial_id": tid, "training_iteration": it, "val_mIoU": vals[-1]}
        self.metrics_dataframe = pd.DataFrame({"val_mIoU": vals})
        self.config, self.error, self.path = params, error, tid


def test_summarize_picks_the_best_trial_that_ran_every_round():
    results = [_Result("a", 3, [0.3, 0.4, 0.42], {"train.lr": 1}), _Result("b", 1, [0.5], {"train.lr": 2}),
               _Result("c", 3, [0.2, 0.45, 0.44], {"train.lr": 3}), _Result("d", 2, [0.1, 0.2], {}, error="boom")]
    s = summarize(results, max_t=3)
    assert (s["trials"], s["finished"], s["stopped_early"], s["errors"]) == (4, 2, 1, 1)
    # b stopped early with a higher warm-up score; c has the best last score among the finished trials
    assert s["best"]["trial_id"] == "c" and s["best"]["best_val_mIoU"] == 0.45


# --- the CLI end to end -------------------------------------------------------------------------------------

# Three trials in a row (grid over train.lr; ASHA's decisions then do not depend on timing), training in the
# trial process (train.num_workers=0): 1.0 + a 0.25-CPU SelectorActor per trial.
SEARCH = ["train.num_workers=0", "tune.cpus_per_trial=1.0", "semi.selector_cpus=0.25", "tune.max_concurrent=1",
          "tune.num_samples=1", "tune.space={train.lr: {type: grid, values: [0.005, 0.0001, 0.002]}}",
          "data.synth_images=24", "data.label_ratio=0.5", "train.epochs=2", "train.steps_per_epoch=12",
          "train.batch_size=16", "train.eval_batch_size=64", "semi.rounds=1", "semi.epochs_per_round=1",
          "semi.unlabeled_per_round=32", "semi.selector_practice_steps=2", "semi.gallery_size=2"]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_group(proc: subprocess.Popen, tmp: Path) -> None:
    """SIGKILL the search's process group, then stragglers whose command line names its Ray temp dir."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for _ in range(50):
        left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and str(tmp) in _cmdline(p.name)]
        if not left:
            return
        for pid in left:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _trained(trial_run: Path) -> tuple:
    """What a trial's training left: its stages' progress logs, rounds.json and its metrics (timings left out)."""
    logs = {p.parent.name: p.read_text() for p in sorted(trial_run.glob("checkpoints/*/progress.log"))}
    metrics = {k: v for k, v in json.loads((trial_run / "metrics.json").read_text()).items() if k != "timing"}
    metrics["data"].pop("load_seconds")
    for m in metrics["rounds"]:
        m.pop("timing")
    return logs, (trial_run / "rounds.json").read_text(), metrics


def _reports(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_tune_stops_early_resumes_after_a_kill_and_writes_a_trainable_best_yaml(ray_session, tmp_path):
    from l2l_ray.cli import main
    from l2l_ray.data.synth import write_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="l2ltu", dir="/tmp"))  # the search's own Ray (RAY_TMPDIR), short paths
    data, run = tmp_path / "data", tmp_path / "run"
    write_synthetic(str(data), 24, 0, 128)
    cmd = [sys.executable, "-m", "l2l_ray", "tune", "--config", str(YAML), f"data.root={data}", f"run.dir={run}",
           *SEARCH]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(tmp), L2L_RAY_NUM_CPUS="2", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    first = tmp_path / "first.log"
    try:
        with open(first, "w") as out:  # 1. start the search; SIGKILL it once a trial has finished its run
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline and not list(run.glob("trials/*/metrics.json")):
                time.sleep(0.2)
            done_before = {p.parent.name: _trained(p.parent) for p in run.glob("trials/*/metrics.json")}
            assert done_before, f"no trial finished:\n{first.read_text()[-3000:]}"
            _stop_group(proc, tmp)
        assert not (run / "best.yaml").exists()
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)  # 2. again
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert "resuming the search" in second.stdout

    summary = json.loads((run / "tune_summary.json").read_text())
    assert summary["trials"] == 3 and summary["errors"] == 0 and summary["max_iterations"] == 2
    lrs = {t["params"]["train.lr"]: t for t in summary["all"]}
    assert sorted(lrs) == [0.0001, 0.002, 0.005]  # the grid: no trial lost or duplicated by the restore
    # ASHA stopped the lr=1e-4 trial after its warm-up report (below the first trial's), the others finished.
    assert lrs[0.0001]["iterations"] == 1 and lrs[0.005]["iterations"] == 2
    assert summary["stopped_early"] >= 1 and summary["finished"] + summary["stopped_early"] == 3
    for t in summary["all"]:  # every report is val mIoU of round (iteration - 1), restarted trials included
        reps = _reports(Path(t["path"]))
        assert reps and all(r["round"] == r["training_iteration"] - 1 and 0 <= r["val_mIoU"] <= 1 for r in reps)
        assert (len({r["training_iteration"] for r in reps}) == 2) == (t["iterations"] == 2)
    # Trials finished before the kill were not retrained. (Tune may restart one whose end its last experiment
    # snapshot had not seen yet: its driver then finds every stage done and only evaluates again.)
    for tid, before in done_before.items():
        assert _trained(run / "trials" / tid) == before

    best = summary["best"]
    assert best["iterations"] == 2 and best["last_val_mIoU"] == max(
        t["last_val_mIoU"] for t in summary["all"] if t["iterations"] == 2)
    cfg = load_config(run / "best.yaml")  # 3. best.yaml: the best trial's config, only run.dir differs
    trial_dir = run / "trials" / best["trial_id"]
    trial_cfg = yaml.safe_load((trial_dir / "config.yaml").read_text())
    got = cfg.to_dict()
    assert got["run"].pop("dir") == str(run / "best") and trial_cfg["run"].pop("dir") == str(trial_dir)
    # trials get the priors cache pinned to the folder the driver filled; best.yaml keeps the user's "" (default),
    # which resolves to that same folder
    assert Path(cfg.priors_cache_dir).resolve() == Path(trial_cfg["priors"].pop("cache_dir")).resolve()
    got["priors"].pop("cache_dir")
    assert got == trial_cfg and cfg.train.lr == best["params"]["train.lr"]
    # `l2l train --config best.yaml`, as it is (in this process: the session's cluster), reproduces the trial. The
    # trial's tokenizer is reused: the WordPiece trainer's vocabulary is not deterministic (see docs/tune.md).
    (run / "best").mkdir()
    shutil.copy(trial_dir / "tokenizer.json", run / "best" / "tokenizer.json")
    assert main(["train", "--config", str(run / "best.yaml")]) == 0
    metrics = json.loads((run / "best" / "metrics.json").read_text())
    trial_metrics = json.loads((trial_dir / "metrics.json").read_text())
    assert [m["round"] for m in metrics["rounds"]] == [1]
    assert metrics["rounds"][-1]["val"]["mIoU"] == pytest.approx(best["last_val_mIoU"], abs=1e-6)  # measured: equal
    assert metrics["rounds"][-1]["val"]["n"] == trial_metrics["rounds"][-1]["val"]["n"]
