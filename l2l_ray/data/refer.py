"""Read a REFER root as published (no Ray, no torch): ``<root>/<dataset>/refs(<split_by>).p`` plus
``<root>/<dataset>/instances.json``; images from ``image_dir`` by the ``file_name`` in instances.json.

    ds = ReferDataset("data", "refcoco", "unc", image_dir="coco/train2014")
    ds.ref_ids("testA")              # REFER getRefIds semantics
    ds.labeled_samples(ids)          # -> [LabeledSample]  (mask as COCO RLE, decoded lazily)
    ds.unlabeled_samples(ids)        # -> [UnlabeledSample] (no mask at all)
    ds.eval_samples("val")           # -> [EvalSample], one per (ref, sentence)

Bad records (an ``ann_id`` that does not resolve, an empty sentence, a bad segmentation, a missing
image file) raise ``DataError`` naming the ref / sentence / file when ``strict=True``; otherwise they
are skipped and counted by reason in ``ds.skipped`` (first messages in ``ds.problems``).
"""

from __future__ import annotations

import json
import numbers
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pycocotools import mask as mask_utils

from l2l_ray.config import ConfigError
from l2l_ray.errors import DataError
from l2l_ray.records import EvalSample, LabeledSample, Sentence, UnlabeledSample

# (dataset, split_by) -> the splits of that scheme (REFER README; synthref is the built-in set)
SCHEMES: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "google"): ("train", "val", "test"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("synthref", "unc"): ("train", "val", "testA", "testB"),
}
DOWNLOAD_URL = "https://bvisionweb1.cs.unc.edu/licheng/referit/data/{dataset}.zip"
MAX_PROBLEMS = 20  # messages kept for the report; every problem is still counted


def scheme_splits(dataset: str, split_by: str) -> tuple[str, ...]:
    """The splits of a (dataset, split_by) scheme; ConfigError naming the valid pairs otherwise."""
    if (dataset, split_by) not in SCHEMES:
        valid = ", ".join(f"{d}/{s}" for d, s in SCHEMES)
        raise ConfigError(f"data.dataset={dataset!r} with data.split_by={split_by!r} is not a known REFER "
                          f"scheme; choose one of {valid}")
    return SCHEMES[(dataset, split_by)]


def split_matches(split: str, ref_split: str) -> bool:
    """REFER ``getRefIds(split=...)``: testA/B/C match any split containing the letter (testAB too),
    ``test`` matches every test split, train / val / testAB-style names match exactly."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def segmentation_to_rle(seg, height: int, width: int) -> dict:
    """A COCO segmentation -> one compressed RLE ``{"size": [H, W], "counts": str}``.

    Polygons: every part rasterised (pycocotools ``frPyObjects``) and merged, i.e. the union of parts
    (REFER's ``getMask`` sums the parts and LAVT keeps ``> 0``). Parts with fewer than 3 points are
    dropped (pycocotools would read a 4-number part as a box). RLE dicts: uncompressed (counts list)
    or compressed (counts str/bytes). Raises ValueError on anything else or a size mismatch.
    """
    if isinstance(seg, dict):
        segs = [seg]
    elif isinstance(seg, list) and seg and all(isinstance(p, dict) for p in seg):
        segs = seg
    elif isinstance(seg, list):
        polys = [[float(v) for v in p] for p in seg if isinstance(p, (list, tuple)) and len(p) >= 6]
        if not polys:
            raise ValueError("segmentation has no polygon with at least 3 points")
        rles = mask_utils.frPyObjects([p[: len(p) // 2 * 2] for p in polys], height, width)
        return _to_str(mask_utils.merge(rles))
    else:
        raise ValueError(f"segmentation of type {type(seg).__name__} is neither polygons nor RLE")
    rles = []
    for s in segs:
        if "counts" not in s or "size" not in s:
            raise ValueError("RLE segmentation needs 'size' and 'counts'")
        if [int(v) for v in s["size"]] != [height, width]:
            raise ValueError(f"RLE size {list(s['size'])} != image size [{height}, {width}]")
        counts = s["counts"]
        if isinstance(counts, list):
            rles.append(mask_utils.frPyObjects(s, height, width))
        else:
            counts = counts.encode("ascii") if isinstance(counts, str) else counts
            rles.append({"size": [height, width], "counts": counts})
    return _to_str(mask_utils.merge(rles) if len(rles) > 1 else rles[0])


def _to_str(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


@dataclass(frozen=True)
class _Ref:
    ref_id: int
    image_id: int
    ann_id: int
    split: str
    category: str
    sentences: tuple[Sentence, ...]


class ReferDataset:
    """The refs, images and annotations of one REFER scheme, validated and indexed.

    Masks are not decoded here: ``labeled_samples`` / ``eval_samples`` carry compact RLEs that the
    records decode on demand (``sample.mask()`` -> bool (H, W) at the image's own resolution).
    """

    def __init__(self, root: str | os.PathLike, dataset: str, split_by: str, image_dir: str = "",
                 strict: bool = False):
        self.dataset, self.split_by, self.strict = dataset, split_by, strict
        self.splits = scheme_splits(dataset, split_by)
        self.dir = Path(root) / dataset
        self.refs_path = self.dir / f"refs({split_by}).p"
        self.instances_path = self.dir / "instances.json"
        self.image_dir = Path(image_dir) if image_dir else self.dir / "images"
        self.skipped: Counter = Counter()
        self.problems: list[str] = []
        raw_refs = self._read_refs()
        inst = self._read_instances()
        self.images: dict[int, dict] = {int(im["id"]): im for im in inst.get("images", [])}
        self.anns: dict[int, dict] = {int(a["id"]): a for a in inst.get("annotations", [])}
        self.categories: dict[int, str] = {int(c["id"]): str(c.get("name", c["id"]))
                                           for c in inst.get("categories", [])}
        self.refs: dict[int, _Ref] = {}
        for ref in raw_refs:
            self._add_ref(ref)
        self._rle_cache: dict[int, dict | None] = {}

    # -- reading -----------------------------------------------------------------------------
    def _missing(self, path: Path) -> FileNotFoundError:
        if self.dataset == "synthref":
            hint = f"run `l2l data synth --out {self.dir.parent}` (or any command on the built-in default)"
        else:
            hint = (f"download {DOWNLOAD_URL.format(dataset=self.dataset)} and unzip it into {self.dir.parent}, "
                    "or use data.dataset=synthref (built-in, `l2l data synth --out DIR`)")
        return FileNotFoundError(f"REFER annotation file not found: {path}; {hint}")

    def _read_refs(self) -> list[dict]:
        if not self.refs_path.is_file():
            raise self._missing(self.refs_path)
        try:
            with open(self.refs_path, "rb") as f:
                refs = pickle.load(f)
        except UnicodeDecodeError:  # refs pickled by Python 2 with non-ASCII bytes
            with open(self.refs_path, "rb") as f:
                refs = pickle.load(f, encoding="latin1")
        except Exception as e:  # any unpickling failure means a bad file
            raise DataError(f"{self.refs_path} is not a readable REFER refs pickle ({e}); re-download it") from e
        if not isinstance(refs, list):
            raise DataError(f"{self.refs_path} holds a {type(refs).__name__}, expected a list of ref dicts")
        return refs

    def _read_instances(self) -> dict:
        if not self.instances_path.is_file():
            raise self._missing(self.instances_path)
        try:
            inst = json.loads(self.instances_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.instances_path} is not valid JSON ({e}); re-download it") from e
        if not isinstance(inst, dict) or "images" not in inst or "annotations" not in inst:
            raise DataError(f"{self.instances_path} lacks 'images' / 'annotations' (not a COCO instances file)")
        return inst

    def _bad(self, reason: str, message: str) -> None:
        """Strict: raise. Run mode: count by reason, keep the first messages."""
        if self.strict:
            raise DataError(message)
        self.skipped[reason] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def _add_ref(self, ref: dict) -> None:
        where = f"{self.refs_path.name}"
        try:
            ref_id, image_id, ann_id = int(ref["ref_id"]), int(ref["image_id"]), int(ref["ann_id"])
            split = str(ref["split"])
        except (KeyError, TypeError, ValueError) as e:
            return self._bad("malformed_ref", f"{where}: a ref lacks ref_id/image_id/ann_id/split ({e!r})")
        if ref_id in self.refs:
            return self._bad("duplicate_ref_id", f"{where}: ref {ref_id} appears twice")
        ann = self.anns.get(ann_id)
        if ann is None:
            return self._bad("unresolved_ann_id", f"ref {ref_id} ({where}): ann_id {ann_id} not found in "
                             f"{self.instances_path}; refs and instances.json must come from the same zip")
        if image_id not in self.images:
            return self._bad("unresolved_image_id", f"ref {ref_id} ({where}): image_id {image_id} not in "
                             f"{self.instances_path}")
        if int(ann.get("image_id", image_id)) != image_id:
            return self._bad("ann_image_mismatch", f"ref {ref_id} ({where}): ann {ann_id} belongs to image "
                             f"{ann.get('image_id')}, not {image_id}")
        if not any(split_matches(s, split) for s in self.splits):
            return self._bad("split_not_in_scheme", f"ref {ref_id} ({where}): split {split!r} is not one of "
                             f"{', '.join(self.splits)}")
        sentences = self._sentences(ref_id, ref.get("sentences") or [])
        if not sentences:
            return self._bad("no_sentences", f"ref {ref_id} ({where}): no non-empty sentence left")
        cat_id = int(ref.get("category_id", ann.get("category_id", -1)))
        self.refs[ref_id] = _Ref(ref_id, image_id, ann_id, split, self.categories.get(cat_id, ""), sentences)

    def _sentences(self, ref_id: int, sents: list) -> tuple[Sentence, ...]:
        """The ref's sentences (LAVT reads ``raw``; ``sent`` when ``raw`` is absent); empty ones dropped."""
        out = []
        for s in sents:
            if not isinstance(s, dict) or not isinstance(s.get("sent_id"), numbers.Integral):
                self._bad("malformed_sentence", f"ref {ref_id} ({self.refs_path.name}): a sentence lacks an "
                          f"integer sent_id ({str(s)[:80]})")
                continue
            sent_id = s["sent_id"]
            text = " ".join(str(s.get("raw") or s.get("sent") or "").split())
            if not text:
                self._bad("empty_sentence", f"ref {ref_id} ({self.refs_path.name}): sentence {sent_id} is empty")
                continue
            out.append(Sentence(int(sent_id), text))
        return tuple(out)

    # -- queries -----------------------------------------------------------------------------
    def ref_ids(self, split: str | None = None) -> list[int]:
        """Ref ids of a split (REFER ``getRefIds`` semantics), in refs-file order; all when None."""
        return [r.ref_id for r in self.refs.values() if split is None or split_matches(split, r.split)]

    def image_id(self, ref_id: int) -> int:
        return self.refs[ref_id].image_id

    def image_path(self, image_id: int) -> str:
        return str(self.image_dir / self.images[image_id]["file_name"])

    def mask_rle(self, ref_id: int) -> dict | None:
        """The ref's mask as compressed RLE (cached); None (counted) when the segmentation is bad."""
        if ref_id not in self._rle_cache:
            ref = self.refs[ref_id]
            im, ann = self.images[ref.image_id], self.anns[ref.ann_id]
            try:
                rle = segmentation_to_rle(ann.get("segmentation"), int(im["height"]), int(im["width"]))
            except (ValueError, TypeError, KeyError) as e:
                self._bad("bad_segmentation", f"ref {ref_id}: ann {ref.ann_id} in {self.instances_path} has a "
                          f"bad segmentation ({e})")
                rle = None
            self._rle_cache[ref_id] = rle
        return self._rle_cache[ref_id]

    def _common(self, ref: _Ref) -> dict:
        im = self.images[ref.image_id]
        return {"ref_id": ref.ref_id, "image_id": ref.image_id, "image_path": self.image_path(ref.image_id),
                "width": int(im["width"]), "height": int(im["height"])}

    def labeled_samples(self, ref_ids: list[int]) -> list[LabeledSample]:
        out = []
        for rid in ref_ids:
            ref, rle = self.refs[rid], self.mask_rle(rid)
            if rle is not None:
                out.append(LabeledSample(**self._common(ref), sentences=ref.sentences, mask_rle=rle,
                                         category=ref.category))
        return out

    def unlabeled_samples(self, ref_ids: list[int]) -> list[UnlabeledSample]:
        return [UnlabeledSample(**self._common(self.refs[rid]), sentences=self.refs[rid].sentences)
                for rid in ref_ids]

    def eval_samples(self, split: str) -> list[EvalSample]:
        """One EvalSample per (ref, sentence) of ``split``; all sentences of a ref share one RLE."""
        out = []
        for rid in self.ref_ids(split):
            ref, rle = self.refs[rid], self.mask_rle(rid)
            if rle is None:
                continue
            common = self._common(ref)
            out += [EvalSample(**common, sent_id=s.sent_id, sentence=s.text, mask_rle=rle, split=split)
                    for s in ref.sentences]
        return out

    def drop_missing_images(self) -> int:
        """Check that every referenced image file exists; refs on missing files are dropped (counted),
        or DataError in strict mode. FileNotFoundError when none exists (wrong ``image_dir``).
        Returns the number of image files found."""
        used = sorted({r.image_id for r in self.refs.values()})
        missing = {i for i in used if not os.path.isfile(self.image_path(i))}
        if used and len(missing) == len(used):
            raise FileNotFoundError(f"none of the {len(used)} images of {self.dataset} found under {self.image_dir} "
                                    f"(e.g. {self.image_path(used[0])}); set data.image_dir to the folder of "
                                    "the instances.json file_names (COCO train2014 for refcoco*)")
        for rid in [r.ref_id for r in self.refs.values() if r.image_id in missing]:
            self._bad("missing_image", f"ref {rid}: image file {self.image_path(self.refs[rid].image_id)} not found")
            del self.refs[rid]
        return len(used) - len(missing)

    def stats(self) -> dict:
        """Counts per split: images, refs, sentences; categories of the referred objects."""
        splits = {}
        for split in self.splits:
            refs = [self.refs[i] for i in self.ref_ids(split)]
            splits[split] = {"images": len({r.image_id for r in refs}), "refs": len(refs),
                             "sentences": sum(len(r.sentences) for r in refs)}
        cats = Counter(r.category for r in self.refs.values())
        return {
            "dataset": self.dataset, "split_by": self.split_by,
            "images": len({r.image_id for r in self.refs.values()}), "refs": len(self.refs),
            "sentences": sum(len(r.sentences) for r in self.refs.values()),
            "splits": splits,
            "num_categories": len(cats),
            "categories": dict(sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))),
            "skipped": dict(self.skipped),
        }
