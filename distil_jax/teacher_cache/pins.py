"""What a teacher cache pins: the fingerprints of the teacher, the tokenizer and the training
rows, and the run settings it was made for (``run_pins``); ``check_pins`` matches a run to it."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

import numpy as np

from distil_jax import data
from distil_jax.teacher_cache.format import FORMAT, FORMAT_VERSION, CacheMismatch, sha256_file

# The dataset fields a cache pins (besides the fingerprint of the rows they make).
_DATASET_FIELDS = ("uri", "subset", "split", "column", "sample_size", "shuffle", "seed",
                   "test_size", "sample_by")
# Where the inputs were found, not what they are (the fingerprints say that): a moved workdir (the
# demo's teacher and corpus live in it) or a teacher copied elsewhere changes them.
_LOCATIONS = (("teacher", "name_or_path"), ("tokenizer", "name_or_path"), ("dataset", "uri"))


# ----------------------------------------------------------------------------- fingerprints


def teacher_fingerprint(name_or_path: str) -> str:
    """sha256 of the teacher's architecture (its parsed config) and of its weight files' bytes.

    Independent of where the folder lives and of the dtype the weights are loaded in; another
    checkpoint, or another architecture option, gives another fingerprint."""
    from distil_jax import hf

    folder = hf.resolve_folder(name_or_path, allow_patterns=["config.json", "model.safetensors*",
                                                             "pytorch_model.bin*"])
    h = hashlib.sha256(repr(hf.load_config(folder)).encode())
    weights = sorted(f for f in folder.iterdir()
                     if f.name.startswith(("model.safetensors", "pytorch_model.bin")))
    if not weights:
        raise FileNotFoundError(f"no weight files in the teacher folder {folder}")
    for f in weights:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    return hashlib.sha256(data.tokenizer_content(tokenizer)).hexdigest()


def rows_fingerprint(arrays) -> str:
    """sha256 of a set of rows (input_ids and segment_ids, and loss_mask when the rows have one
    (dataset.loss_on="completion"), with their shapes); an evaluator's `data.EvalSet` by its
    rows and Distily's evaluator rows. Rows without a loss mask hash as before it existed."""
    if hasattr(arrays, "distily_rows"):
        return rows_fingerprint(arrays.rows) + rows_fingerprint(arrays.distily_rows)[:16]
    h = hashlib.sha256()
    for key in ("input_ids", "segment_ids") + (("loss_mask",) if "loss_mask" in arrays else ()):
        a = np.ascontiguousarray(np.asarray(arrays[key], np.int32))
        h.update(key.encode() + repr(a.shape).encode() + a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- what a cache pins


def effective_k(cache_k: int, vocab_size: int) -> int:
    """The k a config asks for, on a vocabulary of `vocab_size` (k >= V is the whole vocabulary)."""
    if int(cache_k) <= 0:
        raise ValueError(f"teacher.cache_k={cache_k}: use a positive number of tokens (e.g. 64)")
    return min(int(cache_k), int(vocab_size))


def run_pins(config, teacher_cfg, tokenizer, seq_len: int, train_rows: Mapping,
             teacher_fp: str) -> dict:
    """What a cache made for this run must have been made from (the manifest's pinned fields)."""
    ds = config.dataset
    seg = np.asarray(train_rows["segment_ids"])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {"name_or_path": str(config.teacher.model_name_or_path), "fingerprint": teacher_fp,
                    "model_type": teacher_cfg.model_type, "vocab_size": int(teacher_cfg.vocab_size),
                    "weights_dtype": config.teacher.dtype, "compute_dtype": config.train.dtype},
        "tokenizer": {"name_or_path": str(config.tokenizer_name_or_path or config.teacher.model_name_or_path),
                      "fingerprint": tokenizer_fingerprint(tokenizer)},
        "dataset": {**{k: ds.get(k) for k in _DATASET_FIELDS}, "fingerprint": rows_fingerprint(train_rows)},
        "layout": config.dataset.layout,
        "seq_len": int(seq_len),
        "rows": int(seg.shape[0]),
        "real_tokens": int((seg > 0).sum()),
        "temperature": float(config.objective.temperature),
    }


def check_pins(folder, manifest: Mapping, run: Mapping) -> None:
    """CacheMismatch naming the first thing the cache was not made from, as this run would."""
    m = manifest

    def refuse(what: str, theirs, ours, fix: str = "") -> None:
        raise CacheMismatch(
            f"teacher cache {folder} does not match this run: {what} (cache: {theirs}, run: {ours}); "
            + (fix or "record a cache for this run with python -m distil_jax.record_teacher and "
               "the run's config, or point teacher.cache at a matching one"))

    if m["teacher"]["fingerprint"] != run["teacher"]["fingerprint"]:
        refuse("another teacher (weights fingerprint)", m["teacher"]["name_or_path"] + " "
               + m["teacher"]["fingerprint"][:12], run["teacher"]["name_or_path"] + " "
               + run["teacher"]["fingerprint"][:12])
    if m["tokenizer"]["fingerprint"] != run["tokenizer"]["fingerprint"]:
        refuse("another tokenizer", m["tokenizer"]["name_or_path"] + " " + m["tokenizer"]["fingerprint"][:12],
               run["tokenizer"]["name_or_path"] + " " + run["tokenizer"]["fingerprint"][:12])
    if m["layout"] != run["layout"]:
        refuse("another dataset.layout", m["layout"], run["layout"])
    if m["seq_len"] != run["seq_len"]:
        refuse("another sequence length", m["seq_len"], run["seq_len"])
    if m["dataset"]["fingerprint"] != run["dataset"]["fingerprint"]:
        fields = [k for k in _DATASET_FIELDS if m["dataset"].get(k) != run["dataset"].get(k)]
        refuse("another dataset (its training rows differ" + (
            f"; dataset fields {', '.join(fields)} differ" if fields else ", the data itself changed") + ")",
            m["dataset"]["fingerprint"][:12], run["dataset"]["fingerprint"][:12])
    if float(m["temperature"]) != float(run["temperature"]):
        refuse("another objective.temperature (the cache holds the teacher's distribution at the "
               "temperature it was recorded at)", m["temperature"], run["temperature"],
               f"set objective.temperature={m['temperature']} or record a cache at "
               f"{run['temperature']}")


def recording_difference(manifest: Mapping, pins: Mapping) -> Optional[str]:
    """The first pinned field in which an existing cache's manifest differs from a recording's
    `pins` ("path (theirs vs ours)"), or None: a recording may finish (or find complete) only a
    cache of the same inputs and settings. Where the inputs were found (`_LOCATIONS`) is left
    out, so a recording resumes from a moved workdir."""
    def content(m: Mapping) -> dict:
        out = {key: (dict(value) if isinstance(value, Mapping) else value)
               for key, value in m.items() if key in pins}
        for section, field in _LOCATIONS:
            if isinstance(out.get(section), dict):
                out[section].pop(field, None)
        return out

    return _first_difference(content(manifest), content(pins))


def _first_difference(a: Any, b: Any, path: str = "") -> Optional[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            d = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if d:
                return d
        return None
    return None if a == b else f"{path} ({a!r} vs {b!r})"
