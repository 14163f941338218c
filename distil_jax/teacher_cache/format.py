"""The teacher cache's on-disk format: the manifest, the shards (Arrow IPC streams, one record per
real token) and their names, sizes and layout. Columns and manifest keys: docs/teacher_cache.md.

Each shard describes itself in its Arrow schema's metadata (``shard_meta``: k, tail samples,
temperature, stored dtypes, vocabulary, the teacher's and the rows' fingerprints, its rows and
record count), so a manifest that no longer matches its shards (edited, or copied from another
recording) is refused on read (``shard_problem``) instead of being read with the wrong widths.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from distil_jax import fsio

FORMAT = "distil_jax.teacher_cache"
# 2: shards carry their own description (schema metadata), checked against the manifest on read.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DATA_DIR = "data"
COMPRESSION = "zstd"
SHARD_FORMAT = "arrow-ipc-stream"
# Default shard size in positions (real or padding): a few hundred MB at most for k up to 128,
# below the hub's advice for one file (docs/teacher_cache.md).
SHARD_POSITIONS = 1 << 20
# The schema metadata key of a shard's own description.
META_KEY = FORMAT.encode()
_RECORD = "record the cache again with python -m distil_jax.record_teacher"


class CacheMismatch(ValueError):
    """A teacher cache that does not fit the run (or is incomplete, truncated or corrupted)."""


# ----------------------------------------------------------------------------- the manifest


def read_manifest(folder: str | os.PathLike) -> Optional[dict]:
    """The manifest of the cache in `folder`, None if it has none; CacheMismatch if it is not
    one this version reads."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheMismatch(f"teacher cache {folder}: unreadable {MANIFEST} ({e}); {_RECORD}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CacheMismatch(f"{path} is not a distil_jax teacher cache manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheMismatch(f"teacher cache {folder} has format version {m.get('format_version')}, "
                            f"this distil_jax reads version {FORMAT_VERSION}; {_RECORD}")
    return m


def remove_stale_temps(folder: Path, n_shards: int) -> list[Path]:
    """Remove the temp files that killed writers (dead processes of this machine) left beside
    the manifest and the shards (`fsio.clean_stale`; a rewrite of a file also cleans its own)."""
    removed = fsio.clean_stale(folder / MANIFEST)
    for i in range(n_shards):
        removed += fsio.clean_stale(folder / shard_name(i, n_shards))
    return removed


def bytes_per_token(manifest: Mapping) -> float:
    total = sum(s["bytes"] for s in manifest["shards"])
    return total / max(int(manifest["real_tokens"]), 1)


# ----------------------------------------------------------------------------- shard layout


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def shard_name(i: int, n: int) -> str:
    # The hub's split naming: `datasets.load_dataset(DIR)` finds them as the "train" split.
    return f"{DATA_DIR}/train-{i:05d}-of-{n:05d}.arrow"


def default_shard_rows(seq_len: int) -> int:
    return max(1, SHARD_POSITIONS // int(seq_len))


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(n_rows / shard_rows))
    return [(i * shard_rows, min((i + 1) * shard_rows, n_rows)) for i in range(n)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- a shard's own description


def shard_meta(manifest: Mapping, rows: Sequence[int], tokens: int) -> dict:
    """What the shard of `rows` [first, end) holding `tokens` records says about itself: the
    settings of the recording (from the manifest, or the recorder's pins) that a reader relies on."""
    storage = manifest["storage"]
    return {"format_version": FORMAT_VERSION, "k": int(manifest["k"]),
            "tail_samples": int(manifest.get("tail_samples", 0)),
            "temperature": float(manifest["temperature"]),
            "ids_dtype": storage["ids_dtype"], "logprobs_dtype": storage["logprobs_dtype"],
            "vocab_size": int(manifest["teacher"]["vocab_size"]),
            "teacher_fingerprint": manifest["teacher"]["fingerprint"],
            "rows_fingerprint": manifest["dataset"]["fingerprint"],
            "rows": [int(rows[0]), int(rows[1])], "tokens": int(tokens)}


def shard_problem(table: pa.Table, expected: Mapping) -> Optional[str]:
    """What in a shard differs from `expected` (its `shard_meta` by the manifest): its own
    description, its columns' widths and types, its number of records; None if nothing."""
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        return "it carries no description of its recording"
    meta = json.loads(raw)
    for key in expected:
        if meta.get(key) != expected[key]:
            return f"{key} is {meta.get(key)!r} in the shard, {expected[key]!r} in the manifest"
    lists = {"topk_ids": (expected["k"], expected["ids_dtype"]),
             "topk_logprobs": (expected["k"], expected["logprobs_dtype"])}
    if expected["tail_samples"]:
        lists.update(tail_ids=(expected["tail_samples"], expected["ids_dtype"]),
                     tail_logprobs=(expected["tail_samples"], expected["logprobs_dtype"]))
    names = ["row", "position", "topk_ids", "topk_logprobs", "rest_logmass"]
    names += ["tail_ids", "tail_logprobs"] if expected["tail_samples"] else []
    if table.schema.names != names:
        return f"its columns are {table.schema.names}, expected {names}"
    for name, (width, dtype) in lists.items():
        t = table.schema.field(name).type
        if not pa.types.is_fixed_size_list(t):
            return f"column {name} is {t}, not a fixed-size list"
        if t.list_size != width or t.value_type != pa.from_numpy_dtype(np.dtype(dtype)):
            return (f"column {name} holds {t.list_size} x {t.value_type}, the manifest says "
                    f"{width} x {pa.from_numpy_dtype(np.dtype(dtype))}")
    if table.num_rows != expected["tokens"]:
        return f"it holds {table.num_rows} records, the manifest says {expected['tokens']}"
    return None


# ----------------------------------------------------------------------------- writing and reading


def shard_table(meta: Mapping, segment_ids: np.ndarray, top_ids: np.ndarray, top_lp: np.ndarray,
                rest: np.ndarray, tail_ids=None, tail_lp=None) -> pa.Table:
    """The Arrow table of the rows meta["rows"]: one record per real token, in the dtypes and
    with the description `meta` (`shard_meta`) gives.

    segment_ids [n, S]; top_ids, top_lp [n, S, k]; rest [n, S]; tail_ids, tail_lp [n, S, m] or
    None (host arrays)."""
    r, p = np.nonzero(np.asarray(segment_ids) > 0)

    def lists(x, dtype):
        flat = np.ascontiguousarray(x[r, p].astype(dtype)).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), x.shape[-1])

    id_dtype, lp_dtype = np.dtype(meta["ids_dtype"]), np.dtype(meta["logprobs_dtype"])
    columns = {
        "row": pa.array((r + meta["rows"][0]).astype(np.int32)),
        "position": pa.array(p.astype(np.int32)),
        "topk_ids": lists(top_ids, id_dtype),
        "topk_logprobs": lists(top_lp, lp_dtype),
        "rest_logmass": pa.array(rest[r, p].astype(np.float32)),
    }
    if tail_ids is not None:
        columns.update(tail_ids=lists(tail_ids, id_dtype), tail_logprobs=lists(tail_lp, lp_dtype))
    # sort_keys: the same description is the same bytes.
    return pa.table(columns, metadata={META_KEY: json.dumps(dict(meta), sort_keys=True)})


def write_shard(path: Path, table: pa.Table) -> None:
    """Atomically and deterministically (the same table gives the same bytes: no timestamps)."""
    with fsio.atomic_file(path, "wb") as f:
        with pa.ipc.new_stream(f, table.schema,
                               options=pa.ipc.IpcWriteOptions(compression=COMPRESSION)) as writer:
            writer.write_table(table)


def open_shard(path: Path) -> pa.Table:
    """A shard's table, read whole (a truncated stream raises)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def shard_columns(table: pa.Table) -> dict:
    """A shard's columns as numpy, list columns at the widths the shard's schema gives: row,
    position, rest_logmass [T]; topk_ids, topk_logprobs [T, k]; tail_ids, tail_logprobs [T, m]."""
    out = {}
    for name in table.schema.names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
        else:
            out[name] = col.to_numpy()
    return out


def read_shard(folder: Path, entry: Mapping, expected: Mapping) -> dict:
    """The columns (`shard_columns`) of the manifest's shard `entry` in `folder`, after checking
    its size and sha256 against the entry and its contents against `expected` (`shard_meta`).
    CacheMismatch (one line) for a missing, truncated, corrupted or mismatched shard."""
    path = Path(folder) / entry["file"]
    if not path.exists():
        raise CacheMismatch(f"teacher cache {folder}: shard {entry['file']} is missing; {_RECORD}")
    size = path.stat().st_size
    if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        what = "truncated" if size < entry["bytes"] else "corrupted"
        raise CacheMismatch(
            f"teacher cache {folder}: shard {entry['file']} is {what} ({size} bytes, sha256 "
            f"differs from the manifest's {entry['bytes']} bytes); delete it and rerun "
            "python -m distil_jax.record_teacher with the same config to rewrite it")
    table = open_shard(path)
    problem = shard_problem(table, expected)
    if problem:
        raise CacheMismatch(
            f"teacher cache {folder}: shard {entry['file']} does not match the manifest ({problem}): "
            f"the manifest was edited or the shard is another recording's; delete {folder} and {_RECORD}")
    return shard_columns(table)
