#!/usr/bin/env bash
# Download RefCOCO / RefCOCO+ / RefCOCOg (REFER annotations) and COCO train2014 images into the
# REFER layout that l2l_ray reads:
#   <root>/refcoco/{instances.json, refs(unc).p, refs(google).p}, <root>/refcoco+/..., <root>/refcocog/...
#   <root>/images/train2014/COCO_train2014_%012d.jpg          (data.image_dir=<root>/images/train2014)
#
#   bash cluster/fetch_refcoco.sh /mnt/shared/refer            # ~13.5 GB download, ~14 GB on disk
#   ray job submit --entrypoint-num-cpus 4 --runtime-env cluster/runtime_env.yaml -- \
#       bash cluster/fetch_refcoco.sh /mnt/shared/refer        # the same, as a job on a CPU node
#
# The original REFER host (bvisionweb1.cs.unc.edu) is offline; the default mirror is the Internet
# Archive's copy of the same zips (see github.com/lichengunc/refer/issues/14). Override with
# REFER_BASE_URL=... (a folder holding refcoco.zip, refcoco+.zip, refcocog.zip) and COCO_URL=...
# Idempotent: finished parts are skipped (marker files), so a re-run resumes after a failure.
set -euo pipefail

ROOT="${1:?usage: fetch_refcoco.sh ROOT [DATASET ...] (default datasets: refcoco refcoco+ refcocog)}"
shift
if (($#)); then DATASETS=("$@"); else DATASETS=(refcoco refcoco+ refcocog); fi
COCO_URL="${COCO_URL:-http://images.cocodataset.org/zips/train2014.zip}"
declare -A ARCHIVE=(
  [refcoco]="https://web.archive.org/web/20220413011718/https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco.zip"
  [refcoco+]="https://web.archive.org/web/20220413011656/https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco+.zip"
  [refcocog]="https://web.archive.org/web/20220413012904/https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcocog.zip"
)

mkdir -p "$ROOT/images" "$ROOT/.downloads"
fetch() {  # fetch URL FILE: resumable download with retries
  curl -fL --retry 5 --retry-delay 10 -C - -o "$2" "$1"
}

for ds in "${DATASETS[@]}"; do
  [[ -f "$ROOT/$ds/.done" ]] && { echo "$ds: present"; continue; }
  url="${REFER_BASE_URL:+$REFER_BASE_URL/$ds.zip}"
  url="${url:-${ARCHIVE[$ds]:?unknown dataset $ds (refcoco, refcoco+, refcocog)}}"
  fetch "$url" "$ROOT/.downloads/$ds.zip"
  unzip -q -o "$ROOT/.downloads/$ds.zip" -d "$ROOT"
  touch "$ROOT/$ds/.done"
done

if [[ ! -f "$ROOT/images/train2014/.done" ]]; then
  fetch "$COCO_URL" "$ROOT/.downloads/train2014.zip"
  unzip -q -o "$ROOT/.downloads/train2014.zip" -d "$ROOT/images"
  touch "$ROOT/images/train2014/.done"
fi
rm -rf "$ROOT/.downloads"

for ds in "${DATASETS[@]}"; do
  split_by=unc; [[ $ds == refcocog ]] && split_by=umd
  python -m l2l_ray data stats --root "$ROOT" --dataset "$ds" --split-by "$split_by" \
    --image-dir "$ROOT/images/train2014" > "$ROOT/$ds/stats_$split_by.json"
  echo "$ds ($split_by): $(python -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['sentences'], 'sentences,', d['image_files_found'], 'of', d['images'], 'images found')" "$ROOT/$ds/stats_$split_by.json")"
done
