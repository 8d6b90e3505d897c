"""Multi-scale visual encoders with a fusion hook after every stage (no Ray imports).

Every encoder runs its stages one by one and calls ``fuse(i, feature)`` after stage ``i``:
``feature`` is the stage's normalised map (B, C_i, H_i, W_i) and ``fuse`` returns a residual of the
same shape that is added to the stage output *before* the next stage runs (LAVT's early fusion),
so language and prior guidance shape the deeper stages too. ``forward`` returns the fused maps,
finest first (strides 4, 8, 16[, 32]).

- ``TinyConvEncoder``: a small U-Net-style conv net (3x3 conv + BatchNorm) trained from scratch (CPU preset).
- ``SwinEncoder`` / ``ConvNextEncoder``: transformers ``SwinBackbone`` / ``ConvNextBackbone`` built from
  ``SwinConfig`` / ``ConvNextConfig`` (random init) or ``from_pretrained(hub id or local path)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Fuse = Callable[[int, torch.Tensor], torch.Tensor]


class ConvBN(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> ReLU: the fastest normalised conv on CPU (BN folds into one affine op,
    ReLU is cheaper than GELU, dense 3x3 convs run on oneDNN's fast path, unlike depthwise ones)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinyConvEncoder(nn.Module):
    """A U-Net-style encoder for CPUs: two stride-2 3x3 convs to 1/4 scale, then one stage per width, each
    (after the first) starting with a 2x2 max-pool; a stage is ``depth`` pairs of 3x3 ConvBN.

    128 px input, widths (32, 64, 128, 128): maps at 32, 16, 8 and 4 px (strides 4, 8, 16, 32).
    """

    def __init__(self, stem: int = 16, widths: list[int] = (32, 64, 128, 128), depths: list[int] = (1, 1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, stem, 3, 2), ConvBN(stem, widths[0], 3, 2))  # (B, w0, S/4, S/4)
        stages, prev = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            convs = [ConvBN(prev if j == 0 else w, w) for j in range(2 * d)]
            stages.append(nn.Sequential(nn.MaxPool2d(2) if i > 0 else nn.Identity(), *convs))
            prev = w
        self.stages = nn.ModuleList(stages)
        self.channels = list(widths)

    def forward(self, images: torch.Tensor, fuse: Fuse) -> list[torch.Tensor]:
        """images (B, 3, S, S) -> [(B, C_i, S / 2**(i+2), S / 2**(i+2))]."""
        x = self.stem(images)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            x = x + fuse(i, x)
            feats.append(x)
        return feats


def _out_features(n: int) -> list[str]:
    return [f"stage{i + 1}" for i in range(n)]


def _backbone(backbone_cls, config_cls, image_size: int, hub: str, pretrained: bool, kwargs: dict):
    """A transformers backbone with every stage as an output: ``from_pretrained(hub)`` or random init from
    ``config_cls(image_size=..., **kwargs)``."""
    if pretrained:
        if not hub:
            raise ValueError("model.pretrained=true needs a backbone hub id or local path (model.backbone)")
        n = len(config_cls.from_pretrained(hub).depths)
        return backbone_cls.from_pretrained(hub, out_features=_out_features(n))
    n = len(kwargs["depths"])
    return backbone_cls(config_cls(image_size=image_size, out_features=_out_features(n), **kwargs))


class SwinEncoder(nn.Module):
    """A transformers ``SwinBackbone`` run stage by stage (blocks -> fuse -> patch merging)."""

    def __init__(self, image_size: int, hub: str = "", pretrained: bool = False, **swin_kwargs):
        super().__init__()
        from transformers import SwinBackbone, SwinConfig

        self.backbone = _backbone(SwinBackbone, SwinConfig, image_size, hub, pretrained, swin_kwargs)
        self.channels = list(self.backbone.channels)

    def forward(self, images: torch.Tensor, fuse: Fuse) -> list[torch.Tensor]:
        """images (B, 3, S, S) -> [(B, C_i, S / 2**(i+2), S / 2**(i+2))] (ceil division)."""
        swin = self.backbone.swin
        h, dims = swin.embeddings(images)  # (B, L, C), L = H * W
        feats = []
        for i, stage in enumerate(swin.encoder.layers):
            for block in stage.blocks:
                h = block(h, dims, always_partition=True)[0]  # (B, L, C)
            h = self.backbone.hidden_states_norms[f"stage{i + 1}"](h)
            b, length, c = h.shape
            x = h.transpose(1, 2).reshape(b, c, dims[0], dims[1])  # (B, C, H, W)
            x = x + fuse(i, x)
            feats.append(x)
            h = x.flatten(2).transpose(1, 2)  # (B, L, C)
            if stage.downsample is not None:
                h = stage.downsample(h, dims)
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        return feats


class ConvNextEncoder(nn.Module):
    """A transformers ``ConvNextBackbone`` run stage by stage (stage -> norm -> fuse)."""

    def __init__(self, image_size: int, hub: str = "", pretrained: bool = False, **convnext_kwargs):
        super().__init__()
        from transformers import ConvNextBackbone, ConvNextConfig

        self.backbone = _backbone(ConvNextBackbone, ConvNextConfig, image_size, hub, pretrained, convnext_kwargs)
        self.channels = list(self.backbone.channels)

    def forward(self, images: torch.Tensor, fuse: Fuse) -> list[torch.Tensor]:
        """images (B, 3, S, S) -> [(B, C_i, S / 2**(i+2), S / 2**(i+2))]."""
        x = self.backbone.embeddings(images)  # (B, C0, S/4, S/4)
        feats = []
        for i, stage in enumerate(self.backbone.encoder.stages):
            x = self.backbone.hidden_states_norms[f"stage{i + 1}"](stage(x))
            x = x + fuse(i, x)
            feats.append(x)
        return feats


def build_encoder(spec, image_size: int, pretrained: bool) -> nn.Module:
    """The visual encoder of a resolved ``Preset``."""
    if spec.backbone == "tiny":
        return TinyConvEncoder(**spec.backbone_kwargs)
    if spec.backbone == "swin":
        return SwinEncoder(image_size, spec.backbone_hub, pretrained, **spec.backbone_kwargs)
    if spec.backbone == "convnext":
        return ConvNextEncoder(image_size, spec.backbone_hub, pretrained, **spec.backbone_kwargs)
    raise ValueError(f"unknown backbone kind {spec.backbone!r} in preset {spec.name!r}")
