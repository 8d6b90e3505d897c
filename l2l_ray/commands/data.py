"""``l2l data`` subcommands (called by ``l2l_ray.cli``); each prints one JSON object to stdout.

    l2l data synth --out data --images 2000 --seed 0
    l2l data stats --root data --dataset synthref --split-by unc [--image-dir DIR] [--check-images]

Bad input raises FileNotFoundError / ConfigError / UserError / DataError, which the CLI turns into
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from l2l_ray.data.check import FIX_HINT, check_images, image_paths
from l2l_ray.data.refer import ReferDataset
from l2l_ray.errors import DataError, UserError

MAX_LISTED = 50  # bad images named on stderr; all of them are in the JSON on stdout


def synth(args: argparse.Namespace) -> int:
    """Write the synthetic set to ``<out>/synthref`` and print the generator's stats, its wall time
    and the loader's counts of what it wrote (the same loader as for RefCOCO)."""
    if args.images < 1:
        raise UserError(f"--images {args.images}: need at least 1 image")
    from l2l_ray.data.synth import write_synthetic

    t0 = time.perf_counter()
    written = write_synthetic(args.out, num_images=args.images, seed=args.seed)
    seconds = time.perf_counter() - t0
    ds = ReferDataset(args.out, "synthref", "unc")
    out = {"out": str(Path(args.out) / "synthref"), "seconds": round(seconds, 3), "synth": written,
           "stats": ds.stats()}
    print(json.dumps(out, indent=2, default=str))
    return 0


def stats(args: argparse.Namespace) -> int:
    """Print images, refs and sentences per split, the referred categories, skipped records and (when
    the image folder exists) how many of the referenced image files are there.

    ``--check-images`` also decodes every referenced image; bad ones are listed under "bad_images" and
    are a DataError naming each file (exit code 2), so they are found before a run, not in one."""
    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"--root {args.root}: no such folder (a REFER root holds <dataset>/refs(<split_by>).p)")
    if args.image_dir and not Path(args.image_dir).is_dir():
        raise FileNotFoundError(f"--image-dir {args.image_dir}: no such folder (the folder of instances.json "
                                "file_names, e.g. COCO train2014)")
    ds = ReferDataset(args.root, args.dataset, args.split_by, args.image_dir)
    out = ds.stats()
    if ds.image_dir.is_dir():
        used = {ds.image_id(r) for r in ds.ref_ids()}
        out["image_files_found"] = sum(os.path.isfile(ds.image_path(i)) for i in used)
    else:
        out["image_files_found"] = None  # no image folder: annotation-only stats
    out["image_dir"] = str(ds.image_dir)
    if ds.problems:
        out["problems"] = ds.problems
    bad = _check_images(ds, out) if args.check_images else []
    print(json.dumps(out, indent=2))
    if bad:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in bad[:MAX_LISTED])
        if len(bad) > MAX_LISTED:
            listed += f"\n  ... and {len(bad) - MAX_LISTED} more (all under \"bad_images\" on stdout)"
        raise DataError(f"{len(bad)} of {out['images_checked']} images of {ds.dataset} are unreadable:\n"
                        f"{listed}\n{FIX_HINT}")
    return 0


def _check_images(ds: ReferDataset, out: dict) -> list[tuple[str, str]]:
    """Decode every image the refs use; record the count and the bad ones in ``out``."""
    if not ds.image_dir.is_dir():
        raise FileNotFoundError(f"--check-images: image folder {ds.image_dir} not found; pass --image-dir "
                                "(the folder of instances.json file_names, e.g. COCO train2014)")
    paths = image_paths(ds)
    bad = check_images(paths, threads=min(8, os.cpu_count() or 1))
    out["images_checked"] = len(paths)
    out["bad_images"] = [{"path": p, "reason": why} for p, why in bad]
    return bad
