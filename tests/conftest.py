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
# Programs that compile in under 0.2 s are cheaper to compile again than to look up.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
