"""A run's rows from its dataset spec: the training rows and the evaluators' ``EvalSet``s, in
the run's layout, with the statistics the run summary reports (sources -> tokens -> layout)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from distil_jax.data.layout import (LAYOUTS, Arrays, check_seq_len, distily_eval_rows,
                                    docs_to_rows, layout_stats)
from distil_jax.data.shapes import check_loss_on
from distil_jax.data.sources import load_rows, load_split_rows, spec_field
from distil_jax.data.tokens import (RowShape, encode, encode_cached, pad_id, require_eos, tokenize,
                                    tokenize_cached)

logger = logging.getLogger(__name__)


def row_length(max_seq_len: int, model_positions: int, tokenizer_max: int | None = None) -> int:
    """The row length S of a run: ``dataset.max_seq_len``, cut to the positions the model takes
    and the tokenizer's ``model_max_length`` (when it has one). A cut is logged (a warning): the
    rows are shorter than the config asks."""
    limits = {"the teacher's maximum positions": int(model_positions)}
    if tokenizer_max:
        limits["the tokenizer's model_max_length"] = int(tokenizer_max)
    seq_len = min(int(max_seq_len), *limits.values())
    if seq_len < max_seq_len:
        which = min(limits, key=limits.get)
        logger.warning("dataset.max_seq_len=%d is more than %s (%d): rows are %d tokens long; set "
                       "dataset.max_seq_len<=%d to silence this", max_seq_len, which, limits[which],
                       seq_len, seq_len)
    return seq_len


@dataclasses.dataclass
class EvalSet:
    """The rows one evaluator scores.

    rows: {input_ids, segment_ids (, loss_mask)} [N, S] in the run's layout: the token-weighted
      perplexity (over the counted positions).
    distily_rows: Distily's evaluator rows (``distily_eval_rows``: BOS + the first S - 1 tokens,
      one document per row): Distily's per-document perplexity.
    """

    rows: Arrays
    distily_rows: Arrays


def _layout_options(spec: Any) -> dict[str, bool]:
    # Absent fields: Distily's (the config's defaults).
    return {"truncate": bool(spec_field(spec, "truncate", True)),
            "append_eos": bool(spec_field(spec, "append_eos", False))}


def build_datasets(
    spec: Any,
    tokenizer: Any,
    seq_len: int,
    layout: str,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Arrays, EvalSet, dict[str, Any]]:
    """spec -> (train_arrays, test EvalSet, stats), both splits in the same layout.

    Args:
      spec: the dataset fields of ``load_texts`` (any row shape: ``load_split_rows``),
        ``loss_on`` ("all" or "completion"), ``num_proc`` (tokenizing processes, None: automatic)
        and ``truncate`` / ``append_eos`` (see ``docs_to_rows``; absent: True / False, Distily's).
      tokenizer: a Hugging Face tokenizer with an eos token (its pad token, else eos, pads); its
        chat template renders chat rows.
      seq_len: row length S (the caller takes the min with the model's n_positions).
      layout: "pack" (several documents per row) or "pad" (Distily: one per row).
      cache_dir: if set, token ids are cached there (``encode_cached``).

    Returns:
      train arrays {input_ids, segment_ids (, loss_mask)} int32 [N, S], the test split's
      ``EvalSet``, and stats: {"layout", "seq_len", "truncate", "append_eos", "row_shape",
      "loss_on", "train": {...}, "test": {...}} where each split has documents (input rows),
      segments, rows, real_tokens, counted_tokens, padding_fraction, tokens (before truncation)
      and truncated_documents.
    """
    ds, shape, train_idx, test_idx = load_split_rows(spec)
    loss_on = str(spec_field(spec, "loss_on", "all"))
    docs, masks = encode_rows(ds, shape, spec, tokenizer, cache_dir, loss_on)
    pick = lambda xs, idx: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    options = _layout_options(spec)
    stats: dict[str, Any] = {"layout": layout, "seq_len": seq_len, **options,
                             "row_shape": shape.shape, "loss_on": loss_on}
    train, stats["train"] = docs_to_arrays(pick(docs, train_idx), pick(masks, train_idx),
                                           tokenizer, seq_len, layout, "train", **options)
    test, stats["test"] = docs_to_eval_set(pick(docs, test_idx), pick(masks, test_idx), tokenizer,
                                           seq_len, layout, "test", **options)
    return train, test, stats


def encode_rows(ds, shape: RowShape, spec: Any, tokenizer: Any,
                cache_dir: str | os.PathLike | None, loss_on: str):
    """(token ids, token masks or None) of every row of ``ds`` (``encode`` / ``encode_cached``)."""
    check_loss_on(str(spec_field(spec, "uri", "")), shape.shape, loss_on)
    num_proc = spec_field(spec, "num_proc", None)
    if cache_dir is not None:
        return encode_cached(ds, tokenizer, shape, loss_on, cache_dir, num_proc)
    return encode(ds, tokenizer, shape, loss_on, num_proc)


def _tokenized(texts, tokenizer, cache_dir):
    if cache_dir is not None:
        return tokenize_cached(texts, tokenizer, cache_dir)
    return tokenize(texts, tokenizer)


def texts_to_rows(
    texts: Sequence[str],
    tokenizer: Any,
    seq_len: int,
    layout: str,
    cache_dir: str | os.PathLike | None = None,
    name: str = "rows",
    *,
    truncate: bool = True,
    append_eos: bool = False,
    docs: Sequence[np.ndarray] | None = None,
) -> tuple[Arrays, dict[str, Any]]:
    """Texts -> ({input_ids, segment_ids} [N, S] in `layout`, stats of those rows): plain text,
    every token counted (``docs_to_arrays``). docs: the texts' token ids, if already known."""
    if docs is None:
        docs = _tokenized(texts, tokenizer, cache_dir)
    return docs_to_arrays(docs, None, tokenizer, seq_len, layout, name, truncate=truncate,
                          append_eos=append_eos)


def docs_to_arrays(
    docs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    tokenizer: Any,
    seq_len: int,
    layout: str,
    name: str = "rows",
    *,
    truncate: bool = True,
    append_eos: bool = False,
) -> tuple[Arrays, dict[str, Any]]:
    """Token ids (and token masks, or None) per document -> ({input_ids, segment_ids (,
    loss_mask)} [N, S] in `layout`, stats of those rows).

    truncate / append_eos: see ``docs_to_rows``. stats: documents (input rows), segments, rows,
    real_tokens, counted_tokens (the positions the losses count), padding_fraction, tokens
    (before truncation) and truncated_documents (longer than a row: cut with truncate, else
    continued in further segments). Used for each split and for extra evaluators.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported: use 'pack' or 'pad'")
    seq_len = check_seq_len(seq_len)
    eos_id = require_eos(tokenizer)
    arrays = docs_to_rows(docs, seq_len, layout, eos_id=eos_id, pad_id=pad_id(tokenizer),
                          truncate=truncate, append_eos=append_eos, masks=masks)
    s = layout_stats(arrays)
    s["segments"] = s.pop("documents")
    s["documents"] = len(docs)
    s["tokens"] = int(sum(len(d) for d in docs))
    s["truncated_documents"] = int(sum(len(d) + bool(append_eos) > seq_len for d in docs))
    logger.info(
        "%s: %d documents, %d tokens -> %d rows of %d (%s%s), %d real tokens (%d counted in the "
        "losses), %.1f%% padding",
        name, s["documents"], s["tokens"], s["rows"], seq_len, layout,
        ", truncated" if truncate else "", s["real_tokens"], s["counted_tokens"],
        100 * s["padding_fraction"],
    )
    return arrays, s


def texts_to_eval_set(
    texts: Sequence[str],
    tokenizer: Any,
    seq_len: int,
    layout: str,
    cache_dir: str | os.PathLike | None = None,
    name: str = "rows",
    *,
    truncate: bool = True,
    append_eos: bool = False,
) -> tuple[EvalSet, dict[str, Any]]:
    """Texts -> (``EvalSet``: the rows of ``texts_to_rows`` and Distily's evaluator rows, stats
    of the former)."""
    docs = _tokenized(texts, tokenizer, cache_dir)
    return docs_to_eval_set(docs, None, tokenizer, seq_len, layout, name, truncate=truncate,
                            append_eos=append_eos)


def docs_to_eval_set(docs, masks, tokenizer, seq_len: int, layout: str, name: str = "rows", *,
                     truncate: bool = True, append_eos: bool = False) -> tuple[EvalSet, dict[str, Any]]:
    """Token ids (and masks) -> (``EvalSet``, stats of its rows): see ``texts_to_eval_set``."""
    rows, stats = docs_to_arrays(docs, masks, tokenizer, seq_len, layout, name, truncate=truncate,
                                 append_eos=append_eos)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    distily = distily_eval_rows(docs, seq_len, bos_id, pad_id(tokenizer), masks)
    return EvalSet(rows, distily), stats


def spec_to_eval_set(spec: Any, tokenizer: Any, seq_len: int, layout: str,
                     cache_dir: str | os.PathLike | None = None, name: str = "rows", *,
                     truncate: bool = True, append_eos: bool = False,
                     loss_on: str = "all") -> tuple[EvalSet, dict[str, Any]]:
    """Every sampled row of an extra evaluator's dataset spec (any row shape) -> (``EvalSet``,
    stats). loss_on: the run's; a plain-text evaluator always scores every token, and the
    evaluator's own ``loss_on`` field wins."""
    ds, shape = load_rows(spec)
    if not len(ds):
        raise ValueError(f"evaluator {name!r}: dataset {str(spec_field(spec, 'uri', ''))!r} has "
                         "no rows: check uri/split/sample_size or add data")
    loss_on = spec_field(spec, "loss_on", "all" if shape.shape == "text" else loss_on)
    docs, masks = encode_rows(ds, shape, spec, tokenizer, cache_dir, loss_on)
    return docs_to_eval_set(docs, masks, tokenizer, seq_len, layout, name, truncate=truncate,
                            append_eos=append_eos)
