"""Datasets -> tokenized, packed or padded, resumable batches.

Owns everything between a dataset spec and the arrays the train/eval steps consume:

* ``load_texts``: a hub dataset or a local .txt/.json/.jsonl/.parquet/.csv file or directory ->
  (train texts, held-out test texts), with Distily's "first N rows, then a seeded split".
* ``tokenize`` / ``tokenize_cached``: texts -> int32 token ids per document (no special tokens),
  optionally cached in an .npz keyed by the texts and the tokenizer.
* ``docs_to_rows`` (``pack`` / ``pad``): documents -> fixed-shape rows, truncated at the row
  length as Distily does or not (``truncate``); ``distily_eval_rows``: the rows of Distily's
  perplexity evaluator (BOS prepended). A batch is a dict of numpy arrays
  ``input_ids`` int32 [B, S] and ``segment_ids`` int32 [B, S]; segment id 0 is padding (masked out
  of every loss), real tokens carry 1, 2, ... for the documents of their row. The model derives
  the attention mask (same segment, causal) and per-segment positions from ``segment_ids``.
* ``BatchIterator`` (deterministic, endless, resumable from a two-int state) and
  ``eval_batches`` (finite, ordered, static shapes).

Why segments rather than Distily's attention_mask: Distily pads every row to 1024 with EOS and
trains on the padding (docs/design.md, difference 1); segment 0 lets every loss ignore padding, and packing
several documents per row (each its own segment) removes most of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from distil_jax import fsio

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]

LAYOUTS = ("pack", "pad")

# Local file suffix -> the `datasets` builder that reads it.
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

# Bump when the .npz layout or the tokenization call changes, so stale caches are never reused.
_TOKEN_CACHE_VERSION = "1"


# ----------------------------------------------------------------------------------- loading


def _field(spec: Any, name: str, default: Any) -> Any:
    """spec.name, or ``default`` when the field is absent or None (ConfigDict or any object)."""
    value = getattr(spec, name, None)
    return default if value is None else value


def _looks_like_path(uri: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else path-shaped is meant as a local path.
    return (
        uri.startswith(("/", "./", "../", "~", "\\"))
        or uri.count("/") > 1
        or (os.sep != "/" and os.sep in uri)
        or os.path.splitext(uri)[1].lower() in _BUILDERS
    )


def _local_files(uri: str) -> tuple[str, list[str]] | None:
    """(builder, sorted files) for a local path; None for a hub id; raises for a missing path."""
    path = os.path.expanduser(uri)
    if os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            # Hidden files are skipped: they include fsio's in-flight temp files.
            files += [
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in _BUILDERS
            ]
        if not files:
            raise FileNotFoundError(
                f"dataset directory {uri!r} holds no {'/'.join(sorted(_BUILDERS))} files: "
                "point uri at a directory or file with text data"
            )
    elif os.path.isfile(path):
        files = [path]
    elif _looks_like_path(uri):
        raise FileNotFoundError(
            f"dataset path {uri!r} does not exist: pass an existing .txt/.json/.jsonl/.parquet "
            "file or directory (or a Hugging Face hub dataset id such as 'wikimedia/wikipedia')"
        )
    else:
        return None
    builders = {_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in builders:
        raise ValueError(
            f"dataset file {uri!r} has an unsupported suffix: use one of {sorted(_BUILDERS)}"
        )
    if len(builders) > 1:
        raise ValueError(
            f"dataset directory {uri!r} mixes file types ({sorted(builders)}): keep one type per "
            "directory or point uri at a single file"
        )
    return builders.pop(), files


def _hub_offline() -> bool:
    import datasets

    flags = [getattr(datasets.config, "HF_HUB_OFFLINE", False)]
    flags += [os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
              for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    return any(flags)


def _unreachable(uri: str, error: BaseException) -> ConnectionError:
    return ConnectionError(
        f"could not reach dataset {uri!r} on the Hugging Face hub "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
        "offline, pass a local .txt/.json/.jsonl/.parquet path as uri instead (if uri was meant "
        "as a local path, it does not exist)"
    )


def _check_column(uri: str, column: str, columns: Sequence[str]) -> None:
    if column not in columns:
        raise ValueError(
            f"dataset {uri!r} has no column {column!r}; available columns: {list(columns)}: "
            "set column to one of them"
        )


def _load_rows(spec: Any, cache_dir: str | None) -> list[str]:
    """The sampled rows of the text column, in order (before the train/test split)."""
    import datasets

    uri = str(_field(spec, "uri", ""))
    if not uri:
        raise ValueError("dataset uri is empty: set it to a hub dataset id or a local path")
    subset = _field(spec, "subset", None)
    split = _field(spec, "split", "train")
    column = _field(spec, "column", "text")
    sample_size = _field(spec, "sample_size", None)
    shuffle = bool(_field(spec, "shuffle", False))
    seed = int(_field(spec, "seed", 42))
    if sample_size is not None and int(sample_size) <= 0:
        raise ValueError(f"sample_size={sample_size} must be positive (or None for all rows)")

    local = _local_files(uri)
    if local is None and sample_size is not None and not shuffle and not _hub_offline():
        # Distily's "first N rows" of a hub dataset: stream them instead of downloading the whole
        # split (all of English Wikipedia for 5000 rows). Same rows, in the same (file) order.
        try:
            stream = datasets.load_dataset(uri, subset, split=split, streaming=True)
            rows = list(itertools.islice(iter(stream), int(sample_size)))
        except Exception as e:
            wrapped = _hub_error(uri, e)
            if wrapped is e:
                raise
            raise wrapped from e
        if rows:
            _check_column(uri, column, list(rows[0]))
        return _as_texts(uri, column, [r[column] for r in rows])

    if local is not None:
        builder, files = local
        kwargs = {"sample_by": _field(spec, "sample_by", "document")} if builder == "text" else {}
        if all(os.path.getsize(f) == 0 for f in files):
            return []  # datasets' json builder raises a bare StopIteration on empty files
        try:
            # data_files under the requested split name, so `split` works for local files too.
            # datasets logs its own multi-line report of a file it cannot parse: ours replaces it.
            with _datasets_quiet():
                ds = datasets.load_dataset(
                    builder, data_files={split: files}, split=split, cache_dir=cache_dir, **kwargs
                )
            if builder == "text":
                # Blank lines (sample_by="line") and empty files become "" rows: not documents.
                ds = ds.filter(lambda t: len(t) > 0, input_columns="text", keep_in_memory=True)
            _check_column(uri, column, ds.column_names)
            ds = _sample(ds, shuffle, seed, sample_size)
            return _as_texts(uri, column, ds[column])
        except (ValueError, FileNotFoundError):
            if not _is_datasets_error(sys.exc_info()[1]):
                raise  # ours (column, type): already one line
            raise ValueError(_unreadable(uri, builder, files, sys.exc_info()[1])) from None
        except Exception as e:
            raise ValueError(_unreadable(uri, builder, files, e)) from None
    else:
        try:
            ds = datasets.load_dataset(uri, subset, split=split, cache_dir=cache_dir)
        except Exception as e:
            wrapped = _hub_error(uri, e)
            if wrapped is e:
                raise
            raise wrapped from e
    _check_column(uri, column, ds.column_names)
    ds = _sample(ds, shuffle, seed, sample_size)
    return _as_texts(uri, column, ds[column])


@contextlib.contextmanager
def _datasets_quiet():
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _sample(ds, shuffle: bool, seed: int, sample_size):
    if shuffle:
        # keep_in_memory: no indices cache file is written next to the (shared) dataset cache.
        ds = ds.shuffle(seed=seed, keep_in_memory=True)
    if sample_size is not None:
        ds = ds.select(range(min(int(sample_size), len(ds))), keep_in_memory=True)
    return ds


def _is_datasets_error(e: BaseException) -> bool:
    """Raised inside `datasets` / pyarrow (a file it cannot parse), not by our own checks."""
    return isinstance(e, UnicodeDecodeError) or type(e).__module__.split(".")[0] in ("datasets", "pyarrow")


def _unreadable(uri: str, builder: str, files: Sequence[str], error: BaseException) -> str:
    """One line for a local dataset that `datasets` failed to read: the file, the line and the
    problem when we can find it (invalid UTF-8, a malformed JSON line), else datasets' reason."""
    for f in files:
        problem = _file_problem(f, builder)
        if problem:
            return f"cannot read dataset file {f}: {problem}"
    cause = error.__cause__ or error
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return (f"cannot read dataset {uri!r} with the {builder!r} reader: {type(cause).__name__}: "
            f"{first}; check that the file is valid {builder} text in UTF-8")


def _file_problem(path: str, builder: str) -> str | None:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return (f"invalid UTF-8 at line {line} (byte {raw[e.start]:#04x} at offset {e.start}); "
                "save the file as UTF-8")
    if builder != "json":
        return None
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array (a .json file)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        return None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            return (f"line {n} is not valid JSON ({e.msg} at column {e.colno}); a .jsonl file holds "
                    "one JSON object per line")
        if not isinstance(rec, dict):
            return f"line {n} is a JSON {type(rec).__name__}, not an object; use one object per line"
    return None


def _hub_error(uri: str, e: Exception) -> Exception:
    """A one-line error for a failed hub load: unreachable, not found, or the original error."""
    names = " ".join(type(c).__name__ for c in type(e).__mro__)
    if "DatasetNotFound" in names:
        return FileNotFoundError(
            f"dataset {uri!r} is neither a local path nor a dataset on the Hugging Face hub "
            f"({str(e).splitlines()[0] if str(e) else ''}): check the id, or pass a local "
            ".txt/.json/.jsonl/.parquet path"
        )
    if isinstance(e, (ConnectionError, TimeoutError)) or any(
        k in names for k in ("Connect", "Timeout", "Offline", "LocalEntryNotFound")
    ):
        return _unreachable(uri, e)
    return e


def _as_texts(uri: str, column: str, values: Sequence[Any]) -> list[str]:
    texts = list(values)
    bad = next((v for v in texts if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(
            f"column {column!r} of dataset {uri!r} holds {type(bad).__name__} values, not text: "
            "set column to a text column"
        )
    return texts


def split_indices(n: int, test_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): ``datasets.Dataset.train_test_split(test_size, seed=seed)``'s rows.

    Exactly datasets' shuffled split (as Distily calls it): n_test = ceil(test_size * n) for a
    float (test_size rows for an int), perm = np.random.default_rng(seed).permutation(n),
    test = perm[:n_test], train = perm[n_test:], each in permutation order.
    """
    numeric = (int, float, np.integer, np.floating)
    if isinstance(test_size, bool) or not isinstance(test_size, numeric):
        raise ValueError(
            f"test_size={test_size!r} must be a fraction in (0, 1) or an int row count"
        )
    if isinstance(test_size, (float, np.floating)):
        if not 0.0 < test_size < 1.0:
            raise ValueError(
                f"test_size={test_size} must be a fraction in (0, 1) or an int row count: both "
                "train and test splits must be non-empty"
            )
        n_test = math.ceil(float(test_size) * n)
    else:
        n_test = int(test_size)
    n_train = n - n_test
    if n_test <= 0 or n_train <= 0:
        raise ValueError(
            f"splitting {n} rows with test_size={test_size} leaves an empty "
            f"{'test' if n_test <= 0 else 'train'} split: use more rows (sample_size) or "
            "another test_size"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def load_all_texts(spec: Any, cache_dir: str | None = None) -> list[str]:
    """Every sampled row of ``spec`` (no train/test split): for extra evaluators.

    Same fields and errors as ``load_texts`` (test_size and seed of the split are not used).
    """
    if cache_dir is None:
        cache_dir = _field(spec, "cache_dir", None)
    texts = _load_rows(spec, cache_dir)
    if not texts:
        raise ValueError(
            f"dataset {str(_field(spec, 'uri', ''))!r} (split {_field(spec, 'split', 'train')!r}) "
            "has no rows: check uri/split/sample_size or add data"
        )
    return texts


def load_texts(spec: Any, cache_dir: str | None = None) -> tuple[list[str], list[str]]:
    """Loads a dataset and returns (train_texts, test_texts).

    Fields of ``spec`` (an ``ml_collections.ConfigDict`` or any object with attributes; a missing
    or None field takes the default):

      uri: hub dataset id (e.g. "wikimedia/wikipedia") or a local file/directory. Local files are
        read with the `datasets` builder for their suffix: .txt/.text -> "text", .json/.jsonl ->
        "json", .parquet -> "parquet", .csv -> "csv"; a directory is walked recursively (sorted,
        hidden files skipped) and must hold a single file type.
      subset: hub config name (e.g. "20231101.en") or None.
      split: split to read (default "train"); local files are exposed under this name.
      column: the text column (default "text"; the "text" builder always names it "text").
      sample_by: .txt files only: "document" (default: one document per file), "paragraph" (one
        per blank-line-separated paragraph) or "line" (one per line); empty ones are dropped.
      sample_size: keep the first N rows (None: all). With shuffle, N rows of a seeded shuffle.
      shuffle: shuffle the rows with ``seed`` before taking sample_size (default False, Distily).
      seed: seed of that shuffle and of the train/test split (default 42).
      test_size: fraction (float in (0, 1)) or count (int) of the sampled rows held out
        (default 0.002). Rows go to test exactly as ``datasets``' ``train_test_split(test_size,
        seed=seed)`` sends them (shuffled split, see ``split_indices``): 5000 rows with 0.002 ->
        4990 train / 10 test.

    A hub dataset with sample_size and no shuffle is streamed (only the first N rows are
    fetched), unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, in which case the local HF
    cache is used.

    Args:
      cache_dir: `datasets`' cache directory (None: ``spec.cache_dir`` if set, else the HF
        default ~/.cache/huggingface/datasets).

    Raises:
      FileNotFoundError: a local path does not exist (or a directory has no data files).
      ValueError: empty dataset or split, missing/non-text column, bad test_size.
      ConnectionError: a hub id could not be reached (offline): pass a local path instead.
    """
    uri = str(_field(spec, "uri", ""))
    texts = load_all_texts(spec, cache_dir)
    train_idx, test_idx = split_indices(
        len(texts), _field(spec, "test_size", 0.002), int(_field(spec, "seed", 42))
    )
    train = [texts[i] for i in train_idx]
    test = [texts[i] for i in test_idx]
    for name, split_texts in (("train", train), ("held-out test", test)):
        # Empty texts have no token to learn or to score: a split of them would train on nothing
        # and report a perplexity of exactly 1.
        if not any(t.strip() for t in split_texts):
            raise ValueError(
                f"dataset {uri!r}: every text of the {name} split ({len(split_texts)} rows of column "
                f"{_field(spec, 'column', 'text')!r}) is empty; check column, or use more rows "
                "(sample_size) or another test_size"
            )
    logger.info("dataset %s: %d rows -> %d train / %d test", uri, len(texts), len(train), len(test))
    return train, test


# ---------------------------------------------------------------------------------- tokenizing


def _require_eos(tokenizer: Any) -> int:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has "
            "no eos token (needed to end packed documents and to pad): set one, e.g. "
            "tokenizer.add_special_tokens({'eos_token': '<|endoftext|>'}), or use a tokenizer "
            "that defines eos_token"
        )
    return int(eos_id)


def tokenize(texts: Sequence[str], tokenizer: Any, batch_size: int = 1000) -> list[np.ndarray]:
    """Token ids of each text: a list of int32 arrays [len_i], no special tokens added.

    Calls the (fast) tokenizer on batches of ``batch_size`` texts. No truncation: ``pack`` and
    ``pad`` decide what to do with long documents.
    """
    _require_eos(tokenizer)
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            # Silences "sequence length is longer than the specified maximum": expected here.
            verbose=False,
        )
        out.extend(np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"])
    return out


def _tokenizer_fingerprint(tokenizer: Any) -> bytes:
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
    fp = _tokenizer_fingerprint(tokenizer)
    h.update(len(fp).to_bytes(8, "little") + fp)
    h.update(len(texts).to_bytes(8, "little"))
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        # Length-prefixed, so ["ab", "c"] and ["a", "bc"] hash differently.
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def tokenize_cached(
    texts: Sequence[str], tokenizer: Any, cache_dir: str | os.PathLike, batch_size: int = 1000
) -> list[np.ndarray]:
    """``tokenize`` with an on-disk cache: ``cache_dir/tokens-<key>.npz``.

    The .npz holds ``tokens`` int32 [sum len_i] and ``offsets`` int64 [n + 1]; written atomically
    (``fsio.atomic_file``), so concurrent runs and interrupted writes never leave a bad file.
    """
    _require_eos(tokenizer)
    cache_dir = os.fspath(cache_dir)
    path = os.path.join(cache_dir, f"tokens-{token_cache_key(texts, tokenizer)[:32]}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as z:
                tokens, offsets = z["tokens"], z["offsets"]
            if len(offsets) == len(texts) + 1 and offsets[-1] == len(tokens):
                logger.info("token cache hit: %s", path)
                return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        except Exception as e:  # a corrupt cache is rebuilt, never trusted
            logger.warning("ignoring unreadable token cache %s (%s)", path, e)
        logger.warning("token cache %s does not match the texts; rebuilding it", path)
    docs = tokenize(texts, tokenizer, batch_size=batch_size)
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    tokens = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    with fsio.atomic_file(path, "wb") as f:
        np.savez(f, tokens=tokens.astype(np.int32), offsets=offsets)
    logger.info("token cache written: %s (%d docs, %d tokens)", path, len(docs), len(tokens))
    return docs


# ------------------------------------------------------------------------------------ layouts


def _check_seq_len(seq_len: int) -> int:
    if int(seq_len) != seq_len or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be a positive integer")
    return int(seq_len)


def _rows_from_segments(segments: Sequence[Sequence[np.ndarray]], seq_len: int, pad_id: int) -> Arrays:
    """Rows from lists of segments (each row's segments in order, their total <= seq_len):
    {input_ids, segment_ids} int32 [len(segments), seq_len]; segment ids 1, 2, ... in each row,
    padding ``pad_id`` with segment 0 after the last segment."""
    ids = np.full((len(segments), seq_len), pad_id, np.int32)
    segment_ids = np.zeros((len(segments), seq_len), np.int32)
    for r, row in enumerate(segments):
        pos = 0
        for k, seg in enumerate(row):
            n = len(seg)
            ids[r, pos:pos + n] = seg
            segment_ids[r, pos:pos + n] = k + 1
            pos += n
    return {"input_ids": ids, "segment_ids": segment_ids}


def _with_eos(docs: Sequence[np.ndarray], eos_id: int | None) -> list[np.ndarray]:
    if eos_id is None:
        return [np.asarray(d, np.int32) for d in docs]
    eos = np.array([eos_id], np.int32)
    return [np.concatenate([np.asarray(d, np.int32), eos]) for d in docs]


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
         append_eos: bool = True) -> Arrays:
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
    """
    seq_len = _check_seq_len(seq_len)
    docs = _with_eos(docs, eos_id if append_eos else None)
    if truncate:
        docs = [d[:seq_len] for d in docs]
        longer = sum(len(d) == seq_len for d in docs)
        rows = best_fit_rows([len(d) for d in docs], seq_len)
        logger.debug("pack: %d documents (%d of a full row or cut to one) into %d rows",
                     len(docs), longer, len(rows))
        return _rows_from_segments([[docs[i] for i in row] for row in rows], seq_len, eos_id)

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
        eos_id: int | None = None) -> Arrays:
    """Distily's layout: one document per row, {input_ids, segment_ids} int32 [N, seq_len].

    Each document (followed by ``eos_id`` if given; Distily's GPT-2 tokenization adds none) is
    right-padded with ``pad_id``; segment id 1 on real tokens, 0 on padding.
    truncate=True (Distily): a document keeps its first ``seq_len`` tokens; N = len(docs).
    truncate=False: a longer document goes on in further rows (positions restart at 0 in each);
    no token is lost.
    """
    seq_len = _check_seq_len(seq_len)
    docs = _with_eos(docs, eos_id)
    truncated = sum(len(d) > seq_len for d in docs)
    if truncate:
        pieces = [d[:seq_len] for d in docs]
    else:
        pieces = [d[a:a + seq_len] for d in docs for a in range(0, max(len(d), 1), seq_len)]
    out = _rows_from_segments([[p] for p in pieces], seq_len, pad_id)
    if truncated:
        logger.info(
            "pad: %d of %d documents are longer than seq_len=%d and were %s",
            truncated, len(docs), seq_len, "truncated" if truncate else "split over several rows",
        )
    return out


def docs_to_rows(docs: Sequence[np.ndarray], seq_len: int, layout: str, *, eos_id: int,
                 pad_id: int, truncate: bool, append_eos: bool) -> Arrays:
    """Token ids per document -> rows in ``layout`` ("pack" or "pad"), see ``pack`` / ``pad``.

    truncate and append_eos mean the same in both layouts, so with truncate=True both hold the
    same documents, each one whole segment: pad in one row each, pack several per row."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported: use 'pack' or 'pad'")
    if layout == "pack":
        return pack(docs, seq_len, eos_id, truncate=truncate, append_eos=append_eos)
    return pad(docs, seq_len, pad_id, truncate=truncate, eos_id=eos_id if append_eos else None)


def distily_eval_rows(docs: Sequence[np.ndarray], seq_len: int, bos_id: int | None,
                      pad_id: int) -> Arrays:
    """The rows of Distily's perplexity evaluator: {input_ids, segment_ids} [len(docs), seq_len].

    Each document is cut to its first seq_len - 1 tokens and, when the tokenizer has a BOS
    token, BOS is prepended (in the document's segment), so the first real token is scored too;
    one document per row, right-padded (segment 0)."""
    seq_len = _check_seq_len(seq_len)
    prefix = np.array([] if bos_id is None else [bos_id], np.int32)
    pieces = [np.concatenate([prefix, np.asarray(d, np.int32)[:seq_len - 1]]) for d in docs]
    return _rows_from_segments([[p] for p in pieces], seq_len, pad_id)


def layout_stats(arrays: Arrays) -> dict[str, Any]:
    """rows, real_tokens (segment > 0), padding_fraction, documents of a layout.

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
        "padding_fraction": float(1.0 - real / size) if size else 0.0,
        # Segment ids are 1..k in every row, so a row's max is its number of segments.
        "documents": int(seg.max(axis=1).sum()) if rows else 0,
    }


@dataclasses.dataclass
class EvalSet:
    """The rows one evaluator scores.

    rows: {input_ids, segment_ids} [N, S] in the run's layout: the token-weighted perplexity.
    distily_rows: Distily's evaluator rows (``distily_eval_rows``: BOS + the first S - 1 tokens,
      one document per row): Distily's per-document perplexity.
    """

    rows: Arrays
    distily_rows: Arrays


def _layout_options(spec: Any) -> dict[str, bool]:
    # Absent fields: Distily's (the config's defaults).
    return {"truncate": bool(_field(spec, "truncate", True)),
            "append_eos": bool(_field(spec, "append_eos", False))}


def build_datasets(
    spec: Any,
    tokenizer: Any,
    seq_len: int,
    layout: str,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Arrays, EvalSet, dict[str, Any]]:
    """spec -> (train_arrays, test EvalSet, stats), both splits in the same layout.

    Args:
      spec: the dataset fields of ``load_texts``, and ``truncate`` / ``append_eos`` (see
        ``docs_to_rows``; absent: True / False, Distily's).
      tokenizer: a Hugging Face tokenizer with an eos token (its pad token, else eos, pads).
      seq_len: row length S (the caller takes the min with the model's n_positions).
      layout: "pack" (several documents per row) or "pad" (Distily: one per row).
      cache_dir: if set, token ids are cached there (``tokenize_cached``).

    Returns:
      train arrays {input_ids, segment_ids} int32 [N, S], the test split's ``EvalSet``, and
      stats: {"layout", "seq_len", "truncate", "append_eos", "train": {...}, "test": {...}} where
      each split has documents (input texts), segments, rows, real_tokens, padding_fraction,
      tokens (before truncation) and truncated_documents.
    """
    train_texts, test_texts = load_texts(spec)
    options = _layout_options(spec)
    stats: dict[str, Any] = {"layout": layout, "seq_len": seq_len, **options}
    train, stats["train"] = texts_to_rows(train_texts, tokenizer, seq_len, layout, cache_dir,
                                          "train", **options)
    test, stats["test"] = texts_to_eval_set(test_texts, tokenizer, seq_len, layout, cache_dir,
                                            "test", **options)
    return train, test, stats


def _tokenized(texts, tokenizer, cache_dir):
    if cache_dir is not None:
        return tokenize_cached(texts, tokenizer, cache_dir)
    return tokenize(texts, tokenizer)


def _pad_id(tokenizer: Any) -> int:
    # Distily pads with EOS (GPT-2 has no pad token); a tokenizer's own pad token wins.
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return _require_eos(tokenizer) if pad_id is None else int(pad_id)


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
    """Texts -> ({input_ids, segment_ids} [N, S] in `layout`, stats of those rows).

    truncate / append_eos: see ``docs_to_rows``. docs: the texts' token ids, if already known.
    stats: documents (input texts), segments, rows, real_tokens, padding_fraction, tokens (before
    truncation) and truncated_documents (longer than a row: cut with truncate, else continued in
    further segments). Used for each split and for extra evaluators.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported: use 'pack' or 'pad'")
    seq_len = _check_seq_len(seq_len)
    eos_id = _require_eos(tokenizer)
    if docs is None:
        docs = _tokenized(texts, tokenizer, cache_dir)
    arrays = docs_to_rows(docs, seq_len, layout, eos_id=eos_id, pad_id=_pad_id(tokenizer),
                          truncate=truncate, append_eos=append_eos)
    s = layout_stats(arrays)
    s["segments"] = s.pop("documents")
    s["documents"] = len(docs)
    s["tokens"] = int(sum(len(d) for d in docs))
    s["truncated_documents"] = int(sum(len(d) + bool(append_eos) > seq_len for d in docs))
    logger.info(
        "%s: %d documents, %d tokens -> %d rows of %d (%s%s), %d real tokens, %.1f%% padding",
        name, s["documents"], s["tokens"], s["rows"], seq_len, layout,
        ", truncated" if truncate else "", s["real_tokens"], 100 * s["padding_fraction"],
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
    rows, stats = texts_to_rows(texts, tokenizer, seq_len, layout, name=name, truncate=truncate,
                                append_eos=append_eos, docs=docs)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    distily = distily_eval_rows(docs, seq_len, bos_id, _pad_id(tokenizer))
    return EvalSet(rows, distily), stats


# ------------------------------------------------------------------------------------ batching


def _num_rows(arrays: Arrays) -> int:
    sizes = {k: int(np.shape(v)[0]) for k, v in arrays.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must share their leading (row) dimension, got {sizes}")
    return sizes.popitem()[1]


def _pad_rows(batch: Arrays, batch_size: int) -> Arrays:
    """Appends all-zero rows (segment 0: fully masked) up to batch_size, for static shapes."""
    n = next(iter(batch.values())).shape[0]
    if n == batch_size:
        return batch
    return {
        k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
    }


class BatchIterator:
    """Endless, deterministic, resumable batches {key: [batch_size, ...]} over the rows of arrays.

    Epoch e visits the rows in the order ``np.random.default_rng([seed, e]).permutation(n)``
    (row order when shuffle=False), batch_size rows per step. With drop_last the incomplete
    tail of each epoch is skipped; without it, the last batch is filled with all-zero
    (segment 0, fully masked) rows so shapes stay static.

    ``state()`` is {"epoch", "index"} (the next batch), plain ints for JSON; ``restore(state)``
    on an iterator built with the same arguments continues exactly where the saved one was.
    """

    def __init__(
        self,
        arrays: Arrays,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 42,
        drop_last: bool = True,
    ):
        if int(batch_size) != batch_size or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be a positive integer")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_rows = _num_rows(self.arrays)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if drop_last:
            self.steps_per_epoch = self.num_rows // self.batch_size
        else:
            self.steps_per_epoch = -(-self.num_rows // self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_rows} rows make no batch of batch_size={self.batch_size}: lower "
                "batch_size, use more data, or set drop_last=False"
            )
        self.epoch = 0
        self.index = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def __iter__(self) -> Iterator[Arrays]:
        return self

    def __next__(self) -> Arrays:
        order = self._order(self.epoch)
        rows = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        batch = _pad_rows({k: v[rows] for k, v in self.arrays.items()}, self.batch_size)
        self.index += 1
        if self.index == self.steps_per_epoch:
            # Canonical state: "start of the next epoch", never "past the end of this one".
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def restore(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(
                f"cannot restore batch state {state}: index must be in [0, "
                f"{self.steps_per_epoch}] (steps_per_epoch) for these arrays and batch_size"
            )
        if index == self.steps_per_epoch:
            epoch, index = epoch + 1, 0
        self.epoch, self.index = epoch, index


def eval_batches(arrays: Arrays, batch_size: int) -> Iterator[Arrays]:
    """Every row once, in order, batch_size rows per batch; the last batch is filled with
    all-zero (segment 0) rows, so every held-out token counts exactly once and shapes are static.
    """
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = _num_rows(arrays)
    for start in range(0, n, batch_size):
        yield _pad_rows({k: v[start : start + batch_size] for k, v in arrays.items()}, batch_size)
