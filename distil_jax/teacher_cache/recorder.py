"""Recording a teacher cache: runs the teacher once over a run's training rows (the same
tokenization, layout and rows that training builds from the same config and workdir) and writes
the manifest and the shards (``record``; the command line is ``distil_jax.record_teacher``).

Shards are written atomically, each from its own row range; a rerun after an interruption (even
SIGKILL) keeps the finished shards, records the others and ends with the same bytes as an
uninterrupted recording; the manifest is written complete last. The teacher's held-out
perplexity is recorded too, so training from the cache need not load the teacher to report it.

``dataset.loss_on="completion"`` (rows with a ``loss_mask``): the recorder still records every
real token. The teacher's distribution at a position does not depend on whether a loss counts
it, and training applies the batch's ``loss_mask`` to the cached targets exactly as to the
online teacher's (the same ``objective.counted_positions``), so the cached step equals the online
one. The manifest pins the rows with their loss mask (``pins.rows_fingerprint``): the teacher's
held-out perplexity it records is over the counted tokens, and a cache is used only with the
mask it was recorded for. Recording only the counted positions would save the prompts' share of
the disk, but would tie the shards' records to one mask; the simpler, always-correct choice is
kept.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from distil_jax import data, fsio, hf, sharding
from distil_jax.config import DTYPES, validate
from distil_jax.teacher_cache.format import (COMPRESSION, MANIFEST, SHARD_FORMAT, CacheMismatch,
                                             default_shard_rows, ids_dtype, open_shard,
                                             read_manifest, remove_stale_temps, sha256_file,
                                             shard_meta, shard_name, shard_problem, shard_ranges,
                                             shard_table, write_shard)
from distil_jax.teacher_cache.pins import (effective_k, recording_difference, rows_fingerprint,
                                           run_pins, teacher_fingerprint)
from distil_jax.teacher_cache.topk import teacher_top_k
from distil_jax.versions import package_versions

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Recording:
    """One recording's inputs: the run's teacher and rows, and the cache's settings (`pins`)."""

    config: Any
    out: Path
    teacher_cfg: Any
    params: Any
    seq_len: int
    train_rows: dict
    eval_sets: dict
    pins: dict
    ranges: list

    @property
    def n_shards(self) -> int:
        return len(self.ranges)

    def expected(self, i: int) -> dict:
        """Shard i's own description (`format.shard_meta`)."""
        a, b = self.ranges[i]
        tokens = int((np.asarray(self.train_rows["segment_ids"][a:b]) > 0).sum())
        return shard_meta(self.pins, (a, b), tokens)


def record(config: ml_collections.ConfigDict, workdir, *, shard_rows: int = 0,
           batch_size: int = 0) -> dict:
    """Record (or finish recording) the teacher cache of `config`'s run; returns its manifest
    plus "recording" (tokens recorded by this call, seconds, tokens/s; not in the file).

    The cache goes to teacher.cache (default WORKDIR/teacher_cache); shard_rows: training rows
    per shard (0: about `format.SHARD_POSITIONS` positions); batch_size: rows per teacher
    forward pass (0: eval.batch_size)."""
    rec = _prepare(config, workdir, shard_rows)
    existing = _begin(rec)
    if existing is not None:
        log.info("teacher cache %s is complete (%d shards); nothing to do", rec.out, rec.n_shards)
        return {**existing, "recording": {"tokens": 0, "seconds": 0.0, "tokens_per_s": None}}
    todo = [i for i in range(rec.n_shards) if not _shard_ok(rec, i)]
    log.info("teacher cache %s: top %d of %d tokens%s, %d rows of %d (%s), %d shards of %d rows; %d "
             "to record", rec.out, rec.pins["k"], rec.teacher_cfg.vocab_size,
             f" + {rec.pins['tail_samples']} tail samples" if rec.pins.get("tail_samples") else "",
             rec.pins["rows"], rec.seq_len, rec.pins["layout"], rec.n_shards,
             rec.pins["storage"]["shard_rows"], len(todo))
    mesh = sharding.make_mesh()
    rec.params = jax.device_put(rec.params, NamedSharding(mesh, P()))  # replicated
    t0 = time.time()
    recorded = _record_shards(rec, todo, mesh, int(batch_size) or int(rec.config.eval.batch_size))
    seconds = time.time() - t0
    manifest = _finish(rec, _teacher_eval(rec, mesh))
    rate = recorded / seconds if seconds > 0 and recorded else None
    log.info("teacher cache %s complete: %d real tokens, %.1f bytes/token on disk; this call "
             "recorded %d tokens in %.1f s (%s tokens/s); train from it with --config.teacher.cache=%s",
             rec.out, rec.pins["real_tokens"], manifest["bytes_per_token"], recorded, seconds,
             f"{rate:,.0f}" if rate else "n/a", rec.out)
    return {**manifest, "recording": {"tokens": recorded, "seconds": seconds, "tokens_per_s": rate}}


def _prepare(config, workdir, shard_rows: int) -> _Recording:
    """The run's teacher, tokenizer and rows exactly as training builds them (same calls, same
    token cache), and the settings the cache will pin."""
    from distil_jax.training import builders  # not at import: training imports teacher_cache

    config = validate(ml_collections.ConfigDict(config.to_dict()))
    builders.use_compilation_cache(config.train.compilation_cache)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = builders.with_demo_inputs(config, workdir)
    out = Path(config.teacher.cache or workdir / "teacher_cache").resolve()

    teacher_path = config.teacher.model_name_or_path
    teacher_cfg, params = hf.load_pretrained(teacher_path, DTYPES[config.teacher.dtype])
    tokenizer = builders.load_tokenizer(config.tokenizer_name_or_path or teacher_path)
    seq_len = builders.sequence_length(config, teacher_cfg, tokenizer)
    # The run's own data builder: the same rows, evaluators and token cache as training.
    train_rows, eval_sets, _ = builders.build_data(config, tokenizer, seq_len, workdir / "cache")

    k = effective_k(config.teacher.cache_k, teacher_cfg.vocab_size)
    m_tail = int(config.teacher.cache_tail_samples) if k < teacher_cfg.vocab_size else 0
    shard_rows = int(shard_rows) or default_shard_rows(seq_len)
    ranges = shard_ranges(int(train_rows["input_ids"].shape[0]), shard_rows)
    pins = run_pins(config, teacher_cfg, tokenizer, seq_len, train_rows,
                    teacher_fingerprint(teacher_path))
    if m_tail:
        pins.update(tail_samples=m_tail, tail_seed=int(config.train.seed))
    pins.update(k=k, storage={"ids_dtype": ids_dtype(teacher_cfg.vocab_size).name,
                              "logprobs_dtype": config.teacher.cache_dtype,
                              "rest_logmass_dtype": "float32", "format": SHARD_FORMAT,
                              "compression": COMPRESSION, "shard_rows": shard_rows,
                              "shards": len(ranges)})
    return _Recording(config, out, teacher_cfg, params, seq_len, train_rows, eval_sets, pins, ranges)


def _begin(rec: _Recording) -> Optional[dict]:
    """Starts the cache folder (an incomplete manifest first), or checks that the one there is
    this recording's; returns its manifest if it is already complete, else None."""
    existing = read_manifest(rec.out)
    if existing is None:
        if rec.out.exists() and any(rec.out.iterdir()):
            raise ValueError(f"teacher.cache={rec.out} exists and is not a teacher cache (no "
                             f"{MANIFEST}); choose a new or empty folder")
        # Written before any shard: a folder with shards but no manifest is never ours.
        fsio.write_json(rec.out / MANIFEST, {**rec.pins, "complete": False})
        return None
    diff = recording_difference(existing, rec.pins)
    if diff:
        raise CacheMismatch(f"teacher cache {rec.out} was recorded for another run ({diff}); use "
                            "another teacher.cache folder, or delete this one to record it again")
    if existing.get("complete"):
        return existing
    remove_stale_temps(rec.out, rec.n_shards)  # fsio logs what it removes
    return None


def _shard_ok(rec: _Recording, i: int) -> bool:
    """Whether shard i, left by an earlier (maybe killed) call, is complete and this recording's:
    renamed into place only when complete, but check that it reads and describes itself as
    expected anyway."""
    path = rec.out / shard_name(i, rec.n_shards)
    if not path.exists():
        return False
    try:
        problem = shard_problem(open_shard(path), rec.expected(i))
    except Exception as e:  # unreadable: recorded again
        problem = f"unreadable: {e}"
    if problem:
        log.warning("shard %s is not this recording's (%s); recording it again", path, problem)
    return problem is None


def _top_k_fn(rec: _Recording, mesh, bs: int):
    """The teacher's top-k pass, compiled up front (so the throughput is the recording's alone)
    for batches of bs rows."""
    config = rec.config
    top_k = jax.jit(lambda p, ids, seg, row: teacher_top_k(
        rec.teacher_cfg, p, ids, seg, k=rec.pins["k"], temperature=float(config.objective.temperature),
        dtype=DTYPES[config.train.dtype], single_document_rows=config.dataset.layout == "pad",
        tail_samples=rec.pins.get("tail_samples", 0), rows=row, seed=int(config.train.seed)))
    t0 = time.time()
    zeros = sharding.place_batch({key: np.zeros((bs, rec.seq_len), np.int32) for key in ("input_ids", "segment_ids")}
                                 | {"row_index": np.zeros((bs,), np.int32)}, mesh)
    compiled = top_k.lower(rec.params, zeros["input_ids"], zeros["segment_ids"], zeros["row_index"]).compile()
    log.info("compiled the teacher's top-k pass in %.1f s", time.time() - t0)
    return compiled


def _record_shards(rec: _Recording, todo: list[int], mesh, batch_size: int) -> int:
    """Records the shards `todo`; returns the number of records written."""
    if not todo:
        return 0
    bs = -(-batch_size // mesh.devices.size) * mesh.devices.size
    top_k = _top_k_fn(rec, mesh, bs)

    def dispatch(i):
        """Queue shard i's batches on the device (asynchronously); fixed shapes, one compilation."""
        a, b = rec.ranges[i]
        rows = {key: np.asarray(v[a:b]) for key, v in rec.train_rows.items()}
        rows["row_index"] = np.arange(a, b, dtype=np.int32)  # keys the tail samples' draws
        outs = []
        for batch in data.eval_batches(rows, bs):
            placed = sharding.place_batch(batch, mesh)
            outs.append(top_k(rec.params, placed["input_ids"], placed["segment_ids"], placed["row_index"]))
        return i, rows["segment_ids"], outs

    def finish(i, seg, outs) -> int:
        n = rec.ranges[i][1] - rec.ranges[i][0]
        arrays = [np.concatenate([np.asarray(o[j]) for o in outs])[:n] for j in range(len(outs[0]))]
        table = shard_table(rec.expected(i), seg, *arrays)
        write_shard(rec.out / shard_name(i, rec.n_shards), table)
        return table.num_rows

    t0, recorded = time.time(), 0
    bar = tqdm(total=sum(rec.ranges[i][1] - rec.ranges[i][0] for i in todo), desc="record teacher",
               unit="row", dynamic_ncols=True)
    pending = None
    for i in todo + [None]:
        # Shard i's forward passes run on the device while the host writes shard i - 1.
        queued = dispatch(i) if i is not None else None
        if pending is not None:
            recorded += finish(*pending)
            bar.update(rec.ranges[pending[0]][1] - rec.ranges[pending[0]][0])
            bar.set_postfix(tok_s=f"{recorded / max(time.time() - t0, 1e-9):.0f}")
        pending = queued
    bar.close()
    return recorded


def _teacher_eval(rec: _Recording, mesh) -> dict:
    """The teacher's held-out perplexity (and the extra evaluators'), so training from the cache
    reports it without loading the teacher. Timings are left out: the manifest is the same
    bytes however often the recording resumed."""
    from distil_jax.train_step import make_eval_step
    from distil_jax.training.evaluation import evaluate

    eval_teacher = make_eval_step(rec.teacher_cfg, DTYPES[rec.config.train.dtype])
    out = {}
    for name, rows in rec.eval_sets.items():
        res = evaluate(eval_teacher, rec.params, rows, rec.config.eval.batch_size, mesh)
        out[name] = {"fingerprint": rows_fingerprint(rows),
                     **{k: res[k] for k in ("ppl", "distily_ppl", "tokens", "documents")}}
    return out


def _finish(rec: _Recording, teacher_eval: dict) -> dict:
    """Writes the complete manifest (last: a cache is complete only once every shard is in place)."""
    shards = []
    for i, (a, b) in enumerate(rec.ranges):
        path = rec.out / shard_name(i, rec.n_shards)
        shards.append({"file": shard_name(i, rec.n_shards), "rows": [a, b],
                       "tokens": rec.expected(i)["tokens"], "bytes": path.stat().st_size,
                       "sha256": sha256_file(path)})
    manifest = {**rec.pins, "complete": True, "shards": shards, "teacher_eval": teacher_eval,
                "versions": package_versions(), "bytes_per_token": round(
                    sum(s["bytes"] for s in shards) / max(rec.pins["real_tokens"], 1), 2)}
    fsio.write_json(rec.out / MANIFEST, manifest)
    return manifest
