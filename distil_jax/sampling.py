"""Next-token choice for generation: temperature, top-k and top-p filtering, then a draw.

The filters are transformers' logits warpers (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``), applied in the order ``generate`` applies them, so that a sampled
completion here comes from the same distribution as ``model.generate(do_sample=True, ...)``.
Everything is jit-friendly: the settings are Python numbers (static), the logits float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["check_settings", "filter_logits", "next_token"]


def check_settings(temperature: float, top_k: int, top_p: float) -> None:
    """One-line errors for settings no filter can honour."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def _top_k(logits: jax.Array, k: int) -> jax.Array:
    # HF keeps every token whose logit is >= the k-th largest (ties at the k-th are kept).
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p(logits: jax.Array, p: float) -> jax.Array:
    # HF sorts ascending and drops the tokens whose cumulative probability is <= 1 - p; the most
    # likely token always stays. Same arithmetic here, so the kept set is HF's at the edges too.
    order = jnp.argsort(logits, axis=-1)
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop_sorted = (cumulative <= 1.0 - p).at[..., -1].set(False)
    drop = jnp.zeros_like(drop_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """The logits a sample is drawn from: ``[B, V]`` -> float32 ``[B, V]``, filtered with -inf.

    ``temperature`` divides first (it must be > 0 here; 0 means greedy, see :func:`next_token`),
    then top-k (0 = off), then top-p (1 = off), as transformers' ``generate`` orders its warpers.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = _top_k(logits, top_k)
    if top_p < 1.0:
        logits = _top_p(logits, top_p)
    return logits


def next_token(logits: jax.Array, rng: jax.Array | None, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """One token per row from ``logits [B, V]`` -> int32 ``[B]``.

    ``temperature == 0`` is greedy (argmax; the filters cannot change the argmax, and no rng is
    needed); otherwise a draw from ``softmax(filter_logits(...))`` with ``rng``.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key; pass rng=jax.random.key(seed)")
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
