"""The data layer: REFER roots (real or the built-in synthetic set) -> sample records.

    from l2l_ray.data import ensure_data, load_dataset
    ensure_data(cfg)                       # writes the synthetic set on first use (synthref only)
    bundle = load_dataset(cfg, run_dir)    # labeled / unlabeled / eval samples; label split in run_dir
    bundle.labeled[0].mask()               # bool (H, W); UnlabeledSample has no mask at all

The label split follows SemiRES (see ``l2l_ray.data.split``) and is seeded by ``cfg.seed``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from l2l_ray.config import Config
from l2l_ray.data.refer import DataError, ReferDataset
from l2l_ray.data.split import SPLIT_FILE, label_split, read_split, split_to_dict, write_split
from l2l_ray.records import EvalSample, LabeledSample, UnlabeledSample

log = logging.getLogger(__name__)

__all__ = ["DatasetBundle", "DataError", "ReferDataset", "ensure_data", "load_dataset"]


@dataclass
class DatasetBundle:
    labeled: list[LabeledSample]
    unlabeled: list[UnlabeledSample]
    eval: dict[str, list[EvalSample]]  # every non-train split of the scheme, one sample per (ref, sentence)
    skipped: dict = field(default_factory=dict)  # reason -> count (bad refs, empty sentences, missing images)
    stats: dict = field(default_factory=dict)


def _annotation_files(cfg: Config) -> list[Path]:
    d = Path(cfg.data.root) / cfg.data.dataset
    return [d / f"refs({cfg.data.split_by}).p", d / "instances.json"]


def ensure_data(cfg: Config) -> None:
    """Make sure the REFER files exist. The built-in ``synthref`` set is written when missing (under a
    file lock, so parallel Tune trials write it once); a missing real dataset is a FileNotFoundError
    saying where to download it."""
    files = _annotation_files(cfg)
    if all(f.is_file() for f in files):
        return
    if cfg.data.dataset != "synthref":
        missing = next(f for f in files if not f.is_file())
        raise FileNotFoundError(
            f"REFER annotation file not found: {missing}; download "
            f"https://bvisionweb1.cs.unc.edu/licheng/referit/data/{cfg.data.dataset}.zip and unzip it into "
            f"{cfg.data.root}, or use data.dataset=synthref (the built-in synthetic set)")
    import fcntl

    from l2l_ray.data.synth import write_synthetic

    root = Path(cfg.data.root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synthref.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not all(f.is_file() for f in files):  # another process may have written it meanwhile
                log.info("writing the synthetic dataset (%d images) to %s", cfg.data.synth_images, root)
                write_synthetic(str(root), cfg.data.synth_images, cfg.data.synth_seed, cfg.data.image_size)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_dataset(cfg: Config, run_dir: str | Path | None = None, strict: bool = False) -> DatasetBundle:
    """Load ``cfg.data`` into samples and apply the label split (``data.label_ratio``, ``seed``).

    Run mode (``strict=False``): bad refs, empty sentences and refs on missing image files are skipped
    and counted in ``bundle.skipped`` (and logged); ``strict=True`` raises DataError on the first one.
    With ``run_dir`` the split is written to ``<run_dir>/label_split.json``; if that file already holds
    a different split (the config changed under a resumed run) this is a DataError.
    """
    t0 = time.perf_counter()
    ensure_data(cfg)
    d = cfg.data
    ds = ReferDataset(d.root, d.dataset, d.split_by, d.images, strict=strict)
    found = ds.drop_missing_images()
    train = ds.ref_ids("train")
    split = label_split([(r, ds.image_id(r)) for r in train], d.label_ratio, cfg.seed)
    labeled = ds.labeled_samples(list(split.labeled_ref_ids))
    unlabeled = ds.unlabeled_samples(list(split.unlabeled_ref_ids))
    evals = {s: ds.eval_samples(s) for s in ds.splits if s != "train"}
    if run_dir is not None:
        _write_or_check_split(Path(run_dir) / SPLIT_FILE, split, d.dataset, d.split_by)
    stats = {
        "dataset": d.dataset, "split_by": d.split_by, "label_ratio": d.label_ratio, "seed": cfg.seed,
        "train_images": split.num_train_images, "labeled_images": len(split.labeled_image_ids),
        "labeled_refs": len(labeled), "unlabeled_refs": len(unlabeled),
        "labeled_sentences": sum(len(s.sentences) for s in labeled),
        "unlabeled_sentences": sum(len(s.sentences) for s in unlabeled),
        "eval_pairs": {k: len(v) for k, v in evals.items()},
        "image_files_found": found, "load_seconds": round(time.perf_counter() - t0, 3),
    }
    if ds.skipped:
        log.warning("data: skipped %s (e.g. %s)", dict(ds.skipped), "; ".join(ds.problems[:3]))
    return DatasetBundle(labeled, unlabeled, evals, dict(ds.skipped), stats)


def _write_or_check_split(path: Path, split, dataset: str, split_by: str) -> None:
    new = split_to_dict(split, dataset=dataset, split_by=split_by)
    old = read_split(path)
    if old is not None and {k: old.get(k) for k in new} != new:
        raise DataError(f"{path} holds a different label split (dataset, split_by, label_ratio or seed changed "
                        "since this run started); use a new run.dir or delete that file to start over")
    if old is None:
        write_split(path, split, dataset=dataset, split_by=split_by)
