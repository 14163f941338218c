"""The offline demo's inputs, made on this machine with no network: the corpus (the docstrings of
the Python standard library, ``corpus``) and the teacher trained on it (``teacher``), both
written into the run's workdir once and reused.

``ensure_corpus`` / ``ensure_teacher`` make them (or find them); ``corpus_path`` /
``teacher_path`` say where they live in a workdir.
"""

from distil_jax.demo import corpus
from distil_jax.demo.teacher import (CORPUS_FILE, RECIPE_FILE, TEACHER_DIR, corpus_path,
                                     ensure_corpus, ensure_teacher, teacher_path)

__all__ = ["CORPUS_FILE", "RECIPE_FILE", "TEACHER_DIR", "corpus", "corpus_path", "ensure_corpus",
           "ensure_teacher", "teacher_path"]
