"""Shared pytest setup: every test runs on the CPU, quietly, in float32.

jax's persistent compilation cache is on for the whole session (subprocesses inherit it through
the environment): the end-to-end tests compile the same tiny steps in many processes, and a
second compilation of the same program is a disk read instead."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation"))
# The demo teacher's cache (distil_jax.demo.teacher.cache_root) beside it, never the user's ~/.cache.
os.environ.setdefault("DISTIL_JAX_CACHE",
                      str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "distil_jax"))
# Every program, however quick to compile: the many small ones (placement, evaluation, the
# optimizer's init) add up across the suite's processes, and reading one back is cheaper than
# compiling it again, even for the smallest.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The longest files first: `make test` gives whole files to its two workers (--dist loadfile) in
# collection order, so a long file collected last (test_sharding.py, alphabetically late) keeps
# one worker busy after the other has finished; started first, the short files fill in around it.
_LONGEST_FIRST = ("test_sharding.py", "test_train_step.py", "test_train.py", "test_teacher_cache.py",
                  "test_bench.py", "test_scan.py", "test_chat.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within
