"""The ``l2l`` command line end to end on tiny synthetic data, as a user runs it (subprocesses):
``l2l train`` (data, priors, warm-up, one L2L round, evaluation) -> ``l2l eval --run`` -> ``l2l report``,
and a bad config key (exit 2, the key and its closest valid keys, no traceback).

The student trains in-process (``train.num_workers=0``) to keep this under a minute on 2 cores; Ray Train
with pseudo-labels is covered by tests/test_driver.py. The data root is shared with test_driver.py when
both run in one session (same synthetic parameters), otherwise ``l2l train`` writes it itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic.yaml"
TINY_DIR = "l2l_tiny_synthref"  # the same folder and synthetic parameters as tests/test_driver.py
TINY = ["data.image_size=64", "data.synth_images=40", "data.synth_seed=0", "data.label_ratio=0.25",
        "train.batch_size=4", "train.steps_per_epoch=2", "train.num_threads=1", "train.log_every_s=0",
        "train.eval_batch_size=32", "train.num_workers=0", "train.epochs=1", "semi.rounds=1",
        "semi.epochs_per_round=1", "semi.unlabeled_per_round=16", "semi.selector_practice_steps=3",
        "semi.gallery_size=2", "semi.selector_minibatch=16", "method=l2l", "seed=0", "model.preset=tiny"]
SPLIT_KEYS = {"mIoU", "oIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9", "n", "mIoU_small",
              "mIoU_medium", "mIoU_large", "area_tercile_1", "area_tercile_2"}


def l2l(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "L2L_RAY_NUM_CPUS": "2", "L2L_RAY_OBJECT_STORE_MB": "512", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own, as on a laptop
    return subprocess.run([sys.executable, "-m", "l2l_ray", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _config_args() -> list[str]:
    return ["--config", str(CONFIG)] if CONFIG.is_file() else []


@pytest.mark.e2e
def test_train_eval_report_on_tiny_synthetic_data(tmp_path_factory, tmp_path):
    root, run_dir = tmp_path_factory.getbasetemp() / TINY_DIR, tmp_path / "run"
    train = l2l("train", *_config_args(), f"data.root={root}", f"run.dir={run_dir}", *TINY)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-4000:]
    assert "[warmup]" in train.stdout and "[round 1]" in train.stdout  # progress while it runs
    assert "== l2l (labels 0.25, seed 0)" in train.stdout  # the summary table at the end

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "l2l" and metrics["label_ratio"] == 0.25
    assert set(metrics["splits"]) == {"val", "testA", "testB"}
    for name, m in metrics["splits"].items():
        assert set(m) == SPLIT_KEYS and m["n"] == metrics["data"]["eval_pairs"][name] > 0
    (r1,) = metrics["rounds"]
    assert r1["round"] == 1 and "reward" in r1 and 0.0 <= r1["trusted_pixel_share"] <= 1.0
    assert (run_dir / "selector.pt").is_file() and (run_dir / "rounds.json").is_file()
    assert (root / "synthref" / "instances.json").is_file()  # `l2l train` made (or found) the data

    ev = l2l("eval", "--run", str(run_dir))
    assert ev.returncode == 0, ev.stderr[-4000:]
    printed = json.loads(ev.stdout[ev.stdout.index("{"):])  # the JSON printed after any log lines
    assert printed == metrics["splits"]  # same checkpoint, same numbers
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["splits"] == metrics["splits"] and after["eval"]["stage"] == "round_1"
    assert after["rounds"] == metrics["rounds"]  # eval merges, it does not overwrite

    val = l2l("eval", "--run", str(run_dir), "--split", "val")
    assert val.returncode == 0 and set(json.loads(val.stdout[val.stdout.index("{"):])) == {"val"}

    rep = l2l("report", str(run_dir))
    assert rep.returncode == 0, rep.stderr[-4000:]
    html = (run_dir / "report.html").read_text()
    assert "<html" in html.lower() and "gallery" in html.lower() and "testA" in html


@pytest.mark.e2e
def test_unknown_config_key_exits_2_naming_the_key_and_the_closest_ones(tmp_path):
    bad = l2l("train", *_config_args(), f"run.dir={tmp_path / 'run'}", "semi.roundz=3", timeout=120)
    assert bad.returncode == 2
    assert "semi.roundz" in bad.stderr and "semi.rounds" in bad.stderr  # the key and the closest valid key
    assert "Traceback" not in bad.stderr + bad.stdout
    assert not (tmp_path / "run").exists()  # nothing started

    missing = l2l("eval", "--run", str(tmp_path / "nowhere"), timeout=120)
    assert missing.returncode == 2 and "not a run folder" in missing.stderr and "Traceback" not in missing.stderr
