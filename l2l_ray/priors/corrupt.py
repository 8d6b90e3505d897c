"""Bad priors on purpose: the experiment knob behind "how much does each method lose when the prior lies".

    priors, stats = corrupt_priors(priors, refs, rate=0.25, drop_share=0.2, seed=0)
    # refs: (image_id, ref_id, sent_id) triples of every sentence, from the records' ids (never a mask)

A share ``rate`` of the sentences gets a bad prior; of those, ``drop_share`` become "no prior"
(status ``corrupted``), the rest take the prior of a sentence of the same image about ANOTHER ref (the
classic MLLM failure: the right kind of answer about the wrong object; its sent_id and ref_id are the
corrupted sentence's own). A sentence whose image has no other ref with a prior is dropped instead (counted
as ``swap_impossible``). Only ids and other priors are read: no mask, no truth. Seeded, so every method at
the same seed sees the same corrupted priors.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from l2l_ray.records import Prior

CORRUPTED = "corrupted"


def corrupt_priors(priors: dict[int, Prior], refs: Iterable[tuple[int, int, int]], rate: float,
                   drop_share: float = 0.2, seed: int = 0) -> tuple[dict[int, Prior], dict[str, int]]:
    """A new {sent_id: Prior} with ``rate`` of the sentences corrupted; the input dict is left as it was.

    refs: (image_id, ref_id, sent_id) for every sentence; priors missing from ``priors`` are left missing.
    Returns (priors, {"corrupted_swapped", "corrupted_dropped", "swap_impossible"}).
    """
    if not 0.0 <= rate <= 1.0 or not 0.0 <= drop_share <= 1.0:
        raise ValueError(f"corruption rate={rate}, drop_share={drop_share}: both must be in [0, 1]")
    refs = sorted({(int(i), int(r), int(s)) for i, r, s in refs if int(s) in priors})
    out = dict(priors)
    stats = {"corrupted_swapped": 0, "corrupted_dropped": 0, "swap_impossible": 0}
    if rate == 0.0 or not refs:
        return out, stats
    by_image: dict[int, list[tuple[int, int]]] = defaultdict(list)  # image -> [(ref, sent)] with a usable prior
    for image, ref, sent in refs:
        if priors[sent].ok:
            by_image[image].append((ref, sent))
    rng = np.random.default_rng([seed, 7919])  # its own stream: the same corruption for every method at a seed
    hit = rng.random(len(refs)) < rate
    drop = rng.random(len(refs)) < drop_share
    pick = rng.random(len(refs))
    for k, (image, ref, sent) in enumerate(refs):
        if not hit[k]:
            continue
        donors = [s for r, s in by_image[image] if r != ref]
        if drop[k] or not donors:
            stats["swap_impossible"] += int(not drop[k])
            stats["corrupted_dropped"] += 1
            out[sent] = Prior(sent_id=sent, ref_id=ref, status=CORRUPTED, raw_text=priors[sent].raw_text,
                              backend=priors[sent].backend, model=priors[sent].model)
            continue
        donor = priors[donors[int(pick[k] * len(donors))]]
        out[sent] = dataclasses.replace(donor, sent_id=sent, ref_id=ref)
        stats["corrupted_swapped"] += 1
    return out, stats


def sentence_refs(bundle) -> list[tuple[int, int, int]]:
    """(image_id, ref_id, sent_id) of every sentence of a ``DatasetBundle`` (labeled, unlabeled, every eval
    split), read from the records' id fields only."""
    out = [(s.image_id, s.ref_id, t.sent_id) for s in (*bundle.labeled, *bundle.unlabeled) for t in s.sentences]
    out += [(e.image_id, e.ref_id, e.sent_id) for split in bundle.eval.values() for e in split]
    return out
