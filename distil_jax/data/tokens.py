"""Texts -> token ids per document (no special tokens), optionally cached on disk in an .npz
keyed by the texts and the tokenizer's content."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from distil_jax import fsio

logger = logging.getLogger(__name__)

# Bump when the .npz layout or the tokenization call changes, so stale caches are never reused.
_TOKEN_CACHE_VERSION = "1"


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


def pad_id(tokenizer: Any) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its EOS (as Distily: GPT-2
    has no pad token)."""
    own = getattr(tokenizer, "pad_token_id", None)
    return require_eos(tokenizer) if own is None else int(own)


def tokenize(texts: Sequence[str], tokenizer: Any, batch_size: int = 1000) -> list[np.ndarray]:
    """Token ids of each text: a list of int32 arrays [len_i], no special tokens added.

    Calls the (fast) tokenizer on batches of ``batch_size`` texts. No truncation: ``pack`` and
    ``pad`` decide what to do with long documents.
    """
    require_eos(tokenizer)
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


def tokenize_cached(
    texts: Sequence[str], tokenizer: Any, cache_dir: str | os.PathLike, batch_size: int = 1000
) -> list[np.ndarray]:
    """``tokenize`` with an on-disk cache: ``cache_dir/tokens-<key>.npz``.

    The .npz holds ``tokens`` int32 [sum len_i] and ``offsets`` int64 [n + 1]; written atomically
    (``fsio.atomic_file``), so concurrent runs and interrupted writes never leave a bad file.
    """
    require_eos(tokenizer)
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

