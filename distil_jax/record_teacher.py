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
from typing import Optional

from distil_jax.teacher_cache.recorder import record


def main(argv: Optional[list] = None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The run's directory (the same one training uses).")
    flags.DEFINE_integer("shard_rows", 0, "Training rows per shard (0: about 2^20 positions).")
    flags.DEFINE_integer("batch_size", 0, "Rows per teacher forward pass (0: eval.batch_size).")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)
        for noisy in ("absl", "orbax", "jax._src", "datasets", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            record(flags_.config, flags_.workdir, shard_rows=flags_.shard_rows,
                   batch_size=flags_.batch_size)
        except (ValueError, FileNotFoundError, ConnectionError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
