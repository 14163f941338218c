"""The offline demo's corpus and tokenizer live in ``distil_jax.demo.corpus``; this name stays so
that ``from distil_jax import corpus`` keeps working."""

from distil_jax.demo.corpus import EOS_TOKEN, stdlib_docstrings, train_tokenizer, write_jsonl

__all__ = ["EOS_TOKEN", "stdlib_docstrings", "train_tokenizer", "write_jsonl"]
