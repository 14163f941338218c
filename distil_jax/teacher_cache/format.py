"""The teacher cache's on-disk format: the manifest, the shards (Arrow IPC streams, one record
per real token) and their names, sizes and layout. Layout and columns: docs/teacher_cache.md."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from distil_jax import fsio

FORMAT = "distil_jax.teacher_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_DIR = "data"
COMPRESSION = "zstd"
SHARD_FORMAT = "arrow-ipc-stream"
# Default shard size: about 2^20 real-or-padding positions, so a shard is some 10-300 MB at
# k = 32..128 (the hub's advice for Parquet files is below 500 MB).
SHARD_POSITIONS = 1 << 20


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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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


def bytes_per_token(manifest: Mapping) -> float:
    total = sum(s["bytes"] for s in manifest["shards"])
    return total / max(int(manifest["real_tokens"]), 1)


def default_shard_rows(seq_len: int) -> int:
    return max(1, SHARD_POSITIONS // int(seq_len))


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(n_rows / shard_rows))
    return [(i * shard_rows, min((i + 1) * shard_rows, n_rows)) for i in range(n)]
