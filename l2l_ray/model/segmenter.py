"""The guided hierarchical segmenter (pure PyTorch, no Ray imports).

    tok = build_tokenizer(sentences, run_dir)        # l2l_ray.model.text
    model = build_segmenter(cfg, tok)                # preset from cfg.model.preset, S = cfg.data.image_size
    out = model(batch)                               # {"logits": (B,1,S,S), "aux": [(B,1,S/8,S/8), ...]}
    loss, parts = model.loss(batch)                  # BCE + dice, per-pixel weights, aux losses
    probs = model.predict(batch)                     # (B,S,S) in [0, 1]

Data flow: text encoder -> word tokens (B,T,D) and sentence vector; prompt encoder -> guidance
tokens, a prior summary and dense prior maps; the visual encoder calls a ``FusionBlock`` after every
stage (pixel-token attention + FiLM + dense prior, gated residual back into the encoder); the top-down
decoder turns the fused scales into logits at 1/4 scale, upsampled bilinearly to S x S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from l2l_ray.model.decoder import TopDownDecoder
from l2l_ray.model.encoders import build_encoder
from l2l_ray.model.guidance import CrossModalBlock, FusionBlock, PromptEncoder, resize_map
from l2l_ray.model.presets import resolve_preset
from l2l_ray.model.text import TextTokenizer, build_text_encoder


def bce_dice_per_sample(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted BCE + soft dice per sample: logits (B,1,h,w), target/weight (B,H,W) -> (B,).

    The loss is taken at the logits' own resolution: a coarser head gets the target and weight area-averaged
    to its grid (soft targets; H, W multiples of h, w), so no logits are upsampled for a loss. Pixels of weight
    0 are ignored; a sample whose weights are all 0 contributes 0.
    """
    z = logits.float()[:, 0]  # (B, h, w)
    if z.shape[-2:] != target.shape[-2:]:
        tw = resize_map((target * weight)[:, None], z.shape[-2:])[:, 0]
        weight = resize_map(weight[:, None], z.shape[-2:])[:, 0]
        target = tw / weight.clamp(min=1e-6)
    wsum = weight.flatten(1).sum(1)  # (B,)
    bce = F.binary_cross_entropy_with_logits(z, target, reduction="none")  # (B, h, w)
    bce = (bce * weight).flatten(1).sum(1) / wsum.clamp(min=1e-6)
    p = torch.sigmoid(z)
    inter = (p * target * weight).flatten(1).sum(1)
    denom = (p * weight).flatten(1).sum(1) + (target * weight).flatten(1).sum(1)
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return (bce + dice) * (wsum > 0).float()


class Segmenter(nn.Module):
    """Encoder + text encoder + (optional) prompt encoder + per-scale fusion + top-down decoder."""

    def __init__(self, encoder: nn.Module, text_encoder: nn.Module, decoder: TopDownDecoder,
                 fusions: nn.ModuleList, prompt: PromptEncoder | None = None, aux_weight: float = 0.4,
                 bottleneck: CrossModalBlock | None = None, prior_residual: float = 0.0):
        super().__init__()
        # the decoder predicts a correction of the prior's own logits (a learnable gain, 0 = off)
        self.prior_gain = nn.Parameter(torch.tensor(float(prior_residual))) if prompt is not None and \
            prior_residual > 0 else None
        self.bottleneck = bottleneck
        self.encoder = encoder
        self.text = text_encoder
        self.prompt = prompt
        self.fusions = fusions
        self.decoder = decoder
        self.aux_weight = aux_weight

    @classmethod
    def from_config(cls, cfg, tokenizer: TextTokenizer) -> Segmenter:
        """Build from ``cfg.model`` (preset + overrides) at input side ``cfg.data.image_size``."""
        spec = resolve_preset(cfg.model)
        encoder = build_encoder(spec, cfg.data.image_size, cfg.model.pretrained)
        text = build_text_encoder(spec, tokenizer, cfg.model.pretrained)
        d = text.dim
        n = len(encoder.channels)
        heads = max(1, spec.width // 64)
        prompt = PromptEncoder(d, n, spec.width) if cfg.model.guidance else None
        cond_dim = 2 * d if prompt is not None else d
        fusions = nn.ModuleList(FusionBlock(c, d, cond_dim, spec.width, heads) for c in encoder.channels)
        decoder = TopDownDecoder(encoder.channels, spec.width)
        bottleneck = (CrossModalBlock(encoder.channels[-1], d, spec.bottleneck_layers, max(1, d // 32))
                      if spec.bottleneck_layers else None)
        model = cls(encoder, text, decoder, fusions, prompt, cfg.model.aux_weight, bottleneck,
                    cfg.model.prior_residual)
        return model.to(memory_format=torch.channels_last)  # conv weights NHWC: oneDNN's fast layout on CPU

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """batch (see ``l2l_ray.model.inputs``) -> {"logits": (B,1,S,S), "aux": [(B,1,H_i,W_i)] coarser scales}."""
        img = batch["image"].contiguous(memory_format=torch.channels_last)  # (B,3,S,S), NHWC in memory
        s = img.shape[-1]
        words, sentence = self.text(batch["tokens"], batch["token_mask"])  # (B,T,D), (B,D)
        tokens, token_mask, cond, g = words, batch["token_mask"], sentence, None
        if self.prompt is not None:
            b = img.shape[0]
            points = batch.get("points", img.new_zeros(b, 0, 2))
            point_valid = batch.get("point_valid", torch.zeros(b, points.shape[1], dtype=torch.bool,
                                                               device=img.device))
            g = self.prompt(batch["prior"].to(img.dtype), batch["box"].to(img.dtype), batch["prior_valid"],
                            points.to(img.dtype), point_valid)
            tokens = torch.cat([words, g["tokens"].to(words.dtype)], 1)  # (B, T+3+K, D)
            token_mask = torch.cat([token_mask, g["token_mask"]], 1)
            cond = torch.cat([sentence, g["summary"].to(sentence.dtype)], -1)  # (B, 2D)

        def fuse(i: int, x: torch.Tensor) -> torch.Tensor:
            dense = self.prompt.dense_at(i, g, x.shape[-2:]) if g is not None else None
            r = self.fusions[i](x, tokens.to(x.dtype), token_mask, cond.to(x.dtype), dense)
            if self.bottleneck is not None and i == len(self.fusions) - 1:
                r = r + self.bottleneck(x + r, tokens.to(x.dtype), token_mask)  # coarsest scale: joint attention
            return r

        feats = self.encoder(img, fuse)
        logits, aux = self.decoder(feats)  # (B,1,S/4,S/4), coarser
        logits = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)  # (B,1,S,S)
        if self.prior_gain is not None:  # residual on the prior: logit(p) where there is one, 0 elsewhere
            valid = batch["prior_valid"].to(logits.dtype)[:, None, None, None]
            prior = resize_map(batch["prior"].float(), (s, s))  # (B,1,S,S)
            prior_logit = torch.logit(prior.clamp(0.05, 0.95)).to(logits.dtype)
            logits = logits + self.prior_gain.to(logits.dtype) * prior_logit * valid
        return {"logits": logits, "aux": aux}

    def loss_from_outputs(self, out: dict, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Loss of ``forward``'s output (so DDP can wrap ``forward``): mean over the batch of
        sample_weight * (main + aux_weight * mean(aux)), each BCE + dice with per-pixel weights."""
        target, weight = batch["target"], batch["weight"]
        main = bce_dice_per_sample(out["logits"], target, weight)  # (B,)
        aux = torch.stack([bce_dice_per_sample(a, target, weight) for a in out["aux"]]).mean(0) if out["aux"] \
            else torch.zeros_like(main)
        per = main + self.aux_weight * aux
        sw = batch.get("sample_weight")
        if sw is not None:
            per = per * sw
        loss = per.sum() / max(1, per.shape[0])
        return loss, {"loss": loss.detach(), "main": main.mean().detach(), "aux": aux.mean().detach()}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(scalar loss, {"loss", "main", "aux"} detached tensors)."""
        return self.loss_from_outputs(self(batch), batch)

    def fuse_batchnorm(self) -> Segmenter:
        """Inference only: fold every eval-mode BatchNorm into the conv before it (one op instead of two; the
        same outputs up to float rounding). Returns self; the model must not be trained afterwards."""
        from l2l_ray.model.encoders import ConvBN

        for m in self.modules():
            if isinstance(m, ConvBN) and isinstance(m[1], nn.BatchNorm2d):
                m[0] = torch.nn.utils.fusion.fuse_conv_bn_eval(m[0].eval(), m[1].eval()).to(
                    memory_format=torch.channels_last)
                m[1] = nn.Identity()
        return self

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Probabilities (B, S, S) float32 in [0, 1] (call ``eval()`` first for inference)."""
        return torch.sigmoid(self(batch)["logits"].float())[:, 0]


def build_segmenter(cfg, tokenizer: TextTokenizer) -> Segmenter:
    """``Segmenter.from_config`` (the contract entry point)."""
    return Segmenter.from_config(cfg, tokenizer)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
