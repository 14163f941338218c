"""Record a teacher cache: `python -m distil_jax.record_teacher --config C --workdir W [--config.x=y]`.

Runs the teacher once over the run's training rows (the same tokenization, layout and rows that
`python -m distil_jax.train` with the same config and workdir trains on) and writes, for every real
token, the teacher's top-k next-token ids and log-probabilities plus the log of the mass outside
the top k, to `teacher.cache` (default W/teacher_cache). Train from it with
`--config.teacher.cache=DIR`. Format: docs/teacher_cache.md; reading: distil_jax.teacher_cache.

Relevant config fields: teacher.cache_k (k, default 64), teacher.cache_dtype (float16 or float32
log-probabilities), teacher.cache_tail_samples (m tokens drawn from the rest of the
distribution per position, with train.seed), objective.temperature (the distribution recorded is softmax(logits / T)),
eval.batch_size (rows per forward pass, unless --batch_size), and everything that decides the
rows (teacher, tokenizer, dataset.*).

Rows are written in shards of --shard_rows consecutive rows (default: about 2^20 positions), each
atomically (temp file, fsync, rename). Rerunning the same command after an interruption (even
SIGKILL) keeps the finished shards, computes the others and ends with the same bytes as an
uninterrupted recording; the manifest is written complete last. The teacher's held-out
perplexity is recorded too, so training from the cache need not load the teacher to report it.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from distil_jax import cli, data, fsio, hf, teacher_cache as tc
from distil_jax.config import DTYPES, validate
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
    from distil_jax import sharding
    from distil_jax.train_step import make_eval_step

    config = validate(ml_collections.ConfigDict(config.to_dict()))
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = train_lib.with_demo_inputs(config, workdir)
    out = Path(config.teacher.cache or workdir / "teacher_cache").resolve()

    # The rows exactly as training builds them (same calls, same token cache).
    teacher_path = config.teacher.model_name_or_path
    teacher_cfg, params = hf.load_pretrained(teacher_path, DTYPES[config.teacher.dtype])
    tokenizer = train_lib.load_tokenizer(config.tokenizer_name_or_path or teacher_path)
    seq_len = train_lib.sequence_length(config, teacher_cfg, tokenizer)
    # The run's own data builder: the same rows, evaluators and token cache as training.
    train_rows, eval_sets, _ = train_lib.build_data(config, tokenizer, seq_len, workdir / "cache")

    k = tc.effective_k(config.teacher.cache_k, teacher_cfg.vocab_size)
    m_tail = int(config.teacher.cache_tail_samples) if k < teacher_cfg.vocab_size else 0
    n_rows = int(train_rows["input_ids"].shape[0])
    shard_rows = int(shard_rows) or tc.default_shard_rows(seq_len)
    ranges = tc.shard_ranges(n_rows, shard_rows)
    id_dtype = tc.ids_dtype(teacher_cfg.vocab_size)
    pins = tc.run_pins(config, teacher_cfg, tokenizer, seq_len, train_rows,
                       tc.teacher_fingerprint(teacher_path))
    if m_tail:
        pins.update(tail_samples=m_tail, tail_seed=int(config.train.seed))
    pins.update(k=k, storage={"ids_dtype": id_dtype.name, "logprobs_dtype": config.teacher.cache_dtype,
                              "rest_logmass_dtype": "float32", "format": tc.SHARD_FORMAT,
                              "compression": tc.COMPRESSION,
                              "shard_rows": shard_rows, "shards": len(ranges)})

    existing = tc.read_manifest(out)
    if existing is None:
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"teacher.cache={out} exists and is not a teacher cache (no "
                             f"{tc.MANIFEST}); choose a new or empty folder")
        # Written before any shard: a folder with shards but no manifest is never ours.
        fsio.write_json(out / tc.MANIFEST, {**pins, "complete": False})
    else:
        mine = {k_: v for k_, v in existing.items() if k_ in pins}
        diff = tc._first_difference(mine, pins)
        if diff:
            raise tc.CacheMismatch(f"teacher cache {out} was recorded for another run ({diff}); use "
                                   "another teacher.cache folder, or delete this one to record it again")
        if existing.get("complete"):
            log.info("teacher cache %s is complete (%d shards); nothing to do", out, len(ranges))
            return {**existing, "recording": {"tokens": 0, "seconds": 0.0, "tokens_per_s": None}}
    tc.remove_stale_temps(out, len(ranges))  # fsio logs what it removes

    seg_all = np.asarray(train_rows["segment_ids"])
    todo = []
    for i, (a, b) in enumerate(ranges):
        path = out / tc.shard_name(i, len(ranges))
        if not _shard_ok(path, int((seg_all[a:b] > 0).sum())):
            todo.append(i)
    log.info("teacher cache %s: top %d of %d tokens%s, %d rows of %d (%s), %d shards of %d rows; %d "
             "to record", out, k, teacher_cfg.vocab_size,
             f" + {m_tail} tail samples" if m_tail else "", n_rows, seq_len, config.dataset.layout,
             len(ranges), shard_rows, len(todo))

    mesh = sharding.make_mesh()
    bs = int(batch_size) or int(config.eval.batch_size)
    bs = -(-bs // mesh.devices.size) * mesh.devices.size
    dtype = DTYPES[config.train.dtype]
    T = float(config.objective.temperature)
    single_doc = config.dataset.layout == "pad"
    top_k = jax.jit(lambda p, ids, seg, row: tc.teacher_top_k(
        teacher_cfg, p, ids, seg, k=k, temperature=T, dtype=dtype, single_document_rows=single_doc,
        tail_samples=m_tail, rows=row, seed=int(config.train.seed)))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

    # Compiled up front, so the throughput below is the recording's alone.
    t_compile = time.time()
    if todo:
        zeros = sharding.place_batch({key: np.zeros((bs, seq_len), np.int32) for key in ("input_ids", "segment_ids")}
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
            placed = sharding.place_batch(batch, mesh)
            outs.append(top_k(params, placed["input_ids"], placed["segment_ids"], placed["row_index"]))
        return i, rows["segment_ids"], outs

    def finish(i, seg, outs) -> int:
        a, b = ranges[i]
        arrays = [np.concatenate([np.asarray(o[j]) for o in outs])[: b - a] for j in range(len(outs[0]))]
        table = tc.shard_table(a, seg, *arrays[:3], id_dtype, np.dtype(config.teacher.cache_dtype),
                               *arrays[3:])
        tc.write_shard(out / tc.shard_name(i, len(ranges)), table)
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
                                       tc.rows_fingerprint(rows_))
                    for name, rows_ in eval_sets.items()}

    shards = []
    for i, (a, b) in enumerate(ranges):
        path = out / tc.shard_name(i, len(ranges))
        shards.append({"file": tc.shard_name(i, len(ranges)), "rows": [a, b],
                       "tokens": int((seg_all[a:b] > 0).sum()), "bytes": path.stat().st_size,
                       "sha256": tc._sha256_file(path)})
    manifest = {**pins, "complete": True, "shards": shards, "teacher_eval": teacher_eval,
                "versions": package_versions(), "bytes_per_token": round(
                    sum(s["bytes"] for s in shards) / max(pins["real_tokens"], 1), 2)}
    fsio.write_json(out / tc.MANIFEST, manifest)
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
        return tc.shard_records(path) == tokens
    except Exception as e:  # unreadable: recorded again
        log.warning("shard %s is unreadable (%s); recording it again", path, e)
        return False


def main(argv: Optional[list] = None) -> int:
    """The command line (`argv[0]`: the program); returns the exit status (0 done, 2 an error,
    130 interrupted, 143 stopped by SIGTERM)."""
    argv = list(sys.argv if argv is None else argv)
    p = cli.parser("record_teacher", "Record the teacher's top-k targets for a run's training rows "
                   "(the teacher cache, docs/teacher_cache.md), or finish an interrupted recording.",
                   config=True)
    p.add_argument("--workdir", required=True, help="the run's directory (the same one training uses)")
    p.add_argument("--shard-rows", "--shard_rows", dest="shard_rows", type=int, default=0,
                   help="training rows per shard (0: about 2^20 positions)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=0,
                   help="rows per teacher forward pass (0: eval.batch_size)")
    try:
        args, config = cli.parse(p, argv[1:])
    except SystemExit as e:  # --help (0) or a usage error (2, printed by argparse)
        return int(e.code or 0)
    except ValueError as e:  # a UsageError, or an unknown --config.FIELD
        print(f"error: {e}", file=sys.stderr)
        return 2
    with cli.logging_to_stderr(), cli.sigterm_unwinds():
        try:
            record(config, args.workdir, shard_rows=args.shard_rows, batch_size=args.batch_size)
        except (ValueError, FileNotFoundError, ConnectionError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, cli.Terminated) as e:
            what = "stopped by SIGTERM" if isinstance(e, cli.Terminated) else "interrupted"
            print(f"\n{what}: the shards written are kept; run the same command again to finish "
                  "the recording", file=sys.stderr)
            return 143 if isinstance(e, cli.Terminated) else 130
    return 0


if __name__ == "__main__":
    cli.exit(main())
