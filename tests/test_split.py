"""The SemiRES label split: floor(p x N) images (at least 1), all refs of a sampled image labeled,
deterministic for a seed, written atomically."""

from __future__ import annotations

import json
import random

import pytest

from l2l_ray.data.split import label_split, num_labeled_images, read_split, write_split


def make_refs(num_images: int, refs_per_image: int = 3) -> list[tuple[int, int]]:
    """(ref_id, image_id) pairs; image ids are sparse like COCO's."""
    return [(1000 * i + j, 7 * i + 11) for i in range(num_images) for j in range(refs_per_image)]


@pytest.mark.parametrize("ratio,n,expected", [
    (0.001, 2000, 2), (0.01, 2000, 20), (0.05, 2000, 100), (0.1, 2000, 200), (1.0, 2000, 2000),
    (0.001, 500, 1),  # floor(0.5) = 0 -> at least one image
    (0.01, 1, 1), (0.29, 100, 29),  # 0.29 * 100 = 28.999999999999996 in floating point
    (0.999, 1000, 999), (0.5, 0, 0),
])
def test_floor_rule(ratio, n, expected):
    assert num_labeled_images(ratio, n) == expected


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="must be in"):
        num_labeled_images(ratio, 10)


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.05, 0.1, 1.0])
def test_split_partitions_refs_by_image(ratio):
    refs = make_refs(2000)
    s = label_split(refs, ratio, seed=0)
    image_of = dict(refs)
    expected = {0.001: 2, 0.01: 20, 0.05: 100, 0.1: 200, 1.0: 2000}[ratio]
    assert s.num_train_images == 2000 and len(s.labeled_image_ids) == expected
    assert set(s.labeled_ref_ids) | set(s.unlabeled_ref_ids) == set(image_of)
    assert not set(s.labeled_ref_ids) & set(s.unlabeled_ref_ids)
    labeled_images = set(s.labeled_image_ids)
    assert {image_of[r] for r in s.labeled_ref_ids} == labeled_images  # every ref of a sampled image
    assert all(image_of[r] not in labeled_images for r in s.unlabeled_ref_ids)
    assert len(s.labeled_ref_ids) == 3 * len(labeled_images)
    if ratio == 1.0:
        assert s.unlabeled_ref_ids == ()


def test_deterministic_and_order_independent():
    refs = make_refs(300)
    a = label_split(refs, 0.05, seed=0)
    shuffled = refs[:]
    random.Random(1).shuffle(shuffled)
    b = label_split(shuffled, 0.05, seed=0)
    assert a.labeled_image_ids == b.labeled_image_ids and set(a.labeled_ref_ids) == set(b.labeled_ref_ids)
    assert label_split(refs, 0.05, seed=0) == a
    assert label_split(refs, 0.05, seed=1).labeled_image_ids != a.labeled_image_ids  # C(300, 15) choices
    # the SemiRES recipe: random.sample over the image ids with a seeded generator
    assert set(a.labeled_image_ids) == set(random.Random(0).sample(sorted({i for _, i in refs}), 15))


def test_tiny_ratio_still_labels_one_image():
    s = label_split(make_refs(10, refs_per_image=2), 0.001, seed=3)
    assert len(s.labeled_image_ids) == 1 and len(s.labeled_ref_ids) == 2 and len(s.unlabeled_ref_ids) == 18


def test_write_and_read_split(tmp_path):
    s = label_split(make_refs(50), 0.1, seed=0)
    path = tmp_path / "run" / "label_split.json"
    write_split(path, s, dataset="synthref", split_by="unc")
    d = json.loads(path.read_text())
    assert d == read_split(path)
    assert d["dataset"] == "synthref" and d["label_ratio"] == 0.1 and d["seed"] == 0
    assert d["num_train_images"] == 50 and d["num_labeled_images"] == 5
    assert d["labeled_image_ids"] == list(s.labeled_image_ids)
    assert d["labeled_ref_ids"] == list(s.labeled_ref_ids) and d["num_unlabeled_refs"] == 135
    assert [p.name for p in path.parent.iterdir()] == ["label_split.json"]  # no temp file left behind
    assert read_split(tmp_path / "absent.json") is None
