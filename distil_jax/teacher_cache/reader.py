"""Reading a teacher cache: ``TeacherCache`` (open, check against the run, load, the targets of a
batch) and ``CachedBatches`` (a run's batches with the cached targets attached, prefetched)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from distil_jax import data
from distil_jax.teacher_cache.format import (MANIFEST, CacheMismatch, read_manifest, read_shard,
                                             shard_meta)
from distil_jax.teacher_cache.pins import check_pins, rows_fingerprint

log = logging.getLogger(__name__)


class TeacherCache:
    """A complete teacher cache, checked against a run and loaded into host memory.

    `open` refuses (CacheMismatch, one line) a cache that is incomplete, not made for this run
    (teacher, tokenizer, layout, sequence length, dataset, temperature), holds fewer than the
    run's k tokens per position, or has a truncated / corrupted / missing shard (size and sha256
    against the manifest) or one whose own description (k, tail samples, temperature, dtypes,
    fingerprints, rows) differs from the manifest's. The arrays stay in the stored dtypes: T real tokens hold
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
        _check_k(folder, m, k)
        t0 = time.time()
        cat = _read_records(folder, m)
        # The records must be exactly the run's real tokens, row by row, in order (the manifest
        # pins the rows' fingerprint; this catches a shard the manifest was made to agree with).
        seg = np.asarray(train_rows["segment_ids"])
        r, p = np.nonzero(seg > 0)
        if not (np.array_equal(cat["row"], r) and np.array_equal(cat["position"], p)):
            raise CacheMismatch(f"teacher cache {folder}: its records are not the run's real tokens "
                                "(rows / positions differ); record it again")
        ids, lp, rest = _first_k(cat["topk_ids"], cat["topk_logprobs"], cat["rest_logmass"], k)
        row_start = np.zeros(seg.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=seg.shape[0]), out=row_start[1:])
        m_tail = int(m.get("tail_samples", 0))
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
                drop_last: bool = False, process_rows: Optional[slice] = None) -> "CachedBatches":
        return CachedBatches(self, rows, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                             process_rows=process_rows)

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


def _check_k(folder: Path, m: Mapping, k: int) -> None:
    """Refuses a run's k that the cache cannot give (more than recorded; fewer with tail samples)."""
    if k > m["k"]:
        raise CacheMismatch(f"teacher cache {folder} holds the top {m['k']} tokens per position, the "
                            f"run asks teacher.cache_k={k}: set teacher.cache_k<={m['k']} or record "
                            f"a cache with teacher.cache_k={k}")
    if m.get("tail_samples", 0) and k < m["k"]:
        # Its samples are of the mass outside the recorded top k; the tokens k..K would be
        # counted twice.
        raise CacheMismatch(f"teacher cache {folder} holds tail samples drawn outside its top "
                            f"{m['k']}, the run asks teacher.cache_k={k}: set teacher.cache_k="
                            f"{m['k']} (a cache with tail samples is read at the k it was "
                            "recorded with)")


def _read_records(folder: Path, m: Mapping) -> dict:
    """Every shard's columns, concatenated in row order; each shard checked against the manifest
    (`format.read_shard`: file size and sha256, and its own description)."""
    parts = [read_shard(folder, entry, shard_meta(m, entry["rows"], entry["tokens"]))
             for entry in m["shards"]]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _first_k(ids: np.ndarray, lp: np.ndarray, rest: np.ndarray, k: int) -> tuple:
    """The top k of a larger top-K record: its first k (sorted); the others join the rest bucket,
    exactly. ids, lp [T, K]; rest [T] -> [T, k], [T, k], [T] float32."""
    if k == ids.shape[-1]:
        return ids, lp, rest
    # numpy's own log-sum-exp (scipy is not a declared dependency); -inf entries give -inf.
    folded = np.logaddexp.reduce(lp[:, k:].astype(np.float32), axis=-1)
    rest = np.logaddexp(rest, folded).astype(np.float32)
    return np.ascontiguousarray(ids[:, :k]), np.ascontiguousarray(lp[:, :k]), rest


class CachedBatches:
    """A run's `data.BatchIterator` with the cache's targets attached to each host batch,
    assembled on a background thread `depth` batches ahead so the step never waits on it.

    Same interface as BatchIterator for the loop: `next()`, `steps_per_epoch`, `state()` (the
    position after the last batch handed out, not after the ones prefetched) and `restore()`.
    `wait_s`: the time `next()` spent waiting after the first batch (0 when prefetch keeps up).
    """

    def __init__(self, cache: TeacherCache, rows: Mapping, batch_size: int, *, seed: int,
                 shuffle: bool = True, drop_last: bool = False, depth: int = 2,
                 process_rows: Optional[slice] = None):
        n = data.row_count(dict(rows))
        # process_rows: this process's rows of each batch only (data.BatchIterator).
        self._it = data.BatchIterator(dict(rows, row_index=np.arange(n)), batch_size, shuffle=shuffle,
                                      seed=seed, drop_last=drop_last, process_rows=process_rows)
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

