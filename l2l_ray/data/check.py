"""Find unreadable image files before a run starts (no Ray, no torch).

    bad = check_images(ReferDataset("data", "refcoco", "unc", image_dir="coco/train2014"))
    bad = check_images(bundle)                 # a DatasetBundle from load_dataset(cfg)
    bad = check_images(["a.jpg", "b.jpg"])     # paths, or samples with .image_path
    for path, reason in bad: print(path, reason)

Each file is opened and fully decoded with ``load_image``, the loader training uses, so a file that
passes here also loads mid-run. A bad file found mid-run is only skipped and counted
(``SafeImageLoader``); finding it here, first, says which file to replace.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from l2l_ray.data.images import ImageError, load_image
from l2l_ray.data.refer import ReferDataset

FIX_HINT = ("Replace each with an intact copy (re-download or re-extract the image archive), or delete it: "
            "refs whose image file is missing are skipped when the data loads.")


def image_paths(source: Any) -> list[str]:
    """The distinct image files of ``source``, in first-seen order.

    ``source``: a ``ReferDataset`` (the images its refs use), a ``DatasetBundle`` (labeled, unlabeled and
    eval samples), or an iterable of paths (str / PathLike) or of samples with an ``image_path``.
    """
    if isinstance(source, ReferDataset):
        ids = dict.fromkeys(source.image_id(r) for r in source.ref_ids())
        return [source.image_path(i) for i in ids]
    if hasattr(source, "labeled") and hasattr(source, "eval"):  # DatasetBundle (not imported: no cycle)
        source = [*source.labeled, *source.unlabeled, *(s for v in source.eval.values() for s in v)]
    paths = (os.fspath(x) if isinstance(x, str | os.PathLike) else x.image_path for x in source)
    return list(dict.fromkeys(paths))


def _problem(path: str) -> str | None:
    """None when ``path`` decodes, else why not ("not found" / "corrupt or not an image (...)")."""
    try:
        load_image(path)  # full decode, no resize
    except ImageError as e:
        cause = e.__cause__
        if isinstance(cause, FileNotFoundError):
            return "not found"
        return f"corrupt or not an image ({cause})"
    return None


def check_images(source: Any, threads: int = 1) -> list[tuple[str, str]]:
    """Open and decode every image of ``source``; return ``[(path, reason)]`` of the bad ones, in
    ``image_paths`` order ([] when all decode). Never raises for a bad file.

    ``source``: as in ``image_paths`` (ReferDataset, DatasetBundle, paths or samples). ``reason`` is
    "not found" or "corrupt or not an image (<decoder message>)"; ``FIX_HINT`` says what to do.
    ``threads`` > 1 decodes in a thread pool (Pillow releases the GIL while decoding).
    """
    paths = image_paths(source)
    if threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            problems = list(pool.map(_problem, paths, chunksize=16))
    else:
        problems = [_problem(p) for p in paths]
    return [(p, why) for p, why in zip(paths, problems, strict=True) if why is not None]
