"""The built-in synthetic REFER set: layout, masks, sentences, hardness, determinism, atomic writes."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from l2l_ray.data.synth import assign_splits, generate_image, write_synthetic
from l2l_ray.data.synth_figures import ann_mask, save_examples
from l2l_ray.data.synth_scene import FAMILIES
from l2l_ray.vocab import CATEGORIES, COLOURS

N_IMAGES, SEED, SIZE = 60, 3, 128
REF_KEYS = {"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids", "sentences"}
EXTREME_WORDS = {"left": ("left", "leftmost"), "right": ("right", "rightmost"), "top": ("top", "upper", "highest"),
                 "bottom": ("bottom", "lower", "lowest"), "big": ("bigger", "biggest", "largest", "big", "large"),
                 "small": ("smaller", "smallest", "small", "little", "tiny")}
RELATION_MARKERS = (" of ", "above the", "below the", "next to", "near the", "beside", "closest to")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """(dataset dir, refs, instances, stats) of a 60-image set."""
    root = tmp_path_factory.mktemp("synth")
    stats = write_synthetic(str(root), num_images=N_IMAGES, seed=SEED, image_size=SIZE)
    ds = root / "synthref"
    with open(ds / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    return ds, refs, json.loads((ds / "instances.json").read_text()), stats


@pytest.fixture(scope="module")
def scenes():
    """The generator's own objects per image index (same seed -> same scene as on disk)."""
    _, families = assign_splits(N_IMAGES, SEED)
    return [generate_image(SEED, i, families[i], SIZE) for i in range(N_IMAGES)]


def test_layout_files_parse(synth):
    ds, refs, inst, stats = synth
    assert set(inst) == {"images", "annotations", "categories"}
    assert [c["name"] for c in inst["categories"]] == list(CATEGORIES)
    assert len(inst["images"]) == N_IMAGES and sum(stats["images"].values()) == N_IMAGES
    anns = {a["id"]: a for a in inst["annotations"]}
    assert all(set(a) == {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
               for a in anns.values())
    for im in inst["images"]:
        img = cv2.imread(str(ds / "images" / im["file_name"]))
        assert img is not None and img.shape == (im["height"], im["width"], 3) == (SIZE, SIZE, 3)
    assert len(refs) == sum(stats["refs"].values())
    for r in refs:
        assert set(r) == REF_KEYS
        assert anns[r["ann_id"]]["image_id"] == r["image_id"]
        assert anns[r["ann_id"]]["category_id"] == r["category_id"]
        assert r["file_name"].endswith(f"_{r['ref_id']}.png") and not (ds / "images" / r["file_name"]).exists()
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
    assert len({r["ref_id"] for r in refs}) == len(refs)
    assert len({s for r in refs for s in r["sent_ids"]}) == sum(len(r["sent_ids"]) for r in refs)
    assert oct((ds / "images").stat().st_mode)[-3:] != "700"  # readable like any dataset


def test_masks_decode_to_visible_region(synth, scenes):
    ds, _, inst, _ = synth
    by_image: dict[int, list] = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    kinds = set()
    names, centres = list(COLOURS), np.array(list(COLOURS.values()), np.float32)
    colour_ok = colour_n = 0
    for image_id, anns in by_image.items():
        img, objs, _ = scenes[image_id - 1]
        assert len(anns) == len(objs)
        seen = np.zeros((SIZE, SIZE), bool)
        for a, o in zip(sorted(anns, key=lambda a: a["id"]), objs, strict=True):
            kinds.add(type(a["segmentation"]).__name__)
            m = ann_mask(a, SIZE, SIZE)
            assert m.any() and np.array_equal(m, o.visible), f"ann {a['id']}"
            assert m.sum() >= 0.6 * o.full.sum()  # occlusion hides at most 40% of an object
            assert not (m & seen).any()  # visible regions never overlap: occluded pixels belong to the top object
            seen |= m
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            assert a["area"] == m.sum() and np.allclose(a["bbox"], mask_utils.toBbox(rle))
            inner = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            if inner.sum() >= 10:  # the pixels under the mask are painted in the object's colour
                med = np.median(img[inner].astype(np.float32), axis=0)
                colour_n += 1
                colour_ok += names[int(np.argmin(((centres - med) ** 2).sum(1)))] == o.colour
        assert np.array_equal(seen, np.any([o.full for o in objs], axis=0))  # occlusion hides, never deletes
        disk = cv2.imread(str(ds / "images" / f"synthref_{image_id:012d}.png"))[:, :, ::-1]
        assert np.array_equal(disk, img)
    assert kinds == {"list", "dict"}  # polygons where nothing is hidden, RLE otherwise
    assert colour_ok / colour_n >= 0.95


def test_refs_need_disambiguation(synth):
    _, refs, inst, stats = synth
    cats = {}
    for a in inst["annotations"]:
        cats.setdefault(a["image_id"], []).append(a["category_id"])
    assert all(cats[r["image_id"]].count(r["category_id"]) >= 2 for r in refs)
    per_image = {}
    for r in refs:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert len(per_image) == N_IMAGES and all(2 <= n <= 4 for n in per_image.values())
    h = stats["hardness"]
    assert h["refs_with_2plus_same_category"] == 1.0
    assert h["colour_word_alone_unique"] < 0.3


def test_hardness_matches_scenes(synth, scenes):
    """The reported colour-alone share, recomputed here from the scenes and the refs on disk."""
    _, refs, _, stats = synth
    unique = 0
    for r in refs:
        _, objs, _ = scenes[r["image_id"] - 1]
        target = objs[r["ann_id"] % 100]
        unique += sum(o.colour == target.colour for o in objs) == 1
    assert stats["hardness"]["colour_word_alone_unique"] == round(unique / len(refs), 4)


def test_sentences_name_the_category(synth):
    _, refs, inst, _ = synth
    cat_names = {c["id"]: c["name"] for c in inst["categories"]}
    for r in refs:
        assert 2 <= len(r["sentences"]) <= 3
        assert len({s["sent"] for s in r["sentences"]}) == len(r["sentences"])
        for s in r["sentences"]:
            assert s["sent"] and s["tokens"] == s["sent"].split()
            assert s["sent"] == s["raw"].lower().rstrip(".")
            assert any(w in f" {s['sent']} " for w in (f" {w} " for w in CATEGORIES[cat_names[r["category_id"]]]))


def _extreme(sent: str) -> str | None:
    words = sent.split()
    for key, aliases in EXTREME_WORDS.items():
        if any(a in words for a in aliases):
            return key
    return None


def test_position_and_size_words_are_true(synth, scenes):
    """Independent check of simple sentences: 'left X' is the leftmost X (of the named colour), etc."""
    _, refs, _, _ = synth
    checked = 0
    for r in refs:
        _, objs, _ = scenes[r["image_id"] - 1]
        t = objs[r["ann_id"] % 100]
        for s in r["sentences"]:
            key = _extreme(s["sent"])
            if key is None or any(m in s["sent"] for m in RELATION_MARKERS):
                continue
            pool = [o for o in objs if o.cat == t.cat and (t.colour not in s["sent"].split() or o.colour == t.colour)]
            score = {"left": lambda o: -o.cx, "right": lambda o: o.cx, "top": lambda o: -o.cy,
                     "bottom": lambda o: o.cy, "big": lambda o: o.area, "small": lambda o: -o.area}[key]
            assert max(pool, key=score) is t, (r["ref_id"], s["sent"])
            checked += 1
    assert checked > 50


RELATIONS = (("to the left of", "left"), ("left of", "left"), ("to the right of", "right"), ("right of", "right"),
             ("above", "above"), ("below", "below"), ("next to", "near"), ("closest to", "near"), ("beside", "near"),
             ("near", "near"))


def _landmark(phrase: str, objs):
    """'the blue box' / 'the star' -> the one object it names (asserts that it names exactly one)."""
    words = phrase.split()
    assert words[0] == "the", phrase
    colour = words[1] if words[1] in COLOURS else None
    noun = " ".join(words[2:] if colour else words[1:])
    cat = next(c for c, syn in CATEGORIES.items() if noun in syn)
    hits = [o for o in objs if o.cat == cat and colour in (None, o.colour)]
    assert len(hits) == 1, phrase
    return hits[0]


def test_relation_sentences_are_true(synth, scenes):
    """'X left of the blue box': the box is unique and X is on its left; 'X next to Y': X is the nearest X."""
    _, refs, _, _ = synth
    checked = 0
    for r in refs:
        _, objs, _ = scenes[r["image_id"] - 1]
        t = objs[r["ann_id"] % 100]
        for s in r["sentences"]:
            found = next(((p, rel) for p, rel in RELATIONS if f" {p} the " in s["sent"]), None)
            if found is None:
                continue
            head, tail = s["sent"].split(f" {found[0]} ", 1)
            lm = _landmark(tail, objs)
            pool = [o for o in objs if o.cat == t.cat and (t.colour not in head.split() or o.colour == t.colour)]
            ok = {"left": t.cx < lm.cx, "right": t.cx > lm.cx, "above": t.cy < lm.cy, "below": t.cy > lm.cy,
                  "near": min(pool, key=lambda o: np.hypot(o.cx - lm.cx, o.cy - lm.cy)) is t}[found[1]]
            assert ok, (r["ref_id"], s["sent"])
            checked += 1
    assert checked > 30


def test_splits_cover_all_and_follow_families(synth):
    _, refs, inst, stats = synth
    split_of = {}
    for r in refs:
        assert split_of.setdefault(r["image_id"], r["split"]) == r["split"]  # split by image
    assert set(split_of.values()) == {"train", "val", "testA", "testB"}
    assert stats["images"] == {"train": 47, "val": 5, "testA": 4, "testB": 4}  # round(60 * 8%, 6%, 6%), rest
    cat_names = {c["id"]: c["name"] for c in inst["categories"]}
    for r in refs:
        if r["split"] in ("testA", "testB"):
            fam = FAMILIES["radial" if r["split"] == "testA" else "angular"]
            assert cat_names[r["category_id"]] in fam


def _tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_deterministic_bytes(tmp_path):
    """Same seed -> same bytes, also when two spawned worker processes share the images."""
    a, b, c = (write_synthetic(str(tmp_path / n), num_images=12, seed=s, workers=w)
               for n, s, w in (("a", 5, 1), ("b", 5, 2), ("c", 6, 1)))
    assert a["refs"] == b["refs"] and b["workers"] == 2
    ta, tb, tc = (_tree_bytes(tmp_path / n / "synthref") for n in "abc")
    assert len(ta) == 12 + 3 and ta == tb
    assert ta["instances.json"] != tc["instances.json"]


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    first = write_synthetic(str(tmp_path), num_images=6, seed=1)
    refs = tmp_path / "synthref" / "refs(unc).p"
    before = refs.stat().st_mtime_ns
    again = write_synthetic(str(tmp_path), num_images=6, seed=1)
    assert again["existing"] and again["refs"] == first["refs"] and refs.stat().st_mtime_ns == before
    with pytest.warns(UserWarning, match="already holds"):
        write_synthetic(str(tmp_path), num_images=8, seed=1)
    redo = write_synthetic(str(tmp_path), num_images=8, seed=1, overwrite=True)
    assert not redo["existing"] and sum(redo["images"].values()) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthref"]  # no temporary folders left


def test_failure_leaves_no_half_dataset(tmp_path, monkeypatch):
    import l2l_ray.data.synth as synth_mod

    real = synth_mod.generate_image

    def flaky(seed, index, family, size):
        if index == 4:
            raise RuntimeError("disk on fire")
        return real(seed, index, family, size)

    monkeypatch.setattr(synth_mod, "generate_image", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic(str(tmp_path), num_images=10)
    assert list(tmp_path.iterdir()) == []


def test_kill_leaves_no_half_dataset(tmp_path):
    code = f"from l2l_ray.data.synth import write_synthetic; write_synthetic({str(tmp_path)!r}, 100000, workers=1)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".synthref.tmp-*/images/*.png")) and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "synthref").exists() and list(tmp_path.glob(".synthref.tmp-*"))
    write_synthetic(str(tmp_path), num_images=4)  # the next writer clears the dead one's leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthref"]


def test_loader_reads_it(synth):
    refer = pytest.importorskip("l2l_ray.data.refer")
    ds_dir, refs, inst, stats = synth
    ds = refer.ReferDataset(str(ds_dir.parent), "synthref", "unc", strict=True)
    got = ds.stats()
    assert {s: v["refs"] for s, v in got["splits"].items()} == stats["refs"]
    assert {s: v["sentences"] for s, v in got["splits"].items()} == stats["sentences"]
    anns = {a["id"]: a for a in inst["annotations"]}
    for r in refs[:20]:
        want = ann_mask(anns[r["ann_id"]], SIZE, SIZE)
        got_rle = ds.mask_rle(r["ref_id"])
        assert np.array_equal(mask_utils.decode({**got_rle, "counts": _bytes(got_rle["counts"])}).astype(bool), want)


def _bytes(counts):
    return counts.encode("ascii") if isinstance(counts, str) else counts


def test_example_figures(synth, tmp_path):
    ds, _, _, _ = synth
    out = save_examples(str(ds), str(tmp_path), n=3)
    assert len({o["split"] for o in out}) == 3  # one image per split first
    for o in out:
        fig = cv2.imread(o["path"])
        assert fig.shape == (SIZE * 3, 2 * SIZE * 3 + 8, 3) and all(len(s) >= 2 for s in o["refs"])
