"""Typed config: YAML round trip, dotted overrides, errors that name the key and the closest valid keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from l2l_ray.config import Config, ConfigError, all_keys, apply_overrides, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = ["data.root", "data.dataset", "data.split_by", "data.image_dir", "data.label_ratio", "method",
                 "seed", "run.dir", "priors.backend", "priors.cache_dir"]


def test_contract_keys_exist():
    keys = set(all_keys())
    assert set(CONTRACT_KEYS) <= keys


def test_unknown_key_names_closest_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.label_ration'.*data\.label_ratio"):
        load_config(None, ["data.label_ration=0.1"])
    with pytest.raises(ConfigError, match=r"'data.splitby'.*data\.split_by"):
        apply_overrides(Config(), {"data.splitby": "unc"})


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  roots: /x\n")
    with pytest.raises(ConfigError, match=r"'data.roots'.*data\.root"):
        load_config(p)


@pytest.mark.parametrize("override,match", [
    ("seed=abc", r"seed='abc': expected a value of type int"),
    ("data.label_ratio=fast", r"data.label_ratio='fast': expected a value of type float"),
    ("train.use_gpu=maybe", r"train.use_gpu='maybe': expected a value of type bool"),
    ("data.label_ratio=0", r"data.label_ratio=0.0: must be in \(0, 1\]"),
    ("method=semi_res", r"method='semi_res' is not valid.*did you mean semires"),
    ("priors.backend=vlm", r"priors.backend='vlm'.*did you mean vllm"),
    ("data=3", r"data: expected a mapping"),
])
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_override_parsing_and_coercion():
    assert parse_override("data.label_ratio=0.05") == ("data.label_ratio", 0.05)
    assert parse_override("data.image_dir=") == ("data.image_dir", "")
    cfg = load_config(None, ["seed=3", "data.label_ratio=1", "train.use_gpu=true", "data.root=123"])
    assert cfg.seed == 3 and cfg.data.label_ratio == 1.0 and isinstance(cfg.data.label_ratio, float)
    assert cfg.train.use_gpu is True and cfg.data.root == "123"
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("seed")


def test_overrides_return_a_copy():
    base = Config()
    new = apply_overrides(base, {"seed": 5, "semi.ema": 0.9})
    assert (base.seed, base.semi.ema) == (0, 0.99) and (new.seed, new.semi.ema) == (5, 0.9)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["method=semires", "seed=7", "data.dataset=refcoco", "data.label_ratio=0.01",
                             "run.dir=runs/x", "tune.space={semi.ema: [0.9, 0.99]}"])
    path = tmp_path / "sub" / "resolved.yaml"
    cfg.save(path)
    assert yaml.safe_load(path.read_text())["data"]["label_ratio"] == 0.01
    again = load_config(path)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.tune.space == {"semi.ema": [0.9, 0.99]}
    # overrides on top of a saved file
    assert load_config(path, ["seed=8"]).seed == 8


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize("override,match", [
    ("train.batch_size=0", r"train.batch_size=0: must be >= 1"),
    ("train.epochs=-1", r"train.epochs=-1: must be >= 1"),
    ("train.lr=-0.001", r"train.lr=-0.001: must be > 0"),
    ("train.lr=0", r"train.lr=0.0: must be > 0"),
    ("semi.rounds=-2", r"semi.rounds=-2: must be >= 0"),
    ("train.steps_per_epoch=-1", r"train.steps_per_epoch=-1: must be >= 0"),
    ("data.split_by=xyz", r"data.split_by='xyz' is not valid: choose one of unc, google, umd"),
    ("model.preset=huge", r"model.preset='huge' is not valid: choose one of tiny, lavt_swin_b, convnext_b"),
    ("semi.ema=1.5", r"semi.ema=1.5: must be in \[0, 1\]"),
    ("semi.threshold=1", r"semi.threshold=1.0: must be in \[0.5, 1\)"),
    ("semi.selector_pixel_stride=3", r"semi.selector_pixel_stride=3 is not valid: choose one of 1, 2, 4, 8"),
    ("priors.family=llava", r"priors.family='llava' is not valid: choose one of qwen2-vl"),
    ("priors.max_pixels=100", r"priors.max_pixels=100: must be >= priors.min_pixels=3136"),
    ("tune.reduction_factor=1", r"tune.reduction_factor=1: must be >= 2"),
    ("experiment.label_ratios=[0.01, 2]", r"experiment.label_ratios=2: must be in \(0, 1\]"),
    ("experiment.seeds=[0, -1]", r"experiment.seeds=-1: must be >= 0"),
])
def test_out_of_range_values_name_the_key_value_and_range(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_rules_tying_keys_together():
    with pytest.raises(ConfigError, match=r"data.dataset='refcocog' with data.split_by='unc'.*refcocog/umd"):
        load_config(None, ["data.dataset=refcocog", "data.split_by=unc"])
    with pytest.raises(ConfigError, match=r"train.batch_size=1: method mean_teacher needs >= 2"):
        load_config(None, ["method=mean_teacher", "train.batch_size=1"])
    assert load_config(None, ["method=supervised", "train.batch_size=1"]).train.batch_size == 1
    with pytest.raises(ConfigError, match=r"data.image_size=100 must be divisible by semi.selector_pixel_stride=8"):
        load_config(None, ["data.image_size=100", "semi.selector_pixel_stride=8"])
    # zero steps_per_epoch means one pass over the rows; zero rounds means the warm-up alone
    assert load_config(None, ["train.steps_per_epoch=0", "semi.rounds=0"]).semi.rounds == 0


def test_every_numeric_and_enumerated_key_has_a_rule():
    from l2l_ray.config import RULES, _get

    cfg = Config()
    numeric = [k for k in all_keys() if isinstance(_get(cfg, k), (int, float)) and not isinstance(_get(cfg, k), bool)]
    assert set(RULES) <= set(all_keys())  # no rule for a renamed or removed key
    assert sorted(set(numeric) - set(RULES)) == []
    cfg.validate()  # every default passes its own rule


def test_choices_match_the_registries():
    from l2l_ray.config import MLLM_FAMILIES, PRESETS, PRIOR_BACKENDS, PROMPT_VERSIONS, PROPOSAL_METHODS, SPLIT_BYS
    from l2l_ray.data.refer import SCHEMES
    from l2l_ray.model.presets import preset_names
    from l2l_ray.priors import (
        backends,  # noqa: F401  (fills the backend registry)
        proposals,
    )
    from l2l_ray.priors.base import BACKENDS
    from l2l_ray.priors.parsing import FAMILIES
    from l2l_ray.priors.prompts import PROMPTS

    assert {(d, s) for d, ss in SPLIT_BYS.items() for s in ss} == set(SCHEMES)
    assert sorted(PRESETS) == preset_names()
    assert sorted(PRIOR_BACKENDS) == sorted(BACKENDS)
    assert MLLM_FAMILIES == tuple(FAMILIES)
    assert PROMPT_VERSIONS == tuple(PROMPTS)
    assert PROPOSAL_METHODS == tuple(proposals.PROPOSAL_METHODS)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_loads(path):
    load_config(REPO / path)


def test_cli_refuses_a_bad_value_before_anything_runs():
    p = subprocess.run([sys.executable, "-m", "l2l_ray", "config", "--config", "configs/synthetic.yaml",
                        "train.batch_size=0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "train.batch_size=0: must be >= 1" in p.stderr and "Traceback" not in p.stderr + p.stdout
