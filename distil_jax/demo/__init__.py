"""The offline demo's inputs, made on this machine with no network: the corpus (the docstrings of
the Python standard library, ``corpus``) and the teacher trained on it (``teacher``), both
written into the run's workdir once and reused; the teacher is also cached outside the workdir,
keyed by its recipe (``cache_root``, ``$DISTIL_JAX_CACHE``), so a fresh workdir reuses it.

``ensure_corpus`` / ``ensure_teacher`` make them (or find them); ``corpus_path`` /
``teacher_path`` say where they live in a workdir.
"""

from distil_jax.demo import corpus
from distil_jax.demo.teacher import (CACHE_ENV, CORPUS_FILE, RECIPE_FILE, TEACHER_DIR,
                                     cache_root, cached_teacher_path, corpus_path, ensure_corpus,
                                     ensure_teacher, teacher_path)

__all__ = ["CACHE_ENV", "CORPUS_FILE", "RECIPE_FILE", "TEACHER_DIR", "cache_root",
           "cached_teacher_path", "corpus", "corpus_path", "ensure_corpus", "ensure_teacher",
           "teacher_path"]
