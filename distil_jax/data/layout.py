"""Token ids per document -> fixed-shape rows: ``pack`` (several documents per row) or ``pad``
(Distily's: one per row), and Distily's evaluator rows.

A set of rows is a dict of numpy arrays ``input_ids`` int32 [N, S] and ``segment_ids`` int32
[N, S]; segment id 0 is padding (masked out of every loss), real tokens carry 1, 2, ... for the
documents of their row. The model derives the attention mask (same segment, causal) and
per-segment positions from ``segment_ids``.

With token masks (``dataset.loss_on="completion"``: 1 on assistant / completion tokens) the rows
also hold ``loss_mask`` int32 [N, S]: 1 where a position's losses count, i.e. where the token it
predicts (the next one of its document) is a counted token, as TRL shifts its labels. Every loss
and the perplexity count a position only where segment_ids > 0 and loss_mask is 1; without
``loss_mask`` every real position counts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]

LAYOUTS = ("pack", "pad")


def check_seq_len(seq_len: int) -> int:
    if int(seq_len) != seq_len or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be a positive integer")
    return int(seq_len)


def _rows_from_segments(segments: Sequence[Sequence[np.ndarray]], seq_len: int, pad_id: int,
                        masks: Sequence[Sequence[np.ndarray]] | None = None) -> Arrays:
    """Rows from lists of segments (each row's segments in order, their total <= seq_len):
    {input_ids, segment_ids} int32 [len(segments), seq_len]; segment ids 1, 2, ... in each row,
    padding ``pad_id`` with segment 0 after the last segment. masks: the segments' position
    masks, laid out alike as ``loss_mask`` (0 on padding)."""
    ids = np.full((len(segments), seq_len), pad_id, np.int32)
    segment_ids = np.zeros((len(segments), seq_len), np.int32)
    loss_mask = np.zeros((len(segments), seq_len), np.int32)
    for r, row in enumerate(segments):
        pos = 0
        for k, seg in enumerate(row):
            n = len(seg)
            ids[r, pos:pos + n] = seg
            segment_ids[r, pos:pos + n] = k + 1
            if masks is not None:
                loss_mask[r, pos:pos + n] = masks[r][k]
            pos += n
    out = {"input_ids": ids, "segment_ids": segment_ids}
    if masks is not None:
        out["loss_mask"] = loss_mask
    return out


def _with_eos(docs: Sequence[np.ndarray], eos_id: int | None) -> list[np.ndarray]:
    if eos_id is None:
        return [np.asarray(d, np.int32) for d in docs]
    eos = np.array([eos_id], np.int32)
    return [np.concatenate([np.asarray(d, np.int32), eos]) for d in docs]


def position_masks(masks: Sequence[np.ndarray] | None, append_eos: bool) -> list[np.ndarray] | None:
    """Token masks (1 = the token counts) -> position masks (1 = the position's losses count:
    the token it predicts, the next of its document, counts; the last position predicts nothing
    of its document and gets 0), int32, after an appended EOS (which counts when the document's
    last token does: the end of a completion). None stays None."""
    if masks is None:
        return None
    out = []
    for m in masks:
        m = np.asarray(m, np.int32)
        if append_eos:
            m = np.concatenate([m, m[-1:] if len(m) else np.zeros(1, np.int32)])
        out.append(np.concatenate([m[1:], np.zeros(min(len(m), 1), np.int32)]))
    return out


def best_fit_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Documents (each <= seq_len long) into as few rows as best-fit decreasing finds: a list of
    rows, each the indices of its documents. Longest first, each into the row whose free space
    fits it most tightly (a new row if none does); deterministic (ties: the earlier document,
    the earlier row). Empty documents are left out."""
    import bisect

    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free positions, row index), sorted
    for i in order:
        n = int(lengths[i])
        if n > seq_len:
            raise ValueError(f"document {i} has {n} tokens, more than a row of {seq_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def pack(docs: Sequence[np.ndarray], seq_len: int, eos_id: int, *, truncate: bool = False,
         append_eos: bool = True, masks: Sequence[np.ndarray] | None = None) -> Arrays:
    """Packs documents into rows: {input_ids, segment_ids} int32 [N, seq_len].

    With ``append_eos`` each document is followed by ``eos_id`` (the EOS belongs to that
    document's segment). Segment ids restart at 1 in every row; padding is ``eos_id`` with
    segment 0.

    truncate=False: the stream of all documents is cut into rows of ``seq_len``, so a document
    crossing a row boundary continues in the next row as a new segment (the model restarts its
    positions there). Only the last row is padded. N = ceil(sum(len_i + 1) / seq_len); no token
    is lost or duplicated.

    truncate=True (Distily's tokens): each document keeps its first ``seq_len`` tokens (EOS
    included, if appended) and is one segment of one row, placed by ``best_fit_rows``; rows may
    end in padding. Every document then sees exactly the context it has alone in a padded row.

    masks: token masks per document (see the module): adds ``loss_mask``.
    """
    seq_len = check_seq_len(seq_len)
    pos_masks = position_masks(masks, append_eos)
    docs = _with_eos(docs, eos_id if append_eos else None)
    if truncate:
        docs = [d[:seq_len] for d in docs]
        longer = sum(len(d) == seq_len for d in docs)
        rows = best_fit_rows([len(d) for d in docs], seq_len)
        logger.debug("pack: %d documents (%d of a full row or cut to one) into %d rows",
                     len(docs), longer, len(rows))
        row_masks = None if pos_masks is None else [[pos_masks[i][:seq_len] for i in row] for row in rows]
        return _rows_from_segments([[docs[i] for i in row] for row in rows], seq_len, eos_id, row_masks)

    out = _stream_rows(docs, seq_len, eos_id)
    if pos_masks is not None:  # laid out as the tokens: the same stream, cut alike
        flat = np.zeros(out["input_ids"].size, np.int32)
        if pos_masks:
            stream = np.concatenate(pos_masks)
            flat[:len(stream)] = stream
        out["loss_mask"] = flat.reshape(out["input_ids"].shape)
    return out


def _stream_rows(docs: Sequence[np.ndarray], seq_len: int, eos_id: int) -> Arrays:
    """``pack`` without truncation: the documents' stream cut into rows of seq_len, a segment
    per document part, the last row padded with eos_id (segment 0)."""
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    total = int(lengths.sum())
    n_rows = -(-total // seq_len)
    ids = np.full(n_rows * seq_len, eos_id, np.int32)
    owner = np.full(n_rows * seq_len, -1, np.int64)  # document index of each position, -1 = pad
    if total:
        ids[:total] = np.concatenate(docs)
        owner[:total] = np.repeat(np.arange(len(docs)), lengths)
    ids = ids.reshape(n_rows, seq_len)
    owner = owner.reshape(n_rows, seq_len)
    starts_segment = np.ones_like(owner, dtype=bool)
    starts_segment[:, 1:] = owner[:, 1:] != owner[:, :-1]
    segment_ids = np.cumsum(starts_segment, axis=1).astype(np.int32)
    segment_ids[owner < 0] = 0

    if len(docs):
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        crossing = (lengths > 0) & (starts // seq_len != (starts + lengths - 1) // seq_len)
        longer = lengths > seq_len
        if longer.any():
            logger.info(
                "pack: %d of %d documents are longer than seq_len=%d; %d documents in all span "
                "several rows (each part is its own segment)",
                int(longer.sum()), len(docs), seq_len, int(crossing.sum()),
            )
        else:
            logger.debug("pack: %d of %d documents span two rows", int(crossing.sum()), len(docs))
    return {"input_ids": ids, "segment_ids": segment_ids}


def pad(docs: Sequence[np.ndarray], seq_len: int, pad_id: int, *, truncate: bool = True,
        eos_id: int | None = None, masks: Sequence[np.ndarray] | None = None) -> Arrays:
    """Distily's layout: one document per row, {input_ids, segment_ids} int32 [N, seq_len].

    Each document (followed by ``eos_id`` if given; Distily's GPT-2 tokenization adds none) is
    right-padded with ``pad_id``; segment id 1 on real tokens, 0 on padding.
    truncate=True (Distily): a document keeps its first ``seq_len`` tokens; N = len(docs).
    truncate=False: a longer document goes on in further rows (positions restart at 0 in each);
    no token is lost. masks: token masks per document (see the module): adds ``loss_mask``.
    """
    seq_len = check_seq_len(seq_len)
    pos_masks = position_masks(masks, eos_id is not None)
    docs = _with_eos(docs, eos_id)
    truncated = sum(len(d) > seq_len for d in docs)

    def cut(xs):
        if truncate:
            return [d[:seq_len] for d in xs]
        return [d[a:a + seq_len] for d in xs for a in range(0, max(len(d), 1), seq_len)]

    row_masks = None if pos_masks is None else [[m] for m in cut(pos_masks)]
    out = _rows_from_segments([[p] for p in cut(docs)], seq_len, pad_id, row_masks)
    if truncated:
        logger.info(
            "pad: %d of %d documents are longer than seq_len=%d and were %s",
            truncated, len(docs), seq_len, "truncated" if truncate else "split over several rows",
        )
    return out


def docs_to_rows(docs: Sequence[np.ndarray], seq_len: int, layout: str, *, eos_id: int,
                 pad_id: int, truncate: bool, append_eos: bool,
                 masks: Sequence[np.ndarray] | None = None) -> Arrays:
    """Token ids per document -> rows in ``layout`` ("pack" or "pad"), see ``pack`` / ``pad``.

    truncate and append_eos mean the same in both layouts, so with truncate=True both hold the
    same documents, each one whole segment: pad in one row each, pack several per row. masks:
    token masks per document (loss_on="completion"): the rows get ``loss_mask``, the same
    per-position mask in either layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported: use 'pack' or 'pad'")
    if layout == "pack":
        return pack(docs, seq_len, eos_id, truncate=truncate, append_eos=append_eos, masks=masks)
    return pad(docs, seq_len, pad_id, truncate=truncate, eos_id=eos_id if append_eos else None,
               masks=masks)


def distily_eval_rows(docs: Sequence[np.ndarray], seq_len: int, bos_id: int | None,
                      pad_id: int, masks: Sequence[np.ndarray] | None = None) -> Arrays:
    """The rows of Distily's perplexity evaluator: {input_ids, segment_ids} [len(docs), seq_len].

    Each document is cut to its first seq_len - 1 tokens and, when the tokenizer has a BOS
    token, BOS is prepended (in the document's segment), so the first real token is scored too;
    one document per row, right-padded (segment 0). masks: token masks (the BOS counts as not
    counted), laid out as ``loss_mask``."""
    seq_len = check_seq_len(seq_len)
    prefix = np.array([] if bos_id is None else [bos_id], np.int32)
    pieces = [np.concatenate([prefix, np.asarray(d, np.int32)[:seq_len - 1]]) for d in docs]
    row_masks = None
    if masks is not None:
        zero = np.zeros(len(prefix), np.int32)
        full = [np.concatenate([zero, np.asarray(m, np.int32)]) for m in masks]
        row_masks = [[m[:len(p)]] for m, p in zip(position_masks(full, False), pieces)]
    return _rows_from_segments([[p] for p in pieces], seq_len, pad_id, row_masks)


def counted_tokens(arrays: Arrays) -> int:
    """Positions whose losses count: real (segment > 0) and, with ``loss_mask``, masked in."""
    counted = np.asarray(arrays["segment_ids"]) > 0
    if "loss_mask" in arrays:
        counted &= np.asarray(arrays["loss_mask"]) > 0
    return int(counted.sum())


def layout_stats(arrays: Arrays) -> dict[str, Any]:
    """rows, real_tokens (segment > 0), counted_tokens (``counted_tokens``), padding_fraction,
    documents of a layout.

    ``documents`` counts segments: a document split across k rows by ``pack`` counts k times;
    for ``pad`` it is the number of non-empty documents.
    """
    seg = np.asarray(arrays["segment_ids"])
    rows = int(seg.shape[0])
    real = int((seg > 0).sum())
    size = int(seg.size)
    return {
        "rows": rows,
        "real_tokens": real,
        "counted_tokens": counted_tokens(arrays),
        "padding_fraction": float(1.0 - real / size) if size else 0.0,
        # Segment ids are 1..k in every row, so a row's max is its number of segments.
        "documents": int(seg.max(axis=1).sum()) if rows else 0,
    }

