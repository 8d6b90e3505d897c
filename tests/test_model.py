"""The guided segmenter: every preset builds from config and runs, guidance off, "no prior", losses, overfit."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from l2l_ray.config import ConfigError, load_config
from l2l_ray.model import (
    bce_dice_per_sample,
    build_segmenter,
    build_tokenizer,
    count_parameters,
    load_tokenizer,
    make_batch,
    preset_names,
    prior_arrays,
    resolve_preset,
)
from l2l_ray.model.guidance import box_map
from l2l_ray.records import Prior

SENTS = ["the red circle on the left", "right blue square", "big ring", "the tiny star at the bottom"]
# Large presets at a tiny width/depth so they run on a CPU in a second (same classes, same wiring).
SMALL = ["model.encoder_width=16", "model.encoder_depth=1", "model.text_width=32", "model.text_layers=1",
         "model.width=16", "data.image_size=64"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(SENTS, None, vocab_size=100, max_len=12)


def _batch(tok, s: int, b: int = 4, target: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens, mask = tok.encode((SENTS * b)[:b])
    tgt = torch.zeros(b, s, s)
    for i in range(b):
        tgt[i, s // 4 + i: s // 2 + i, s // 8: s // 2] = 1
    return make_batch(torch.randint(0, 255, (b, 3, s, s), dtype=torch.uint8, generator=g), tokens, mask,
                      target=tgt if target else None)


@pytest.mark.parametrize("preset", ["tiny", "lavt_swin_b", "convnext_b"])
def test_every_preset_builds_from_config_and_gives_shaped_outputs(tok, preset):
    assert set(preset_names()) >= {"tiny", "lavt_swin_b", "convnext_b"}
    cfg = load_config(None, [f"model.preset={preset}"] + ([] if preset == "tiny" else SMALL))
    s = cfg.data.image_size
    model = build_segmenter(cfg, tok)
    batch = _batch(tok, s)
    out = model(batch)
    n_scales = 4
    assert out["logits"].shape == (4, 1, s, s)
    assert [a.shape[-1] for a in out["aux"]] == [s // 2 ** (i + 3) for i in range(n_scales - 1)]
    loss, parts = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"loss", "main", "aux"}
    assert all(c.weight.grad is not None for c in model.prompt.dense)  # guidance enters every scale
    probs = model.eval().predict(batch)
    assert probs.shape == (4, s, s) and 0.0 <= probs.min() and probs.max() <= 1.0


def test_tiny_preset_is_about_one_million_parameters(tok):
    n = count_parameters(build_segmenter(load_config(None, []), tok))
    assert 0.4e6 < n < 1.5e6


def test_large_preset_keeps_its_full_size_recipe():
    spec = resolve_preset(load_config(None, ["model.preset=lavt_swin_b"]).model)
    assert spec.backbone == "swin" and spec.backbone_kwargs["depths"] == [2, 2, 18, 2]
    assert spec.backbone_kwargs["embed_dim"] == 128 and spec.text_dim == 768 and spec.image_size == 480
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_preset(load_config(None, ["model.preset=nope"]).model)


def test_guidance_off_builds_and_ignores_the_prior(tok):
    on = build_segmenter(load_config(None, ["data.image_size=64"]), tok)
    off = build_segmenter(load_config(None, ["data.image_size=64", "model.guidance=false"]), tok).eval()
    assert off.prompt is None and count_parameters(off) < count_parameters(on)
    b = _batch(tok, 64, target=False)
    p1 = off.predict(b)
    b2 = dict(b, prior=torch.rand_like(b["prior"]), box=torch.tensor([[0.1, 0.1, 0.5, 0.5]] * 4),
              prior_valid=torch.ones(4, dtype=torch.bool))
    assert torch.equal(p1, off.predict(b2))


def test_no_prior_rows_ignore_prior_inputs_and_valid_rows_use_them(tok):
    torch.manual_seed(0)
    model = build_segmenter(load_config(None, ["data.image_size=64"]), tok).eval()
    b = _batch(tok, 64, target=False)
    valid = torch.tensor([True, True, False, False])
    b = dict(b, prior_valid=valid, box=torch.tensor([[0.2, 0.2, 0.6, 0.6]] * 4))
    b["points"] = torch.full((4, 4, 2), 0.4)
    b["point_valid"] = torch.tensor([[True, False, False, False]] * 4)
    p1 = model.predict(b)
    b2 = dict(b, prior=torch.rand_like(b["prior"]), box=torch.tensor([[0.5, 0.1, 0.9, 0.3]] * 4))
    p2 = model.predict(b2)
    assert torch.allclose(p1[2:], p2[2:], atol=1e-6)  # "no prior": prior map and box are not read
    assert not torch.allclose(p1[:2], p2[:2], atol=1e-6)  # a valid prior changes the prediction


def test_prior_arrays_turn_missing_and_failed_priors_into_no_prior():
    ok = Prior(sent_id=1, ref_id=1, box=(0.1, 0.2, 0.5, 0.6), points=((0.3, 0.4),),
               proposal=np.full((8, 8), 255, np.uint8))
    failed = Prior(sent_id=2, ref_id=1, status="malformed_json")
    a = prior_arrays([ok, failed, None], 4)
    assert a["prior_valid"].tolist() == [True, False, False]
    assert (a["prior"][0] == 255).all() and (a["prior"][1:] == 128).all()
    assert a["box"][0].tolist() == pytest.approx([0.1, 0.2, 0.5, 0.6]) and not a["box"][1:].any()
    assert a["point_valid"][0].tolist() == [True, False, False, False]


def test_box_map_rasterises_pixel_centres():
    # centres of a 4-px row: 0.125, 0.375, 0.625, 0.875 -> x in [0.25, 0.75]: cols 1, 2; y in [0.25, 0.5]: row 1
    m = box_map(torch.tensor([[0.25, 0.25, 0.75, 0.5], [0.0, 0.0, 0.0, 0.0]]), 4)
    expect = torch.zeros(2, 4, 4)
    expect[0, 1, 1:3] = 1
    assert torch.equal(m, expect)


def test_bce_dice_matches_hand_computed_values_and_ignores_weight_zero():
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    weight = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # the second "1" pixel is ignored
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    # bce = ln 2 on every kept pixel; dice = 1 - (2 * 0.5 + 1) / (0.5 * 3 + 1 + 1) = 1 - 2 / 3.5
    expected = math.log(2) + 1 - 2 / 3.5
    assert bce_dice_per_sample(logits, target, weight).item() == pytest.approx(expected, rel=1e-5)
    assert bce_dice_per_sample(logits, target, torch.zeros_like(weight)).item() == 0.0
    # a 1x1 head is scored at its own resolution: weight area-averaged to 3/4, target (sum t*w / sum w) to 1/3;
    # bce = ln 2; dice = 1 - (2 * 0.5 * 1/3 * 3/4 + 1) / (0.5 * 3/4 + 1/3 * 3/4 + 1)
    coarse = math.log(2) + 1 - (0.25 + 1) / (0.375 + 0.25 + 1)
    assert bce_dice_per_sample(torch.zeros(1, 1, 1, 1), target, weight).item() == pytest.approx(coarse, rel=1e-5)


def test_tokenizer_saves_loads_pickles_and_pads(tok, tmp_path):
    tokens, mask = tok.encode(["the red circle", "qqqq zzzz"])
    assert tokens.shape == (2, 12) and mask.dtype == torch.bool
    assert mask[0].tolist() == [True] * 5 + [False] * 7  # [CLS] the red circle [SEP]
    assert tokens[0, 0].item() == tok.tok.token_to_id("[CLS]") and tokens[0, 5].item() == tok.pad_id
    assert tok.tok.token_to_id("[UNK]") in tokens[1].tolist()
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert torch.equal(again.encode(["right blue square"])[0], tok.encode(["right blue square"])[0])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.max_len == 12 and torch.equal(clone.encode(["big ring"])[0], tok.encode(["big ring"])[0])
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_one_batch_overfit_uses_the_sentence(tok):
    """Two sentences on the *same* image with different masks: fitting both needs the text."""
    torch.manual_seed(0)
    cfg = load_config(None, ["data.image_size=32"])  # small input: the same network, 4x cheaper
    model = build_segmenter(cfg, tok)
    b = _batch(tok, 32)
    b["image"][1] = b["image"][0]
    b["target"][1] = 0
    b["target"][1, 20:28, 18:30] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(50):
        loss, _ = model.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first
    pred = model.eval().predict(b) > 0.5
    gt = b["target"] > 0.5
    iou = ((pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1)).tolist()
    assert min(iou[:2]) > 0.7, iou


def test_prior_residual_adds_the_prior_logit_on_valid_rows_only(tok):
    cfg = load_config(None, ["data.image_size=64"])
    torch.manual_seed(0)
    plain = build_segmenter(cfg, tok).eval()
    torch.manual_seed(0)
    res = build_segmenter(load_config(None, ["data.image_size=64", "model.prior_residual=1.5"]), tok).eval()
    res.load_state_dict({**plain.state_dict(), "prior_gain": torch.tensor(1.5)})
    assert plain.prior_gain is None and float(res.prior_gain.detach()) == 1.5
    b = _batch(tok, 64, target=False)
    prior = torch.full((4, 1, 64, 64), 0.2)  # at model resolution, so the residual needs no resizing
    prior[..., 10:30, 10:30] = 0.99  # clamped to 0.95 inside the residual
    b = dict(b, prior=prior, prior_valid=torch.tensor([True, False, True, False]))
    with torch.no_grad():
        d = res(b)["logits"] - plain(b)["logits"]  # (B,1,S,S)
    want = 1.5 * torch.logit(prior.clamp(0.05, 0.95))
    assert torch.allclose(d[[0, 2]], want[[0, 2]], atol=1e-4)
    assert torch.allclose(d[[1, 3]], torch.zeros_like(d[[1, 3]]), atol=1e-6)  # no prior: no residual
    off = build_segmenter(load_config(None, ["data.image_size=64", "model.guidance=false",
                                             "model.prior_residual=1.0"]), tok)
    assert off.prior_gain is None  # no guidance, no prior anywhere in the model
