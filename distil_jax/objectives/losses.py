"""Loss functions of the distillation objective, keyed by Distily's names.

This module owns the per-component loss functions (``kl``, ``reverse_kl``, ``cakld``, ``jsd``,
``raw_mse``, ``soft_mse``, ``cos``, ``ce``) plus the hard-label next-token loss ``clm`` and the
masked reduction they share (:func:`masked_mean`). They are pure ``jax.numpy`` functions.

Conventions (the "defects" are the numbered differences from Distily in docs/design.md):

* ``fn(student [..., F], teacher [..., F], mask [...] bool | None) -> float32 scalar``.
  For the distribution losses (``kl``, ``reverse_kl``, ``cakld``, ``jsd``, ``ce``, ``soft_mse``)
  the inputs are logits; the log-softmax is taken in float32 whatever the input dtype (Distily
  took it in bf16).
* Reduction: one value per position (summed over F for the distribution losses, averaged over F
  for ``raw_mse`` / ``soft_mse``, ``1 - cos`` for ``cos``), then averaged over the positions where
  ``mask`` is True (Distily averaged over padding too). ``mask=None`` means every
  position. A fully masked input gives 0, not NaN.
* ``jsd`` and ``ce`` are the correct definitions, not Distily's (which are wrong).
* Zero probabilities are safe: ``0 * log 0`` terms contribute 0 to the value and nothing NaN to
  the gradient, even for ``-inf`` logits.

Temperature scaling (logits / T, loss * T^2) is the caller's job: these functions see the logits
they are given.

Teacher cache (``topk_loss``, ``topk_log_probs``): when the teacher is read from a recorded
top-k cache (docs/teacher_cache.md) the divergences ``kl``, ``reverse_kl``, ``cakld``, ``jsd`` and
``ce`` are taken between the two distributions on k + 1 buckets: the teacher's top-k tokens of
each position, and one bucket for the rest of the vocabulary (the teacher's mass there is
recorded; the student's is a logsumexp over the non-top-k logits). With k = V this is the
divergence over the vocabulary; with k < V it is that of the coarse-grained distributions, a
lower bound for the KLs and the JSD (data-processing inequality).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["LOSSES", "LOG_PROB_ROWS", "get_loss", "masked_mean", "topk_log_probs",
           "topk_loss"] + [
    "kl", "reverse_kl", "cakld", "jsd", "raw_mse", "soft_mse", "cos", "ce", "clm",
]

# torch.nn.functional.cosine_similarity's default eps.
_COS_EPS = 1e-8


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of ``values`` over the positions where ``mask`` is True, as a float32 scalar.

    Args:
      values: ``[...]`` per-position values.
      mask: ``[...]`` bool, broadcastable to ``values.shape``; None means every position.

    Returns 0 (not NaN) when no position is selected. Masked-out entries are dropped with
    ``jnp.where`` (not multiplied by 0), so even inf/NaN there cannot leak into the value.
    """
    values = jnp.asarray(values, jnp.float32)
    if mask is None:
        return jnp.mean(values)
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), values.shape)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = jnp.sum(mask, dtype=jnp.float32)
    return total / jnp.maximum(count, 1.0)


def _log_probs(logits: jax.Array) -> jax.Array:
    """float32 log-softmax over the last axis (upcast first; Distily's was in bf16)."""
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _kl_rows(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """Per-position KL(p || q) = sum_v p (log p - log q), ``[..., F] -> [...]``.

    Terms with p == 0 are exactly 0. The inner ``where``s keep ``-inf`` log p and log q out of
    the product on those terms, so that neither the value nor the gradient (whose unselected
    branch is multiplied by 0, and 0 * inf = NaN) sees an infinity.
    """
    p = jnp.exp(log_p)
    positive = p > 0
    safe_log_p = jnp.where(positive, log_p, 0.0)
    safe_log_q = jnp.where(positive, log_q, 0.0)
    terms = jnp.where(positive, p * (safe_log_p - safe_log_q), 0.0)
    return jnp.sum(terms, axis=-1)


def _check_beta(beta) -> None:
    # Only concrete Python numbers can be checked; a traced beta is the caller's responsibility.
    if isinstance(beta, (int, float)) and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _reverse_kl_rows(log_s, log_t):
    return _kl_rows(log_s, log_t)


def _forward_kl_rows(log_s, log_t):
    return _kl_rows(log_t, log_s)


def _cakld_rows(log_s, log_t, beta=0.5):
    return beta * _kl_rows(log_s, log_t) + (1.0 - beta) * _kl_rows(log_t, log_s)


def _jsd_rows(log_s, log_t, beta=0.5):
    # TRL's generalized JSD (GKD) at its ends: the mixture degenerates (both KLs to it are 0), so
    # beta = 0 is defined as the forward KL(teacher || student) and beta = 1 as the reverse KL.
    if isinstance(beta, (int, float)) and beta in (0, 1):
        return _kl_rows(log_t, log_s) if beta == 0 else _kl_rows(log_s, log_t)
    beta = jnp.asarray(beta, jnp.float32)
    a = jnp.log(beta) + log_t
    b = jnp.log1p(-beta) + log_s
    # logaddexp(-inf, x) = x with a zero gradient on the -inf side, but logaddexp(-inf, -inf)
    # has a NaN gradient. Where both are -inf, p_t = p_s = 0 and _kl_rows ignores log m anyway.
    both_zero = jnp.isneginf(a) & jnp.isneginf(b)
    log_m = jnp.logaddexp(jnp.where(both_zero, 0.0, a), jnp.where(both_zero, 0.0, b))
    return beta * _kl_rows(log_t, log_m) + (1.0 - beta) * _kl_rows(log_s, log_m)


def _ce_rows(log_s, log_t):
    p_t = jnp.exp(log_t)
    positive = p_t > 0
    # Same double-where as in _kl_rows: a -inf log p_s on a p_t == 0 term must not reach the grad.
    return -jnp.sum(jnp.where(positive, p_t * jnp.where(positive, log_s, 0.0), 0.0), axis=-1)


# Per-position divergences of two distributions given as float32 log-probabilities
# (student, teacher) [..., F] -> [...]: the logits losses below apply them to log-softmaxes over
# the vocabulary, the teacher-cache loss (`topk_log_probs`) to its k + 1 buckets.
LOG_PROB_ROWS: dict[str, Callable[..., jax.Array]] = {
    "kl": _forward_kl_rows,
    "reverse_kl": _reverse_kl_rows,
    "cakld": _cakld_rows,
    "jsd": _jsd_rows,
    "ce": _ce_rows,
}


def kl(student, teacher, mask=None):
    """Forward KL(teacher || student) from logits ``[..., V]``, mean over masked positions."""
    return masked_mean(_forward_kl_rows(_log_probs(student), _log_probs(teacher)), mask)


def reverse_kl(student, teacher, mask=None):
    """Reverse KL(student || teacher) from logits ``[..., V]``, mean over masked positions."""
    return masked_mean(_reverse_kl_rows(_log_probs(student), _log_probs(teacher)), mask)


def cakld(student, teacher, mask=None, *, beta: float = 0.5):
    """``beta * reverse_kl + (1 - beta) * kl`` from logits ``[..., V]`` (Distily: beta = 0.5)."""
    _check_beta(beta)
    return masked_mean(_cakld_rows(_log_probs(student), _log_probs(teacher), beta), mask)


def jsd(student, teacher, mask=None, *, beta: float = 0.5):
    """Generalized Jensen-Shannon divergence from logits ``[..., V]``.

    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``;
    bounded by the entropy of beta (ln 2 at beta = 0.5). Distily's version reversed the KL
    directions and ignored beta. log m is a logsumexp of the two weighted log
    probabilities, so it is finite wherever either distribution has mass.
    """
    _check_beta(beta)
    return masked_mean(_jsd_rows(_log_probs(student), _log_probs(teacher), beta), mask)


def ce(student, teacher, mask=None):
    """Soft cross-entropy ``-sum_v p_t log p_s`` from logits ``[..., V]``.

    Distily applied the softmax twice; this is the textbook soft-label CE.
    """
    return masked_mean(_ce_rows(_log_probs(student), _log_probs(teacher)), mask)


def raw_mse(student, teacher, mask=None):
    """Mean squared error of raw features ``[..., F]``: mean over F, then over masked positions.

    With every position selected this is torch ``mse_loss(reduction="mean")`` (every position
    has the same F elements).
    """
    diff = jnp.asarray(student, jnp.float32) - jnp.asarray(teacher, jnp.float32)
    return masked_mean(jnp.mean(jnp.square(diff), axis=-1), mask)


def soft_mse(student, teacher, mask=None):
    """MSE between ``softmax(student)`` and ``softmax(teacher)`` (logits ``[..., V]``)."""
    diff = jnp.exp(_log_probs(student)) - jnp.exp(_log_probs(teacher))
    return masked_mean(jnp.mean(jnp.square(diff), axis=-1), mask)


def cos(student, teacher, mask=None):
    """Mean over masked positions of ``1 - cosine_similarity`` along the last axis ``[..., F]``.

    Like torch ``cosine_similarity(eps=1e-8)``: each norm is clamped to eps separately.
    """
    s = jnp.asarray(student, jnp.float32)
    t = jnp.asarray(teacher, jnp.float32)
    similarity = jnp.sum(s * t, axis=-1) / (optax.safe_norm(s, _COS_EPS, axis=-1)
                                     * optax.safe_norm(t, _COS_EPS, axis=-1))
    return masked_mean(1.0 - similarity, mask)


def clm(student_logits, labels, mask=None):
    """Hard-label cross-entropy: mean over masked positions of ``-log softmax(student)[label]``.

    Args:
      student_logits: ``[..., V]`` logits already aligned with ``labels`` (the caller shifts for
        next-token prediction).
      labels: ``[...]`` int token ids; values at masked-out positions are ignored (may be -100).
      mask: ``[...]`` bool, or None for every position.
    """
    log_s = _log_probs(student_logits)
    labels = jnp.asarray(labels)
    if mask is not None:
        # Masked labels may be an ignore index such as -100: replace them by a valid id.
        labels = jnp.where(jnp.asarray(mask, bool), labels, 0)
    picked = jnp.take_along_axis(log_s, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return masked_mean(-picked, mask)


def _top_k_mask(ids: jax.Array, vocab: int) -> jax.Array:
    """[..., k] token ids -> [..., V] bool, True at the listed ids (a scatter, not a one-hot sum:
    no [..., k, V] intermediate)."""
    lead = ids.shape[:-1]
    flat = ids.reshape(-1, ids.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    return jnp.zeros((flat.shape[0], vocab), bool).at[rows, flat].set(True).reshape(lead + (vocab,))


def topk_log_probs(student_logits, ids, teacher_logprobs, rest_logmass):
    """The student's and the teacher's distributions on the teacher cache's k + 1 buckets.

    Args:
      student_logits: ``[..., V]`` (any float dtype; the log-softmax is taken in float32).
      ids: ``[..., k]`` int, the teacher's top-k token ids (distinct within a position).
      teacher_logprobs: ``[..., k]`` the teacher's log-probabilities of those tokens (any float
        dtype, e.g. float16 as stored).
      rest_logmass: ``[...]`` log of the teacher's probability mass outside the top k,
        ``log sum_{v not in top k} p_t(v)`` (-inf when nothing is left).

    Returns ``(log_s, log_t)``, float32 ``[..., k + 1]`` (``[..., k]`` when k = V):

      log_s = (log q(i_1), ..., log q(i_k), log sum_{v not in top k} q(v))
      log_t = (log p(i_1), ..., log p(i_k), rest_logmass) - logsumexp of the same k + 1 values

    with q = softmax(student_logits). The student's rest bucket is a logsumexp over the
    non-top-k vocabulary (exact even when its mass is tiny, unlike log(1 - sum)). The teacher's
    k + 1 buckets are renormalized so that rounding to the stored dtype cannot leave them
    summing to anything but 1 (for float32 storage that is a change of ~1e-7). Any divergence of
    ``LOG_PROB_ROWS`` applied to these buckets is the divergence between the two distributions
    coarse-grained to {top-k tokens, everything else}; with k = V there is no rest bucket and it
    is exactly the divergence over the whole vocabulary.
    """
    return _buckets(_log_probs(student_logits), ids, teacher_logprobs, rest_logmass)[:2]


def _buckets(log_q, ids, teacher_logprobs, rest_logmass):
    """`topk_log_probs` from the student's log-softmax ``log_q [..., V]``, plus the teacher's
    normalizer ``[..., 1]`` (what was subtracted from the stored log-probabilities)."""
    vocab, k = log_q.shape[-1], ids.shape[-1]
    ids = jnp.asarray(ids).astype(jnp.int32)
    log_s = jnp.take_along_axis(log_q, ids, axis=-1)
    log_t = jnp.asarray(teacher_logprobs, jnp.float32)
    if k < vocab:
        rest_s = jax.nn.logsumexp(jnp.where(_top_k_mask(ids, vocab), -jnp.inf, log_q), axis=-1)
        log_s = jnp.concatenate([log_s, rest_s[..., None]], axis=-1)
        rest_t = jnp.asarray(rest_logmass, jnp.float32)[..., None]
        log_t = jnp.concatenate([log_t, rest_t], axis=-1)
    norm = jax.nn.logsumexp(log_t, axis=-1, keepdims=True)
    return log_s, log_t - norm, norm


# The losses whose teacher-cache form uses the cache's tail samples (forward directions: the
# teacher's probabilities weight the terms, so a sample of the tail estimates its share without
# bias); the others use the k + 1 buckets.
TAIL_SAMPLED = ("kl", "ce")


def _tail_sampled_rows(name, log_q, ids, teacher_logprobs, rest_logmass, tail_ids, tail_logprobs):
    """Per-position forward KL or CE ``[...]`` from the top k (exact) and m tail samples.

    The top-k terms are the buckets' (`topk_log_probs`); the tail's share of the sum over the
    vocabulary is estimated from m tokens drawn from the teacher's tail distribution
    ``p(v) / p_rest`` (v outside the top k):

      kl:  sum_{i<=k} p_i (log p_i - log q_i) + (p_rest / m) sum_{j<=m} (log p(t_j) - log q(t_j))
      ce: -sum_{i<=k} p_i log q_i            - (p_rest / m) sum_{j<=m} log q(t_j)

    whose expectation over the draw is the exact loss over the whole vocabulary, and so is its
    gradient's (each tail token's expected target is p(v), where the k + 1 buckets give the tail
    tokens the student's own shape). p_i, p_rest and p(t_j) are renormalized with the buckets.
    tail_ids, tail_logprobs: ``[..., m]``.
    """
    log_s, log_t, norm = _buckets(log_q, ids, teacher_logprobs, rest_logmass)
    k, m = ids.shape[-1], tail_ids.shape[-1]
    head_rows = LOG_PROB_ROWS[name](log_s[..., :k], log_t[..., :k])
    weight = jnp.exp(log_t[..., k:]) / m  # [..., 1]
    log_q_tail = jnp.take_along_axis(log_q, jnp.asarray(tail_ids).astype(jnp.int32), axis=-1)
    lp_tail = jnp.asarray(tail_logprobs, jnp.float32) - norm
    # A zero weight (no tail mass) must keep -inf log-probabilities out of value and gradient.
    used = (weight > 0) & jnp.isfinite(lp_tail)
    safe_q = jnp.where(used, log_q_tail, 0.0)
    if name == "kl":
        terms = weight * (jnp.where(used, lp_tail, 0.0) - safe_q)
    else:
        terms = -weight * safe_q
    return head_rows + jnp.sum(jnp.where(used, terms, 0.0), axis=-1)


def topk_loss(name: str, student_logits, ids, teacher_logprobs, rest_logmass, mask=None,
              tail_ids=None, tail_logprobs=None):
    """The logits loss ``name`` (kl, reverse_kl, cakld, jsd or ce) on the teacher cache's k + 1
    buckets (see `topk_log_probs`), mean over masked positions. Shapes as in `topk_log_probs`.

    With tail samples (``tail_ids``, ``tail_logprobs`` ``[..., m]``, m > 0), kl and ce estimate
    the tail's share from them instead (`_tail_sampled_rows`); the other losses use the buckets.
    """
    if name not in LOG_PROB_ROWS:
        raise ValueError(f"the logits loss {name!r} cannot be computed from a teacher cache (it "
                         f"holds top-k log-probabilities, not logits); use one of "
                         f"{', '.join(LOG_PROB_ROWS)}")
    if tail_ids is not None and tail_ids.shape[-1] and name in TAIL_SAMPLED:
        rows = _tail_sampled_rows(name, _log_probs(student_logits), ids, teacher_logprobs,
                                  rest_logmass, tail_ids, tail_logprobs)
        return masked_mean(rows, mask)
    log_s, log_t = topk_log_probs(student_logits, ids, teacher_logprobs, rest_logmass)
    return masked_mean(LOG_PROB_ROWS[name](log_s, log_t), mask)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "kl": kl,
    "reverse_kl": reverse_kl,
    "cakld": cakld,
    "jsd": jsd,
    "raw_mse": raw_mse,
    "soft_mse": soft_mse,
    "cos": cos,
    "ce": ce,
    "clm": clm,
}


def get_loss(name: str) -> Callable[..., jax.Array]:
    """The loss function called ``name``; ValueError naming the valid names otherwise."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown loss_fn {name!r}; valid: {', '.join(sorted(LOSSES))}"
        ) from None
