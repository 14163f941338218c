"""Where a run's texts come from: a hub dataset id or a local .txt/.json/.jsonl/.parquet/.csv
file or directory -> (train texts, held-out test texts), with Distily's "first N rows, then a
seeded split" (``load_texts``; ``load_all_texts`` for extra evaluators without a split).

Errors are one line naming the problem and the fix (a missing path, an unreachable hub, a file
`datasets` cannot parse, a missing or non-text column, an empty split)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from distil_jax.data import shapes

logger = logging.getLogger(__name__)

# Local file suffix -> the `datasets` builder that reads it.
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}



def spec_field(spec: Any, name: str, default: Any) -> Any:
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


def load_rows(spec: Any, cache_dir: str | None = None):
    """(the sampled rows as a ``datasets.Dataset``, in order, before the train/test split; their
    ``RowShape``): the shape detected from the columns or set by ``column`` /
    ``completion_column`` (``shapes.detect_shape``)."""
    from distil_jax.data.tokens import RowShape

    if cache_dir is None:
        cache_dir = spec_field(spec, "cache_dir", None)
    uri = str(spec_field(spec, "uri", ""))
    ds = _load_rows(spec, cache_dir)
    shape = RowShape(*shapes.detect_shape(
        uri, ds.column_names, getattr(spec, "column", None),
        getattr(spec, "completion_column", None), ds[0] if len(ds) else None))
    return ds, shape


def _load_rows(spec: Any, cache_dir: str | None):
    """The sampled rows (a ``datasets.Dataset``), in order (before the train/test split)."""
    import datasets

    uri = str(spec_field(spec, "uri", ""))
    if not uri:
        raise ValueError("dataset uri is empty: set it to a hub dataset id or a local path")
    sample_size = spec_field(spec, "sample_size", None)
    shuffle = bool(spec_field(spec, "shuffle", False))
    seed = int(spec_field(spec, "seed", 42))
    streaming = bool(spec_field(spec, "streaming", False))
    if sample_size is not None and int(sample_size) <= 0:
        raise ValueError(f"sample_size={sample_size} must be positive (or None for all rows)")
    if streaming and sample_size is None:
        raise ValueError("dataset.streaming=True reads sample_size rows of the stream: set "
                         "dataset.sample_size (or streaming=False to download the whole split)")

    local = _local_files(uri)
    if local is not None:
        return _load_local(spec, uri, local, cache_dir, shuffle, seed, sample_size)
    if streaming or (sample_size is not None and not shuffle and not _hub_offline()):
        # Distily's "first N rows" of a hub dataset: stream them instead of downloading the whole
        # split (all of English Wikipedia for 5000 rows). Same rows, in the same (file) order.
        return _stream(spec, uri, int(sample_size), shuffle, seed)
    try:
        ds = datasets.load_dataset(uri, spec_field(spec, "subset", None),
                                   split=spec_field(spec, "split", "train"), cache_dir=cache_dir)
    except Exception as e:
        wrapped = _hub_error(uri, e)
        if wrapped is e:
            raise
        raise wrapped from e
    return _sample(ds, shuffle, seed, sample_size)


def _stream(spec: Any, uri: str, sample_size: int, shuffle: bool, seed: int):
    """The first sample_size rows of a streamed hub dataset (with shuffle: of datasets'
    buffered shuffle of the stream, buffer 10,000 rows), in memory."""
    import datasets

    try:
        stream = datasets.load_dataset(uri, spec_field(spec, "subset", None),
                                       split=spec_field(spec, "split", "train"), streaming=True)
        if shuffle:
            stream = stream.shuffle(seed=seed, buffer_size=10_000)
        rows = list(itertools.islice(iter(stream), sample_size))
    except Exception as e:
        wrapped = _hub_error(uri, e)
        if wrapped is e:
            raise
        raise wrapped from e
    return datasets.Dataset.from_list(rows)


def _load_local(spec, uri, local, cache_dir, shuffle, seed, sample_size):
    import datasets

    builder, files = local
    split = spec_field(spec, "split", "train")
    kwargs = {"sample_by": spec_field(spec, "sample_by", "document")} if builder == "text" else {}
    if all(os.path.getsize(f) == 0 for f in files):
        # datasets' json builder raises a bare StopIteration on empty files
        return datasets.Dataset.from_dict({"text": []})
    try:
        # data_files under the requested split name, so `split` works for local files too.
        # datasets logs its own multi-line report of a file it cannot parse: ours replaces it.
        with _datasets_quiet():
            ds = datasets.load_dataset(
                builder, data_files={split: files}, split=split, cache_dir=cache_dir, **kwargs
            )
        # Arrow may hold invalid UTF-8 until a value is read: find it here, where it is reported.
        ds.data.table.validate(full=True)
        if builder == "text":
            # Blank lines (sample_by="line") and empty files become "" rows: not documents.
            ds = ds.filter(lambda t: len(t) > 0, input_columns="text", keep_in_memory=True)
        return _sample(ds, shuffle, seed, sample_size)
    except (ValueError, FileNotFoundError):
        if not _is_datasets_error(sys.exc_info()[1]):
            raise  # ours: already one line
        raise ValueError(_unreadable(uri, builder, files, sys.exc_info()[1])) from None
    except Exception as e:
        raise ValueError(_unreadable(uri, builder, files, e)) from None


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


def test_rows(test_size: float | int) -> float | int:
    """``test_size`` as ``split_indices`` reads it: a fraction (float in (0, 1)) of the rows, or a
    row count (int >= 1). A whole float >= 1 is a row count: a config field that holds a float
    (``dataset.test_size``, default 0.002) turns ``--config.dataset.test_size=2`` into 2.0.
    ValueError (one line) for anything else."""
    numeric = (int, float, np.integer, np.floating)
    if isinstance(test_size, bool) or not isinstance(test_size, numeric) or not math.isfinite(test_size):
        raise ValueError(f"test_size={test_size!r}: use a fraction in (0, 1) or a row count (an "
                         "integer >= 1)")
    if isinstance(test_size, (float, np.floating)) and not float(test_size).is_integer():
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size={test_size}: use a fraction in (0, 1) or a row count (an "
                             "integer >= 1)")
        return float(test_size)
    if test_size < 1:
        raise ValueError(f"test_size={test_size}: use a row count of at least 1 or a fraction in "
                         "(0, 1); both train and test splits must be non-empty")
    return int(test_size)


def split_indices(n: int, test_size: float | int, seed: int,
                  max_test_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): ``datasets.Dataset.train_test_split(test_size, seed=seed)``'s rows.

    Exactly datasets' shuffled split (as Distily calls it): n_test = ceil(test_size * n) for a
    fraction (at most ``max_test_rows``, when set: datasets' split with that row count), test_size
    rows for a row count (``test_rows``), perm = np.random.default_rng(seed).permutation(n),
    test = perm[:n_test], train = perm[n_test:], each in permutation order.
    """
    test_size = test_rows(test_size)
    if isinstance(test_size, float):
        n_test = math.ceil(test_size * n)
        if max_test_rows is not None:
            n_test = min(n_test, int(max_test_rows))
    else:
        n_test = test_size
    n_train = n - n_test
    if n_test <= 0 or n_train <= 0:
        raise ValueError(
            f"splitting {n} rows with test_size={test_size} leaves an empty "
            f"{'test' if n_test <= 0 else 'train'} split: use more rows (sample_size) or "
            "another test_size"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def _require_rows(spec: Any, n: int) -> None:
    if not n:
        raise ValueError(
            f"dataset {str(spec_field(spec, 'uri', ''))!r} (split {spec_field(spec, 'split', 'train')!r}) "
            "has no rows: check uri/split/sample_size or add data"
        )


def load_all_texts(spec: Any, cache_dir: str | None = None) -> list[str]:
    """Every sampled row of a plain-text ``spec`` (no train/test split).

    Same fields and errors as ``load_texts`` (test_size and seed of the split are not used).
    """
    ds, shape = load_rows(spec, cache_dir)
    _require_rows(spec, len(ds))
    uri = str(spec_field(spec, "uri", ""))
    if shape.shape != "text":
        raise ValueError(f"dataset {uri!r} holds {shape.shape} rows, not plain text: read it with "
                         "data.load_split_rows, or set column to a text column")
    return _as_texts(uri, shape.column, ds[shape.column])


def load_split_rows(spec: Any, cache_dir: str | None = None):
    """(rows, ``RowShape``, train indices, held-out indices): ``load_rows`` and the split of
    ``split_indices`` (``test_size``, ``max_test_rows``, ``seed``). Plain text is checked as
    ``load_texts`` checks it (text values, no split of empty texts only)."""
    ds, shape = load_rows(spec, cache_dir)
    _require_rows(spec, len(ds))
    uri = str(spec_field(spec, "uri", ""))
    if shape.shape == "text":
        texts = _as_texts(uri, shape.column, ds[shape.column])
    train_idx, test_idx = split_indices(
        len(ds), spec_field(spec, "test_size", 0.002), int(spec_field(spec, "seed", 42)),
        getattr(spec, "max_test_rows", None))
    if shape.shape == "text":
        for name, idx in (("train", train_idx), ("held-out test", test_idx)):
            _check_not_empty(spec, name, [texts[i] for i in idx])
    logger.info("dataset %s (%s rows): %d rows -> %d train / %d test", uri, shape.shape, len(ds),
                len(train_idx), len(test_idx))
    return ds, shape, train_idx, test_idx


def _check_not_empty(spec: Any, name: str, texts: Sequence[str]) -> None:
    # Empty texts have no token to learn or to score: a split of them would train on nothing
    # and report a perplexity of exactly 1.
    if not any(t.strip() for t in texts):
        raise ValueError(
            f"dataset {str(spec_field(spec, 'uri', ''))!r}: every text of the {name} split "
            f"({len(texts)} rows of column {spec_field(spec, 'column', 'text')!r}) is empty; check "
            "column, or use more rows (sample_size) or another test_size"
        )


def load_texts(spec: Any, cache_dir: str | None = None) -> tuple[list[str], list[str]]:
    """Loads a plain-text dataset and returns (train_texts, test_texts).

    Fields of ``spec`` (an ``ml_collections.ConfigDict`` or any object with attributes; a missing
    or None field takes the default):

      uri: hub dataset id (e.g. "wikimedia/wikipedia") or a local file/directory. Local files are
        read with the `datasets` builder for their suffix: .txt/.text -> "text", .json/.jsonl ->
        "json", .parquet -> "parquet", .csv -> "csv"; a directory is walked recursively (sorted,
        hidden files skipped) and must hold a single file type.
      subset: hub config name (e.g. "20231101.en") or None.
      split: split to read (default "train"); local files are exposed under this name.
      column: the text column (None: detected, "text" for plain text; the "text" builder always
        names it "text"). ``load_split_rows`` also reads chat and prompt/completion rows.
      sample_by: .txt files only: "document" (default: one document per file), "paragraph" (one
        per blank-line-separated paragraph) or "line" (one per line); empty ones are dropped.
      sample_size: keep the first N rows (None: all). With shuffle, N rows of a seeded shuffle.
      shuffle: shuffle the rows with ``seed`` before taking sample_size (default False, Distily).
      streaming: hub datasets: stream the sample_size rows instead of downloading the split.
      seed: seed of that shuffle and of the train/test split (default 42).
      test_size: fraction (float in (0, 1)) or count (a whole number >= 1, see ``test_rows``) of
        the sampled rows held out (default 0.002). Rows go to test exactly as ``datasets``'
        ``train_test_split(test_size, seed=seed)`` sends them (shuffled split, see
        ``split_indices``): 5000 rows with 0.002 -> 4990 train / 10 test.
      max_test_rows: at most this many held-out rows from a fractional test_size (None: no cap).

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
    ds, shape, train_idx, test_idx = load_split_rows(spec, cache_dir)
    if shape.shape != "text":
        raise ValueError(f"dataset {str(spec_field(spec, 'uri', ''))!r} holds {shape.shape} rows, "
                         "not plain text: read it with data.load_split_rows, or set column to a "
                         "text column")
    texts = ds[shape.column]
    return [texts[i] for i in train_idx], [texts[i] for i in test_idx]
