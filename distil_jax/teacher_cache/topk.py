"""The teacher's top-k next-token distribution at every position (jittable), and the tail
samples drawn outside it: what the recorder stores."""

from __future__ import annotations


def teacher_top_k(config, params, input_ids, segment_ids, *, k: int, temperature: float = 1.0,
                  dtype=None, single_document_rows: bool = False, tail_samples: int = 0,
                  rows=None, seed: int = 0):
    """The teacher's top-k next-token distribution at every position (jittable).

    input_ids, segment_ids: [B, S]. Returns (ids [B, S, k] int32, most probable first;
    logprobs [B, S, k] float32; rest [B, S] float32 = log of the mass outside the top k, -inf
    when k = V), all from a float32 log-softmax of logits / temperature, as the online step sees
    them (same forward, same compute dtype). With tail_samples = m > 0 (k < V) also
    (tail_ids [B, S, m] int32, tail_logprobs [B, S, m] float32): see `sample_tail`, drawn with
    a key made from `seed` and each row's index `rows` [B] int32 in the training rows, so the
    draw does not depend on how rows are batched.
    """
    import jax
    import jax.numpy as jnp

    from distil_jax import models
    from distil_jax.objectives.losses import _top_k_mask

    kwargs = dict(segment_ids=segment_ids, single_document_rows=single_document_rows)
    if dtype is not None:
        kwargs["dtype"] = dtype
    # The forward of the train step's teacher: its stacked blocks as frozen_layers (not differentiated).
    logits = models.forward(config, models.frozen_layers(config, params), input_ids, **kwargs).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, k)
    if k == logp.shape[-1]:
        return top_ids, top_lp, jnp.full(logp.shape[:-1], -jnp.inf, jnp.float32)
    in_top = _top_k_mask(top_ids, logp.shape[-1])  # [B, S, V], shared by the rest and the draws
    rest = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, logp), axis=-1)
    if not tail_samples:
        return top_ids, top_lp, rest
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(seed), r))(rows)
    u = jax.vmap(lambda key: jax.random.uniform(key, logp.shape[1:2]))(keys)  # [B, S]
    tail_ids = sample_tail(logp, in_top, u, tail_samples)
    return top_ids, top_lp, rest, tail_ids, jnp.take_along_axis(logp, tail_ids, axis=-1)


def sample_tail(logp, in_top, u, m: int):
    """m tokens per position drawn from the distribution outside the top k, p(v) / p_rest.

    logp: [..., V] float32 log-probabilities; in_top: [..., V] bool, True on the top-k tokens
    (`losses._top_k_mask`); u: [...] uniform in [0, 1).
    Systematic sampling: the j-th draw is the token whose cumulative tail mass first exceeds
    (j + u) / m of the total (one uniform per position, m evenly spaced points). Each draw is
    marginally distributed as p(v) / p_rest, so an average over the m draws is an unbiased
    estimate of a tail mean, with less variance than m independent draws. Returns [..., m]
    int32 ids: never a top-k token when the tail has mass (their mass is zeroed before the
    cumulative sum); where it has none, the loss gives the draws weight 0.
    """
    import jax.numpy as jnp

    V = logp.shape[-1]
    p = jnp.where(in_top, 0.0, jnp.exp(logp))
    cdf = jnp.cumsum(p, axis=-1)
    total = cdf[..., -1:]
    points = (jnp.arange(m, dtype=jnp.float32) + u[..., None]) / m * total
    # Rounding must not put a point at or past the total (that would pick the last token, maybe
    # a top-k one): the largest float below the total.
    points = jnp.minimum(points, jnp.nextafter(total, 0.0))
    find = jnp.vectorize(lambda c, x: jnp.searchsorted(c, x, side="right"), signature="(v),(m)->(m)")
    return jnp.minimum(find(cdf, points), V - 1).astype(jnp.int32)


