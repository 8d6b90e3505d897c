"""The built-in synthetic referring-segmentation set "synthref", written in the genuine REFER layout.

    l2l data synth --out data --images 2000 --seed 0        # or, from Python:
    python -c "from l2l_ray.data.synth import write_synthetic; print(write_synthetic('data'))"

Layout (read back by the same loader as RefCOCO):
    <root>/synthref/refs(unc).p       pickle: list of REFER ref dicts (splits train/val/testA/testB)
    <root>/synthref/instances.json    COCO: images, annotations (visible-region masks), categories
    <root>/synthref/images/<file_name> PNG, square ``image_size`` px
    <root>/synthref/synth_meta.json   generator parameters and statistics (not part of REFER)

Each image has 1-2 referred categories of one family with >= 2 instances each, 2-4 refs and 2-3
sentences per ref; testA images refer to "radial" shapes only, testB images to "angular" ones only
(RefCOCO's people vs objects). Same seed -> same bytes; each image draws from its own seeded stream.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from l2l_ray.data.synth_scene import CATEGORY_NAMES, FAMILIES, render, sample_scene, segmentation
from l2l_ray.data.synth_text import describe, raw_form

DATASET = "synthref"
SPLITS = ("train", "val", "testA", "testB")
SPLIT_SHARES = {"val": 0.08, "testA": 0.06, "testB": 0.06}  # the rest is train
VERSION = 1
# Huffman-only zlib: the sensor noise defeats LZ77 matching anyway; faster and smaller than level 1 here
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]


def assign_splits(num_images: int, seed: int) -> tuple[list[str], list[str]]:
    """Split and family per image index. testA -> "radial", testB -> "angular", train/val either (50/50).

    Counts are fixed shares of ``num_images`` (each split gets >= 1 image when ``num_images >= 4``), and
    which image lands where is a seeded permutation.
    """
    rng = np.random.default_rng([seed, 1 << 30])
    counts = {s: max(1, round(share * num_images)) if num_images >= 4 else 0 for s, share in SPLIT_SHARES.items()}
    order = rng.permutation(num_images)
    splits = ["train"] * num_images
    start = 0
    for split, n in counts.items():
        for i in order[start:start + n]:
            splits[i] = split
        start += n
    fams = list(FAMILIES)
    families = [
        fams[0] if s == "testA" else fams[1] if s == "testB" else fams[int(rng.integers(2))] for s in splits
    ]
    return splits, families


def _choose_refs(objs, rng: np.random.Generator, family: str, size: int) -> list[tuple[int, list]]:
    """2-4 (object index, [(sentence, cue)]) of the family's categories that have >= 2 instances."""
    min_px = 20 * (size / 128) ** 2
    count = {c: sum(o.cat == c for o in objs) for c in CATEGORY_NAMES}
    cands = [i for i, o in enumerate(objs) if o.cat in FAMILIES[family] and count[o.cat] >= 2
             and o.visible.sum() >= min_px]
    want = int(rng.integers(2, 5))
    refs = []
    for i in rng.permutation(cands):
        sents = describe(int(i), objs, rng, size, int(rng.choice([2, 3])))
        if len(sents) >= 2:
            refs.append((int(i), sents))
        if len(refs) == want:
            break
    return refs


def generate_image(seed: int, index: int, family: str, size: int):
    """One image: (RGB uint8 (size, size, 3), objects in drawing order, refs as from ``_choose_refs``)."""
    rng = np.random.default_rng([seed, index])
    for _ in range(50):
        objs = sample_scene(rng, family, size)
        refs = _choose_refs(objs, rng, family, size)
        if len(refs) >= 2:
            return render(objs, rng, size), objs, refs
    raise RuntimeError(f"synthref: no scene with 2 describable refs for image {index} (seed {seed}, size {size})")


def image_records(seed: int, index: int, family: str, split: str, size: int, image_dir: str) -> dict:
    """Generate image ``index``, write its PNG into ``image_dir``, return its COCO/REFER records.

    Pure per image (own seeded stream, ids derived from the index), so any process can run it. Refs carry
    no ref_id / sent_id yet: those are numbered in image order by ``_Builder``.
    """
    img, objs, refs = generate_image(seed, index, family, size)
    image_id = index + 1
    file_name = f"{DATASET}_{image_id:012d}.png"
    ok, png = cv2.imencode(".png", np.ascontiguousarray(img[:, :, ::-1]), _PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"synthref: PNG encoding failed for image {image_id}")
    (Path(image_dir) / file_name).write_bytes(png.tobytes())
    anns, n_occluded = [], 0
    for k, o in enumerate(objs):  # ann id = image_id * 100 + k: a scene has at most 9 objects
        rle = mask_utils.encode(np.asfortranarray(o.visible.astype(np.uint8)))
        anns.append({"id": image_id * 100 + k, "image_id": image_id, "category_id": CATEGORY_NAMES.index(o.cat) + 1,
                     "segmentation": segmentation(o), "area": float(mask_utils.area(rle)),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
        n_occluded += int(not np.array_equal(o.visible, o.full))
    out_refs = []
    for k, sents in refs:
        t, rng = objs[k], np.random.default_rng([seed, image_id * 100 + k, 7])
        out_refs.append({
            "ann_id": image_id * 100 + k, "category_id": CATEGORY_NAMES.index(t.cat) + 1,
            "sentences": [{"tokens": s.split(), "raw": raw_form(s, rng), "sent": s} for s, _ in sents],
            "cues": [(c.kind, c.colour) for _, c in sents],
            "ge2_same_cat": sum(o.cat == t.cat for o in objs) >= 2,
            "colour_unique": sum(o.colour == t.colour for o in objs) == 1,
            "colour_cat_unique": sum(o.colour == t.colour and o.cat == t.cat for o in objs) == 1})
    return {"image": {"id": image_id, "file_name": file_name, "width": size, "height": size}, "split": split,
            "anns": anns, "refs": out_refs, "occluded": n_occluded,
            "rle": sum(isinstance(a["segmentation"], dict) for a in anns)}


def _image_chunk(args: tuple) -> list[dict]:
    seed, indices, families, splits, size, image_dir = args
    return [image_records(seed, i, f, s, size, image_dir) for i, f, s in zip(indices, families, splits, strict=True)]


class _Builder:
    """Numbers refs and sentences in image order; accumulates the REFER/COCO records and statistics."""

    def __init__(self) -> None:
        self.images, self.anns, self.refs = [], [], []
        self.count = {k: dict.fromkeys(SPLITS, 0) for k in ("images", "refs", "sentences")}
        self.h = dict.fromkeys(["refs", "ge2_same_cat", "colour_unique", "colour_cat_unique", "sentences",
                                "names_colour", "occluded", "rle"], 0)
        self.cues = dict.fromkeys(["position", "size", "relation", "colour"], 0)
        self.next_sent_id = 1

    def add(self, rec: dict) -> None:
        split, image_id = rec["split"], rec["image"]["id"]
        self.images.append(rec["image"])
        self.anns += rec["anns"]
        self.count["images"][split] += 1
        self.h["occluded"] += rec["occluded"]
        self.h["rle"] += rec["rle"]
        for r in rec["refs"]:
            ref_id = len(self.refs) + 1
            sentences = [{"tokens": s["tokens"], "raw": s["raw"], "sent_id": self.next_sent_id + n, "sent": s["sent"]}
                         for n, s in enumerate(r["sentences"])]
            self.next_sent_id += len(sentences)
            self.refs.append({"sent_ids": [s["sent_id"] for s in sentences],
                              "file_name": f"{DATASET}_{image_id:012d}_{ref_id}.png", "ann_id": r["ann_id"],
                              "ref_id": ref_id, "image_id": image_id, "split": split, "sentences": sentences,
                              "category_id": r["category_id"]})
            self.count["refs"][split] += 1
            self.count["sentences"][split] += len(sentences)
            for kind, named in r["cues"]:
                self.cues[kind] += 1
                self.h["names_colour"] += int(named)
            self.h["refs"] += 1
            self.h["sentences"] += len(sentences)
            for key in ("ge2_same_cat", "colour_unique", "colour_cat_unique"):
                self.h[key] += int(r[key])

    def stats(self) -> dict:
        h, nr, ns, no = self.h, max(1, self.h["refs"]), max(1, self.h["sentences"]), max(1, len(self.anns))
        return {**{k: dict(v) for k, v in self.count.items()}, "objects": len(self.anns), "hardness": {
            "refs_with_2plus_same_category": round(h["ge2_same_cat"] / nr, 4),
            "colour_word_alone_unique": round(h["colour_unique"] / nr, 4),
            "colour_and_category_unique": round(h["colour_cat_unique"] / nr, 4),
            "sentences_naming_target_colour": round(h["names_colour"] / ns, 4),
            "sentence_cue_share": {k: round(v / ns, 4) for k, v in self.cues.items()},
            "occluded_objects": round(h["occluded"] / no, 4),
            "rle_annotations": round(h["rle"] / no, 4)}}

    def instances(self) -> dict:
        cats = [{"id": i + 1, "name": c, "supercategory": next(f for f, cs in FAMILIES.items() if c in cs)}
                for i, c in enumerate(CATEGORY_NAMES)]
        return {"images": self.images, "annotations": self.anns, "categories": cats}


def _existing(root: Path, num_images: int, seed: int, image_size: int) -> dict | None:
    """Stats of a complete dataset already at ``root/synthref`` (None if there is none)."""
    ds = root / DATASET
    if not ((ds / "refs(unc).p").is_file() and (ds / "instances.json").is_file()):
        return None
    meta_path = ds / "synth_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    params = meta.get("params", {})
    wanted = {"num_images": num_images, "seed": seed, "image_size": image_size}
    if params and any(params.get(k) != v for k, v in wanted.items()):
        warnings.warn(f"{ds} already holds a synthref set made with {params}, not {wanted}; keeping it "
                      "(pass overwrite=True or delete the folder to regenerate)", stacklevel=3)
    stats = dict(meta.get("stats", {}))
    if not stats:
        with open(ds / "refs(unc).p", "rb") as f:
            refs = pickle.load(f)
        stats = {k: dict.fromkeys(SPLITS, 0) for k in ("refs", "sentences")}
        for r in refs:
            stats["refs"][r["split"]] += 1
            stats["sentences"][r["split"]] += len(r["sentences"])
    return {"root": str(root), "dataset": DATASET, "params": params, **stats, "seconds": 0.0, "existing": True}


def _remove_stale_tmp(root: Path) -> None:
    """Delete temporary folders left by killed writers on this machine (their pid is gone)."""
    for d in root.glob(f".{DATASET}.tmp-*"):
        try:
            os.kill(int(d.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def _write_tree(tmp: Path, b: _Builder, params: dict, stats: dict) -> None:
    # pickle's memo follows object identity, which differs between 1 and N worker processes; a JSON round
    # trip makes identity a function of content, so the bytes are the same either way
    with open(tmp / "refs(unc).p", "wb") as f:
        pickle.dump(json.loads(json.dumps(b.refs)), f, protocol=4)
    with open(tmp / "instances.json", "w") as f:
        f.write(json.dumps(b.instances(), separators=(",", ":")))  # dumps: C encoder, json.dump is pure Python
    with open(tmp / "synth_meta.json", "w") as f:  # no timings or paths here: same seed -> same bytes
        json.dump({"generator": "l2l_ray.data.synth", "params": params, "stats": stats}, f, indent=1)


def _move_into_place(tmp: Path, ds: Path, overwrite: bool) -> bool:
    """Rename the finished temporary folder onto ``ds``. False if another writer got there first.

    With ``overwrite`` the old set is first moved aside (and restored if the rename fails), so at every
    instant ``ds`` is either absent, the old complete set or the new complete set.
    """
    old = Path(tempfile.mkdtemp(prefix=f".{DATASET}.old-", dir=ds.parent)) / DATASET if overwrite else None
    if old is not None and ds.exists():
        os.replace(ds, old)
    try:
        os.rename(tmp, ds)
    except OSError:
        if old is not None and old.exists() and not ds.exists():
            os.replace(old, ds)
        if not ds.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    finally:
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    return True


def _generate_all(tmp: Path, num_images: int, seed: int, size: int, workers: int) -> _Builder:
    """Every image's records, in image order, from ``workers`` spawned processes (1: this process)."""
    splits, families = assign_splits(num_images, seed)
    step = max(1, min(100, -(-num_images // max(1, 4 * workers))))
    chunks = [(seed, list(range(i, min(i + step, num_images))), families[i:i + step], splits[i:i + step], size,
               str(tmp / "images")) for i in range(0, num_images, step)]
    b = _Builder()
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:  # spawn, not fork: forking a process that already used OpenCV's thread pool can hang
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_image_chunk, chunks))
        except BrokenProcessPool as e:  # e.g. a script without an ``if __name__ == "__main__"`` guard
            warnings.warn(f"synthref: worker processes failed ({e}); generating in this process", stacklevel=3)
            results = [_image_chunk(c) for c in chunks]
    else:
        results = [_image_chunk(c) for c in chunks]
    for recs in results:
        for rec in recs:
            b.add(rec)
    return b


def write_synthetic(root: str, num_images: int = 2000, seed: int = 0, image_size: int = 128,
                    overwrite: bool = False, workers: int | None = None) -> dict:
    """Write ``<root>/synthref`` (REFER layout) unless a complete one exists; return its statistics.

    Built in a temporary sibling folder and renamed into place, so a kill never leaves half a dataset.
    ``workers``: processes (None: up to 8 CPUs for >= 400 images, else 1); the bytes do not depend on it.
    Returns ``{"images"|"refs"|"sentences": {split: n}, "objects", "hardness": {...}, "seconds", ...}``.
    """
    if num_images < 1 or image_size < 32:
        raise ValueError(f"write_synthetic: num_images={num_images} must be >= 1 and image_size={image_size} >= 32")
    root_p = Path(root)
    params = {"num_images": num_images, "seed": seed, "image_size": image_size, "version": VERSION}
    if not overwrite and (found := _existing(root_p, num_images, seed, image_size)) is not None:
        return found
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(8, cpus) if num_images >= 400 else 1
    t0 = time.perf_counter()
    root_p.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root_p)
    tmp = root_p / f".{DATASET}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: that makes a 0700 folder, and the dataset should be readable like any other
    try:
        (tmp / "images").mkdir()
        b = _generate_all(tmp, num_images, seed, image_size, workers)
        stats = b.stats()
        _write_tree(tmp, b, params, stats)
        placed = _move_into_place(tmp, root_p / DATASET, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not placed:
        return _existing(root_p, num_images, seed, image_size)
    return {"root": str(root_p), "dataset": DATASET, "params": params, **stats,
            "seconds": round(time.perf_counter() - t0, 3), "existing": False, "workers": workers}
