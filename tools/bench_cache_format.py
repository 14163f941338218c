#!/usr/bin/env python
"""Bytes on disk and read / write speed of a teacher cache's records in candidate file formats.

    python tools/bench_cache_format.py DIR [--tokens N] [--repeat R]

DIR is a recorded teacher cache (python -m distil_jax.record_teacher). Its first N records are
written, in memory, as: the cache's own format (Arrow IPC stream, zstd buffers), Arrow IPC
uncompressed, and Parquet (the same list columns; zstd; pyarrow's defaults, and with dictionary
encoding off). Reading is timed to the numpy arrays training uses (`teacher_cache.shard_columns`).
Best of R repeats. Prints a markdown table (docs/teacher_cache.md records it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from distil_jax import teacher_cache as tc  # noqa: E402


def _ipc(table, compression):
    def write():
        b = io.BytesIO()
        with pa.ipc.new_stream(b, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
            w.write_table(table)
        return b.getvalue()

    def read(raw):
        return pa.ipc.open_stream(pa.BufferReader(raw)).read_all()

    return write, read


def _parquet(table, **kw):
    def write():
        b = io.BytesIO()
        pq.write_table(table, b, **kw)
        return b.getvalue()

    def read(raw):
        return pq.read_table(io.BytesIO(raw))

    return write, read


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    m = tc.read_manifest(a.cache)
    k = m["k"]
    parts, n = [], 0
    for shard in m["shards"]:
        parts.append(tc.open_shard(Path(a.cache) / shard["file"]))
        n += parts[-1].num_rows
        if n >= a.tokens:
            break
    table = pa.concat_tables(parts).slice(0, a.tokens).combine_chunks()
    n = table.num_rows
    formats = {
        "Arrow IPC stream, zstd (the cache's format)": _ipc(table, "zstd"),
        "Arrow IPC stream, uncompressed": _ipc(table, None),
        "Parquet, zstd (pyarrow defaults: dictionary on)": _parquet(table, compression="zstd"),
        "Parquet, zstd, no dictionary": _parquet(table, compression="zstd", use_dictionary=False),
    }
    print(f"{n:,} records of k = {k}, V = {m['teacher']['vocab_size']}, "
          f"{m['storage']['logprobs_dtype']} log-probs; load {[round(x, 2) for x in os.getloadavg()]}")
    print("| format | bytes / token | write (M tokens/s) | read to numpy (M tokens/s) |")
    print("|---|---|---|---|")
    rows = {}
    for name, (write, read) in formats.items():
        w = r = float("inf")
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            raw = write()
            w = min(w, time.perf_counter() - t0)
            t0 = time.perf_counter()
            tc.shard_columns(read(raw))  # the reader's own conversion
            r = min(r, time.perf_counter() - t0)
        rows[name] = dict(bytes_per_token=len(raw) / n, write=n / w / 1e6, read=n / r / 1e6)
        print(f"| {name} | {len(raw) / n:.1f} | {n / w / 1e6:.2f} | {n / r / 1e6:.2f} |", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
