"""Example figures of a REFER-layout dataset: image | each ref's mask outlined, read back from disk.

    python -m l2l_ray.data.synth_figures data/synthref docs/synth_examples 3
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

OUTLINE_BGR = [(0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 128, 0)]  # yellow, magenta, green, blue


def ann_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """pycocotools semantics (COCO.annToRLE): polygons (union of parts) or RLE -> bool (h, w)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def figure(image_rgb: np.ndarray, masks: list[np.ndarray], scale: int = 3) -> np.ndarray:
    """BGR uint8 (S*scale, 2*S*scale + gap, 3): the image, and the image with numbered mask outlines."""
    big = cv2.resize(image_rgb[:, :, ::-1], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    over = big.copy()
    for n, m in enumerate(masks):
        mb = cv2.resize(m.astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mb, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        colour = OUTLINE_BGR[n % len(OUTLINE_BGR)]
        cv2.drawContours(over, contours, -1, (0, 0, 0), 4)
        cv2.drawContours(over, contours, -1, colour, 2)
        ys, xs = np.nonzero(mb)
        org = (int(xs.mean()) - 6, int(ys.mean()) + 7)
        cv2.putText(over, str(n + 1), org, cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 4)
        cv2.putText(over, str(n + 1), org, cv2.FONT_HERSHEY_SIMPLEX, 0.6, colour, 2)
    gap = np.full((big.shape[0], 8, 3), 255, np.uint8)
    return np.concatenate([big, gap, over], axis=1)


def save_examples(dataset_dir: str, out_dir: str, n: int = 3, image_ids: list[int] | None = None,
                  split_by: str = "unc", scale: int = 3) -> list[dict]:
    """Write ``example_<k>.png`` for ``n`` images (one per split first); return [{path, image_id, split, refs}]."""
    ds = Path(dataset_dir)
    with open(ds / f"refs({split_by}).p", "rb") as f:
        refs = pickle.load(f)
    inst = json.loads((ds / "instances.json").read_text())
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    if image_ids is None:
        by_split: dict[str, int] = {}
        for r in refs:
            by_split.setdefault(r["split"], r["image_id"])
        image_ids = list(by_split.values())[:n]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = []
    for k, image_id in enumerate(image_ids):
        im = images[image_id]
        rgb = cv2.imread(str(ds / "images" / im["file_name"]), cv2.IMREAD_COLOR)[:, :, ::-1]
        its = [r for r in refs if r["image_id"] == image_id]
        masks = [ann_mask(anns[r["ann_id"]], im["height"], im["width"]) for r in its]
        path = Path(out_dir) / f"example_{k + 1}.png"
        cv2.imwrite(str(path), figure(rgb, masks, scale), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        out.append({"path": str(path), "image_id": image_id, "split": its[0]["split"],
                    "refs": [[s["raw"] for s in r["sentences"]] for r in its]})
    return out


if __name__ == "__main__":
    print(json.dumps(save_examples(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3), indent=1))
