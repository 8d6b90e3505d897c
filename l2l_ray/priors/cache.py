"""The priors cache on disk: Parquet part files, one row per sentence, written atomically (no Ray imports).

Layout (one folder per cache key; ``<cache_dir>`` is ``cfg.priors_cache_dir``)::

    <cache_dir>/<dataset>_<split_by>/<backend>_<model-slug>_<prompt_version>[_p<params-hash>]/
        key.json                                   # the full key, for humans and tools
        .lock                                      # writers: shared flock per part; compact: exclusive
        part-<time_ns>-<uuid8>.parquet             # one finished batch each
        part-....parquet.corrupt-<time>            # an unreadable part, moved aside (never read)
        .part-....parquet.XXXX.tmp                 # a write in flight (readers ignore it)

- A batch becomes visible only when its whole part file is on disk (``l2l_ray.io.atomic_write``: temp
  file, fsync, ``os.replace``), so a kill mid-write loses at most the batch in flight, never corrupts.
- The key is (dataset, split_by, backend, model, prompt_version) plus, when set away from their defaults,
  the config fields that shape the output (``output_params``: proposal and lexical knobs, family, ...),
  so changing ``priors.proposal_blend`` never serves stale proposals.
- Part names sort in write order; on read, a ``sent_id`` found in several parts (a batch written twice,
  a retried failure) keeps its **last** row, so there are never duplicates.
- A part that cannot be read (truncated or damaged outside our writes, e.g. a disk or copy error) is moved aside
  as ``part-....parquet.corrupt-<time>`` with a warning, and its batch counts as not cached, so the next
  ``l2l priors`` recomputes just that batch (``PriorCache.quarantined``; the run summary's ``quarantined_parts``).
- Transient failures (``TRANSIENT_STATUSES``: timeouts, HTTP errors, backend exceptions) are cached (they are counted in
  the summary) but not "done": the next run asks the backend again and the new row wins.

    cache = PriorCache(cfg)
    todo = [r for r in requests if r.sent_id not in cache.done_ids()]
    cache.write(backend(todo))
    priors = cache.load()          # {sent_id: Prior}
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import re
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from l2l_ray.io import atomic_write, atomic_write_json, read_json
from l2l_ray.records import Prior

# Failures of the call, not of the answer: retried by the next run (a deterministic answer is not).
TRANSIENT_STATUSES = frozenset({"timeout", "http_error", "model_error"})
CACHE_FORMAT = 1
_PART_GLOB = "part-*.parquet"

SCHEMA = pa.schema([
    ("sent_id", pa.int64()),
    ("ref_id", pa.int64()),
    ("status", pa.string()),
    ("box", pa.list_(pa.float64(), 4)),  # normalised xyxy; NaN x4 = no box
    ("points", pa.list_(pa.float64())),  # flattened normalised (x, y) pairs
    ("score", pa.float64()),
    ("category", pa.string()),
    ("attributes", pa.list_(pa.string())),
    ("spatial", pa.list_(pa.string())),
    ("raw_text", pa.string()),
    ("proposal", pa.binary()),  # uint8 (S, S) soft mask bytes, row-major; null = no proposal
    ("proposal_size", pa.int32()),  # S (0 when no proposal)
    ("backend", pa.string()),
    ("model", pa.string()),
])


# PriorsConfig fields that change how priors are computed but not what they are; every other field (the
# proposal_* and lexical_* knobs, family, max_tokens, ...) is part of the cache key when not at its default.
_OPERATIONAL = frozenset({"backend", "model", "prompt_version", "cache_dir", "endpoint", "api_key_env", "timeout_s",
                          "max_retries", "concurrency", "batch_size", "num_gpus", "tensor_parallel_size",
                          "include_eval", "corruption", "corruption_drop"})  # corruption: applied after loading


def output_params(pcfg) -> dict:
    """The ``PriorsConfig`` fields that shape the priors and differ from their defaults (sorted)."""
    default = type(pcfg)()
    return {f.name: getattr(pcfg, f.name) for f in sorted(dataclasses.fields(pcfg), key=lambda f: f.name)
            if f.name not in _OPERATIONAL and getattr(pcfg, f.name) != getattr(default, f.name)}


def model_slug(model: str) -> str:
    """A folder-safe, collision-free name for a hub id or local path ("" -> "none")."""
    if not model:
        return "none"
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").split("/")[-1])[:48]
    return f"{tail}-{hashlib.sha1(model.encode()).hexdigest()[:8]}"


def prior_to_row(p: Prior) -> dict:
    """One ``Prior`` -> a plain dict with the ``SCHEMA`` columns (for row-wise producers such as a
    ``ray.data.llm`` postprocess function); ``PriorCache.write_table`` casts batches of them."""
    return priors_to_table([p]).to_pylist()[0]


def priors_to_table(priors: list[Prior]) -> pa.Table:
    """``Prior`` records -> an Arrow table in ``SCHEMA`` (one row each, in order)."""
    nan_box = (float("nan"),) * 4
    boxes = np.array([p.box if p.box is not None else nan_box for p in priors], np.float64).reshape(-1)
    sizes = [0 if p.proposal is None else int(p.proposal.shape[0]) for p in priors]
    for p in priors:
        if p.proposal is not None and (p.proposal.ndim != 2 or p.proposal.shape[0] != p.proposal.shape[1]):
            raise ValueError(f"sent_id {p.sent_id}: proposal must be a square uint8 (S, S) array, "
                             f"got shape {p.proposal.shape}")
    cols = {
        "sent_id": pa.array([int(p.sent_id) for p in priors], pa.int64()),
        "ref_id": pa.array([int(p.ref_id) for p in priors], pa.int64()),
        "status": pa.array([p.status for p in priors], pa.string()),
        "box": pa.FixedSizeListArray.from_arrays(pa.array(boxes, pa.float64()), 4),
        "points": pa.array([[float(v) for xy in p.points for v in xy] for p in priors], pa.list_(pa.float64())),
        "score": pa.array([float(p.score) for p in priors], pa.float64()),
        "category": pa.array([p.category for p in priors], pa.string()),
        "attributes": pa.array([list(p.attributes) for p in priors], pa.list_(pa.string())),
        "spatial": pa.array([list(p.spatial) for p in priors], pa.list_(pa.string())),
        "raw_text": pa.array([p.raw_text for p in priors], pa.string()),
        "proposal": pa.array([None if p.proposal is None else np.ascontiguousarray(p.proposal, np.uint8).tobytes()
                              for p in priors], pa.binary()),
        "proposal_size": pa.array(sizes, pa.int32()),
        "backend": pa.array([p.backend for p in priors], pa.string()),
        "model": pa.array([p.model for p in priors], pa.string()),
    }
    return pa.table(cols, schema=SCHEMA)


def _proposals(col: pa.ChunkedArray, sizes: np.ndarray) -> list[np.ndarray | None]:
    """Binary column -> one (S, S) uint8 view per row into the Arrow data buffer (None where null): no
    per-row copies; rows never overlap, and the views keep the buffer alive."""
    out: list[np.ndarray | None] = []
    start = 0
    for chunk in col.chunks:
        n = len(chunk)
        if n == 0:
            continue
        _, off_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(off_buf, np.int32)[chunk.offset: chunk.offset + n + 1]
        data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        s = sizes[start: start + n]
        out += [data[offsets[i]: offsets[i + 1]].reshape(s[i], s[i]) if valid[i] and s[i] else None
                for i in range(n)]
        start += n
    return out


def table_to_priors(table: pa.Table) -> dict[int, Prior]:
    """An Arrow table in ``SCHEMA`` -> ``{sent_id: Prior}`` (columns converted in bulk, proposals as views)."""
    n = table.num_rows
    boxes = table["box"].combine_chunks().values.to_numpy(zero_copy_only=False).reshape(n, 4) if n else \
        np.zeros((0, 4))
    has_box = ~np.isnan(boxes).any(axis=1)
    box_list = [tuple(b) if h else None for b, h in zip(boxes.tolist(), has_box.tolist(), strict=True)]
    points = [tuple(zip(v[0::2], v[1::2], strict=True)) for v in table["points"].to_pylist()]
    sizes = table["proposal_size"].to_numpy()
    proposals = _proposals(table["proposal"], sizes)
    cols = {name: table[name].to_pylist() for name in
            ("sent_id", "ref_id", "status", "score", "category", "attributes", "spatial", "raw_text", "backend",
             "model")}
    return {
        sid: Prior(sent_id=sid, ref_id=rid, status=st, box=bx, points=pt, score=sc, category=cat,
                   attributes=tuple(at), spatial=tuple(sp), raw_text=rt, proposal=pr, backend=be, model=mo)
        for sid, rid, st, bx, pt, sc, cat, at, sp, rt, pr, be, mo in zip(
            cols["sent_id"], cols["ref_id"], cols["status"], box_list, points, cols["score"], cols["category"],
            cols["attributes"], cols["spatial"], cols["raw_text"], proposals, cols["backend"], cols["model"],
            strict=True)
    }


def dedupe_last(table: pa.Table) -> pa.Table:
    """Keep the last row of each ``sent_id`` (rows are in write order), sorted by ``sent_id``."""
    ids = table["sent_id"].to_numpy()
    if len(ids) == 0:
        return table
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)  # unique ids ascending
    keep = len(ids) - 1 - first_in_reversed
    return table.take(pa.array(keep, pa.int64()))


class PriorCache:
    """The priors of one cache key, ``(dataset, split_by, backend, model, prompt_version)``, on disk."""

    def __init__(self, cfg):
        """``cfg``: a ``Config``. The key comes from the config alone, so training finds the cache that
        ``l2l priors`` wrote with the same config (no backend is built to read it)."""
        p = cfg.priors
        params = output_params(p)
        self.key = {"dataset": cfg.data.dataset, "split_by": cfg.data.split_by, "backend": p.backend,
                    "model": p.model, "prompt_version": p.prompt_version, "params": params, "format": CACHE_FORMAT}
        name = f"{p.backend}_{model_slug(p.model)}_{p.prompt_version}"
        if params:  # e.g. priors.proposal_blend=0.3 gets its own folder instead of stale proposals
            name += "_p" + hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
        self.root = Path(cfg.priors_cache_dir)
        self.dir = self.root / f"{cfg.data.dataset}_{cfg.data.split_by}" / name
        self.quarantined: list[Path] = []  # unreadable parts this instance moved aside (see _quarantine)

    def __repr__(self) -> str:
        return f"PriorCache({str(self.dir)!r})"

    def parts(self) -> list[Path]:
        """Finished part files in write order (temp files of writes in flight are not listed)."""
        return sorted(self.dir.glob(_PART_GLOB)) if self.dir.is_dir() else []

    def _new_part_path(self) -> Path:
        return self.dir / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"

    def _ensure_dir(self) -> None:
        if not (self.dir / "key.json").exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.dir / "key.json", self.key)
        elif (found := read_json(self.dir / "key.json")) != self.key:
            raise ValueError(f"{self.dir}/key.json holds {found}, expected {self.key}: the folder belongs to "
                             "another cache key or format; move it away or set priors.cache_dir elsewhere")

    @contextlib.contextmanager
    def _lock(self, exclusive: bool):
        """Writers hold a shared lock while writing a part; ``compact`` an exclusive one (fcntl, per host)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def write_table(self, table: pa.Table) -> Path | None:
        """Write one batch (an Arrow table in ``SCHEMA``) as a new part file, atomically."""
        if table.num_rows == 0:
            return None
        if missing := [c for c in SCHEMA.names if c not in table.column_names]:
            raise ValueError(f"prior rows lack columns {missing}: build rows with l2l_ray.priors.cache.prior_to_row")
        table = table.select(SCHEMA.names).cast(SCHEMA)
        self._ensure_dir()
        path = self._new_part_path()
        with self._lock(exclusive=False):
            atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        return path

    def write(self, priors: list[Prior]) -> Path | None:
        """Write one batch of priors as a new part file, atomically; returns its path (None if empty)."""
        return self.write_table(priors_to_table(priors))

    def _quarantine(self, path: Path, error: Exception) -> None:
        """Move an unreadable part aside (``<part>.corrupt-<UTC time>``, kept for a post-mortem, never read again):
        its sentences drop out of ``done_ids``, so the next compute asks the backend for exactly that batch."""
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        try:
            path.rename(aside)
        except FileNotFoundError:
            raise  # another reader moved it, or a compaction merged it: _read lists the parts again
        except OSError as e:  # e.g. a read-only cache: cannot move it, so say what to do instead
            raise ValueError(f"priors cache part {path} is unreadable ({error}) and could not be moved aside ({e}); "
                             "delete that file and re-run `l2l priors` (only its batch is recomputed)") from None
        self.quarantined.append(aside)
        print(f"priors cache: WARNING: part {path} is unreadable ({error}); moved it to {aside.name}, its batch "
              "will be recomputed", file=sys.stderr, flush=True)

    def _read_once(self, columns: list[str] | None) -> pa.Table:
        tables = []
        for path in self.parts():
            try:
                tables.append(pq.read_table(path, columns=columns, schema=SCHEMA))
            except (FileNotFoundError, PermissionError):
                raise  # vanished: merged by a concurrent compact (see _read); no access: not corruption
            except (OSError, pa.ArrowInvalid) as e:  # truncated or damaged (a visible part is never torn by us)
                self._quarantine(path, e)
        schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def _read(self, columns: list[str] | None = None, attempts: int = 3) -> pa.Table:
        """All parts in write order. A part that vanishes while listed was merged by a concurrent
        ``compact`` into a newer part: list again and re-read."""
        for _ in range(attempts - 1):
            with contextlib.suppress(FileNotFoundError):
                return self._read_once(columns)
        return self._read_once(columns)

    def table(self, sent_ids=None) -> pa.Table:
        """The deduplicated cache as an Arrow table sorted by ``sent_id`` (optionally only ``sent_ids``)."""
        table = dedupe_last(self._read())
        if sent_ids is not None:
            table = table.filter(pc.is_in(table["sent_id"], pa.array(np.fromiter(sent_ids, np.int64))))
        return table

    def statuses(self) -> dict[int, str]:
        """``{sent_id: status}`` of every cached sentence (reads two columns only)."""
        t = dedupe_last(self._read(["sent_id", "status"]))
        return dict(zip(t["sent_id"].to_pylist(), t["status"].to_pylist(), strict=True))

    def done_ids(self, retry: frozenset[str] = TRANSIENT_STATUSES) -> set[int]:
        """Sentence ids that need no new backend call (cached with a status not in ``retry``)."""
        t = dedupe_last(self._read(["sent_id", "status"]))
        done = pc.invert(pc.is_in(t["status"], pa.array(sorted(retry), pa.string())))
        return set(t["sent_id"].filter(done).to_pylist())

    def load(self, sent_ids=None) -> dict[int, Prior]:
        """``{sent_id: Prior}`` for every cached sentence (or those of ``sent_ids`` that are cached)."""
        return table_to_priors(self.table(sent_ids))

    def compact(self) -> Path | None:
        """Merge all parts into one deduplicated part, atomically; then delete the merged parts.

        Holds the exclusive lock, so no writer on this host adds a part meanwhile, and temp files left by
        killed writers can be deleted. Concurrent readers re-list (see ``_read``). A kill at any point
        leaves a readable cache (at worst the old parts beside the merged one, same rows).
        """
        if not self.dir.is_dir():
            return None
        with self._lock(exclusive=True):
            for tmp in self.dir.glob(".part-*.tmp"):
                tmp.unlink(missing_ok=True)
            parts = self.parts()
            if len(parts) <= 1:
                return parts[0] if parts else None
            table = self.table()
            # Named after the newest merged part so that parts written later still sort (and win) after it.
            path = parts[-1].with_name(parts[-1].stem + "-c.parquet")
            atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
            for p in parts:
                if p != path:
                    p.unlink(missing_ok=True)
        return path
