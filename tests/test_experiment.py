"""`l2l experiment`: the grid, ablation validation, and the table read back from metrics.json files."""

from __future__ import annotations

import pytest

from l2l_ray.config import ConfigError, load_config
from l2l_ray.experiment import planned_runs, results_table, run_name, run_overrides
from l2l_ray.io import atomic_write_json


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run.dir={tmp_path}", "experiment.methods=[supervised, semires, l2l]",
                              "experiment.label_ratios=[0.01, 0.05]", "experiment.seeds=[0, 1]", *extra])


def test_grid_has_methods_ablations_and_ceiling(tmp_path):
    cfg = _cfg(tmp_path, "experiment.ablations={l2l_no_rl: {method: l2l, semi.use_rl: false}}")
    runs = planned_runs(cfg)
    # (methods guided + unguided + ablations) x ratios x seeds + ceiling (both halves) x seeds + prior row
    assert len(runs) == (3 + 3 + 1) * 2 * 2 + 2 * 2 + 1
    names = [run_name(r) for r in runs]
    assert len(set(names)) == len(names)
    assert "l2l_no_rl_p0.05_s1" in names and "supervised_p1_s0" in names and "prior_only_p1_s0" in names
    ab = next(r for r in runs if r["row"] == "l2l_no_rl")
    ov = run_overrides(ab, tmp_path / "x")
    assert ov["semi.use_rl"] is False and ov["method"] == "l2l" and ov["run.dir"] == str(tmp_path / "x")
    ung = next(r for r in runs if r["row"] == "semires_unguided")
    assert ung["overrides"] == {"method": "semires", "model.guidance": False}
    assert "supervised_unguided_p1_s1" in names


def test_corruption_rows_in_the_grid(tmp_path):
    cfg = _cfg(tmp_path, "experiment.ablations={l2l_no_rl: {method: l2l, semi.use_rl: false}}",
               "experiment.corruption_rates=[0.25, 0.5]", "experiment.corruption_rows=[l2l, l2l_no_rl]",
               "experiment.corruption_seeds=[0, 1]", "experiment.unguided=false")
    runs = [r for r in planned_runs(cfg) if "_c" in r["row"]]
    assert len(runs) == 2 * 2 * 2 + 2  # rates x rows x seeds + the prior alone per rate
    r = next(r for r in runs if r["row"] == "l2l_no_rl_c0.5" and r["seed"] == 1)
    assert r["overrides"] == {"method": "l2l", "semi.use_rl": False, "priors.corruption": 0.5}
    assert r["data.label_ratio"] == 0.05
    with pytest.raises(ConfigError, match="corruption_rows"):
        _cfg(tmp_path, "experiment.corruption_rates=[0.5]", "experiment.corruption_rows=[nope]")


@pytest.mark.parametrize("ablation, words", [
    ("{l2l: {method: l2l}}", "new name"),
    ("{x: {model.guidnce: false}}", "model.guidance"),
    ("{x: {seed: 3}}", "set by the experiment grid"),
    ("{x: {}}", "mapping of dotted keys"),
])
def test_bad_ablation_names_the_problem(tmp_path, ablation, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(tmp_path, f"experiment.ablations={ablation}")


def _metrics(val: float, test: float, rounds=()):
    split = lambda v: {"mIoU": v, "oIoU": v - 0.1, "prec@0.5": 0.0, "prec@0.7": 0.0, "prec@0.9": 0.0,  # noqa: E731
                       "n": 10}
    return {"splits": {"val": split(val), "testA": split(test)}, "rounds": list(rounds), "timing": {"total_s": 60.0},
            "warmup_val": {"mIoU": 0.2} if rounds else None}


def test_table_means_spreads_and_lead(tmp_path):
    cfg = _cfg(tmp_path)
    values = {("supervised", 0.01): (0.10, 0.20), ("semires", 0.01): (0.30, 0.30), ("l2l", 0.01): (0.40, 0.50),
              ("supervised", 0.05): (0.20, 0.20), ("prior_only", 1.0): (0.35, None)}
    rnd = {"round": 1, "val": {"mIoU": 0.45}, "trusted_pixel_share": 0.8, "rejected_share": 0.1,
           "pseudo_iou_diag": 0.6, "reward": {"total": 1.5, "prior": 0.7}, "cand_share/proposal": 0.9,
           "cand_share/reject": 0.1}
    for (row, p), (s0, s1) in values.items():
        for seed, v in ((0, s0), (1, s1)):
            if v is None:
                continue
            r = {"row": row, "data.label_ratio": p, "seed": seed}
            atomic_write_json(tmp_path / run_name(r) / "metrics.json",
                              _metrics(v, v, [rnd] if row != "supervised" else []))
    text = results_table(cfg, "l2l experiment")
    assert text.startswith("# Results on the built-in synthetic data")
    assert "| supervised | yes | 0.01 | 2 | 15.0 ± 5.0 | 5.0 ± 5.0 |" in text
    assert "| l2l | yes | 0.01 | 2 | 45.0 ± 5.0 |" in text
    assert "| semires | yes | 0.01 | 2 | 30.0 ± 0.0 |" in text
    assert ("labels 0.01: l2l val mIoU 45.0; difference to supervised +30.0 (larger std 5.0), semires +15.0 "
            "(larger std 5.0), prior_only +10.0 (larger std 5.0)") in text
    assert "| prior_only | - | none (no training) | 1 | 35.0 |" in text
    assert "l2l | 0.01 | 1 | 0.450 | 0.800 | 0.100 | 0.600 | 1.500 | 0.700 | n/a" in text
    assert "proposal 0.90" in text
    assert "0.05: l2l" not in text  # no l2l run at 5%: no comparison line
    assert "| supervised | yes | 0.05 | 2 | 20.0 ± 0.0 |" in text


def test_gap_closed_corruption_table_and_plots(tmp_path):
    cfg = _cfg(tmp_path, "experiment.corruption_rates=[0.5]", "experiment.corruption_rows=[l2l, semires]",
               "experiment.corruption_seeds=[0]", "experiment.label_ratios=[0.05]", "experiment.seeds=[0]")
    values = {("supervised", 0.05): 0.20, ("supervised", 1.0): 0.60, ("l2l", 0.05): 0.50, ("semires", 0.05): 0.40,
              ("l2l_c0.5", 0.05): 0.45, ("semires_c0.5", 0.05): 0.20}
    rnd = {"round": 1, "val": {"mIoU": 0.5}}
    for (row, p), v in values.items():
        r = {"row": row, "data.label_ratio": p, "seed": 0}
        atomic_write_json(tmp_path / run_name(r) / "metrics.json", _metrics(v, v, [rnd] if "l2l" in row else []))
    text = results_table(cfg, "l2l experiment")
    assert "closed: 75%" in text  # (50 - 20) / (60 - 20)
    assert "| l2l | 50.0 | 45.0 | 5.0 |" in text and "| semires | 40.0 | 20.0 | 20.0 |" in text
    assert "| l2l_c0.5 | yes" not in text  # corruption rows: their own table (and the round log), not the main one
    from l2l_ray.experiment import _groups, write_plots

    names = write_plots(cfg, _groups(cfg), tmp_path / "results.md")
    assert names == ["results_rounds.png", "results_corruption.png"]
    assert all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in names)


def test_title_names_a_refer_dataset(tmp_path):
    cfg = _cfg(tmp_path, "data.dataset=refcoco", "data.root=/data/refer")
    assert results_table(cfg, "l2l experiment").startswith("# Results on refcoco (unc) (`/data/refer`")
