"""Top-down (FPN-style) decoder: fuses the encoder scales into mask logits at the finest scale (1/4),
with one auxiliary logit head per coarser scale (deep supervision). No Ray imports."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from l2l_ray.model.encoders import ConvBN


class TopDownDecoder(nn.Module):
    """feats [(B, C_i, H_i, W_i)] finest first -> logits (B, 1, H_0, W_0), aux [(B, 1, H_i, W_i)], i >= 1."""

    def __init__(self, in_channels: list[int], width: int):
        super().__init__()
        self.lateral = nn.ModuleList(ConvBN(c, width, 1) for c in in_channels)
        self.smooth = nn.ModuleList(ConvBN(width, width, 3) for _ in in_channels)
        self.aux_heads = nn.ModuleList(nn.Conv2d(width, 1, 1) for _ in in_channels[1:])
        self.head = nn.Sequential(ConvBN(width, width, 3), nn.Conv2d(width, 1, 1))

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = len(feats)
        p = self.smooth[-1](self.lateral[-1](feats[-1]))  # (B, W, H_{n-1}, W_{n-1})
        aux = [self.aux_heads[-1](p)]
        for i in range(n - 2, -1, -1):
            up = F.interpolate(p, size=feats[i].shape[-2:], mode="bilinear", align_corners=False)
            p = self.smooth[i](up + self.lateral[i](feats[i]))  # (B, W, H_i, W_i)
            if i > 0:
                aux.append(self.aux_heads[i - 1](p))
        return self.head(p), aux[::-1]  # aux finest-first: scales 1 .. n-1
