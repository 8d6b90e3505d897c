"""Prior guidance and the per-scale fusion block (no Ray imports).

``PromptEncoder`` turns a prior into learnable guidance, as SAM's prompt encoder does for its prompts:
- dense: the soft proposal (2p - 1), the box and a validity plane, rasterised at every encoder scale ->
  a 3x3 conv per scale (all planes are 0 where ``prior_valid`` is false, so those rows get the conv's
  bias: a learned "no prior" embedding);
- sparse: box corners and points (Fourier features + type embeddings) and one prior-summary token (an MLP
  of the proposal at 8 x 8 and the box; or
  a learned "no prior" token) that join the word tokens every fusion block attends to.

``FusionBlock`` (one per scale) is LAVT's pixel-word attention plus guidance: pixels attend to the
word + guidance tokens, the result multiplies the visual projection, FiLM from the sentence and prior
summary modulates it, the dense prior map is added, and a tanh gate makes the residual that goes
back into the encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def box_map(box: torch.Tensor, size: int) -> torch.Tensor:
    """Rasterise normalised xyxy boxes (B, 4) to {0, 1} maps (B, size, size); a zero box gives zeros."""
    c = (torch.arange(size, device=box.device, dtype=box.dtype) + 0.5) / size  # pixel centres (S,)
    inside_x = (c[None] >= box[:, 0:1]) & (c[None] <= box[:, 2:3])  # (B, S)
    inside_y = (c[None] >= box[:, 1:2]) & (c[None] <= box[:, 3:4])  # (B, S)
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(box.dtype)  # (B, S, S)


def coord_planes(b: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): x and y of every pixel centre, in [-1, 1]."""
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w * 2 - 1
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])  # (2, H, W)
    return grid[None].expand(b, 2, h, w)


class FourierPoints(nn.Module):
    """Normalised (x, y) in [0, 1] -> random Fourier features (..., 2F) (SAM's positional encoding)."""

    def __init__(self, num_freqs: int = 16, scale: float = 1.0):
        super().__init__()
        self.register_buffer("gauss", scale * torch.randn(2, num_freqs))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        proj = (2 * xy - 1) @ self.gauss.to(xy.dtype) * (2 * math.pi)  # (..., F)
        return torch.cat([proj.sin(), proj.cos()], -1)  # (..., 2F)


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, *size): area averaging when shrinking by a whole factor, else bilinear."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h % size[0] == 0 and w % size[1] == 0:
        return F.avg_pool2d(x, (h // size[0], w // size[1]))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PromptEncoder(nn.Module):
    """Prior (map, box, points, validity) -> dense maps per scale, guidance tokens and a summary vector.

    The dense planes (2p - 1, the box, a validity plane) are rasterised at the scale each fusion block uses
    (the proposal is area-averaged from its own side, the box is drawn at that side): nothing is drawn at full
    resolution and shrunk back.
    """

    def __init__(self, dim: int, num_scales: int, width: int, num_freqs: int = 16,
                 summary_side: int = 8):
        super().__init__()
        # one 3x3 conv per scale; rows without a prior have all-zero planes, so they get the conv's bias alone:
        # a learned "no prior" embedding per scale, with no branch
        self.dense = nn.ModuleList(nn.Conv2d(3, width, 3, 1, 1) for _ in range(num_scales))
        self.summary_side = summary_side
        self.pe = FourierPoints(num_freqs)
        self.point_proj = nn.Linear(2 * num_freqs, dim)
        self.type_embed = nn.Embedding(3, dim)  # box top-left, box bottom-right, point
        self.summary = nn.Sequential(nn.Linear(2 * summary_side**2 + 4, dim), nn.GELU(), nn.Linear(dim, dim))
        self.no_prior_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.no_prior_token, std=0.02)

    @staticmethod
    def planes(g: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The guidance planes at ``size``: (B, 3, h, w) = (2p - 1, box, valid), zero where there is no prior."""
        v = g["valid"].to(g["prior"].dtype)[:, None, None, None]  # (B, 1, 1, 1)
        p = resize_map(g["prior"], size)  # (B, 1, h, w)
        box = box_map(g["box"], size[0])[:, None] if size[0] == size[1] else \
            resize_map(box_map(g["box"], max(size))[:, None], size)
        return torch.cat([(2 * p - 1) * v, box * v, v.expand(-1, 1, *size)], 1)

    def forward(self, prior: torch.Tensor, box: torch.Tensor, valid: torch.Tensor, points: torch.Tensor,
                point_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """prior (B,1,P,P) in [0,1] at any side P; box (B,4); valid (B,) bool; points (B,K,2); point_valid (B,K).

        Returns {"tokens": (B,3+K,D), "token_mask": (B,3+K) bool, "summary": (B,D), "valid", "prior", "box"}.
        """
        b = prior.shape[0]
        g = {"prior": prior, "box": box, "valid": valid}
        coarse = self.planes(g, (self.summary_side, self.summary_side))[:, :2].flatten(1)  # (B, 2*side^2)
        summary = self.summary(torch.cat([coarse, box], 1))  # (B, D)
        summary = torch.where(valid[:, None], summary, self.no_prior_token.to(summary.dtype))
        corners = box.view(b, 2, 2)  # (B, 2 corners, xy)
        xy = torch.cat([corners, points], 1)  # (B, 2+K, 2)
        kinds = torch.cat([torch.tensor([0, 1], device=box.device),
                           torch.full((points.shape[1],), 2, device=box.device)])  # (2+K,)
        sparse = self.point_proj(self.pe(xy)) + self.type_embed(kinds)[None]  # (B, 2+K, D)
        box_ok = valid & ((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]))  # (B,)
        mask = torch.cat([box_ok[:, None].expand(b, 2), point_valid & valid[:, None]], 1)  # (B, 2+K)
        tokens = torch.cat([summary[:, None], sparse], 1)  # (B, 3+K, D)
        token_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)  # (B, 3+K)
        return {**g, "tokens": tokens, "token_mask": token_mask, "summary": summary}

    def dense_at(self, i: int, g: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The dense guidance for scale ``i``: (B, W, H, W) (the conv's bias alone, a constant, where invalid)."""
        w = self.dense[i].weight
        return self.dense[i](self.planes(g, tuple(size)).to(w.dtype).contiguous(memory_format=torch.channels_last))


class FusionBlock(nn.Module):
    """Pixel-to-token attention + FiLM + dense guidance at one scale -> a gated residual (B, C, H, W)."""

    def __init__(self, channels: int, token_dim: int, cond_dim: int, width: int, heads: int = 1):
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} must be divisible by heads {heads}")
        self.heads = heads
        # +2 input channels: normalised (x, y) of every pixel, so spatial words ("left", "top") have a direct
        # handle (CoordConv); a cheap prior that speeds up learning from scratch a lot. One 1x1 conv makes both
        # the attention queries and the visual projection.
        self.qv = nn.Conv2d(channels, 2 * width, 1)
        self.pos = nn.Conv2d(2, 2 * width, 1, bias=False)  # the coordinates' part of the same 1x1 conv
        self.kv = nn.Linear(token_dim, 2 * width)
        self.lang = nn.Conv2d(width, width, 1)
        self.film = nn.Linear(cond_dim, 2 * width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.out = nn.Conv2d(width, 2 * channels, 1)  # residual and its tanh gate

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor, cond: torch.Tensor,
                dense: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,C,H,W); tokens (B,N,D); token_mask (B,N) bool; cond (B,Dc); dense (B,W,H,W) or None."""
        b, _, h, w = x.shape
        nh = self.heads
        # conv(cat[x, coords]) = conv(x) + conv(coords): the coordinate part is computed once, not per sample
        q, vis = (self.qv(x) + self.pos(coord_planes(1, h, w, x))).chunk(2, 1)  # (B, W, H, W) each
        q = q.flatten(2).transpose(1, 2).reshape(b, h * w, nh, -1).transpose(1, 2)  # (B, nh, HW, W/nh)
        k, v = self.kv(tokens).chunk(2, -1)  # (B, N, W) each
        k = k.reshape(b, k.shape[1], nh, -1).transpose(1, 2)  # (B, nh, N, W/nh)
        v = v.reshape(b, v.shape[1], nh, -1).transpose(1, 2)  # (B, nh, N, W/nh)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask[:, None, None, :])  # (B, nh, HW, W/nh)
        att = att.transpose(2, 3).reshape(b, -1, h, w)  # (B, W, H, W)
        m = F.relu(vis) * F.relu(self.lang(att))  # (B, W, H, W)
        gamma, beta = self.film(cond).chunk(2, -1)  # (B, W) each
        m = m * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        if dense is not None:
            m = m + dense
        r, gate = self.out(m).chunk(2, 1)  # (B, C, H, W) each
        return torch.tanh(gate) * r


class CrossModalBlock(nn.Module):
    """Joint self-attention over the coarsest visual tokens and the word + guidance tokens.

    Comparative and relational phrases ("the biggest", "left of the star") need objects compared with each
    other, which per-pixel attention to words cannot do; a few transformer layers over (H*W + N) tokens at
    the coarsest scale can. Returns a residual (B, C, H, W) (zero at init: the output projection starts at 0).
    """

    def __init__(self, channels: int, token_dim: int, layers: int, heads: int):
        super().__init__()
        self.inp = nn.Linear(channels + 2, token_dim)
        layer = nn.TransformerEncoderLayer(token_dim, heads, 2 * token_dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(token_dim)
        self.out = nn.Linear(token_dim, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """x (B,C,H,W); tokens (B,N,D); token_mask (B,N) bool -> residual (B,C,H,W)."""
        b, c, h, w = x.shape
        v = torch.cat([x, coord_planes(b, h, w, x)], 1).flatten(2).transpose(1, 2)  # (B, HW, C+2)
        seq = torch.cat([self.inp(v), tokens.to(v.dtype)], 1)  # (B, HW+N, D)
        pad = torch.cat([torch.zeros(b, h * w, dtype=torch.bool, device=x.device), ~token_mask], 1)  # (B, HW+N)
        seq = self.norm(self.layers(seq, src_key_padding_mask=pad))
        return self.out(seq[:, : h * w]).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
