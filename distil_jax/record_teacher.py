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

import sys
from typing import Optional

from distil_jax import cli, preemption
from distil_jax.teacher_cache.recorder import record


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
    return cli.command(p, argv[1:], _record)


def _record(args, config) -> int:
    try:
        record(config, args.workdir, shard_rows=args.shard_rows, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError, ConnectionError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, preemption.Terminated) as e:
        what = "stopped by SIGTERM" if isinstance(e, preemption.Terminated) else "interrupted"
        print(f"\n{what}: the shards written are kept; run the same command again to finish "
              "the recording", file=sys.stderr)
        return 143 if isinstance(e, preemption.Terminated) else 130
    return 0


if __name__ == "__main__":
    cli.exit(main())
