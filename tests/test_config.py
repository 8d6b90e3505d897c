"""Typed config: YAML round trip, dotted overrides, errors that name the key and the closest valid keys."""

from __future__ import annotations

import pytest
import yaml

from l2l_ray.config import Config, ConfigError, all_keys, apply_overrides, load_config, parse_override

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
