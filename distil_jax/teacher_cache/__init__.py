"""The teacher cache: the teacher's top-k log-probabilities for every real token of a run's
training rows, recorded once (`python -m distil_jax.record_teacher`) and read by training
(`--config.teacher.cache=DIR`) instead of running the teacher. The format is documented in
docs/teacher_cache.md; in short:

    DIR/manifest.json                       what the cache was made from (checked by training)
    DIR/data/train-00000-of-00003.arrow     one record per real token, rows [0, R) of training
    DIR/data/train-00001-of-00003.arrow     rows [R, 2R) ...

The shards are Arrow IPC streams (the format `datasets` keeps its own data in; it reads them
with `load_dataset("arrow", data_files=...)` or `Dataset.from_file`) with zstd-compressed
buffers: about as small as Parquet with the same list columns and several times faster to read
and write, since Parquet encodes list columns value by value (measured in docs/teacher_cache.md).
Each shard also describes itself in its schema's metadata (k, tail samples, temperature, dtypes,
fingerprints, rows), checked against the manifest on read. Each record is one real token
(segment id > 0) of one training row:

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

One module per part: `format` (the manifest, the shards, their names and layout), `pins` (the
fingerprints and run settings a cache is made for, and the check of a run against them), `topk`
(the teacher's top k and tail samples, jittable), `reader` (`TeacherCache`, the prefetching
`CachedBatches`, the run's checks) and `recorder` (`record`; its command line is
`python -m distil_jax.record_teacher`).
"""

from distil_jax.teacher_cache.format import (COMPRESSION, DATA_DIR, FORMAT, FORMAT_VERSION,
                                             MANIFEST, SHARD_FORMAT, SHARD_POSITIONS,
                                             CacheMismatch, bytes_per_token, default_shard_rows,
                                             ids_dtype, open_shard, read_manifest, read_shard,
                                             remove_stale_temps, sha256_file, shard_columns,
                                             shard_meta, shard_name, shard_problem, shard_ranges,
                                             shard_table, write_shard)
from distil_jax.teacher_cache.pins import (check_pins, effective_k, recording_difference,
                                           rows_fingerprint, run_pins, teacher_fingerprint,
                                           tokenizer_fingerprint)
from distil_jax.teacher_cache.reader import (CachedBatches, TeacherCache, check_config,
                                             require_complete, student_needs_teacher_weights)
from distil_jax.teacher_cache.recorder import record
from distil_jax.teacher_cache.topk import sample_tail, teacher_top_k

__all__ = [
    "COMPRESSION", "CacheMismatch", "CachedBatches", "DATA_DIR", "FORMAT", "FORMAT_VERSION",
    "MANIFEST", "SHARD_FORMAT", "SHARD_POSITIONS", "TeacherCache", "bytes_per_token",
    "check_config", "check_pins", "default_shard_rows", "effective_k", "ids_dtype", "open_shard",
    "read_manifest", "read_shard", "record", "recording_difference", "remove_stale_temps",
    "require_complete", "rows_fingerprint", "run_pins", "sample_tail", "sha256_file",
    "shard_columns", "shard_meta", "shard_name", "shard_problem", "shard_ranges", "shard_table",
    "student_needs_teacher_weights", "teacher_fingerprint", "teacher_top_k",
    "tokenizer_fingerprint", "write_shard",
]
