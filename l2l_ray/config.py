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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("supervised", "mean_teacher", "semires", "l2l")
SYNTHETIC_DATASET = "synthref"
# The registries' names, kept here as literals so this module imports nothing heavy; tests/test_config.py
# checks each against its registry (l2l_ray.data.refer.SCHEMES, model.presets, priors.backends, ...).
SPLIT_BYS = {"refcoco": ("unc", "google"), "refcoco+": ("unc", "google"), "refcocog": ("umd", "google"),
             SYNTHETIC_DATASET: ("unc",)}  # dataset -> its REFER split schemes
PRESETS = ("tiny", "lavt_swin_b", "convnext_b")
PRIOR_BACKENDS = ("lexical", "hf", "openai", "vllm")
MLLM_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
PROMPT_VERSIONS = ("v1",)
PROPOSAL_METHODS = ("grabcut", "box")


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
        if self.split_by not in SPLIT_BYS.get(self.dataset, ()):
            schemes = ", ".join(f"{d}/{s}" for d, ss in SPLIT_BYS.items() for s in ss)
            raise ConfigError(f"data.dataset={self.dataset!r} with data.split_by={self.split_by!r} is not a known "
                              f"REFER scheme; choose one of {schemes}")

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
    cache_dir: str = ""  # "" = $L2L_CACHE/priors/<data.root name>-<hash> (L2L_CACHE: ~/.cache/l2l-ray); never data.root
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
    # Soft proposals (l2l_ray.priors.proposals; measured choice in bench/prior_quality.py):
    proposal_method: str = "grabcut"  # grabcut (box-initialised GrabCut blended with a box prior) | box
    proposal_grabcut_iters: int = 1  # GrabCut EM iterations (2-3 measured no better on the synthetic set)
    proposal_work_size: int = 48  # GrabCut window around the box, downscaled to at most this many px a side
    proposal_blend: float = 0.6  # weight of GrabCut's mask vs the smooth box prior (0 = box only)
    proposal_softness: float = 0.08  # box prior edge falloff, fraction of the box side
    proposal_margin: float = 0.1  # "probably background" band around the box, fraction of the box side
    proposal_point_radius: float = 0.04  # normalised radius of point seeds / of a box made from points only
    proposal_point_boost: float = 0.5  # how far a point pulls its neighbourhood towards 1
    # Lexical prior (l2l_ray.priors.lexical):
    lexical_work_size: int = 128  # images are analysed on a square copy this many pixels wide
    include_eval: bool = True  # also make priors for labeled and evaluation samples
    # Experiment knob (l2l_ray/priors/corrupt.py): this share of sentences gets a bad prior after loading (the prior
    # of another ref of the same image, or "no prior" for corruption_drop of them); ids only, never a mask
    corruption: float = 0.0
    corruption_drop: float = 0.2
    # MLLM backends (hf / openai / vllm); see docs/priors.md
    min_pixels: int = 3136  # Qwen-VL smart_resize: min pixels of the model input (processor default 56*56)
    max_pixels: int = 1003520  # ... max pixels (1280*28*28); images are resized to this before they are sent
    structured: bool = True  # constrain answers to the JSON schema (vllm structured_outputs, openai response_format)
    retry_backoff_s: float = 0.5  # openai: delay before the first retry, doubled for each further retry
    device: str = "auto"  # hf: auto (cuda if available, else cpu) | cpu | cuda:0 ...
    dtype: str = "auto"  # hf: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    max_model_len: int = 8192  # vllm: engine context length (text + image tokens)
    gpu_memory_utilization: float = 0.9  # vllm: share of GPU memory the engine may take
    accelerator_type: str = ""  # vllm: Ray accelerator type, e.g. L4 or H100 ("" = any GPU)

    def validate(self) -> None:
        if self.max_pixels < self.min_pixels:
            raise ConfigError(f"priors.max_pixels={self.max_pixels}: must be >= priors.min_pixels={self.min_pixels}")


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny (CPU, from scratch) | lavt_swin_b | ... (see l2l_ray.model.presets)
    guidance: bool = True  # ablation switch: prior guidance injected at every scale
    backbone: str = ""  # transformers hub id / local path of the visual backbone override ("" = preset's)
    text_encoder: str = ""  # transformers id / local path override ("" = preset's)
    pretrained: bool = False  # load backbone / text weights (GPU users; never on the default path)
    width: int = 0  # 0 = preset's channel width
    # Segmenter size knobs (l2l_ray.model.presets; 0 = the preset's value). Tests build the large presets
    # at a tiny size with these; users rarely need them.
    encoder_width: int = 0  # backbone stage-1 channels (Swin embed_dim, ConvNeXt hidden_sizes[0]; doubles per stage)
    encoder_depth: int = 0  # caps the blocks per backbone stage
    text_width: int = 0  # text encoder hidden size (from-scratch encoders only)
    text_layers: int = 0  # text encoder layers (from-scratch encoders only)
    max_tokens: int = 0  # tokens per sentence incl. [CLS]/[SEP] (longer sentences are truncated)
    aux_weight: float = 0.4  # weight of the auxiliary losses at the coarser decoder scales
    prior_residual: float = 0.0  # > 0 (with guidance): logits += gain * logit(proposal); learnable gain starts here


@dataclass
class TrainConfig:
    num_workers: int = 1  # Ray Train workers (0 = in-process, for debugging)
    keep_learner: bool = True  # the driver trains every stage on one long-lived Ray Train run (no start-up per
    #                            stage; l2l_ray/train/learner.py); false = a TorchTrainer per stage
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
    # Schedule and bookkeeping (l2l_ray.train):
    steps_per_epoch: int = 0  # 0 = one pass over the training rows; >0 = fixed steps (data cycled), so
    #                           runs at different label ratios train equally long
    warmup_steps: int = 0  # linear lr warm-up, then poly decay to 0 over the stage
    poly_power: float = 0.9  # lr = base * (1 - step / total) ** poly_power (LAVT's schedule)
    grad_clip: float = 1.0  # max grad norm (0 = off)
    log_every_s: float = 10.0  # progress line interval while training
    inject_failure_epoch: int = -1  # fault-tolerance check: a worker raises once at the start of this epoch
    hflip: float = 0.5  # per-row probability of a horizontal flip with "left" <-> "right" swapped in the sentence


@dataclass
class SemiConfig:
    """The self-evolving loop (methods mean_teacher, semires, l2l)."""

    rounds: int = 4
    epochs_per_round: int = 4
    unlabeled_per_round: int = 1500  # unlabeled (ref, sentence) pairs pseudo-labelled per round (0 = all)
    gallery_size: int = 8  # fixed val pairs drawn in the report's gallery
    ema: float = 0.99
    threshold: float = 0.9  # mean_teacher confidence threshold
    unlabeled_weight: float = 1.0
    use_priors: bool = True  # ablation: uninformative prior everywhere
    use_rl: bool = True  # ablation: fixed rule on the same candidates
    selector_lr: float = 3e-3
    selector_workers: int = 1
    reward_prior: float = 1.0
    reward_consistency: float = 1.0
    reward_credit: float = 1.0  # held-out credit of the trusted labels (selection/rewards.py::credit_map)
    # --- selection (l2l_ray/selection; see docs/selection.md) ---
    reward_truth: float = 2.0  # IoU with the TRUE mask, only on held-out LABELED pairs (practice episodes)
    reward_wrong_pixel: float = 3.0  # pixel reward of trusting a wrong label is -this (a right one is +1)
    reject_iou: float = 0.3  # a rejected pair is paid as if its label had this IoU in every IoU term
    selector_heldout: float = 0.25  # share of labeled images in each practice fold (round(1/this) folds)
    practice_rotation: bool = True  # round r practises on fold r, every other stage trains on it (false: one fold
    #                                 held out of every stage, the old way)
    selector_practice_steps: int = 60  # REINFORCE steps per round on the held-out labeled pairs
    explore_share: float = 0.3  # exploring rounds: this share of pairs acts by a policy sample (the update's
    #                             episodes), the rest greedily (1.0 = all sampled)
    selector_update_epochs: int = 1  # passes over a round's unlabeled episodes in the delayed update
    selector_minibatch: int = 64  # pairs per selector gradient step
    selector_max_update_pairs: int = 1024  # subsample of a round's unlabeled episodes used for the update
    selector_entropy: float = 0.01  # entropy bonus of the candidate head
    selector_pixel_coef: float = 1.0  # weight of the per-pixel trust loss
    selector_pixel_stride: int = 4  # coarse trust path runs at size/stride (plus a per-pixel fine term)
    selector_hidden: int = 64  # width of the candidate encoder (pixel head uses hidden // 4)
    selector_cpus: float = 0.5  # Ray CPUs reserved per SelectorActor (it idles while the student trains)
    selector_threads: int = 1  # torch threads in a SelectorActor (0 = Ray default); 1 is fastest on a busy 2-core box
    teacher_actors: int = 0  # teacher inference on this many Ray actors (0 = in the driver / one GPU task)
    teacher_cpus: float = 0.5  # Ray CPUs reserved per teacher actor (it idles while the student trains)
    teacher_threads: int = 1  # torch threads per teacher actor (0 = Ray default)
    semires_iou: float = 0.5  # SemiRES IOM: proposal replaces the teacher mask when IoU > this
    semires_pwa_var: float = 0.1  # SemiRES PWA: variance (not sigma) of N(p; 0.5, var), as in its code



@dataclass
class TuneSection:
    num_samples: int = 4
    max_concurrent: int = 1
    grace_period: int = 1
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    space: dict = field(default_factory=dict)  # dotted key -> {"type": "loguniform", "low":..,"high":..} | list


@dataclass
class ExperimentSection:
    """``l2l experiment``: methods x label ratios x seeds on one config, then the results table."""

    methods: list = field(default_factory=lambda: ["supervised", "mean_teacher", "semires", "l2l"])
    label_ratios: list = field(default_factory=lambda: [0.01, 0.05])
    seeds: list = field(default_factory=lambda: [0, 1])
    ceiling: bool = True  # also run supervised at label_ratio 1.0 (per seed)
    ceiling_seeds: list = field(default_factory=list)  # seeds of the ceiling runs ([] = experiment.seeds)
    # name -> {dotted key: value}: extra rows, each run like `methods` at every ratio and seed, e.g.
    # {l2l_no_guidance: {method: l2l, model.guidance: false}} (a dict-valued leaf, like tune.space)
    ablations: dict = field(default_factory=dict)
    prior_row: bool = True  # also score the prior's proposal alone (no segmenter, no labels)
    unguided: bool = True  # also every method (and the ceiling) with model.guidance=false: rows <method>_unguided
    # Bad priors (priors.corruption): rows <row>_c<rate> for these rows (methods or ablations) at one label ratio
    corruption_rates: list = field(default_factory=list)  # e.g. [0.25, 0.5]; rate 0 is the main grid's row
    corruption_rows: list = field(default_factory=lambda: ["l2l", "l2l_no_rl", "semires", "mean_teacher"])
    corruption_ratio: float = 0.05
    corruption_seeds: list = field(default_factory=lambda: [0, 1])
    out: str = "docs/results.md"

    def validate(self) -> None:
        for m in self.methods:
            _check("experiment.methods", m, METHODS)
        for rate in self.corruption_rates:
            _check("experiment.corruption_rates", rate, "[0, 1]")
        _check("experiment.corruption_ratio", self.corruption_ratio, "(0, 1]")
        for seed in self.corruption_seeds:
            _check("experiment.corruption_seeds", seed, RULES["seed"])
        for seed in self.ceiling_seeds:
            _check("experiment.ceiling_seeds", seed, RULES["seed"])
        unknown = [r for r in self.corruption_rows if r not in self.methods and r not in self.ablations]
        if self.corruption_rates and unknown:
            raise ConfigError(f"experiment.corruption_rows: {unknown} are neither in experiment.methods nor in "
                              "experiment.ablations; name rows of the grid, e.g. [l2l, l2l_no_rl, semires]")
        for ratio in self.label_ratios:
            _check("experiment.label_ratios", ratio, RULES["data.label_ratio"])
        for seed in self.seeds:
            _check("experiment.seeds", seed, RULES["seed"])
        for name, overrides in self.ablations.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)) or name in METHODS:
                raise ConfigError(f"experiment.ablations.{name}: use a new name of letters, digits, '_', '-' "
                                  f"(not one of {', '.join(METHODS)}), e.g. l2l_no_guidance")
            if not isinstance(overrides, dict) or not overrides:
                raise ConfigError(f"experiment.ablations.{name}: expected a mapping of dotted keys, e.g. "
                                  "{method: l2l, model.guidance: false}")
            fixed = [k for k in overrides if k in ("seed", "data.label_ratio", "run.dir") or k.startswith("experiment")]
            if fixed:
                raise ConfigError(f"experiment.ablations.{name}: {fixed[0]} is set by the experiment grid; remove it")
            try:
                apply_overrides(Config(), dict(overrides))
            except ConfigError as e:
                raise ConfigError(f"experiment.ablations.{name}: {e}") from e


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
    experiment: ExperimentSection = field(default_factory=ExperimentSection)

    def validate(self) -> Config:
        """Check every key against ``RULES``, then the rules that tie keys together; ConfigError otherwise."""
        for key, rule in RULES.items():
            _check(key, _get(self, key), rule)
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.method != "supervised" and self.train.batch_size < 2:
            raise ConfigError(f"train.batch_size={self.train.batch_size}: method {self.method} needs >= 2 "
                              "(each step takes half labeled, half pseudo-labelled rows)")
        if self.method == "l2l" and self.data.image_size % self.semi.selector_pixel_stride:
            raise ConfigError(f"data.image_size={self.data.image_size} must be divisible by "
                              f"semi.selector_pixel_stride={self.semi.selector_pixel_stride} (method l2l)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML, atomically (a file ``load_config`` accepts as is)."""
        from l2l_ray.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def priors_cache_dir(self) -> str:
        """``priors.cache_dir``, else a folder the user owns (the dataset folder is often a read-only shared mount):
        ``$L2L_CACHE/priors/<data.root name>-<sha1 of the resolved data.root, 8 hex>``, so two data roots never
        share a cache. ``L2L_CACHE`` defaults to ``$XDG_CACHE_HOME/l2l-ray``, i.e. ``~/.cache/l2l-ray``."""
        if self.priors.cache_dir:
            return self.priors.cache_dir
        import hashlib

        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base = os.environ.get("L2L_CACHE") or Path(xdg) / "l2l-ray"
        root = Path(self.data.root).expanduser().resolve()
        tag = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name)[:32] or "root"
        return str(Path(base).expanduser() / "priors" / f"{tag}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}")


def _choice_msg(key: str, value: Any, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(value), valid, n=3, cutoff=0.3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{key}={value!r} is not valid: choose one of {', '.join(valid)}{hint}"


# The allowed values of every numeric and enumerated key, checked when a config is loaded, so `l2l config`
# refuses what `l2l train` would crash on later. A rule is a tuple of choices or a range: "> 0", ">= 1",
# "[0, 1]", "(0, 1]", "[0.5, 1)". Rules that tie keys together are in the ``validate`` methods.
RULES: dict[str, str | tuple] = {
    "method": METHODS,
    "seed": ">= 0",
    "data.dataset": tuple(SPLIT_BYS),
    "data.split_by": ("unc", "google", "umd"),
    "data.label_ratio": "(0, 1]",
    "data.image_size": ">= 32",
    "data.synth_images": ">= 1",
    "data.synth_seed": ">= 0",
    "priors.backend": PRIOR_BACKENDS,
    "priors.family": MLLM_FAMILIES,
    "priors.prompt_version": PROMPT_VERSIONS,
    "priors.timeout_s": "> 0",
    "priors.max_retries": ">= 0",
    "priors.concurrency": ">= 1",
    "priors.batch_size": ">= 1",
    "priors.num_gpus": ">= 0",
    "priors.tensor_parallel_size": ">= 1",
    "priors.max_tokens": ">= 1",
    "priors.proposal_size": ">= 8",
    "priors.proposal_method": PROPOSAL_METHODS,
    "priors.proposal_grabcut_iters": ">= 1",
    "priors.proposal_work_size": ">= 16",
    "priors.proposal_blend": "[0, 1]",
    "priors.proposal_softness": "> 0",
    "priors.proposal_margin": ">= 0",
    "priors.proposal_point_radius": "> 0",
    "priors.proposal_point_boost": "[0, 1]",
    "priors.lexical_work_size": ">= 16",
    "priors.min_pixels": ">= 1",
    "priors.max_pixels": ">= 1",
    "priors.retry_backoff_s": ">= 0",
    "priors.dtype": ("auto", "float32", "bfloat16", "float16"),
    "priors.corruption": "[0, 1]",
    "priors.corruption_drop": "[0, 1]",
    "priors.max_model_len": ">= 1",
    "priors.gpu_memory_utilization": "(0, 1]",
    "model.preset": PRESETS,
    "model.width": ">= 0",
    "model.encoder_width": ">= 0",
    "model.encoder_depth": ">= 0",
    "model.text_width": ">= 0",
    "model.text_layers": ">= 0",
    "model.max_tokens": ">= 0",
    "model.aux_weight": ">= 0",
    "model.prior_residual": ">= 0",
    "train.num_workers": ">= 0",
    "train.cpus_per_worker": ">= 0",
    "train.epochs": ">= 1",
    "train.batch_size": ">= 1",
    "train.lr": "> 0",
    "train.weight_decay": ">= 0",
    "train.max_failures": ">= -1",  # -1 = retry for ever (Ray Train's FailureConfig)
    "train.eval_batch_size": ">= 1",
    "train.num_threads": ">= 0",
    "train.steps_per_epoch": ">= 0",
    "train.warmup_steps": ">= 0",
    "train.poly_power": ">= 0",
    "train.grad_clip": ">= 0",
    "train.log_every_s": ">= 0",
    "train.inject_failure_epoch": ">= -1",  # -1 = off
    "train.hflip": "[0, 1]",
    "semi.rounds": ">= 0",
    "semi.epochs_per_round": ">= 1",
    "semi.unlabeled_per_round": ">= 0",
    "semi.gallery_size": ">= 0",
    "semi.ema": "[0, 1]",
    "semi.threshold": "[0.5, 1)",
    "semi.unlabeled_weight": ">= 0",
    "semi.selector_lr": "> 0",
    "semi.selector_workers": ">= 1",
    "semi.reward_prior": ">= 0",
    "semi.reward_consistency": ">= 0",
    "semi.reward_credit": ">= 0",
    "semi.reward_truth": ">= 0",
    "semi.reward_wrong_pixel": ">= 0",
    "semi.reject_iou": "[0, 1]",
    "semi.selector_heldout": "[0, 1)",
    "semi.selector_practice_steps": ">= 0",
    "semi.explore_share": "[0, 1]",
    "semi.selector_update_epochs": ">= 0",
    "semi.selector_minibatch": ">= 1",
    "semi.selector_max_update_pairs": ">= 1",
    "semi.selector_entropy": ">= 0",
    "semi.selector_pixel_coef": ">= 0",
    "semi.selector_pixel_stride": (1, 2, 4, 8),
    "semi.selector_hidden": ">= 4",
    "semi.selector_cpus": ">= 0",
    "semi.selector_threads": ">= 0",
    "semi.teacher_actors": ">= 0",
    "semi.teacher_cpus": ">= 0",
    "semi.teacher_threads": ">= 0",
    "semi.semires_iou": "[0, 1]",
    "semi.semires_pwa_var": "> 0",
    "tune.num_samples": ">= 1",
    "tune.max_concurrent": ">= 1",
    "tune.grace_period": ">= 1",
    "tune.reduction_factor": ">= 2",
    "tune.cpus_per_trial": "> 0",
    "experiment.corruption_ratio": "(0, 1]",
}
_RANGE = re.compile(r"(?P<op>>=|>) (?P<lo>\S+)|(?P<left>[\[(])(?P<a>\S+), (?P<b>\S+)(?P<right>[\])])")


def _in_range(value: float, rule: str) -> bool:
    m = _RANGE.fullmatch(rule)
    if m is None:
        raise ValueError(f"bad range rule {rule!r}")  # a typo in RULES, not the user's fault
    if m["op"]:
        lo = float(m["lo"])
        return value >= lo if m["op"] == ">=" else value > lo
    a, b = float(m["a"]), float(m["b"])
    above = value >= a if m["left"] == "[" else value > a
    below = value <= b if m["right"] == "]" else value < b
    return above and below


def _check(key: str, value: Any, rule: str | tuple) -> None:
    """ConfigError naming ``key``, ``value`` and the allowed range or choices when ``value`` breaks ``rule``."""
    if isinstance(rule, tuple):
        if value not in rule:
            raise ConfigError(_choice_msg(key, value, [str(c) for c in rule]))
    elif not _in_range(value, rule):
        where = rule if rule[0] in "<>" else f"in {rule}"
        raise ConfigError(f"{key}={value!r}: must be {where}")


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


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
        # `tune.space` and `experiment.ablations` are dict-valued leaves.
        if isinstance(v, dict) and full not in ("tune.space", "experiment.ablations"):
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
