"""The ``l2l priors`` pipeline: requests from the data, the batch guard, ``load_priors`` for training,
the Ray Data actor pool and the ``ray.data.llm``-style branch on the local cluster, and ``run_priors``
end to end on a tiny synthetic set with the lexical backend."""

from __future__ import annotations

import numpy as np
import pytest

from l2l_ray.config import Config, PriorsConfig
from l2l_ray.priors.base import PriorRequest
from l2l_ray.priors.cache import PriorCache, prior_to_row
from l2l_ray.priors.pipeline import (
    CacheMissError,
    _actor_resources,
    compute_priors,
    format_summary,
    load_priors,
    requests_from_bundle,
    run_backend_batch,
    summarize,
)
from l2l_ray.records import EvalSample, LabeledSample, Prior, Sentence, UnlabeledSample


class HalfBoxBackend:
    """A real (tiny) backend: "left" -> the left half, "right" -> the right half, else no box."""

    name, model = "toy", ""

    def __init__(self, pcfg: PriorsConfig | None = None, size: int = 4):
        self.size = size

    def one(self, r: PriorRequest) -> Prior:
        s = self.size
        prop = np.zeros((s, s), np.uint8)
        if "left" in r.sentence:
            box, prop[:, : s // 2] = (0.0, 0.0, 0.5, 1.0), 255
        elif "right" in r.sentence:
            box, prop[:, s // 2:] = (0.5, 0.0, 1.0, 1.0), 255
        else:
            return Prior(r.sent_id, r.ref_id, status="no_box", raw_text=r.sentence, backend=self.name)
        return Prior(r.sent_id, r.ref_id, box=box, score=0.9, spatial=(r.sentence.split()[-1],),
                     raw_text=r.sentence, proposal=prop, backend=self.name)

    def __call__(self, requests: list[PriorRequest]) -> list[Prior]:
        return [self.one(r) for r in requests]

    def process_dataset(self, ds):
        """The ``ray.data.llm`` contract used for backend "vllm": request rows in, cache rows out."""
        return ds.map(lambda row: prior_to_row(self.one(PriorRequest(**row))))


class RaisingBackend(HalfBoxBackend):
    def __call__(self, requests):
        raise ConnectionError("engine died")


def make_cfg(tmp_path, **priors) -> Config:
    cfg = Config()
    cfg.priors.cache_dir = str(tmp_path / "cache")
    for k, v in priors.items():
        setattr(cfg.priors, k, v)
    return cfg


def requests(n: int) -> list[PriorRequest]:
    words = ["the left one", "the right one", "something"]
    return [PriorRequest(i, 10 + i // 2, "/x.png", 64, 64, words[i % 3]) for i in range(n)]


RLE = {"size": [2, 2], "counts": "04"}


def test_requests_from_bundle_dedupes_and_respects_include_eval():
    from l2l_ray.data import DatasetBundle

    unl = [UnlabeledSample(1, 5, "a.png", 10, 20, (Sentence(11, "left"), Sentence(12, "right")))]
    lab = [LabeledSample(2, 6, "b.png", 30, 40, (Sentence(21, "big"),), RLE)]
    ev = {"val": [EvalSample(3, 31, 7, "c.png", 50, 60, "small", RLE), EvalSample(3, 11, 7, "c.png", 5, 6, "dup", RLE)]}
    bundle = DatasetBundle(labeled=lab, unlabeled=unl, eval=ev)
    only_unl = requests_from_bundle(bundle, include_eval=False)
    assert only_unl == [PriorRequest(11, 1, "a.png", 10, 20, "left"), PriorRequest(12, 1, "a.png", 10, 20, "right")]
    everything = requests_from_bundle(bundle, include_eval=True)
    assert [r.sent_id for r in everything] == [11, 12, 21, 31]  # sent 11 again in val: first one wins
    assert everything[2] == PriorRequest(21, 2, "b.png", 30, 40, "big")
    assert everything[3] == PriorRequest(31, 3, "c.png", 50, 60, "small")


def test_batch_guard_turns_exceptions_into_counted_failures():
    out = run_backend_batch(RaisingBackend(), requests(3))
    assert [p.status for p in out] == ["model_error"] * 3 and "engine died" in out[0].raw_text
    assert [p.sent_id for p in out] == [0, 1, 2]

    class Shuffled(HalfBoxBackend):
        def __call__(self, reqs):
            return super().__call__(reqs)[::-1]

    with pytest.raises(RuntimeError, match="one Prior per request, in order"):
        run_backend_batch(Shuffled(), requests(3))


def test_load_priors_never_computes_and_says_what_to_run(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(CacheMissError, match=r"no priors cached in .*lexical_none_v1.*l2l priors --config"):
        load_priors(cfg)
    compute_priors(cfg, requests(6), use_ray=False, backend_factory=HalfBoxBackend)
    assert sorted(load_priors(cfg)) == list(range(6))
    got = load_priors(cfg, [1, 2])
    assert got[1].box == (0.5, 0.0, 1.0, 1.0) and got[2].status == "no_box"
    assert np.allclose(got[2].soft_mask(4), 0.5)  # a failed prior is uninformative, never zeros
    with pytest.raises(CacheMissError, match=r"2 of 3 sentences have no prior .*sent_id \[6, 7\]"):
        load_priors(cfg, [0, 6, 7])
    assert sorted(load_priors(cfg, [0, 6, 7], allow_missing=True)) == [0]


def test_default_cache_is_outside_the_data_and_names_the_former_folder(tmp_path, private_cache, capsys):
    """The default cache is under $L2L_CACHE (conftest), keyed by data.root; a cache at the former default,
    <data.root>/<dataset>/priors, is named (not silently recomputed) and reused with priors.cache_dir."""
    cfg = Config()
    cfg.data.root = str(tmp_path / "data")
    assert cfg.priors_cache_dir.startswith(private_cache) and str(tmp_path) not in cfg.priors_cache_dir
    old = tmp_path / "data" / cfg.data.dataset / "priors"
    legacy = make_cfg(tmp_path)
    legacy.data.root, legacy.priors.cache_dir = cfg.data.root, str(old)
    compute_priors(legacy, requests(4), use_ray=False, backend_factory=HalfBoxBackend)
    capsys.readouterr()
    compute_priors(cfg, requests(4), use_ray=False, backend_factory=HalfBoxBackend)
    assert f"priors.cache_dir={old}" in capsys.readouterr().err
    again = compute_priors(legacy, requests(4), use_ray=False, backend_factory=HalfBoxBackend)
    assert again["cached_before"] == 4 and again["quarantined_parts"] == 0


def test_summary_counts_and_table():
    from l2l_ray.priors.quality import prior_quality

    priors = {0: Prior(0, 0, box=(0, 0, 1, 1)), 1: Prior(1, 0, status="no_box"), 2: Prior(2, 0, status="no_box")}
    s = summarize(priors, requests(4))
    assert s == {"coverage": 0.25, "failures": {"no_box": 2, "not_cached": 1}}
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True  # the left half
    from l2l_ray.masks import encode_rle

    truth = [EvalSample(0, 0, 1, "x.png", 8, 8, "left", encode_rle(mask)),
             EvalSample(0, 1, 1, "x.png", 8, 8, "left", encode_rle(mask))]
    q = prior_quality(priors, truth, image_size=8)
    # truth box (0, 0, .5, 1): prior (whole box 0.5, no box 0) / 2; centre .125 / .625; whole .5 / 1
    assert q["box_iou"] == {"prior": 0.25, "centre_box": 0.2, "whole_image": 0.5}
    text = format_summary({"backend": "toy", "model": "", "requested": 4, "cached_before": 0, "computed": 4,
                           "seconds": 2.0, "samples_per_s": 2.0, **s, "quality": q})
    assert "coverage (ok priors) 25.0%" in text and "no_box 2, not_cached 1" in text and "2.0 samples/s" in text
    assert "centre_box" in text and "whole_image" in text and "0.250" in text


def test_actor_pool_fits_the_cluster():
    assert _actor_resources(PriorsConfig(concurrency=1), 2.0) == {"num_cpus": 1.0, "num_gpus": None,
                                                                  "pool_size": 1}
    assert _actor_resources(PriorsConfig(concurrency=4), 2.0)["num_cpus"] == 0.5
    # openai: one actor whose thread pool makes priors.concurrency requests at a time
    assert _actor_resources(PriorsConfig(backend="openai", concurrency=16), 2.0) == {
        "num_cpus": 0.25, "num_gpus": None, "pool_size": 1}
    assert _actor_resources(PriorsConfig(concurrency=3), 0.0)["num_cpus"] == round(0.25 / 3, 3)
    assert _actor_resources(PriorsConfig(backend="hf", num_gpus=1.0), 8.0)["num_gpus"] == 1.0


# --- on the local Ray cluster ----------------------------------------------------------------------------

@pytest.mark.ray
def test_ray_data_actor_pool_fills_cache_then_skips(tmp_path, by_value):
    cfg = make_cfg(tmp_path, batch_size=8, concurrency=2)
    run = compute_priors(cfg, requests(50), backend_factory=HalfBoxBackend)
    assert run["computed"] == 50 and run["cached_before"] == 0
    cache = PriorCache(cfg)
    assert len(cache.parts()) >= 2  # written batch by batch as they finished, not once at the end
    priors = cache.load()
    assert sorted(priors) == list(range(50))
    assert priors[0].box == (0.0, 0.0, 0.5, 1.0) and priors[0].proposal[:, :2].min() == 255
    assert priors[4].box == (0.5, 0.0, 1.0, 1.0) and priors[5].status == "no_box"
    again = compute_priors(cfg, requests(60), backend_factory=HalfBoxBackend)
    assert again["cached_before"] == 50 and again["computed"] == 10
    assert PriorCache(cfg).table()["sent_id"].to_pylist() == list(range(60))


@pytest.mark.ray
def test_processor_branch_gets_rows_directly(tmp_path, by_value):
    cfg = make_cfg(tmp_path, backend="vllm", batch_size=16)
    run = compute_priors(cfg, requests(20), backend_factory=HalfBoxBackend)
    priors = PriorCache(cfg).load()
    assert run["computed"] == 20 and sorted(priors) == list(range(20))
    assert priors[3].box == (0.0, 0.0, 0.5, 1.0) and priors[3].spatial == ("one",)
    assert priors[2].status == "no_box" and priors[2].proposal is None


@pytest.mark.ray
@pytest.mark.e2e
def test_run_priors_lexical_on_tiny_synthetic_set(tmp_path, ray_session):
    pytest.importorskip("l2l_ray.priors.backends", reason="backend registry module not written yet")
    pytest.importorskip("l2l_ray.priors.quality", reason="prior_quality not written yet")
    from l2l_ray.config import apply_overrides
    from l2l_ray.priors.pipeline import run_priors

    cfg = apply_overrides(Config(), {"data.root": str(tmp_path / "data"), "data.synth_images": 24,
                                     "data.label_ratio": 0.25, "priors.batch_size": 16})
    summary = run_priors(cfg)
    n = summary["requested"]
    assert n > 0 and summary["computed"] == n and summary["cached_before"] == 0
    assert 0.0 < summary["coverage"] <= 1.0 and "quality" in summary
    assert summary["coverage"] + sum(summary["failures"].values()) / n == pytest.approx(1.0, abs=1e-3)
    again = run_priors(cfg)
    assert again["computed"] == 0 and again["coverage"] == summary["coverage"]


def test_ray_env_flags(monkeypatch):
    from l2l_ray.ray_utils import _env_flag

    monkeypatch.setenv("L2L_RAY_DASHBOARD", "1")
    monkeypatch.setenv("L2L_RAY_LOG_TO_DRIVER", "off")
    assert _env_flag("L2L_RAY_DASHBOARD", False) is True and _env_flag("L2L_RAY_LOG_TO_DRIVER", True) is False
    assert _env_flag("L2L_RAY_UNSET_FLAG", True) is True


@pytest.mark.ray
def test_ensure_ray_reuses_the_running_cluster(ray_session):
    from l2l_ray.ray_utils import ensure_ray

    assert ensure_ray(Config())["CPU"] == 2.0  # the session's cluster, not a new one
