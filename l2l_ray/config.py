"""Typed, validated run configuration: YAML files in ``configs/`` plus dotted ``key=value`` overrides.

    cfg = load_config("configs/synthetic.yaml", ["method=supervised", "data.label_ratio=0.05"])
    cfg.data.label_ratio  # 0.05

The same dotted keys work on the CLI, in ``ray job submit`` entrypoints and in Tune search spaces
(``apply_overrides(cfg, {"semi.ema": 0.99})``). An unknown key or a value of the wrong type raises
``ConfigError`` naming the key and the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("supervised", "mean_teacher", "semires", "l2l")
SYNTHETIC_DATASET = "synthref"


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the key and what to do."""


@dataclass
class DataConfig:
    root: str = "data"  # REFER root: <root>/<dataset>/refs(<split_by>).p and instances.json
    dataset: str = SYNTHETIC_DATASET  # refcoco | refcoco+ | refcocog | synthref (built-in)
    split_by: str = "unc"  # unc | google | umd
    image_dir: str = ""  # folder of instances.json file_names; "" = <root>/<dataset>/images
    label_ratio: float = 0.05  # share of training *images* whose refs are labeled (SemiRES protocol)
    image_size: int = 128  # square model input side, pixels
    synth_images: int = 2000  # images in the built-in synthetic set
    synth_seed: int = 0

    def validate(self) -> None:
        if not 0.0 < self.label_ratio <= 1.0:
            raise ConfigError(f"data.label_ratio={self.label_ratio}: must be in (0, 1], e.g. 0.01 or 0.05")
        if self.image_size < 32:
            raise ConfigError(f"data.image_size={self.image_size}: must be >= 32")

    @property
    def images(self) -> str:
        return self.image_dir or str(Path(self.root) / self.dataset / "images")


@dataclass
class RunSection:
    dir: str = "runs/default"  # the run folder: resolved config, checkpoints, metrics.json
    resume: bool = True  # re-running with the same run.dir continues from the last checkpoint


@dataclass
class PriorsConfig:
    backend: str = "lexical"  # lexical | hf | openai | vllm
    cache_dir: str = ""  # "" = <data.root>/<data.dataset>/priors
    model: str = ""  # hub id or local path (hf / vllm / openai model name)
    family: str = "qwen2.5-vl"  # output convention: qwen2-vl | qwen2.5-vl | qwen3-vl
    prompt_version: str = "v1"
    endpoint: str = "http://127.0.0.1:8000/v1"  # openai backend
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    concurrency: int = 1  # actor pool size (Ray Data) / parallel HTTP requests
    batch_size: int = 32
    num_gpus: float = 0.0  # per prior actor
    tensor_parallel_size: int = 1
    max_tokens: int = 256
    proposal_size: int = 64  # soft proposal side, pixels (stored uint8)
    include_eval: bool = True  # also make priors for labeled and evaluation samples

    def validate(self) -> None:
        if self.backend not in ("lexical", "hf", "openai", "vllm"):
            raise ConfigError(_choice_msg("priors.backend", self.backend, ["lexical", "hf", "openai", "vllm"]))


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny (CPU, from scratch) | lavt_swin_b | ... (see l2l_ray.model.presets)
    guidance: bool = True  # ablation switch: prior guidance injected at every scale
    backbone: str = ""  # timm model name override ("" = preset's)
    text_encoder: str = ""  # transformers id / local path override ("" = preset's)
    pretrained: bool = False  # load backbone / text weights (GPU users; never on the default path)
    width: int = 0  # 0 = preset's channel width


@dataclass
class TrainConfig:
    num_workers: int = 1  # Ray Train workers (0 = in-process, for debugging)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    amp: bool = True  # bf16 autocast on GPU only
    epochs: int = 20  # supervised epochs (also the warm-up length for semi-supervised methods)
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-2
    max_failures: int = 1
    eval_batch_size: int = 64
    num_threads: int = 0  # torch threads per worker (0 = torch default)
    compile: bool = False


@dataclass
class SemiConfig:
    """The self-evolving loop (methods mean_teacher, semires, l2l)."""

    rounds: int = 4
    epochs_per_round: int = 4
    ema: float = 0.99
    threshold: float = 0.9  # mean_teacher confidence threshold
    unlabeled_weight: float = 1.0
    use_priors: bool = True  # ablation: uninformative prior everywhere
    use_rl: bool = True  # ablation: fixed rule on the same candidates
    selector_lr: float = 3e-3
    selector_workers: int = 1
    reward_prior: float = 1.0
    reward_consistency: float = 1.0
    reward_progress: float = 1.0


@dataclass
class TuneSection:
    num_samples: int = 4
    max_concurrent: int = 1
    grace_period: int = 1
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    space: dict = field(default_factory=dict)  # dotted key -> {"type": "loguniform", "low":..,"high":..} | list


@dataclass
class Config:
    method: str = "l2l"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    run: RunSection = field(default_factory=RunSection)
    priors: PriorsConfig = field(default_factory=PriorsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    tune: TuneSection = field(default_factory=TuneSection)

    def validate(self) -> Config:
        if self.method not in METHODS:
            raise ConfigError(_choice_msg("method", self.method, list(METHODS)))
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML, atomically (a file ``load_config`` accepts as is)."""
        from l2l_ray.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def priors_cache_dir(self) -> str:
        return self.priors.cache_dir or str(Path(self.data.root) / self.data.dataset / "priors")


def _choice_msg(key: str, value: Any, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(value), valid, n=3, cutoff=0.3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{key}={value!r} is not valid: choose one of {', '.join(valid)}{hint}"


def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config, e.g. ``['method', 'seed', 'data.root', ...]``."""
    obj = obj if obj is not None else Config()
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        return value if isinstance(value, str) else str(value)
    elif typ is dict or typing.get_origin(typ) is dict:
        if isinstance(value, dict):
            return value
    elif typ is list or typing.get_origin(typ) is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    raise ConfigError(f"{key}={value!r}: expected a value of type {getattr(typ, '__name__', typ)}")


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        if part not in names:
            close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
            hint = f" Closest valid keys: {', '.join(close)}." if close else ""
            raise ConfigError(f"unknown config key {key!r}.{hint} Run `l2l config --keys` for all keys.")
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(obj))
            current = getattr(obj, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
                for k, v in value.items():
                    _set(cfg, f"{key}.{k}", v)
                return
            setattr(obj, part, _coerce(key, value, hints[part]))
        else:
            obj = getattr(obj, part)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        full = f"{prefix}{k}"
        # `tune.space` is itself a dict-valued leaf.
        if isinstance(v, dict) and full != "tune.space":
            out.update(_flatten(v, f"{full}."))
        else:
            out[full] = v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``"data.label_ratio=0.05"`` -> ``("data.label_ratio", 0.05)`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. data.label_ratio=0.05")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Return a validated copy of ``cfg`` with dotted overrides (a dict or ``key=value`` strings)."""
    cfg = Config.from_dict(cfg.to_dict()) if isinstance(cfg, Config) else cfg
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else list(overrides.items())
    for key, value in items:
        _set(cfg, key, value)
    return cfg.validate()


def _from_dict(d: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in _flatten(d).items():
        _set(cfg, key, value)
    return cfg.validate()


Config.from_dict = staticmethod(_from_dict)  # type: ignore[attr-defined]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pick one of configs/*.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys at the top level")
    cfg = _from_dict(data)
    return apply_overrides(cfg, overrides or [])
