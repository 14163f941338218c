"""Recording a teacher cache: runs the teacher once over a run's training rows (the same
tokenization, layout and rows that training builds from the same config and workdir) and writes
the manifest and the shards (``record``; the command line is ``distil_jax.record_teacher``).

Shards are written atomically, each from its own row range; a rerun after an interruption (even
SIGKILL) keeps the finished shards, records the others and ends with the same bytes as an
uninterrupted recording; the manifest is written complete last."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from distil_jax import data, fsio, hf
from distil_jax.config import DTYPES, validate
from distil_jax.teacher_cache.format import (COMPRESSION, MANIFEST, SHARD_FORMAT, CacheMismatch,
                                             _sha256_file, default_shard_rows, ids_dtype,
                                             read_manifest, remove_stale_temps, shard_name,
                                             shard_ranges, shard_records, shard_table, write_shard)
from distil_jax.teacher_cache.pins import (_first_difference, effective_k, rows_fingerprint,
                                           run_pins, teacher_fingerprint)
from distil_jax.teacher_cache.topk import teacher_top_k
from distil_jax.versions import package_versions

log = logging.getLogger("distil_jax")



def _eval_record(res: dict, fingerprint: str) -> dict:
    # Timings are left out: the manifest is the same bytes however often the recording resumed.
    return {"fingerprint": fingerprint,
            **{k: res[k] for k in ("ppl", "distily_ppl", "tokens", "documents")}}


def record(config: ml_collections.ConfigDict, workdir, *, shard_rows: int = 0,
           batch_size: int = 0) -> dict:
    """Record (or finish recording) the teacher cache of `config`'s run; returns its manifest
    plus "recording" (tokens recorded by this call, seconds, tokens/s; not in the file)."""
    from distil_jax import train as train_lib
    from distil_jax.train_step import make_eval_step, make_mesh, replicate, shard_batch

    config = validate(ml_collections.ConfigDict(config.to_dict()))
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if config.demo_teacher.enabled:
        config = train_lib._with_demo_inputs(config, workdir)
    out = Path(config.teacher.cache or workdir / "teacher_cache").resolve()

    # The rows exactly as training builds them (same calls, same token cache).
    teacher_path = config.teacher.model_name_or_path
    teacher_cfg, params = hf.load_pretrained(teacher_path, DTYPES[config.teacher.dtype])
    tokenizer = train_lib._tokenizer(config.tokenizer_name_or_path or teacher_path)
    tok_max = getattr(tokenizer, "model_max_length", None) or teacher_cfg.max_positions
    seq_len = int(min(config.dataset.max_seq_len, teacher_cfg.max_positions, tok_max))
    # The run's own data builder: the same rows, evaluators and token cache as training.
    train_rows, eval_sets, _ = train_lib.build_data(config, tokenizer, seq_len, workdir / "cache")

    k = effective_k(config.teacher.cache_k, teacher_cfg.vocab_size)
    m_tail = int(config.teacher.cache_tail_samples) if k < teacher_cfg.vocab_size else 0
    n_rows = int(train_rows["input_ids"].shape[0])
    shard_rows = int(shard_rows) or default_shard_rows(seq_len)
    ranges = shard_ranges(n_rows, shard_rows)
    id_dtype = ids_dtype(teacher_cfg.vocab_size)
    pins = run_pins(config, teacher_cfg, tokenizer, seq_len, train_rows,
                       teacher_fingerprint(teacher_path))
    if m_tail:
        pins.update(tail_samples=m_tail, tail_seed=int(config.train.seed))
    pins.update(k=k, storage={"ids_dtype": id_dtype.name, "logprobs_dtype": config.teacher.cache_dtype,
                              "rest_logmass_dtype": "float32", "format": SHARD_FORMAT,
                              "compression": COMPRESSION,
                              "shard_rows": shard_rows, "shards": len(ranges)})

    existing = read_manifest(out)
    if existing is None:
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"teacher.cache={out} exists and is not a teacher cache (no "
                             f"{MANIFEST}); choose a new or empty folder")
        # Written before any shard: a folder with shards but no manifest is never ours.
        fsio.write_json(out / MANIFEST, {**pins, "complete": False})
    else:
        mine = {k_: v for k_, v in existing.items() if k_ in pins}
        diff = _first_difference(mine, pins)
        if diff:
            raise CacheMismatch(f"teacher cache {out} was recorded for another run ({diff}); use "
                                   "another teacher.cache folder, or delete this one to record it again")
        if existing.get("complete"):
            log.info("teacher cache %s is complete (%d shards); nothing to do", out, len(ranges))
            return {**existing, "recording": {"tokens": 0, "seconds": 0.0, "tokens_per_s": None}}
    remove_stale_temps(out, len(ranges))  # fsio logs what it removes

    seg_all = np.asarray(train_rows["segment_ids"])
    todo = []
    for i, (a, b) in enumerate(ranges):
        path = out / shard_name(i, len(ranges))
        if not _shard_ok(path, int((seg_all[a:b] > 0).sum())):
            todo.append(i)
    log.info("teacher cache %s: top %d of %d tokens%s, %d rows of %d (%s), %d shards of %d rows; %d "
             "to record", out, k, teacher_cfg.vocab_size,
             f" + {m_tail} tail samples" if m_tail else "", n_rows, seq_len, config.dataset.layout,
             len(ranges), shard_rows, len(todo))

    mesh = make_mesh()
    bs = int(batch_size) or int(config.eval.batch_size)
    bs = -(-bs // mesh.devices.size) * mesh.devices.size
    dtype = DTYPES[config.train.dtype]
    T = float(config.objective.temperature)
    single_doc = config.dataset.layout == "pad"
    top_k = jax.jit(lambda p, ids, seg, row: teacher_top_k(
        teacher_cfg, p, ids, seg, k=k, temperature=T, dtype=dtype, single_document_rows=single_doc,
        tail_samples=m_tail, rows=row, seed=int(config.train.seed)))
    params = replicate(params, mesh)

    # Compiled up front, so the throughput below is the recording's alone.
    t_compile = time.time()
    if todo:
        zeros = shard_batch({key: np.zeros((bs, seq_len), np.int32) for key in ("input_ids", "segment_ids")}
                            | {"row_index": np.zeros((bs,), np.int32)}, mesh)
        top_k = top_k.lower(params, zeros["input_ids"], zeros["segment_ids"], zeros["row_index"]).compile()
        log.info("compiled the teacher's top-k pass in %.1f s", time.time() - t_compile)

    def dispatch(i):
        """Queue shard i's batches on the device (asynchronously); fixed shapes, one compilation."""
        a, b = ranges[i]
        rows = {key: np.asarray(v[a:b]) for key, v in train_rows.items()}
        rows["row_index"] = np.arange(a, b, dtype=np.int32)  # keys the tail samples' draws
        outs = []
        for batch in data.eval_batches(rows, bs):
            placed = shard_batch(batch, mesh)
            outs.append(top_k(params, placed["input_ids"], placed["segment_ids"], placed["row_index"]))
        return i, rows["segment_ids"], outs

    def finish(i, seg, outs) -> int:
        a, b = ranges[i]
        arrays = [np.concatenate([np.asarray(o[j]) for o in outs])[: b - a] for j in range(len(outs[0]))]
        table = shard_table(a, seg, *arrays[:3], id_dtype, np.dtype(config.teacher.cache_dtype),
                               *arrays[3:])
        write_shard(out / shard_name(i, len(ranges)), table)
        return table.num_rows

    t0, recorded = time.time(), 0
    bar = tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in todo), desc="record teacher",
               unit="row", dynamic_ncols=True)
    pending = None
    for i in todo + [None]:
        # Shard i's forward passes run on the device while the host writes shard i - 1.
        queued = dispatch(i) if i is not None else None
        if pending is not None:
            recorded += finish(*pending)
            bar.update(ranges[pending[0]][1] - ranges[pending[0]][0])
            bar.set_postfix(tok_s=f"{recorded / max(time.time() - t0, 1e-9):.0f}")
        pending = queued
    bar.close()
    seconds = time.time() - t0

    # The teacher's held-out perplexity (and the extra evaluators'), so training from the cache
    # reports it without loading the teacher.
    eval_teacher = make_eval_step(teacher_cfg, dtype)
    teacher_eval = {name: _eval_record(train_lib.evaluate(eval_teacher, params, rows_, config.eval.batch_size, mesh),
                                       rows_fingerprint(rows_))
                    for name, rows_ in eval_sets.items()}

    shards = []
    for i, (a, b) in enumerate(ranges):
        path = out / shard_name(i, len(ranges))
        shards.append({"file": shard_name(i, len(ranges)), "rows": [a, b],
                       "tokens": int((seg_all[a:b] > 0).sum()), "bytes": path.stat().st_size,
                       "sha256": _sha256_file(path)})
    manifest = {**pins, "complete": True, "shards": shards, "teacher_eval": teacher_eval,
                "versions": package_versions(), "bytes_per_token": round(
                    sum(s["bytes"] for s in shards) / max(pins["real_tokens"], 1), 2)}
    fsio.write_json(out / MANIFEST, manifest)
    rate = recorded / seconds if seconds > 0 and recorded else None
    log.info("teacher cache %s complete: %d real tokens, %.1f bytes/token on disk; this call "
             "recorded %d tokens in %.1f s (%s tokens/s); train from it with --config.teacher.cache=%s",
             out, pins["real_tokens"], manifest["bytes_per_token"], recorded, seconds,
             f"{rate:,.0f}" if rate else "n/a", out)
    return {**manifest, "recording": {"tokens": recorded, "seconds": seconds, "tokens_per_s": rate}}


def _shard_ok(path: Path, tokens: int) -> bool:
    """Whether a shard left by an earlier (maybe killed) call is complete: renamed into place
    only when complete, but check that it reads and holds its rows' tokens anyway."""
    if not path.exists():
        return False
    try:
        return shard_records(path) == tokens
    except Exception as e:  # unreadable: recorded again
        log.warning("shard %s is unreadable (%s); recording it again", path, e)
        return False

