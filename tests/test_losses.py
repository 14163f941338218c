"""distil_jax.objectives.losses against independent float64 NumPy formulas (the definitions in docs/design.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from distil_jax.objectives import losses
from distil_jax.objectives.losses import LOSSES, get_loss, masked_mean
from tests.np_reference import np_divergence_rows, np_log_softmax

# float32 computation vs a float64 reference: 1e-5 relative and absolute tolerance.
TOL = dict(rtol=1e-5, atol=1e-5)
SHAPE = (2, 5, 11)


# ----- float64 NumPy references, written from the definitions -----

def np_reduce(rows, mask):
    if mask is None:
        return rows.mean()
    return (rows * mask).sum() / max(mask.sum(), 1)


def np_loss(name, s, t, mask, beta=0.5):
    ps, pt = np.exp(np_log_softmax(s)), np.exp(np_log_softmax(t))
    s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
    rows = np_divergence_rows(name, ps, pt, beta)
    if rows is not None:
        return np_reduce(rows, mask)
    if name == "raw_mse":
        rows = ((s64 - t64) ** 2).mean(-1)
    elif name == "soft_mse":
        rows = ((ps - pt) ** 2).mean(-1)
    elif name == "cos":
        rows = 1 - (s64 * t64).sum(-1) / (
            np.maximum(np.linalg.norm(s64, axis=-1), 1e-8)
            * np.maximum(np.linalg.norm(t64, axis=-1), 1e-8)
        )
    else:
        raise AssertionError(name)
    return np_reduce(rows, mask)


PAIR_LOSSES = ["kl", "reverse_kl", "cakld", "jsd", "raw_mse", "soft_mse", "cos", "ce"]


def make_inputs(seed=0, shape=SHAPE, scale=3.0):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal(shape) * scale).astype(np.float32)
    t = (rng.standard_normal(shape) * scale).astype(np.float32)
    mask = rng.random(shape[:-1]) < 0.6
    mask[0, 0] = True  # at least one selected position
    return s, t, mask


def test_registry_names():
    assert set(LOSSES) == set(PAIR_LOSSES) | {"clm"}
    for name in LOSSES:
        assert get_loss(name) is LOSSES[name]


def test_unknown_loss_message():
    with pytest.raises(ValueError, match=r"unknown loss_fn 'foo'; valid: .*cakld.*clm.*jsd"):
        get_loss("foo")


@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("use_mask", [True, False])
def test_matches_numpy(name, use_mask):
    s, t, mask = make_inputs()
    mask = mask if use_mask else None
    got = get_loss(name)(jnp.asarray(s), jnp.asarray(t), None if mask is None else jnp.asarray(mask))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), np_loss(name, s, t, mask), **TOL)


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.9, 1.0])
@pytest.mark.parametrize("name", ["cakld", "jsd"])
def test_beta(name, beta):
    s, t, mask = make_inputs(1)
    got = get_loss(name)(s, t, mask, beta=beta)
    np.testing.assert_allclose(float(got), np_loss(name, s, t, mask, beta), **TOL)


def test_beta_out_of_range():
    s, t, mask = make_inputs()
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        losses.jsd(s, t, mask, beta=1.5)


def test_bf16_inputs_are_upcast():
    s, t, mask = make_inputs(2)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    got = losses.kl(s16, t16, mask)
    assert got.dtype == jnp.float32
    # Reference on the bf16-rounded values: only the inputs are rounded, not the arithmetic.
    ref = np_loss("kl", np.asarray(s16, np.float32), np.asarray(t16, np.float32), mask)
    np.testing.assert_allclose(float(got), ref, **TOL)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "cakld", "jsd"])
def test_divergence_of_identical_inputs_is_zero(name):
    s, _, mask = make_inputs(3)
    assert abs(float(get_loss(name)(s, s, mask))) < 1e-6


def test_jsd_bounds_on_extreme_inputs():
    v = 11
    # Disjoint one-hot-like distributions: JSD -> ln 2 (its maximum at beta = 0.5).
    t = np.full((3, v), -1e9, np.float32)
    s = np.full((3, v), -1e9, np.float32)
    t[:, 0] = 0.0
    s[:, 1] = 0.0
    got = float(losses.jsd(s, t, None))
    assert 0.0 <= got <= np.log(2) + 1e-6
    np.testing.assert_allclose(got, np.log(2), **TOL)
    # Very peaked but overlapping, huge logits: still within [0, ln 2].
    rng = np.random.default_rng(4)
    s, t = (rng.standard_normal((2, 5, v)) * 1e4).astype(np.float32), (
        rng.standard_normal((2, 5, v)) * 1e4
    ).astype(np.float32)
    got = float(losses.jsd(s, t, None))
    assert 0.0 <= got <= np.log(2) + 1e-6


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_masked_positions_do_not_matter(name):
    s, t, mask = make_inputs(5)
    base = float(get_loss(name)(s, t, mask))
    rng = np.random.default_rng(6)
    s2, t2 = s.copy(), t.copy()
    s2[~mask] = rng.standard_normal(s2[~mask].shape) * 1e6
    t2[~mask] = np.nan  # even NaN in a masked-out position must not leak
    assert float(get_loss(name)(s2, t2, mask)) == base


@pytest.mark.parametrize("name", PAIR_LOSSES + ["clm"])
def test_fully_masked_is_zero(name):
    s, t, mask = make_inputs()
    other = np.zeros(mask.shape, np.int32) if name == "clm" else t
    got = float(get_loss(name)(s, other, np.zeros_like(mask)))
    assert got == 0.0


def test_raw_mse_matches_torch():
    s, t, _ = make_inputs(7, shape=(2, 3, 4, 6))
    ref = torch.nn.functional.mse_loss(torch.from_numpy(s), torch.from_numpy(t), reduction="mean")
    full = np.ones(s.shape[:-1], bool)
    np.testing.assert_allclose(float(losses.raw_mse(s, t, full)), ref.item(), **TOL)
    np.testing.assert_allclose(float(losses.raw_mse(s, t, None)), ref.item(), **TOL)


def test_cos_matches_torch_including_tiny_vectors():
    s, t, _ = make_inputs(8)
    s[0, 0] = 1e-9  # norm below eps: torch clamps each norm separately
    t[0, 0] = 1e-9
    ref = 1 - torch.nn.functional.cosine_similarity(
        torch.from_numpy(s), torch.from_numpy(t), dim=-1, eps=1e-8
    )
    np.testing.assert_allclose(float(losses.cos(s, t, None)), ref.mean().item(), **TOL)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_gradients_finite_with_zero_probabilities(name):
    s, t, mask = make_inputs(9)
    # Zero probabilities (-1e9 logits) on both sides, in shared (entry 2) and disjoint entries.
    s[..., :3] = -1e9
    t[..., 2:5] = -1e9
    if name not in ("raw_mse", "cos"):  # logits losses: exact -inf where both sides are zero
        s[0, 0, :2] = -np.inf
        t[0, 0, :2] = -np.inf
    fn = get_loss(name)
    value, (g_s, g_t) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t), mask)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(g_s)))
    assert np.all(np.isfinite(np.asarray(g_t)))


def test_clm_matches_numpy():
    s, _, mask = make_inputs(10)
    rng = np.random.default_rng(11)
    labels = rng.integers(0, SHAPE[-1], SHAPE[:-1]).astype(np.int32)
    picked = np.take_along_axis(np_log_softmax(s), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(losses.clm(s, labels, mask)), np_reduce(-picked, mask), **TOL)
    np.testing.assert_allclose(float(losses.clm(s, labels, None)), -picked.mean(), **TOL)
    # Ignore-index labels at masked positions change nothing.
    labels2 = np.where(mask, labels, -100)
    assert float(losses.clm(s, labels2, mask)) == float(losses.clm(s, labels, mask))


def test_masked_mean():
    v = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = np.array([[True, False, True], [False, False, True]])
    assert float(masked_mean(v, m)) == pytest.approx((0 + 2 + 5) / 3)
    assert float(masked_mean(v, None)) == pytest.approx(2.5)
    assert float(masked_mean(v, np.zeros_like(m))) == 0.0
    # A mask that broadcasts (one flag per row).
    assert float(masked_mean(v, np.array([[True], [False]]))) == pytest.approx(1.0)


def np_grad(fn, x, eps=1e-6):
    """Central finite differences of a float64 scalar function, entry by entry."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += eps
        lo[i] -= eps
        g[i] = (fn(hi) - fn(lo)) / (2 * eps)
    return g


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_gradients_match_numpy_finite_differences(name):
    # kl / reverse_kl / cakld have a hand-written backward pass (_kl_logit_rows): it, and every
    # autodiff'ed loss, must match float64 finite differences of the NumPy definition, for the
    # student's and the teacher's argument, masked positions included (their gradient is 0).
    s, t, mask = make_inputs(10, shape=(2, 3, 7), scale=2.0)
    g_s, g_t = jax.grad(get_loss(name), argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t), mask)
    ref_s = np_grad(lambda x: np_loss(name, x, t, mask), s)
    ref_t = np_grad(lambda x: np_loss(name, s, x, mask), t)
    np.testing.assert_allclose(np.asarray(g_s), ref_s, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_t), ref_t, rtol=1e-4, atol=1e-6)
