"""The REFER loader on the genuine RefCOCO / RefCOCO+ / RefCOCOg records (stand-in images), the mask
semantics (union of polygon parts, RLE), bad input, images, and load_dataset."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from l2l_ray.config import Config, ConfigError
from l2l_ray.data import DataError, load_dataset
from l2l_ray.data.images import ImageError, SafeImageLoader, load_image, load_mask_resized
from l2l_ray.data.refer import ReferDataset, segmentation_to_rle, split_matches
from l2l_ray.masks import decode_rle, encode_rle
from l2l_ray.records import UnlabeledSample

# the fixture README's table: (dataset, split_by) -> refs, sentences, splits
FIXTURE_TABLE = {
    ("refcoco", "unc"): (8, 23, ("train", "val", "testA", "testB")),
    ("refcoco", "google"): (6, 17, ("train", "val", "test")),
    ("refcoco+", "unc"): (8, 25, ("train", "val", "testA", "testB")),
    ("refcocog", "umd"): (6, 12, ("train", "val", "test")),
    ("refcocog", "google"): (4, 8, ("train", "val")),
}
SCHEMES = list(FIXTURE_TABLE)


def write_stand_in_images(root: str, dataset: str, image_dir: Path) -> int:
    """Grey JPEGs of the sizes in instances.json, named by its file_name. Returns how many."""
    image_dir.mkdir(parents=True, exist_ok=True)
    images = json.loads((Path(root) / dataset / "instances.json").read_text())["images"]
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (120, 110, 100)).save(image_dir / im["file_name"])
    return len(images)


def copy_dataset(src_root: str, dataset: str, dst_root: Path) -> Path:
    shutil.copytree(Path(src_root) / dataset, dst_root / dataset)
    return dst_root / dataset


def rewrite_refs(path: Path, edit) -> None:
    refs = pickle.loads(path.read_bytes())
    edit(refs)
    path.chmod(0o644)
    path.write_bytes(pickle.dumps(refs))


@pytest.mark.parametrize("dataset,split_by", SCHEMES)
def test_counts_match_fixture_table(refer_fixture_root, dataset, split_by):
    n_refs, n_sents, splits = FIXTURE_TABLE[(dataset, split_by)]
    ds = ReferDataset(refer_fixture_root, dataset, split_by, strict=True)
    st = ds.stats()
    assert (st["refs"], st["sentences"]) == (n_refs, n_sents)
    assert tuple(st["splits"]) == splits
    assert all(s["refs"] > 0 for s in st["splits"].values())
    # the fixture's splits do not overlap, so the per-split counts add up to the totals
    assert sum(s["refs"] for s in st["splits"].values()) == n_refs
    assert sum(s["sentences"] for s in st["splits"].values()) == n_sents
    raw = pickle.loads(ds.refs_path.read_bytes())
    assert sorted(ds.ref_ids()) == sorted(r["ref_id"] for r in raw)


@pytest.mark.parametrize("dataset,split_by", SCHEMES)
def test_mask_areas_and_eval_pairs(refer_fixture_root, tmp_path, dataset, split_by):
    write_stand_in_images(refer_fixture_root, dataset, tmp_path / "train2014")
    ds = ReferDataset(refer_fixture_root, dataset, split_by, str(tmp_path / "train2014"), strict=True)
    assert ds.drop_missing_images() == len({ds.image_id(r) for r in ds.ref_ids()})
    for sample in ds.labeled_samples(ds.ref_ids()):
        ann = ds.anns[ds.refs[sample.ref_id].ann_id]
        mask = sample.mask()
        assert mask.shape == (sample.height, sample.width) and mask.dtype == bool
        assert abs(mask.sum() - ann["area"]) <= 0.01 * ann["area"], (sample.ref_id, mask.sum(), ann["area"])
        assert Path(sample.image_path).is_file()  # instances.json file_name, not the ref's own file_name
    raw = {r["ref_id"]: r for r in pickle.loads(ds.refs_path.read_bytes())}
    for split in ds.splits:
        pairs = ds.eval_samples(split)
        expected = [(rid, s["sent_id"]) for rid in ds.ref_ids(split) for s in raw[rid]["sentences"]]
        assert [(p.ref_id, p.sent_id) for p in pairs] == expected
        texts = {s["sent_id"]: " ".join(s["raw"].split()) for r in raw.values() for s in r["sentences"]}
        assert all(p.sentence == texts[p.sent_id] for p in pairs)  # LAVT reads `raw`
        assert {p.split for p in pairs} == {split}


def test_split_semantics_follow_getRefIds():
    assert split_matches("testA", "testA") and split_matches("testA", "testAB")
    assert not split_matches("testA", "testB") and not split_matches("testA", "train")
    assert split_matches("test", "testA") and split_matches("test", "test")
    assert split_matches("train", "train") and not split_matches("train", "val")
    assert split_matches("testAB", "testAB") and not split_matches("testAB", "testA")


def test_unknown_scheme_names_valid_ones(refer_fixture_root):
    with pytest.raises(ConfigError, match="refcocog/umd"):
        ReferDataset(refer_fixture_root, "refcocog", "unc")


def test_union_of_polygon_parts_and_rle_forms():
    one = [[1, 1, 5, 1, 5, 5, 1, 5]]  # rows/cols 1..4: 16 pixels
    two = one + [[3, 3, 7, 3, 7, 7, 3, 7]]  # overlaps the first in a 2x2 block: union 16 + 16 - 4
    assert decode_rle(segmentation_to_rle(one, 10, 10)).sum() == 16
    union = decode_rle(segmentation_to_rle(two, 10, 10))
    assert union.sum() == 28  # union, not the sum of parts (32)
    # compressed RLE (str counts, as the synthetic set may write) and uncompressed COCO RLE
    compressed = encode_rle(union)
    assert np.array_equal(decode_rle(segmentation_to_rle(compressed, 10, 10)), union)
    uncompressed = {"size": [4, 5], "counts": [3, 4, 13]}  # column-major: 3 off, 4 on, 13 off
    m = decode_rle(segmentation_to_rle(uncompressed, 4, 5))
    assert m.sum() == 4 and m.T.reshape(-1)[3:7].all()
    with pytest.raises(ValueError, match="size"):
        segmentation_to_rle(compressed, 10, 12)
    with pytest.raises(ValueError, match="3 points"):
        segmentation_to_rle([[1, 1, 5, 1]], 10, 10)


def test_missing_annotation_files(refer_fixture_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p.*download .*refcoco\.zip"):
        ReferDataset(tmp_path, "refcoco", "unc")
    d = copy_dataset(refer_fixture_root, "refcoco", tmp_path)
    (d / "instances.json").chmod(0o644)
    (d / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        ReferDataset(tmp_path, "refcoco", "unc")
    with pytest.raises(FileNotFoundError, match="l2l data synth"):
        ReferDataset(tmp_path, "synthref", "unc")


def test_unresolvable_ann_id(refer_fixture_root, tmp_path):
    d = copy_dataset(refer_fixture_root, "refcoco", tmp_path)
    rewrite_refs(d / "refs(unc).p", lambda refs: refs[3].update(ann_id=999999999))
    bad_ref = pickle.loads((d / "refs(unc).p").read_bytes())[3]["ref_id"]
    with pytest.raises(DataError, match=rf"ref {bad_ref} .*ann_id 999999999 not found"):
        ReferDataset(tmp_path, "refcoco", "unc", strict=True)
    ds = ReferDataset(tmp_path, "refcoco", "unc")
    assert ds.skipped == {"unresolved_ann_id": 1}
    assert bad_ref not in ds.ref_ids() and len(ds.ref_ids()) == 7
    assert ds.stats()["skipped"] == {"unresolved_ann_id": 1}


def test_empty_sentences(refer_fixture_root, tmp_path):
    d = copy_dataset(refer_fixture_root, "refcoco", tmp_path)

    def edit(refs):
        refs[0]["sentences"][1].update(raw="   ", sent="")
        for s in refs[1]["sentences"]:  # every sentence of ref 1 empty -> the ref is skipped
            s.update(raw="", sent="")

    rewrite_refs(d / "refs(unc).p", edit)
    refs = pickle.loads((d / "refs(unc).p").read_bytes())
    rid, sid = refs[0]["ref_id"], refs[0]["sentences"][1]["sent_id"]
    with pytest.raises(DataError, match=rf"ref {rid} .*sentence {sid} is empty"):
        ReferDataset(tmp_path, "refcoco", "unc", strict=True)
    ds = ReferDataset(tmp_path, "refcoco", "unc")
    n1 = len(refs[1]["sentences"])
    assert ds.skipped == {"empty_sentence": 1 + n1, "no_sentences": 1}
    assert ds.stats()["sentences"] == 23 - 1 - n1 and ds.stats()["refs"] == 7
    assert sid not in [s.sent_id for s in ds.refs[rid].sentences]


def test_images_load_resize_and_errors(tmp_path):
    Image.new("L", (40, 30), 200).save(tmp_path / "gray.png")  # grayscale -> RGB
    img = load_image(str(tmp_path / "gray.png"), 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and (img == 200).all()
    assert load_image(str(tmp_path / "gray.png")).shape == (30, 40, 3)
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    for name in ("corrupt.jpg", "truncated.jpg"):
        with pytest.raises(ImageError, match=name):
            load_image(str(tmp_path / name), 16)
    with pytest.raises(ImageError, match="not found: .*missing.jpg"):
        load_image(str(tmp_path / "missing.jpg"), 16)
    loader = SafeImageLoader(16)
    results = [loader(str(tmp_path / n)) for n in ("gray.png", "corrupt.jpg", "missing.jpg", "truncated.jpg")]
    assert results[0].shape == (16, 16, 3) and results[1:] == [None, None, None]
    assert loader.failures == {"corrupt": 2, "missing": 1} and "corrupt.jpg" in loader.report()


def test_mask_resize_is_nearest():
    m = np.array([[1, 0], [0, 1]], bool)
    big = load_mask_resized(m, 4)
    assert big.dtype == bool and np.array_equal(big, np.kron(m, np.ones((2, 2), int)).astype(bool))
    assert np.array_equal(load_mask_resized(big, 2), m)


def fixture_config(root: str, image_dir: Path, **data) -> Config:
    return Config.from_dict({"data": {"root": root, "dataset": "refcoco", "split_by": "unc",
                                      "image_dir": str(image_dir), **data}})


def test_load_dataset_on_real_records(refer_fixture_root, tmp_path):
    write_stand_in_images(refer_fixture_root, "refcoco", tmp_path / "img")
    cfg = fixture_config(refer_fixture_root, tmp_path / "img", label_ratio=1.0)
    b = load_dataset(cfg, run_dir=tmp_path / "run")
    assert [s.ref_id for s in b.labeled] == ReferDataset(refer_fixture_root, "refcoco", "unc").ref_ids("train")
    assert b.unlabeled == [] and list(b.eval) == ["val", "testA", "testB"]
    assert [len(v) for v in b.eval.values()] == [6, 6, 6] and b.skipped == {}
    split = json.loads((tmp_path / "run" / "label_split.json").read_text())
    assert split["labeled_ref_ids"] == [s.ref_id for s in b.labeled] and split["label_ratio"] == 1.0
    # the same run folder with another ratio would mix two splits: refused
    with pytest.raises(DataError, match="different label split"):
        load_dataset(fixture_config(refer_fixture_root, tmp_path / "img", label_ratio=0.5), tmp_path / "run")


def test_unlabeled_samples_have_no_mask(refer_fixture_root, tmp_path):
    write_stand_in_images(refer_fixture_root, "refcoco", tmp_path / "img")
    ds = ReferDataset(refer_fixture_root, "refcoco", "unc", str(tmp_path / "img"))
    (u,) = ds.unlabeled_samples(ds.ref_ids("train")[:1])
    assert isinstance(u, UnlabeledSample)
    for name in ("mask", "mask_rle", "segmentation"):
        assert not hasattr(u, name)


def test_missing_images_skipped_or_fatal(refer_fixture_root, tmp_path):
    n = write_stand_in_images(refer_fixture_root, "refcoco", tmp_path / "img")
    victim = sorted((tmp_path / "img").iterdir())[0]
    victim.unlink()
    ds = ReferDataset(refer_fixture_root, "refcoco", "unc", str(tmp_path / "img"))
    assert ds.drop_missing_images() == n - 1
    assert ds.skipped["missing_image"] == 8 - len(ds.ref_ids()) > 0
    assert victim.name in ds.problems[0]
    with pytest.raises(DataError, match=victim.name):
        ReferDataset(refer_fixture_root, "refcoco", "unc", str(tmp_path / "img"), strict=True).drop_missing_images()
    with pytest.raises(FileNotFoundError, match="data.image_dir"):
        ReferDataset(refer_fixture_root, "refcoco", "unc", str(tmp_path / "nowhere")).drop_missing_images()


def test_coco_rle_of_fixture_matches_pycocotools_annToMask(refer_fixture_root):
    """Parity with the REFER/COCO API: frPyObjects -> merge -> decode of the raw annotation."""
    ds = ReferDataset(refer_fixture_root, "refcocog", "umd")
    for rid in ds.ref_ids():
        ref = ds.refs[rid]
        im, ann = ds.images[ref.image_id], ds.anns[ref.ann_id]
        rles = mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"])
        expected = mask_utils.decode(rles).sum(axis=2) > 0  # REFER getMask: sum of parts, LAVT: > 0
        assert np.array_equal(decode_rle(ds.mask_rle(rid)), expected)


def test_ensure_data_writes_synthref_once_and_refuses_missing_real(tmp_path):
    pytest.importorskip("l2l_ray.data.synth", reason="l2l_ray/data/synth.py not in the tree yet")
    from l2l_ray.data import ensure_data

    cfg = Config.from_dict({"data": {"root": str(tmp_path), "synth_images": 12, "label_ratio": 0.5}})
    ensure_data(cfg)
    refs = tmp_path / "synthref" / "refs(unc).p"
    assert refs.is_file() and (tmp_path / "synthref" / "instances.json").is_file()
    mtime = refs.stat().st_mtime_ns
    b = load_dataset(cfg)  # present now: not rewritten
    assert refs.stat().st_mtime_ns == mtime
    assert b.stats["image_files_found"] == 12 and b.skipped == {}
    assert b.stats["labeled_images"] == b.stats["train_images"] // 2
    real = Config.from_dict({"data": {"root": str(tmp_path), "dataset": "refcoco+"}})
    with pytest.raises(FileNotFoundError, match=r"refcoco\+/refs\(unc\)\.p.*refcoco\+\.zip"):
        ensure_data(real)
