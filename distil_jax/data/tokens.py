"""Rows -> token ids per document (no special tokens beyond a chat template's) and, with
loss_on="completion", token masks; tokenized through ``datasets.Dataset.map`` and optionally
cached on disk in an .npz keyed by the rows and the tokenizer's content."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from distil_jax import fsio
from distil_jax.data import shapes

logger = logging.getLogger(__name__)

# Bump when the .npz layout or the tokenization call changes, so stale caches are never reused.
_TOKEN_CACHE_VERSION = "1"
# The cache of chat / prompt-completion rows and of token masks: its own key and file.
_ROWS_CACHE_VERSION = "2"


@dataclasses.dataclass(frozen=True)
class RowShape:
    """A dataset's row shape (``shapes.SHAPES``) and the columns it reads."""

    shape: str
    column: str
    completion_column: str | None = None

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.column, self.completion_column) if c is not None]


def require_eos(tokenizer: Any) -> int:
    """The tokenizer's EOS id; ValueError (one line, with the fix) if it has none."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has "
            "no eos token (needed to end packed documents and to pad): set one, e.g. "
            "tokenizer.add_special_tokens({'eos_token': '<|endoftext|>'}), or use a tokenizer "
            "that defines eos_token"
        )
    return int(eos_id)


def check_vocab(tokenizer: Any, teacher_vocab_size: int, teacher: str = "the teacher") -> None:
    """ValueError (one line, with the fix) when the tokenizer has ids the teacher has no row
    for: the run's tokenizer and the teacher (hence the student, whose vocabulary is the
    teacher's) must share a vocabulary."""
    n = len(tokenizer)
    if n > int(teacher_vocab_size):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has {n} tokens but {teacher} a vocabulary of "
                         f"{teacher_vocab_size}: teacher, student and tokenizer must share one "
                         "vocabulary; set tokenizer_name_or_path to the teacher's tokenizer (or "
                         "'' to use it)")


def pad_id(tokenizer: Any) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its EOS (as Distily: GPT-2
    has no pad token)."""
    own = getattr(tokenizer, "pad_token_id", None)
    return require_eos(tokenizer) if own is None else int(own)


def tokenize(texts: Sequence[str], tokenizer: Any, batch_size: int = 1000,
             num_proc: int | None = None) -> list[np.ndarray]:
    """Token ids of each text: a list of int32 arrays [len_i], no special tokens added.

    Runs the (fast) tokenizer through ``datasets.Dataset.map`` (batches of ``batch_size`` texts,
    ``num_proc`` processes: ``default_num_proc`` when None; datasets' progress bar). No
    truncation: ``pack`` and ``pad`` decide what to do with long documents.
    """
    import datasets

    require_eos(tokenizer)
    ds = datasets.Dataset.from_dict({"text": list(texts)})

    def encode(batch):
        return {"input_ids": tokenizer(
            batch["text"], add_special_tokens=False, return_attention_mask=False,
            return_token_type_ids=False,
            # Silences "sequence length is longer than the specified maximum": expected here.
            verbose=False)["input_ids"]}

    docs, _ = _mapped(ds, encode, batch_size, num_proc, "tokenizing", with_mask=False)
    return docs


def default_num_proc(rows: int) -> int | None:
    """Processes for tokenizing ``rows`` rows when the config says None: one (None), always.
    datasets forks its workers, and forking a process whose XLA threads already run can leave a
    worker blocked on a lock some thread held at the fork (seen here: a hung test); the fast
    tokenizers already encode a batch on every core. ``dataset.num_proc`` > 1 is the user's
    explicit choice."""
    del rows
    return None


def _mapped(ds, fn, batch_size: int, num_proc: int | None, desc: str,
            with_mask: bool, with_indices: bool = False) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """``ds.map(fn)`` (batched; datasets' fingerprint cache when ``ds`` is backed by files) ->
    (int32 ids per row, int8 token masks per row or None), read from the Arrow columns."""
    import datasets

    if not len(ds):  # datasets.map drops the new columns of an empty dataset
        return [], ([] if with_mask else None)
    if num_proc is None:
        num_proc = default_num_proc(len(ds))
    # More processes than rows: datasets would start idle ones.
    num_proc = min(int(num_proc), len(ds)) if num_proc and len(ds) else None
    features = {"input_ids": datasets.List(datasets.Value("int32"))}
    if with_mask:
        features["token_mask"] = datasets.List(datasets.Value("int8"))
    out = ds.map(fn, batched=True, batch_size=batch_size,
                 num_proc=num_proc if num_proc and num_proc > 1 else None, with_indices=with_indices,
                 remove_columns=ds.column_names, features=datasets.Features(features), desc=desc)
    return _ragged(out, "input_ids", np.int32), _ragged(out, "token_mask", np.int8) if with_mask else None


def _ragged(ds, column: str, dtype) -> list[np.ndarray]:
    """A list<int> column as numpy arrays (views of one flat array)."""
    col = ds.data.column(column).combine_chunks()
    values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype)
    offsets = np.asarray(col.offsets, np.int64)
    offsets = offsets - offsets[0]
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def tokenizer_content(tokenizer: Any) -> bytes:
    """What a tokenizer is, as bytes (for content hashes: the token cache's key, the teacher
    cache's tokenizer fingerprint): its full serialization when it has one, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The full serialized tokenizer (vocab, merges, normalizer, pre-tokenizer, added tokens):
        # a content hash, so the same tokenizer saved in another directory still hits the cache.
        return backend.to_str().encode("utf-8")
    vocab = sorted(tokenizer.get_vocab().items())
    return repr((type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), vocab)).encode()


def token_cache_key(texts: Sequence[str], tokenizer: Any) -> str:
    """sha256 hex digest of (cache format, tokenizer content, every text)."""
    h = hashlib.sha256()
    h.update(f"distil_jax.tokens.v{_TOKEN_CACHE_VERSION}\0".encode())
    fp = tokenizer_content(tokenizer)
    h.update(len(fp).to_bytes(8, "little") + fp)
    h.update(len(texts).to_bytes(8, "little"))
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        # Length-prefixed, so ["ab", "c"] and ["a", "bc"] hash differently.
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def rows_cache_key(ds, tokenizer, shape: RowShape, loss_on: str) -> str:
    """sha256 hex digest of (cache format v2, tokenizer content, chat template, the row shape and
    its columns, loss_on, every row's JSON): the key of chat and prompt/completion rows and of
    loss_on="completion". Plain text with loss_on="all" keeps ``token_cache_key``'s (v1) key."""
    h = hashlib.sha256()
    h.update(f"distil_jax.tokens.v{_ROWS_CACHE_VERSION}\0".encode())
    fp = tokenizer_content(tokenizer)
    h.update(len(fp).to_bytes(8, "little") + fp)
    template = getattr(tokenizer, "chat_template", None)
    meta = json.dumps([repr(template), dataclasses.astuple(shape), loss_on]).encode()
    h.update(len(meta).to_bytes(8, "little") + meta)
    h.update(len(ds).to_bytes(8, "little"))
    for row in ds.select_columns(shape.columns).to_list():
        b = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def encode(ds, tokenizer, shape: RowShape, loss_on: str = "all", num_proc: int | None = None,
           batch_size: int = 1000) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The rows of a ``datasets.Dataset`` -> (int32 token ids per row, int8 token masks per row
    or None). ``shapes.encode_rows`` through ``Dataset.map`` (see ``tokenize``); the masks (1 =
    the token counts in the losses) only with loss_on="completion"."""
    require_eos(tokenizer)
    shapes.check_loss_on("the dataset", shape.shape, loss_on)
    if shape.shape == "chat":  # once, before any row (and any worker process)
        shapes.require_chat_template(tokenizer)

    def fn(batch, indices):
        return shapes.encode_rows(batch, tokenizer, shape.shape, shape.column,
                                  shape.completion_column, loss_on, first_index=indices[0])

    return _mapped(ds, fn, batch_size, num_proc, f"tokenizing ({shape.shape})",
                   with_mask=loss_on == "completion", with_indices=True)


def encode_cached(ds, tokenizer, shape: RowShape, loss_on: str, cache_dir: str | os.PathLike,
                  num_proc: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """``encode`` with the on-disk cache of ``tokenize_cached`` (plain text, loss_on="all": the
    same v1 file) or, for the other shapes and for masks, a v2 file that also holds
    ``token_mask`` int8 [sum len_i] (another name: a v1 file is never read as v2)."""
    with_mask = loss_on == "completion"
    if shape.shape == "text" and not with_mask:
        texts = ds[shape.column]
        key = token_cache_key(texts, tokenizer)
        compute = lambda: (tokenize(texts, tokenizer, num_proc=num_proc), None)  # noqa: E731
    else:
        key = rows_cache_key(ds, tokenizer, shape, loss_on)
        compute = lambda: encode(ds, tokenizer, shape, loss_on, num_proc)  # noqa: E731
    return _cached(os.fspath(cache_dir), key, len(ds), compute, with_mask)


def tokenize_cached(
    texts: Sequence[str], tokenizer: Any, cache_dir: str | os.PathLike, batch_size: int = 1000
) -> list[np.ndarray]:
    """``tokenize`` with an on-disk cache: ``cache_dir/tokens-<key>.npz``.

    The .npz holds ``tokens`` int32 [sum len_i] and ``offsets`` int64 [n + 1]; written atomically
    (``fsio.atomic_file``), so concurrent runs and interrupted writes never leave a bad file.
    """
    require_eos(tokenizer)
    compute = lambda: (tokenize(texts, tokenizer, batch_size=batch_size), None)  # noqa: E731
    return _cached(os.fspath(cache_dir), token_cache_key(texts, tokenizer), len(texts), compute,
                   False)[0]


def _cached(cache_dir: str, key: str, n: int, compute, with_mask: bool):
    path = os.path.join(cache_dir, f"tokens-{key[:32]}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as z:
                tokens, offsets = z["tokens"], z["offsets"]
                mask = z["token_mask"] if with_mask else None
            if len(offsets) == n + 1 and offsets[-1] == len(tokens) and (
                    mask is None or len(mask) == len(tokens)):
                logger.info("token cache hit: %s", path)
                split = lambda a: [a[i:j] for i, j in zip(offsets[:-1], offsets[1:])]  # noqa: E731
                return split(tokens), (split(mask) if with_mask else None)
        except Exception as e:  # a corrupt cache is rebuilt, never trusted
            logger.warning("ignoring unreadable token cache %s (%s)", path, e)
        logger.warning("token cache %s does not match the texts; rebuilding it", path)
    docs, masks = compute()
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    flat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    arrays = {"tokens": flat(docs, np.int32), "offsets": offsets}
    if with_mask:
        arrays["token_mask"] = flat(masks, np.int8)
    with fsio.atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
    logger.info("token cache written: %s (%d docs, %d tokens)", path, len(docs), len(arrays["tokens"]))
    return docs, masks
