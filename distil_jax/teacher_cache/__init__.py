"""The teacher cache: the teacher's top-k log-probabilities for every real token of a run's
training rows, recorded once (`python -m distil_jax.record_teacher`) and read by training
(`--config.teacher.cache=DIR`) instead of running the teacher. The format is documented in
docs/teacher_cache.md; in short:

    DIR/manifest.json                       what the cache was made from (checked by training)
    DIR/data/train-00000-of-00003.arrow     one record per real token, rows [0, R) of training
    DIR/data/train-00001-of-00003.arrow     rows [R, 2R) ...

The shards are Arrow IPC streams (the format `datasets` keeps its own data in; it reads them
with `load_dataset("arrow", data_files=...)` or `Dataset.from_file`) with zstd-compressed
buffers: as small as Parquet with the same list columns, and measured 5x faster to read and 6x
faster to write (Parquet encodes list columns value by value; docs/teacher_cache.md). Each
record is one real token (segment id > 0) of one training row:

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
                                             CacheMismatch, _sha256_file, bytes_per_token,
                                             default_shard_rows, ids_dtype, read_manifest,
                                             read_shard, remove_stale_temps, shard_name,
                                             shard_ranges, shard_records, shard_table, write_shard)
from distil_jax.teacher_cache.pins import (_DATASET_FIELDS, _first_difference, check_pins,
                                           effective_k, rows_fingerprint, run_pins,
                                           teacher_fingerprint, tokenizer_fingerprint)
from distil_jax.teacher_cache.reader import (CachedBatches, TeacherCache, _logsumexp,
                                             check_config, require_complete,
                                             student_needs_teacher_weights)
from distil_jax.teacher_cache.recorder import record
from distil_jax.teacher_cache.topk import sample_tail, teacher_top_k
