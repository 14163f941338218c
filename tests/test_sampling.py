"""Sampling filters against transformers' logits warpers, and draws against their distribution."""

import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import jax
import jax.numpy as jnp

from distil_jax import sampling


def _hf_filtered(logits, temperature, top_k, top_p):
    scores = torch.tensor(logits)
    for warper in ([TemperatureLogitsWarper(temperature)]
                   + ([TopKLogitsWarper(top_k)] if top_k else [])
                   + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])):
        scores = warper(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.8, 20, 0.5), (1.0, 1, 1.0), (2.0, 0, 0.05)])
def test_filters_keep_the_tokens_transformers_keeps(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 3, (4, 50)).astype(np.float32)
    ours = np.asarray(sampling.filter_logits(
        jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    theirs = _hf_filtered(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    kept = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


def test_greedy_is_the_argmax_and_needs_no_rng():
    logits = np.random.default_rng(1).normal(size=(3, 11)).astype(np.float32)
    np.testing.assert_array_equal(sampling.next_token(jnp.asarray(logits), None),
                                  logits.argmax(-1))


def test_draws_follow_the_filtered_distribution():
    """A chi-square goodness-of-fit over 40,000 draws (p > 1e-4; a wrong filter or temperature
    moves p to ~0), and no draw ever lands on a filtered-out token."""
    vocab, draws = 12, 40_000
    row = np.random.default_rng(2).normal(0, 1.5, vocab).astype(np.float32)
    settings = dict(temperature=0.8, top_k=8, top_p=0.9)
    tokens = np.asarray(jax.jit(lambda l, k: sampling.next_token(l, k, **settings))(
        jnp.tile(jnp.asarray(row), (draws, 1)), jax.random.key(0)))
    filtered = _hf_filtered(row[None], **settings)[0]
    probs = np.exp(filtered - filtered.max())
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    assert kept.sum() >= 3  # the test means something only if several tokens remain
    p_value = scipy.stats.chisquare(counts[kept], probs[kept] * draws).pvalue
    assert p_value > 1e-4, (counts, probs * draws)


def test_bad_settings_are_one_line_errors():
    for kwargs in (dict(temperature=-1.0, top_k=0, top_p=1.0), dict(temperature=1.0, top_k=-2,
                   top_p=1.0), dict(temperature=1.0, top_k=0, top_p=0.0)):
        with pytest.raises(ValueError, match="must be"):
            sampling.check_settings(**kwargs)
    with pytest.raises(ValueError, match="rng"):
        sampling.next_token(jnp.zeros((1, 4)), None, temperature=1.0)
