"""The teacher cache: the teacher's top-k log-probabilities for every real token of a run's
training rows, recorded once (`python -m distil_jax.record_teacher`) and read by training
(`--config.teacher.cache=DIR`) instead of running the teacher. The format is documented in
docs/teacher_cache.md; in short:

    DIR/manifest.json                       what the cache was made from (checked by training)
    DIR/data/train-00000-of-00003.arrow     one record per real token, rows [0, R) of training
    DIR/data/train-00001-of-00003.arrow     rows [R, 2R) ...

The shards are Arrow IPC streams (the format `datasets` keeps its own data in; it reads them
with `load_dataset("arrow", data_files=...)` or `Dataset.from_file`) with zstd-compressed
buffers: as small as Parquet with the same list columns, and measured 5x faster to read and 6x
faster to write (Parquet encodes list columns value by value; docs/teacher_cache.md). Each
record is one real token (segment id > 0) of one training row:

    row            int32          index of the row in the run's training rows (before shuffling)
    position       int32          position of the token in the row, 0..S-1
    topk_ids       k x uint16     the teacher's k most probable next tokens, most probable first
                                  (int32 when the vocabulary has more than 65536 tokens)
    topk_logprobs  k x float16    their log-probabilities (float32 with teacher.cache_dtype)
    rest_logmass   float32        log of the probability mass of the other V - k tokens
    tail_ids       m x uint16     with teacher.cache_tail_samples = m > 0: m tokens drawn from the
                                  teacher's distribution outside the top k (systematic sampling)
    tail_logprobs  m x float16    their log-probabilities (the stored dtype, as topk_logprobs)

The log-probabilities are a float32 log-softmax of the teacher's logits / T (T = the objective's
temperature at recording) taken before selecting; the cache is keyed by row index, so any epoch
and any shuffled order reads it. How training uses it: `distil_jax.objectives.losses.topk_loss`.

This module holds the format (fingerprints, the pins a run is checked against, shard writing
and reading), the reader that training opens (`TeacherCache`) and the prefetching batch source
(`CachedBatches`). The recording loop is `distil_jax.record_teacher`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from distil_jax import data, fsio

log = logging.getLogger(__name__)

FORMAT = "distil_jax.teacher_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_DIR = "data"
COMPRESSION = "zstd"
SHARD_FORMAT = "arrow-ipc-stream"
# Default shard size: about 2^20 real-or-padding positions, so a shard is some 10-300 MB at
# k = 32..128 (the hub's advice for Parquet files is below 500 MB).
SHARD_POSITIONS = 1 << 20
# The dataset fields a cache pins (besides the fingerprint of the rows they make).
_DATASET_FIELDS = ("uri", "subset", "split", "column", "sample_size", "shuffle", "seed",
                   "test_size", "sample_by")


class CacheMismatch(ValueError):
    """A teacher cache that does not fit the run (or is incomplete, truncated or corrupted)."""


# ----------------------------------------------------------------------------- files


def remove_stale_temps(folder: Path, n_shards: int) -> list[Path]:
    """Remove the temp files that killed writers (dead processes of this machine) left beside
    the manifest and the shards (`fsio.clean_stale`; a rewrite of a file also cleans its own)."""
    removed = fsio.clean_stale(folder / MANIFEST)
    for i in range(n_shards):
        removed += fsio.clean_stale(folder / shard_name(i, n_shards))
    return removed


def read_manifest(folder: str | os.PathLike) -> Optional[dict]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheMismatch(f"teacher cache {folder}: unreadable {MANIFEST} ({e}); record it again "
                            "with python -m distil_jax.record_teacher") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CacheMismatch(f"{path} is not a distil_jax teacher cache manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheMismatch(f"teacher cache {folder} has format version {m.get('format_version')}, "
                            f"this distil_jax reads version {FORMAT_VERSION}; record it again")
    return m


# ----------------------------------------------------------------------------- fingerprints


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def teacher_fingerprint(name_or_path: str) -> str:
    """sha256 of the teacher's architecture (its parsed config) and of its weight files' bytes.

    Independent of where the folder lives and of the dtype the weights are loaded in; another
    checkpoint, or another architecture option, gives another fingerprint."""
    from distil_jax import hf

    folder = hf.resolve_folder(name_or_path, allow_patterns=["config.json", "model.safetensors*",
                                                             "pytorch_model.bin*"])
    h = hashlib.sha256(repr(hf.load_config(folder)).encode())
    weights = sorted(f for f in folder.iterdir()
                     if f.name.startswith(("model.safetensors", "pytorch_model.bin")))
    if not weights:
        raise FileNotFoundError(f"no weight files in the teacher folder {folder}")
    for f in weights:
        h.update(f.name.encode() + b"\0" + _sha256_file(f).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    return hashlib.sha256(data._tokenizer_fingerprint(tokenizer)).hexdigest()


def rows_fingerprint(arrays) -> str:
    """sha256 of a set of rows (input_ids and segment_ids, with their shapes); an evaluator's
    `data.EvalSet` by its rows and Distily's evaluator rows."""
    if hasattr(arrays, "distily_rows"):
        return rows_fingerprint(arrays.rows) + rows_fingerprint(arrays.distily_rows)[:16]
    h = hashlib.sha256()
    for key in ("input_ids", "segment_ids"):
        a = np.ascontiguousarray(np.asarray(arrays[key], np.int32))
        h.update(key.encode() + repr(a.shape).encode() + a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- what a cache pins


def effective_k(cache_k: int, vocab_size: int) -> int:
    """The k a config asks for, on a vocabulary of `vocab_size` (k >= V is the whole vocabulary)."""
    if int(cache_k) <= 0:
        raise ValueError(f"teacher.cache_k={cache_k}: use a positive number of tokens (e.g. 64)")
    return min(int(cache_k), int(vocab_size))


def run_pins(config, teacher_cfg, tokenizer, seq_len: int, train_rows: Mapping,
             teacher_fp: str) -> dict:
    """What a cache made for this run must have been made from (the manifest's pinned fields)."""
    ds = config.dataset
    seg = np.asarray(train_rows["segment_ids"])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {"name_or_path": str(config.teacher.model_name_or_path), "fingerprint": teacher_fp,
                    "model_type": teacher_cfg.model_type, "vocab_size": int(teacher_cfg.vocab_size),
                    "weights_dtype": config.teacher.dtype, "compute_dtype": config.train.dtype},
        "tokenizer": {"name_or_path": str(config.tokenizer_name_or_path or config.teacher.model_name_or_path),
                      "fingerprint": tokenizer_fingerprint(tokenizer)},
        "dataset": {**{k: ds.get(k) for k in _DATASET_FIELDS}, "fingerprint": rows_fingerprint(train_rows)},
        "layout": config.dataset.layout,
        "seq_len": int(seq_len),
        "rows": int(seg.shape[0]),
        "real_tokens": int((seg > 0).sum()),
        "temperature": float(config.objective.temperature),
    }


def check_pins(folder, manifest: Mapping, run: Mapping) -> None:
    """CacheMismatch naming the first thing the cache was not made from, as this run would."""
    m = manifest

    def refuse(what: str, theirs, ours, fix: str = "") -> None:
        raise CacheMismatch(
            f"teacher cache {folder} does not match this run: {what} (cache: {theirs}, run: {ours}); "
            + (fix or "record a cache for this run with python -m distil_jax.record_teacher and "
               "the run's config, or point teacher.cache at a matching one"))

    if m["teacher"]["fingerprint"] != run["teacher"]["fingerprint"]:
        refuse("another teacher (weights fingerprint)", m["teacher"]["name_or_path"] + " "
               + m["teacher"]["fingerprint"][:12], run["teacher"]["name_or_path"] + " "
               + run["teacher"]["fingerprint"][:12])
    if m["tokenizer"]["fingerprint"] != run["tokenizer"]["fingerprint"]:
        refuse("another tokenizer", m["tokenizer"]["name_or_path"] + " " + m["tokenizer"]["fingerprint"][:12],
               run["tokenizer"]["name_or_path"] + " " + run["tokenizer"]["fingerprint"][:12])
    if m["layout"] != run["layout"]:
        refuse("another dataset.layout", m["layout"], run["layout"])
    if m["seq_len"] != run["seq_len"]:
        refuse("another sequence length", m["seq_len"], run["seq_len"])
    if m["dataset"]["fingerprint"] != run["dataset"]["fingerprint"]:
        fields = [k for k in _DATASET_FIELDS if m["dataset"].get(k) != run["dataset"].get(k)]
        refuse("another dataset (its training rows differ" + (
            f"; dataset fields {', '.join(fields)} differ" if fields else ", the data itself changed") + ")",
            m["dataset"]["fingerprint"][:12], run["dataset"]["fingerprint"][:12])
    if float(m["temperature"]) != float(run["temperature"]):
        refuse("another objective.temperature (the cache holds the teacher's distribution at the "
               "temperature it was recorded at)", m["temperature"], run["temperature"],
               f"set objective.temperature={m['temperature']} or record a cache at "
               f"{run['temperature']}")


def _first_difference(a: Any, b: Any, path: str = "") -> Optional[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            d = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if d:
                return d
        return None
    return None if a == b else f"{path} ({a!r} vs {b!r})"


# ----------------------------------------------------------------------------- the teacher's top k


def teacher_top_k(config, params, input_ids, segment_ids, *, k: int, temperature: float = 1.0,
                  dtype=None, single_document_rows: bool = False, tail_samples: int = 0,
                  rows=None, seed: int = 0):
    """The teacher's top-k next-token distribution at every position (jittable).

    input_ids, segment_ids: [B, S]. Returns (ids [B, S, k] int32, most probable first;
    logprobs [B, S, k] float32; rest [B, S] float32 = log of the mass outside the top k, -inf
    when k = V), all from a float32 log-softmax of logits / temperature, as the online step sees
    them (same forward, same compute dtype). With tail_samples = m > 0 (k < V) also
    (tail_ids [B, S, m] int32, tail_logprobs [B, S, m] float32): see `sample_tail`, drawn with
    a key made from `seed` and each row's index `rows` [B] int32 in the training rows, so the
    draw does not depend on how rows are batched.
    """
    import jax
    import jax.numpy as jnp

    from distil_jax import models
    from distil_jax.objectives.losses import _top_k_mask

    kwargs = dict(segment_ids=segment_ids, single_document_rows=single_document_rows)
    if dtype is not None:
        kwargs["dtype"] = dtype
    logits = models.forward(config, params, input_ids, **kwargs).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, k)
    if k == logp.shape[-1]:
        return top_ids, top_lp, jnp.full(logp.shape[:-1], -jnp.inf, jnp.float32)
    in_top = _top_k_mask(top_ids, logp.shape[-1])  # [B, S, V], shared by the rest and the draws
    rest = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, logp), axis=-1)
    if not tail_samples:
        return top_ids, top_lp, rest
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(seed), r))(rows)
    u = jax.vmap(lambda key: jax.random.uniform(key, logp.shape[1:2]))(keys)  # [B, S]
    tail_ids = sample_tail(logp, in_top, u, tail_samples)
    return top_ids, top_lp, rest, tail_ids, jnp.take_along_axis(logp, tail_ids, axis=-1)


def sample_tail(logp, in_top, u, m: int):
    """m tokens per position drawn from the distribution outside the top k, p(v) / p_rest.

    logp: [..., V] float32 log-probabilities; in_top: [..., V] bool, True on the top-k tokens
    (`losses._top_k_mask`); u: [...] uniform in [0, 1).
    Systematic sampling: the j-th draw is the token whose cumulative tail mass first exceeds
    (j + u) / m of the total (one uniform per position, m evenly spaced points). Each draw is
    marginally distributed as p(v) / p_rest, so an average over the m draws is an unbiased
    estimate of a tail mean, with less variance than m independent draws. Returns [..., m]
    int32 ids: never a top-k token when the tail has mass (their mass is zeroed before the
    cumulative sum); where it has none, the loss gives the draws weight 0.
    """
    import jax.numpy as jnp

    V = logp.shape[-1]
    p = jnp.where(in_top, 0.0, jnp.exp(logp))
    cdf = jnp.cumsum(p, axis=-1)
    total = cdf[..., -1:]
    points = (jnp.arange(m, dtype=jnp.float32) + u[..., None]) / m * total
    # Rounding must not put a point at or past the total (that would pick the last token, maybe
    # a top-k one): the largest float below the total.
    points = jnp.minimum(points, jnp.nextafter(total, 0.0))
    find = jnp.vectorize(lambda c, x: jnp.searchsorted(c, x, side="right"), signature="(v),(m)->(m)")
    return jnp.minimum(find(cdf, points), V - 1).astype(jnp.int32)


# ----------------------------------------------------------------------------- shards


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def shard_name(i: int, n: int) -> str:
    # The hub's split naming: `datasets.load_dataset(DIR)` finds them as the "train" split.
    return f"{DATA_DIR}/train-{i:05d}-of-{n:05d}.arrow"


def shard_table(first_row: int, segment_ids: np.ndarray, top_ids: np.ndarray, top_lp: np.ndarray,
                rest: np.ndarray, id_dtype, lp_dtype, tail_ids=None, tail_lp=None):
    """The Arrow table of rows [first_row, first_row + n): one record per real token.

    segment_ids [n, S]; top_ids, top_lp [n, S, k]; rest [n, S]; tail_ids, tail_lp [n, S, m] or
    None (host arrays)."""
    import pyarrow as pa

    r, p = np.nonzero(np.asarray(segment_ids) > 0)

    def lists(x, dtype):
        flat = np.ascontiguousarray(x[r, p].astype(dtype)).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), x.shape[-1])

    columns = {
        "row": pa.array((r + first_row).astype(np.int32)),
        "position": pa.array(p.astype(np.int32)),
        "topk_ids": lists(top_ids, id_dtype),
        "topk_logprobs": lists(top_lp, lp_dtype),
        "rest_logmass": pa.array(rest[r, p].astype(np.float32)),
    }
    if tail_ids is not None:
        columns.update(tail_ids=lists(tail_ids, id_dtype), tail_logprobs=lists(tail_lp, lp_dtype))
    return pa.table(columns)


def write_shard(path: Path, table) -> None:
    """Atomically and deterministically (the same table gives the same bytes: no timestamps)."""
    import pyarrow as pa

    with fsio.atomic_file(path, "wb") as f:
        with pa.ipc.new_stream(f, table.schema,
                               options=pa.ipc.IpcWriteOptions(compression=COMPRESSION)) as writer:
            writer.write_table(table)


def shard_records(path: Path) -> int:
    """The number of records of a shard (reads it whole: a truncated one raises)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def read_shard(path: Path, k: int, m: int = 0) -> dict:
    """A shard's columns as numpy: row, position [T]; topk_ids, topk_logprobs [T, k]; rest_logmass
    [T]; with m tail samples also tail_ids, tail_logprobs [T, m]."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        t = pa.ipc.open_stream(source).read_all()
    out = {name: t.column(name).to_numpy() for name in ("row", "position", "rest_logmass")}
    lists = {"topk_ids": k, "topk_logprobs": k}
    if m:
        lists.update(tail_ids=m, tail_logprobs=m)
    for name, width in lists.items():
        col = t.column(name).combine_chunks()
        out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return out


# ----------------------------------------------------------------------------- reading


class TeacherCache:
    """A complete teacher cache, checked against a run and loaded into host memory.

    `open` refuses (CacheMismatch, one line) a cache that is incomplete, not made for this run
    (teacher, tokenizer, layout, sequence length, dataset, temperature), holds fewer than the
    run's k tokens per position, or has a truncated / corrupted / missing shard (size and sha256
    against the manifest). The arrays stay in the stored dtypes: T real tokens hold
    T·((k + m)·(2 + 2) + 4) bytes at float16 / uint16 with m tail samples.
    """

    def __init__(self, folder: Path, manifest: dict, k: int, row_start: np.ndarray,
                 ids: np.ndarray, logprobs: np.ndarray, rest: np.ndarray,
                 tail_ids: Optional[np.ndarray] = None, tail_logprobs: Optional[np.ndarray] = None):
        self.folder, self.manifest, self.k = folder, manifest, k
        self.row_start, self.ids, self.logprobs, self.rest = row_start, ids, logprobs, rest
        self.tail_ids, self.tail_logprobs = tail_ids, tail_logprobs
        self.tail_samples = 0 if tail_ids is None else int(tail_ids.shape[-1])

    @classmethod
    def open(cls, folder: str | os.PathLike, run: Mapping, train_rows: Mapping, k: int) -> "TeacherCache":
        """run: `run_pins` of this run; train_rows: its training rows; k: the run's effective k
        (<= the cache's: the top k of a larger cache are its first k, the rest folds in)."""
        folder = Path(folder)
        m = require_complete(folder)
        check_pins(folder, m, run)
        if k > m["k"]:
            raise CacheMismatch(f"teacher cache {folder} holds the top {m['k']} tokens per position, the "
                                f"run asks teacher.cache_k={k}: set teacher.cache_k<={m['k']} or record "
                                f"a cache with teacher.cache_k={k}")
        m_tail = int(m.get("tail_samples", 0))
        if m_tail and k < m["k"]:
            # Its samples are of the mass outside the recorded top k; the tokens k..K would be
            # counted twice.
            raise CacheMismatch(f"teacher cache {folder} holds tail samples drawn outside its top "
                                f"{m['k']}, the run asks teacher.cache_k={k}: set teacher.cache_k="
                                f"{m['k']} (a cache with tail samples is read at the k it was "
                                "recorded with)")
        t0 = time.time()
        parts = []
        for shard in m["shards"]:
            path = folder / shard["file"]
            if not path.exists():
                raise CacheMismatch(f"teacher cache {folder}: shard {shard['file']} is missing; record "
                                    "the cache again (python -m distil_jax.record_teacher)")
            size = path.stat().st_size
            if size != shard["bytes"] or _sha256_file(path) != shard["sha256"]:
                what = "truncated" if size < shard["bytes"] else "corrupted"
                raise CacheMismatch(
                    f"teacher cache {folder}: shard {shard['file']} is {what} ({size} bytes, sha256 "
                    f"differs from the manifest's {shard['bytes']} bytes); delete it and rerun "
                    "python -m distil_jax.record_teacher with the same config to rewrite it")
            parts.append(read_shard(path, m["k"], m_tail))
        cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        # The records must be exactly the run's real tokens, row by row, in order (the manifest
        # pins the rows' fingerprint; this catches a shard the manifest was made to agree with).
        r, p = np.nonzero(np.asarray(train_rows["segment_ids"]) > 0)
        if not (np.array_equal(cat["row"], r) and np.array_equal(cat["position"], p)):
            raise CacheMismatch(f"teacher cache {folder}: its records are not the run's real tokens "
                                "(rows / positions differ); record it again")
        ids, lp, rest = cat["topk_ids"], cat["topk_logprobs"], cat["rest_logmass"]
        if k < m["k"]:
            # Fewer buckets than recorded: the top k are the first k (sorted), the others join
            # the rest bucket, exactly.
            extra = lp[:, k:].astype(np.float32)
            rest = np.logaddexp(rest, _logsumexp(extra)).astype(np.float32)
            ids, lp = np.ascontiguousarray(ids[:, :k]), np.ascontiguousarray(lp[:, :k])
        n = int(np.asarray(train_rows["segment_ids"]).shape[0])
        row_start = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=n), out=row_start[1:])
        tail = (cat["tail_ids"], cat["tail_logprobs"]) if m_tail else (None, None)
        log.info("teacher cache %s: %d real tokens, top %d of %d%s (%s), %.1f MB in memory, loaded in %.1f s",
                 folder, len(rest), k, m["teacher"]["vocab_size"],
                 f" + {m_tail} tail samples" if m_tail else "", m["storage"]["logprobs_dtype"],
                 sum(a.nbytes for a in (ids, lp, rest) + tail if a is not None) / 1e6, time.time() - t0)
        return cls(folder, m, k, row_start, ids, lp, rest, *tail)

    def targets(self, row_index: np.ndarray, segment_ids: np.ndarray) -> dict:
        """The cached targets of one host batch: {CACHE_BATCH_KEYS: [B, S, k], [B, S, k], [B, S]},
        and with tail samples {CACHE_TAIL_KEYS: [B, S, m], [B, S, m]}.

        row_index [B]: each batch row's index in the training rows; segment_ids [B, S]. Rows with
        no real token (the all-padding rows that fill a last batch) get fillers only."""
        from distil_jax.objectives.objective import CACHE_BATCH_KEYS, CACHE_TAIL_KEYS

        seg = np.asarray(segment_ids)
        real = seg > 0
        rows = np.asarray(row_index)[real.any(axis=1)]
        starts, ends = self.row_start[rows], self.row_start[rows + 1]
        lengths = ends - starts
        if int(lengths.sum()) != int(real.sum()):
            raise CacheMismatch("a batch's real tokens differ from the teacher cache's rows")
        # Flat indices of those rows' records, row after row (np.repeat of the row starts).
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        idx = np.arange(int(lengths.sum())) + offsets
        B, S = seg.shape
        ids = np.zeros((B, S, self.k), self.ids.dtype)
        lp = np.zeros((B, S, self.k), self.logprobs.dtype)
        rest = np.zeros((B, S), np.float32)
        ids[real], lp[real], rest[real] = self.ids[idx], self.logprobs[idx], self.rest[idx]
        out = dict(zip(CACHE_BATCH_KEYS, (ids, lp, rest)))
        if self.tail_samples:
            t_ids = np.zeros((B, S, self.tail_samples), self.tail_ids.dtype)
            t_lp = np.zeros((B, S, self.tail_samples), self.tail_logprobs.dtype)
            t_ids[real], t_lp[real] = self.tail_ids[idx], self.tail_logprobs[idx]
            out.update(zip(CACHE_TAIL_KEYS, (t_ids, t_lp)))
        return out

    def batches(self, rows: Mapping, batch_size: int, *, seed: int, shuffle: bool = True,
                drop_last: bool = False) -> "CachedBatches":
        return CachedBatches(self, rows, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last)

    def teacher_eval(self, rows: Mapping) -> Optional[dict]:
        """The teacher's evaluation on `rows` as recorded in the manifest, or None if it has none
        of these rows (matched by their fingerprint)."""
        fp = rows_fingerprint(rows)
        for name, rec in (self.manifest.get("teacher_eval") or {}).items():
            if rec.get("fingerprint") == fp:
                return {k: v for k, v in rec.items() if k != "fingerprint"} | {"source": "teacher cache manifest"}
        return None

    def summary(self) -> dict:
        """What the run summary (and the model card) say about the cache."""
        m = self.manifest
        return {"path": str(self.folder), "k": self.k, "recorded_k": m["k"],
                "tail_samples": self.tail_samples,
                "vocab_size": m["teacher"]["vocab_size"], "logprobs_dtype": m["storage"]["logprobs_dtype"],
                "temperature": m["temperature"], "teacher_fingerprint": m["teacher"]["fingerprint"],
                "real_tokens": m["real_tokens"], "bytes": sum(s["bytes"] for s in m["shards"])}


def require_complete(folder: Path) -> dict:
    """The manifest of a complete cache in `folder`, or CacheMismatch saying what to do."""
    m = read_manifest(folder)
    if m is None:
        raise CacheMismatch(f"teacher.cache={folder}: no {MANIFEST} there; record the cache first with "
                            f"python -m distil_jax.record_teacher --config CONFIG --workdir DIR "
                            f"--config.teacher.cache={folder}")
    if not m.get("complete"):
        raise CacheMismatch(f"teacher cache {folder} is incomplete (its recording was interrupted): "
                            "rerun python -m distil_jax.record_teacher with the same config to finish it")
    return m


def _logsumexp(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] == 0:
        return np.full(x.shape[:-1], -np.inf, np.float32)
    top = x.max(axis=-1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(x - safe[..., None]).sum(-1)) + safe


class CachedBatches:
    """A run's `data.BatchIterator` with the cache's targets attached to each host batch,
    assembled on a background thread `depth` batches ahead so the step never waits on it.

    Same interface as BatchIterator for the loop: `next()`, `steps_per_epoch`, `state()` (the
    position after the last batch handed out, not after the ones prefetched) and `restore()`.
    `wait_s`: the time `next()` spent waiting after the first batch (0 when prefetch keeps up).
    """

    def __init__(self, cache: TeacherCache, rows: Mapping, batch_size: int, *, seed: int,
                 shuffle: bool = True, drop_last: bool = False, depth: int = 2):
        n = data._num_rows(dict(rows))
        self._it = data.BatchIterator(dict(rows, row_index=np.arange(n)), batch_size, shuffle=shuffle,
                                      seed=seed, drop_last=drop_last)
        self.cache, self.depth = cache, depth
        self.steps_per_epoch = self._it.steps_per_epoch
        self._state = self._it.state()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.wait_s, self._handed = 0.0, 0

    def _make(self):
        batch = next(self._it)
        index = batch.pop("row_index")
        batch.update(self.cache.targets(index, batch["segment_ids"]))
        return batch, self._it.state()

    def _work(self):
        while not self._stop.is_set():
            try:
                item = self._make()
            except BaseException as e:  # handed to the consumer, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, name="teacher-cache-prefetch", daemon=True)
            self._thread.start()
        t0 = time.perf_counter()
        item = self._queue.get()
        if self._handed:
            self.wait_s += time.perf_counter() - t0
        self._handed += 1
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state(self) -> dict[str, int]:
        return dict(self._state)

    def restore(self, state: Mapping[str, int]) -> None:
        self.close()
        self._it.restore(dict(state))
        self._state = self._it.state()

    def close(self) -> None:
        """Stop the prefetch thread and drop what it prepared (the position is kept)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = queue.Queue(maxsize=self.depth)
            self._it.restore(self._state)


# ----------------------------------------------------------------------------- the run's side


def check_config(config) -> None:
    """Before any work: a run with teacher.cache must have an objective that a cache can feed
    and a complete cache folder. One-line ValueErrors."""
    from distil_jax.objectives.objective import Objective

    if not config.teacher.cache:
        return
    obj = dict(config.objective.to_dict())
    obj.pop("logits_chunk_tokens", None)
    Objective.from_config(obj).check_cacheable()
    require_complete(Path(config.teacher.cache))


def student_needs_teacher_weights(student_cfg: Mapping) -> bool:
    """Whether building the student reads the teacher's weights (copied modules or blocks)."""
    return bool(student_cfg.get("copy_teacher_modules") or student_cfg.get("init_from_teacher_layers"))


def bytes_per_token(manifest: Mapping) -> float:
    total = sum(s["bytes"] for s in manifest["shards"])
    return total / max(int(manifest["real_tokens"]), 1)


def default_shard_rows(seq_len: int) -> int:
    return max(1, SHARD_POSITIONS // int(seq_len))


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(n_rows / shard_rows))
    return [(i * shard_rows, min((i + 1) * shard_rows, n_rows)) for i in range(n)]
