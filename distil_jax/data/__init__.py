"""Datasets -> tokenized, packed or padded, resumable batches.

Owns everything between a dataset spec and the arrays the train/eval steps consume, one module
per step of the way:

* ``sources``: a hub dataset (downloaded or streamed) or a local .txt/.json/.jsonl/.parquet/.csv
  file or directory -> its rows and their shape, with Distily's "first N rows, then a seeded
  split" (``load_rows``, ``load_split_rows``, ``load_texts``, ``load_all_texts``,
  ``split_indices``).
* ``shapes``: the row shapes (plain text, chat ``messages``, prompt/completion) -> token ids and
  token masks (``loss_on="completion"``: assistant turns / completions), chat templates.
* ``tokens``: rows -> int32 token ids per document (no special tokens beyond a chat template's)
  through ``datasets.Dataset.map``, optionally cached in an .npz keyed by the rows and the
  tokenizer (``tokenize``, ``tokenize_cached``, ``encode``, ``encode_cached``).
* ``layout``: documents -> fixed-shape rows, truncated at the row length as Distily does or not
  (``pack``, ``pad``, ``docs_to_rows``); ``distily_eval_rows``: the rows of Distily's perplexity
  evaluator (BOS prepended). A batch is a dict of numpy arrays ``input_ids`` int32 [B, S] and
  ``segment_ids`` int32 [B, S]; segment id 0 is padding (masked out of every loss), real tokens
  carry 1, 2, ... for the documents of their row; with loss_on="completion" also ``loss_mask``
  int32 [B, S] (1 where a position's losses count, see ``layout``).
* ``rows``: a run's training rows and evaluation sets from its spec (``build_datasets``,
  ``texts_to_rows``, ``texts_to_eval_set``, ``EvalSet``) and its row length (``row_length``).
* ``batches``: ``BatchIterator`` (deterministic, endless, resumable from a two-int state) and
  ``eval_batches`` (finite, ordered, static shapes).

Why segments rather than Distily's attention_mask: Distily pads every row to 1024 with EOS and
trains on the padding (docs/design.md, difference 1); segment 0 lets every loss ignore padding,
and packing several documents per row (each its own segment) removes most of it.
"""

from distil_jax.data.batches import BatchIterator, eval_batches, row_count
from distil_jax.data.layout import (LAYOUTS, Arrays, best_fit_rows, check_seq_len,
                                    counted_tokens, distily_eval_rows, docs_to_rows, layout_stats,
                                    pack, pad, position_masks)
from distil_jax.data.rows import (EvalSet, build_datasets, docs_to_arrays, docs_to_eval_set,
                                  row_length, spec_to_eval_set, texts_to_eval_set, texts_to_rows)
from distil_jax.data.shapes import LOSS_ON, SHAPES, check_turns, detect_shape, encode_chat
from distil_jax.data.sources import (load_all_texts, load_rows, load_split_rows, load_texts,
                                     spec_field, split_indices, test_rows)
from distil_jax.data.tokens import (RowShape, check_vocab, encode, encode_cached, pad_id,
                                    require_eos, token_cache_key, tokenize, tokenize_cached,
                                    tokenizer_content)

__all__ = [
    "Arrays", "BatchIterator", "EvalSet", "LAYOUTS", "LOSS_ON", "RowShape", "SHAPES",
    "best_fit_rows", "build_datasets", "check_seq_len", "check_turns", "check_vocab",
    "counted_tokens", "detect_shape", "distily_eval_rows", "docs_to_arrays", "docs_to_eval_set",
    "docs_to_rows", "encode", "encode_cached", "encode_chat", "eval_batches", "layout_stats",
    "load_all_texts", "load_rows", "load_split_rows", "load_texts", "pack", "pad", "pad_id",
    "position_masks", "require_eos", "row_count", "row_length", "spec_field", "spec_to_eval_set",
    "split_indices", "test_rows", "texts_to_eval_set", "texts_to_rows", "token_cache_key",
    "tokenize", "tokenize_cached", "tokenizer_content",
]
