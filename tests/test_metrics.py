"""mIoU / oIoU / prec@X against hand-computed cases (LAVT protocol: one pair per (ref, sentence))."""

from __future__ import annotations

import numpy as np
import pytest

from l2l_ray.metrics import IoUAccumulator, batch_intersection_union, intersection_union, summarize


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_intersection_union_hand_case():
    gt = box(10, 10, 0, 4, 0, 4)  # 16 pixels
    pred = box(10, 10, 2, 6, 2, 6)  # 16 pixels, overlap rows/cols 2..3 = 4 pixels
    assert intersection_union(pred, gt) == (4, 28)
    assert intersection_union(np.zeros((10, 10), bool), gt) == (0, 16)  # empty prediction
    assert intersection_union(np.zeros((3, 3)), np.zeros((3, 3))) == (0, 0)  # empty union
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((3, 3)), np.zeros((3, 4)))


def test_summary_three_pairs():
    # pairs: IoU 4/28, 0/16 (empty prediction), 16/16 (exact)
    s = summarize(np.array([4, 0, 16]), np.array([28, 16, 16]))
    assert s["mIoU"] == pytest.approx((4 / 28 + 0 + 1) / 3)
    assert s["oIoU"] == pytest.approx(20 / 60)
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert s[f"prec@{t}"] == pytest.approx(1 / 3)
    assert s["n"] == 3


def test_precision_thresholds_are_inclusive():
    # IoUs exactly 0.5, 0.7 and 0.9: prec@X counts IoU >= X (LAVT), so 0.5 -> 3/3, 0.6 -> 2/3, 0.9 -> 1/3
    s = summarize(np.array([5, 7, 9]), np.array([10, 10, 10]))
    assert (s["prec@0.5"], s["prec@0.6"], s["prec@0.7"], s["prec@0.8"], s["prec@0.9"]) == pytest.approx(
        (1.0, 2 / 3, 2 / 3, 1 / 3, 1 / 3))
    assert s["mIoU"] == pytest.approx(0.7) and s["oIoU"] == pytest.approx(21 / 30)


def test_empty_union_counts_as_perfect_pair():
    # empty prediction on an empty truth: IoU 1 for mIoU and prec; it adds nothing to oIoU's sums
    s = summarize(np.array([0, 3]), np.array([0, 6]))
    assert s["mIoU"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["oIoU"] == pytest.approx(3 / 6)
    assert s["prec@0.5"] == 1.0 and s["prec@0.6"] == 0.5
    only_empty = summarize(np.array([0]), np.array([0]))
    assert only_empty["mIoU"] == 1.0 and only_empty["oIoU"] == 1.0


def test_no_pairs():
    s = summarize(np.array([], np.int64), np.array([], np.int64))
    assert s["n"] == 0 and s["mIoU"] == 0.0 and s["oIoU"] == 0.0


def test_accumulator_batch_equals_pairwise():
    gt = np.stack([box(8, 8, 0, 4, 0, 4), box(8, 8, 0, 8, 0, 8), np.zeros((8, 8), bool)])
    pred = np.stack([box(8, 8, 0, 4, 0, 2), np.zeros((8, 8), bool), np.zeros((8, 8), bool)])
    i, u = batch_intersection_union(pred, gt)
    assert i.tolist() == [8, 0, 0] and u.tolist() == [16, 64, 0]
    acc = IoUAccumulator()
    acc.add_batch(pred[:2], gt[:2])
    acc.add(*intersection_union(pred[2], gt[2]))
    s = acc.summary()
    assert s["mIoU"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert s["oIoU"] == pytest.approx(8 / 80)
    assert s["prec@0.5"] == pytest.approx(2 / 3) and s["prec@0.6"] == pytest.approx(1 / 3)


def test_size_terciles_split_pairs_by_true_area():
    from l2l_ray.metrics import size_terciles

    areas = np.array([0.01, 0.02, 0.03, 0.10, 0.11, 0.12, 0.40, 0.50, 0.60])
    inters = np.array([0, 1, 2, 3, 3, 3, 4, 4, 4])
    unions = np.full(9, 4)
    got = size_terciles(inters, unions, areas)
    assert got["mIoU_small"] == pytest.approx((0 + 0.25 + 0.5) / 3)
    assert got["mIoU_medium"] == pytest.approx(0.75) and got["mIoU_large"] == pytest.approx(1.0)
    assert got["area_tercile_1"] == pytest.approx(np.quantile(areas, 1 / 3))
    assert size_terciles(np.zeros(0), np.zeros(0), np.zeros(0)) == {}
