"""Held-out credit (l2l_ray.train.credit): the gradient alignment by hand, and against autograd on a real head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2l_ray.train.credit import alignment_from_features, heldout_gradient


def test_heldout_gradient_by_hand():
    # one held-out pair, 2x2 head grid, features (1 channel + bias): f = [[1, 2], [3, 4]], probs .5, truth top row
    feats = np.stack([np.array([[1.0, 2.0], [3.0, 4.0]]), np.ones((2, 2))])[None].astype(np.float32)  # (1, 2, 2, 2)
    probs = np.full((1, 2, 2), 0.5, np.float32)
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2] = True  # area-averaged to the 2x2 grid: top row 1, bottom row 0
    g = heldout_gradient(feats, probs, masks)
    # (p - t): top -0.5, bottom +0.5 -> weight: (-0.5*1 - 0.5*2 + 0.5*3 + 0.5*4) / 4 = 0.5; bias: 0
    assert g.tolist() == pytest.approx([0.5, 0.0])
    a = alignment_from_features(feats, g, 4)
    assert a.dtype == np.float16 and a.shape == (1, 4, 4)
    assert float(np.sqrt(np.mean(a.astype(np.float32) ** 2))) == pytest.approx(1.0, rel=0.05)  # unit RMS


def test_credit_predicts_the_held_out_loss_change_of_one_step():
    """First order: one SGD step of a 1x1 conv head on a pair's labels changes the held-out BCE by about
    -lr * sum_j (p_j - y_j) * (f_j . g_H); the credit's sign must match the measured change."""
    torch.manual_seed(0)
    head = torch.nn.Conv2d(4, 1, 1)
    fh, th = torch.randn(3, 4, 8, 8), (torch.rand(3, 8, 8) > 0.5).float()  # held-out features / truth
    f, y = torch.randn(1, 4, 8, 8), (torch.rand(1, 8, 8) > 0.5).float()  # one pair and a label for it

    def loss(x, t):
        return torch.nn.functional.binary_cross_entropy_with_logits(head(x)[:, 0], t, reduction="mean")

    with torch.no_grad():
        ph, p = torch.sigmoid(head(fh))[:, 0], torch.sigmoid(head(f))[:, 0]
    cat = lambda x: torch.cat([x, torch.ones_like(x[:, :1])], 1).numpy()  # noqa: E731
    g = heldout_gradient(cat(fh), ph.numpy(), th.numpy() > 0.5)
    credit = float(((p - y).numpy() * np.einsum("nchw,c->nhw", cat(f), g)).sum())
    before = loss(fh, th).item()
    lr = 1e-3
    head.zero_grad()
    (loss(f, y) * y.numel()).backward()  # the sum over pixels, as the credit sums
    with torch.no_grad():
        for q in head.parameters():
            q -= lr * q.grad
    change = loss(fh, th).item() - before
    assert change == pytest.approx(-lr * credit, rel=0.05)
