"""Segmenter presets: a registry of named architectures, selected by ``model.preset``.

    spec = resolve_preset(cfg.model)      # the preset with the cfg's size knobs applied
    spec.backbone, spec.text, spec.width  # "tiny" | "convnext" | "swin", "small" | "bert", decoder width

| preset         | backbone (stages)            | text encoder                 | params | meant for           |
|----------------|------------------------------|------------------------------|--------|---------------------|
| ``tiny``       | 3x3 conv + BN net, 4 scales  | 2-layer transformer, 96 wide | ~1 M   | CPU, from scratch   |
| ``lavt_swin_b``| Swin-B (window 12), 4 scales | BERT-base                    | ~200 M | GPU, 480 px (LAVT)  |
| ``convnext_b`` | ConvNeXt-B, 4 scales         | BERT-base                    | ~200 M | GPU, 480 px         |

Backbones are transformers classes (``SwinBackbone``, ``ConvNextBackbone``) built from their config
with random weights, or ``from_pretrained`` (hub id or local path) when ``model.pretrained`` is true.
timm is not used (it is not installable here without a CUDA torch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from l2l_ray.config import ConfigError, ModelConfig

_PRESETS: dict[str, Callable[[], Preset]] = {}


@dataclass(frozen=True)
class Preset:
    """Everything that defines a segmenter architecture (no weights)."""

    name: str
    backbone: str  # "tiny" | "convnext" | "swin"
    backbone_kwargs: dict = field(default_factory=dict)  # tiny: widths/depths; else SwinConfig/ConvNextConfig kw
    backbone_hub: str = ""  # hub id / local path used when model.pretrained
    text: str = "small"  # "small" (from scratch) | "bert" (BertModel)
    text_kwargs: dict = field(default_factory=dict)  # small: width/layers/heads; bert: BertConfig kw
    text_hub: str = ""
    width: int = 64  # fusion attention / decoder channels
    bottleneck_layers: int = 2  # joint visual + word transformer layers at the coarsest scale (0 = none)
    max_tokens: int = 16  # tokens per sentence incl. [CLS]/[SEP]
    vocab_size: int = 2000  # trained tokenizer (ignored with a pretrained tokenizer)
    image_size: int = 128  # the input side it is meant for

    @property
    def text_dim(self) -> int:
        """Width of the word tokens (and of the guidance tokens that join them)."""
        return int(self.text_kwargs["width"] if self.text == "small" else self.text_kwargs["hidden_size"])


def register(name: str):
    """Decorator: register a zero-argument function returning a ``Preset``."""

    def deco(fn: Callable[[], Preset]) -> Callable[[], Preset]:
        _PRESETS[name] = fn
        return fn

    return deco


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    if name not in _PRESETS:
        raise ConfigError(f"model.preset={name!r} is not valid: choose one of {', '.join(preset_names())}")
    return _PRESETS[name]()


@register("tiny")
def tiny() -> Preset:
    """~1 M parameters; trains in minutes on 2 CPU cores at 128 px (predicts at 1/4 scale)."""
    return Preset(
        name="tiny", backbone="tiny",
        backbone_kwargs={"stem": 16, "widths": [32, 64, 128, 128], "depths": [1, 1, 1, 1]},
        text="small", text_kwargs={"width": 96, "layers": 2, "heads": 4},
        width=32, max_tokens=16, vocab_size=2000, image_size=128)


_BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


@register("lavt_swin_b")
def lavt_swin_b() -> Preset:
    """LAVT-class: Swin-B (patch 4, window 12, ImageNet-22k weights when pretrained) + BERT-base, 480 px."""
    return Preset(
        name="lavt_swin_b", backbone="swin",
        backbone_kwargs={"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
                         "window_size": 12, "drop_path_rate": 0.3},
        backbone_hub="microsoft/swin-base-patch4-window12-384-in22k",
        text="bert", text_kwargs=dict(_BERT_BASE), text_hub="bert-base-uncased",
        width=256, bottleneck_layers=1, max_tokens=20, vocab_size=16000, image_size=480)


@register("convnext_b")
def convnext_b() -> Preset:
    """ConvNeXt-B (ImageNet-22k weights when pretrained) + BERT-base, 480 px."""
    return Preset(
        name="convnext_b", backbone="convnext",
        backbone_kwargs={"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3], "drop_path_rate": 0.3},
        backbone_hub="facebook/convnext-base-224-22k",
        text="bert", text_kwargs=dict(_BERT_BASE), text_hub="bert-base-uncased",
        width=256, bottleneck_layers=1, max_tokens=20, vocab_size=16000, image_size=480)


def _scaled_backbone(p: Preset, width: int, depth: int) -> dict:
    kw = dict(p.backbone_kwargs)
    n = len(kw.get("depths", []))
    if depth:
        kw["depths"] = [min(d, depth) for d in kw["depths"]]
    if width and p.backbone == "tiny":
        kw["widths"] = [width * 2 ** min(i, 2) for i in range(n)]
        kw["stem"] = max(8, width // 2)
    elif width and p.backbone == "swin":
        kw["embed_dim"] = width
        kw["num_heads"] = [max(1, width * 2**i // 32) for i in range(n)]  # 32 channels per head, as Swin-B
    elif width and p.backbone == "convnext":
        kw["hidden_sizes"] = [width * 2**i for i in range(n)]
    return kw


def resolve_preset(m: ModelConfig) -> Preset:
    """The preset named by ``m.preset`` with the config's overrides (hub ids, widths, depths) applied."""
    p = get_preset(m.preset)
    text_kw = dict(p.text_kwargs)
    if p.text == "small":
        text_kw["width"] = m.text_width or text_kw["width"]
        text_kw["layers"] = m.text_layers or text_kw["layers"]
    else:
        if m.text_width:
            heads = max(1, m.text_width // 64)
            text_kw.update(hidden_size=m.text_width, num_attention_heads=heads, intermediate_size=4 * m.text_width)
        if m.text_layers:
            text_kw["num_hidden_layers"] = m.text_layers
    return dataclasses.replace(
        p,
        backbone_kwargs=_scaled_backbone(p, m.encoder_width, m.encoder_depth),
        backbone_hub=m.backbone or p.backbone_hub,
        text_kwargs=text_kw,
        text_hub=m.text_encoder or p.text_hub,
        width=m.width or p.width,
        max_tokens=m.max_tokens or p.max_tokens,
    )
