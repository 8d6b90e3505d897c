"""The priors cache on disk: exact round trip, last-write-wins without duplicates, atomic part files,
and resume after a real SIGKILL (no finished batch recomputed, every id exactly once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from l2l_ray.config import Config
from l2l_ray.priors.base import PriorRequest
from l2l_ray.priors.cache import PriorCache, model_slug, prior_to_row, priors_to_table, table_to_priors
from l2l_ray.records import Prior

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent


def make_cfg(tmp_path, **priors) -> Config:
    cfg = Config()  # defaults: synthref / unc / lexical / v1
    cfg.priors.cache_dir = str(tmp_path / "cache")
    for k, v in priors.items():
        setattr(cfg.priors, k, v)
    return cfg


def full_prior(i: int, size: int = 8) -> Prior:
    rng = np.random.default_rng(i)
    return Prior(sent_id=i, ref_id=100 + i, status="ok", box=(0.125, 0.25, 0.5 + i / 1000, 0.75),
                 points=((0.3, 0.4), (0.31, 0.41)), score=0.5 + i / 100, category="circle",
                 attributes=("red", "big"), spatial=("left",), raw_text=f'{{"bbox": [{i}]}}',
                 proposal=rng.integers(0, 256, (size, size), dtype=np.uint8), backend="lexical", model="")


def assert_same(a: Prior, b: Prior) -> None:
    for f in ("sent_id", "ref_id", "status", "box", "points", "score", "category", "attributes", "spatial",
              "raw_text", "backend", "model"):
        assert getattr(a, f) == getattr(b, f), f
    if a.proposal is None:
        assert b.proposal is None
    else:
        assert b.proposal.dtype == np.uint8 and np.array_equal(a.proposal, b.proposal)


def test_round_trip_every_field(tmp_path):
    cache = PriorCache(make_cfg(tmp_path))
    priors = [full_prior(i) for i in range(5)]
    priors.append(Prior(sent_id=9, ref_id=7, status="malformed_json", raw_text='{"bbox": [1, 2'))
    priors.append(Prior(sent_id=10, ref_id=7, status="ok", box=(0.0, 0.0, 1.0, 1.0), proposal=None))
    cache.write(priors)
    loaded = cache.load()
    assert sorted(loaded) == [0, 1, 2, 3, 4, 9, 10]
    for p in priors:
        assert_same(p, loaded[p.sent_id])
    assert loaded[9].box is None and loaded[9].soft_mask(4).tolist() == [[0.5] * 4] * 4
    assert cache.load([1, 9, 12345]).keys() == {1, 9}  # ids not cached are simply absent
    assert (cache.dir / "key.json").exists() and cache.dir.name == "lexical_none_v1"


def test_row_helpers_match_table():
    p = full_prior(3)
    row = prior_to_row(p)
    assert row["sent_id"] == 3 and row["box"] == [0.125, 0.25, 0.503, 0.75] and row["proposal_size"] == 8
    assert row["points"] == [0.3, 0.4, 0.31, 0.41] and len(row["proposal"]) == 64
    assert_same(p, table_to_priors(priors_to_table([p]))[3])


def test_write_table_accepts_rows_from_row_producers(tmp_path):
    """Rows as a ray.data.llm postprocess emits them (plain dicts, extra columns, inferred types)."""
    import pyarrow as pa

    cache = PriorCache(make_cfg(tmp_path))
    rows = [{**prior_to_row(full_prior(1)), "generated_text": "x"},
            prior_to_row(Prior(sent_id=2, ref_id=1, status="empty_answer")) | {"generated_text": ""}]
    cache.write_table(pa.Table.from_pylist(rows))
    assert_same(full_prior(1), cache.load()[1])
    assert cache.load()[2].status == "empty_answer"
    with pytest.raises(ValueError, match="prior_to_row"):
        cache.write_table(pa.table({"sent_id": [3], "status": ["ok"]}))


def test_no_duplicates_last_write_wins(tmp_path):
    cache = PriorCache(make_cfg(tmp_path))
    batch = [full_prior(i) for i in range(4)]
    cache.write(batch)
    cache.write(batch)  # the same batch written twice (e.g. a retried block)
    cache.write([Prior(sent_id=2, ref_id=102, status="no_box", raw_text="second answer")])
    table = cache.table()
    assert table["sent_id"].to_pylist() == [0, 1, 2, 3]  # sorted, each once
    loaded = cache.load()
    assert loaded[2].status == "no_box" and loaded[2].raw_text == "second answer"
    assert_same(batch[1], loaded[1])


def test_transient_failures_are_not_done(tmp_path):
    cache = PriorCache(make_cfg(tmp_path))
    cache.write([full_prior(1), Prior(sent_id=2, ref_id=1, status="timeout"),
                 Prior(sent_id=3, ref_id=1, status="malformed_json"), Prior(sent_id=4, ref_id=1, status="model_error")])
    assert cache.done_ids() == {1, 3}  # a malformed answer is an answer; a timeout is retried
    assert cache.statuses() == {1: "ok", 2: "timeout", 3: "malformed_json", 4: "model_error"}
    cache.write([full_prior(2)])
    assert cache.done_ids() == {1, 2, 3}


def test_compact_keeps_last_and_later_writes_still_win(tmp_path):
    cache = PriorCache(make_cfg(tmp_path))
    for i in range(5):
        cache.write([full_prior(i), full_prior(i + 1)])
    cache.write([Prior(sent_id=0, ref_id=100, status="no_box")])
    before = cache.load()
    merged = cache.compact()
    assert cache.parts() == [merged]
    after = cache.load()
    assert sorted(after) == list(range(6)) and after[0].status == "no_box"
    for i in range(1, 6):
        assert_same(before[i], after[i])
    cache.write([Prior(sent_id=0, ref_id=100, status="ok", box=(0.0, 0.0, 0.5, 0.5))])
    assert cache.load([0])[0].status == "ok"


def test_reader_survives_a_concurrent_compaction(tmp_path, monkeypatch):
    cache = PriorCache(make_cfg(tmp_path))
    cache.write([full_prior(1)])
    cache.write([full_prior(2)])
    stale = cache.parts()
    cache.compact()  # as if another process compacted between our listing and our reading
    listings = iter([stale])
    real_parts = PriorCache.parts
    monkeypatch.setattr(cache, "parts", lambda: next(listings, None) or real_parts(cache))
    assert sorted(cache.load()) == [1, 2]


def test_compact_waits_for_writers(tmp_path):
    import fcntl
    import threading

    cache = PriorCache(make_cfg(tmp_path))
    cache.write([full_prior(1)])
    cache.write([full_prior(2)])
    with open(cache.dir / ".lock", "a") as f:  # a writer in the middle of a part
        fcntl.flock(f, fcntl.LOCK_SH)
        t = threading.Thread(target=cache.compact)
        t.start()
        t.join(0.3)
        assert t.is_alive() and len(cache.parts()) == 2  # compaction waits...
        fcntl.flock(f, fcntl.LOCK_UN)
    t.join(10)
    assert not t.is_alive() and len(cache.parts()) == 1  # ...and runs once the writer is done


def test_cache_key_separates_backends_models_prompts(tmp_path):
    dirs = {PriorCache(make_cfg(tmp_path, **kw)).dir for kw in
            [{}, {"backend": "hf"}, {"model": "Qwen/Qwen2.5-VL-7B-Instruct"},
             {"model": "/models/Qwen2.5-VL-7B-Instruct"}, {"prompt_version": "v2"}, {"max_tokens": 64},
             {"batch_size": 3, "concurrency": 2, "timeout_s": 1.0}]}
    assert len(dirs) == 6  # batch_size / concurrency / timeout do not change what a prior is
    assert model_slug("Qwen/Qwen2.5-VL-7B-Instruct").startswith("Qwen2.5-VL-7B-Instruct-")
    cfg = make_cfg(tmp_path)
    cfg.data.split_by = "google"
    assert PriorCache(cfg).dir.parent.name == "synthref_google"


def test_tmp_files_ignored_and_damaged_part_moved_aside(tmp_path, capsys):
    cache = PriorCache(make_cfg(tmp_path))
    cache.write([full_prior(1)])
    # A write in flight (or killed) leaves a temp file named by l2l_ray.io.atomic_write: never read.
    (cache.dir / ".part-00000000000000000009-deadbeef.parquet.x1y2.tmp").write_bytes(b"PAR1 half a file")
    assert len(cache.parts()) == 1 and cache.done_ids() == {1}
    # A visible part is always complete; one damaged by other means is moved aside (kept), with a warning naming it.
    bad = cache.dir / "part-99999999999999999999-00000000.parquet"
    bad.write_bytes(b"not parquet")
    assert sorted(cache.load()) == [1]
    assert not bad.exists() and cache.parts() == [p for p in cache.parts() if p != bad]
    (aside,) = cache.quarantined
    assert aside.name.startswith(bad.name + ".corrupt-") and aside.read_bytes() == b"not parquet"
    assert bad.name in capsys.readouterr().err


def test_truncated_part_is_quarantined_and_its_batch_recomputed(tmp_path):
    """A part cut short on disk: the next run moves it aside, recomputes just that batch, and counts it."""
    from l2l_ray.priors.pipeline import compute_priors

    n, batch, log = 12, 4, tmp_path / "calls.txt"
    cfg = make_cfg(tmp_path, batch_size=batch)
    factory = lambda pcfg: SlowCountingBackend(str(log), 0.0)  # noqa: E731
    first = compute_priors(cfg, toy_requests(n), use_ray=False, backend_factory=factory)
    assert first["computed"] == n and first["quarantined_parts"] == 0
    cache = PriorCache(cfg)
    original = cache.load()
    victim = cache.parts()[1]
    victim_ids = set(pq.read_table(victim, columns=["sent_id"])["sent_id"].to_pylist())
    os.truncate(victim, victim.stat().st_size // 2)
    n_calls = len(calls(log))

    again = compute_priors(cfg, toy_requests(n), use_ray=False, backend_factory=factory)
    assert again["quarantined_parts"] == 1
    assert again["cached_before"] == n - batch and again["computed"] == batch
    assert set(calls(log)[n_calls:]) == victim_ids  # only the lost batch was asked again
    aside = list(cache.dir.glob(victim.name + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].stat().st_size > 0 and not victim.exists()  # kept, not deleted
    reloaded = PriorCache(cfg).load()
    assert sorted(reloaded) == list(range(n))
    for i in range(n):
        assert_same(original[i], reloaded[i])


def test_a_read_only_data_root_is_never_written(tmp_path, private_cache):
    """The default cache lives under $L2L_CACHE (conftest: a session temp folder), keyed by data.root, never in
    the dataset folder. As root chmod does not stop writes, so the test also checks nothing changed there."""
    from l2l_ray.config import apply_overrides
    from l2l_ray.data import ensure_data
    from l2l_ray.priors.pipeline import run_priors

    root = tmp_path / "data"
    cfg = apply_overrides(Config(), {"data.root": str(root), "data.synth_images": 12, "data.label_ratio": 0.25,
                                     "priors.include_eval": False})
    ensure_data(cfg)

    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}

    before = snapshot()
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    for p in modes:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        summary = run_priors(cfg, use_ray=False)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert summary["computed"] == summary["requested"] > 0
    cache_dir = Path(summary["cache_dir"])
    assert Path(private_cache) in cache_dir.parents and root not in cache_dir.parents
    assert snapshot() == before
    other = apply_overrides(cfg, {"data.root": str(tmp_path / "elsewhere" / "data")})
    assert other.priors_cache_dir != cfg.priors_cache_dir  # same folder name, other root: another cache


def test_kill_during_write_leaves_no_visible_part(tmp_path):
    """SIGKILL after half of a part's bytes are on disk, before os.replace: readers see only old parts."""
    cfg_dir = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import pyarrow.parquet as pq
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from test_prior_cache import make_cfg, full_prior
        from l2l_ray.priors.cache import PriorCache
        from pathlib import Path
        cache = PriorCache(make_cfg(Path({str(tmp_path)!r})))
        cache.write([full_prior(1)])
        real = pq.write_table
        def torn(table, where, **kw):
            real(table, where, **kw)
            size = os.path.getsize(where)
            os.truncate(where, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        pq.write_table = torn
        cache.write([full_prior(2), full_prior(3)])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    cache = PriorCache(make_cfg(tmp_path))
    leftovers = [p for p in cache.dir.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and cfg_dir in leftovers[0].parents  # the torn file exists...
    with pytest.raises(Exception):  # noqa: B017 - ...and really is torn
        pq.read_table(leftovers[0])
    assert len(cache.parts()) == 1 and sorted(cache.load()) == [1]  # ...but is invisible


# --- resume after a kill, through the real compute loop -------------------------------------------------

class SlowCountingBackend:
    """A real backend: box = left or right half by the word in the sentence; logs every answered
    sent_id to ``$L2L_TEST_CALL_LOG`` and sleeps ``$L2L_TEST_SLEEP`` s per batch."""

    name, model = "lexical", ""

    def __init__(self, log_path: str, sleep: float):
        self.log_path, self.sleep = log_path, sleep

    def __call__(self, requests: list[PriorRequest]) -> list[Prior]:
        time.sleep(self.sleep)
        out = []
        for r in requests:
            box = (0.0, 0.0, 0.5, 1.0) if "left" in r.sentence else (0.5, 0.0, 1.0, 1.0)
            prop = np.zeros((4, 4), np.uint8)
            prop[:, :2] = 255 if box[0] == 0.0 else 0
            prop[:, 2:] = 0 if box[0] == 0.0 else 255
            out.append(Prior(r.sent_id, r.ref_id, box=box, score=1.0, raw_text=r.sentence, proposal=prop,
                             backend=self.name))
        with open(self.log_path, "a") as f:  # one append per batch
            f.write("".join(f"{r.sent_id}\n" for r in requests))
        return out


def slow_counting_factory(pcfg) -> SlowCountingBackend:
    return SlowCountingBackend(os.environ["L2L_TEST_CALL_LOG"], float(os.environ.get("L2L_TEST_SLEEP", "0")))


def toy_requests(n: int) -> list[PriorRequest]:
    return [PriorRequest(i, i // 3, "/nonexistent.png", 128, 128, "the left one" if i % 2 else "the right one")
            for i in range(n)]


def calls(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_resume_after_sigkill_recomputes_nothing_finished(tmp_path):
    n, batch = 60, 4
    log = tmp_path / "calls.txt"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from pathlib import Path
        from test_prior_cache import make_cfg, slow_counting_factory, toy_requests
        from l2l_ray.priors.pipeline import compute_priors
        cfg = make_cfg(Path({str(tmp_path)!r}), batch_size={batch})
        compute_priors(cfg, toy_requests({n}), use_ray=False, backend_factory=slow_counting_factory)
    """)
    env = {**os.environ, "L2L_TEST_CALL_LOG": str(log), "L2L_TEST_SLEEP": "0.15"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stderr=subprocess.PIPE)
    cache = PriorCache(make_cfg(tmp_path, batch_size=batch))
    deadline = time.time() + 45
    while len(cache.parts()) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    finished = set(cache.table()["sent_id"].to_pylist())
    first_calls = calls(log)
    assert 3 * batch <= len(finished) < n and len(finished) % batch == 0
    assert len(first_calls) - len(finished) <= batch  # at most the batch in flight was lost

    from l2l_ray.priors.pipeline import compute_priors

    os.environ["L2L_TEST_CALL_LOG"], os.environ["L2L_TEST_SLEEP"] = str(log), "0"
    try:
        cfg = make_cfg(tmp_path, batch_size=batch)
        run = compute_priors(cfg, toy_requests(n), use_ray=False, backend_factory=slow_counting_factory)
    finally:
        del os.environ["L2L_TEST_CALL_LOG"], os.environ["L2L_TEST_SLEEP"]
    second_calls = calls(log)[len(first_calls):]
    assert run["cached_before"] == len(finished) and run["computed"] == n - len(finished)
    assert sorted(second_calls) == sorted(set(range(n)) - finished)  # nothing finished was recomputed
    ids = cache.table()["sent_id"].to_pylist()
    assert ids == list(range(n))  # every id exactly once
    loaded = cache.load()
    assert loaded[1].box == (0.0, 0.0, 0.5, 1.0) and loaded[2].box == (0.5, 0.0, 1.0, 1.0)
    assert loaded[1].proposal[:, :2].min() == 255 and loaded[1].proposal[:, 2:].max() == 0
