"""Prior quality on the synthetic set: lexical prior vs trivial baselines, and GrabCut vs box proposals.

    python bench/prior_quality.py --root /tmp/l2l_pq --images 400 --seed 1
    python bench/prior_quality.py --root /tmp/l2l_pq --images 400 --seed 1 --fit-shapes   # shape prototypes

Writes (or reuses) a synthetic set of ``--images`` images under ``--root`` with every training ref
labeled, runs the lexical backend on every sentence with a known mask (train + val + testA + testB),
once per proposal method, and prints ``prior_quality``'s table for each. Then, to judge the proposal
maker alone (what the MLLM backends get), it makes proposals from the *true* boxes with each method.
``--fit-shapes`` prints the median shape features of the matched true regions per category (the
numbers behind ``lexical_regions.PROTOTYPES``). Single process; timings are wall clock on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np

from l2l_ray.config import load_config
from l2l_ray.data import load_dataset
from l2l_ray.priors.base import PriorRequest
from l2l_ray.priors.lexical import LexicalBackend
from l2l_ray.priors.lexical_regions import ImageRegions, load_image
from l2l_ray.priors.proposals import ProposalParams, soft_proposal
from l2l_ray.priors.quality import box_iou, format_quality, mask_box, prior_quality, truth_at
from l2l_ray.records import EvalSample


def _samples(root: str, images: int, seed: int):
    cfg = load_config(None, [f"data.root={root}", f"data.synth_images={images}", f"data.synth_seed={seed}",
                             "data.label_ratio=1.0"])
    bundle = load_dataset(cfg)
    samples = list(bundle.labeled) + [s for split in bundle.eval.values() for s in split]
    return cfg, bundle, samples


def _requests(samples) -> list[PriorRequest]:
    reqs = []
    for s in samples:
        sents = [(s.sent_id, s.sentence)] if isinstance(s, EvalSample) else [(x.sent_id, x.text) for x in s.sentences]
        reqs += [PriorRequest(i, s.ref_id, s.image_path, s.width, s.height, t) for i, t in sents]
    return reqs


def lexical_table(cfg, samples, reqs, method: str) -> dict:
    backend = LexicalBackend(replace(cfg.priors, proposal_method=method))
    t0 = time.perf_counter()
    priors = {p.sent_id: p for p in backend(reqs)}
    secs = time.perf_counter() - t0
    q = prior_quality(priors, samples, cfg.priors.proposal_size)
    q["requests_per_s"] = round(len(reqs) / secs, 1)
    print(f"\n== lexical prior, proposal_method={method}: {len(reqs)} sentences, {q['requests_per_s']} req/s "
          "(one process)")
    print(format_quality(q))
    return q


def true_box_proposals(cfg, samples, methods) -> dict:
    """mIoU of proposals made from each sample's true box (no points), per method and category."""
    size = cfg.priors.proposal_size
    ious: dict[str, list[float]] = defaultdict(list)
    secs: dict[str, float] = defaultdict(float)
    for s in samples:
        mask = s.mask()
        box = mask_box(mask)
        if box is None:
            continue
        img = load_image(s.image_path, s.width, s.height, max(s.width, s.height))
        truth = truth_at(mask, size)
        for m in methods:
            t0 = time.perf_counter()
            pred = soft_proposal(img, box, [], size, replace(ProposalParams.from_config(cfg.priors), method=m)) > 127
            secs[m] += time.perf_counter() - t0
            ious[m].append(float((pred & truth).sum() / max((pred | truth).sum(), 1)))
    out = {m: {"mIoU": round(float(np.mean(v)), 4), "ms_per_proposal": round(1000 * secs[m] / len(v), 3)}
           for m, v in ious.items()}
    print(f"\n== proposals from the TRUE box ({len(ious[methods[0]])} masks, {size} px): {json.dumps(out)}")
    return out


def fit_shapes(bundle) -> dict:
    """Median (and MAD) shape features of the region that matches each labeled target best (box IoU >= 0.6)."""
    feats: dict[str, list[np.ndarray]] = defaultdict(list)
    for s in bundle.labeled:
        regions = ImageRegions(load_image(s.image_path, s.width, s.height, 128))
        box = mask_box(s.mask())
        pool = regions.all_regions()
        ious = [box_iou(r.box, box) for r in pool]
        if ious and max(ious) >= 0.6:
            feats[s.category].append(pool[int(np.argmax(ious))].features)
    out = {}
    for cat, f in sorted(feats.items()):
        f = np.array(f)
        med = np.median(f, 0)
        out[cat] = {"n": len(f), "median": np.round(med, 3).tolist(),
                    "mad": np.round(1.4826 * np.median(np.abs(f - med), 0), 3).tolist()}
    print("\n== shape features (rect_fill, solidity, log elongation, hole share) of matched true regions:")
    for cat, v in out.items():
        print(f"{cat:9s} n={v['n']:4d} median={v['median']} mad={v['mad']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/l2l_prior_quality")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--methods", default="grabcut,box")
    ap.add_argument("--fit-shapes", action="store_true")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    cfg, bundle, samples = _samples(args.root, args.images, args.seed)
    if args.fit_shapes:
        fit_shapes(bundle)
        return
    reqs = _requests(samples)
    methods = args.methods.split(",")
    results = {"lexical": {m: lexical_table(cfg, samples, reqs, m) for m in methods},
               "true_box": true_box_proposals(cfg, samples, methods),
               "data": {"root": args.root, "images": args.images, "seed": args.seed, "samples": len(samples)}}
    if args.json:
        from l2l_ray.io import atomic_write_json

        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
