"""distil_jax.objectives.norms and .projectors: shapes, init, orthogonality, trainability."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distil_jax.objectives.norms import NORMS, apply_norm, init_norm
from distil_jax.objectives.projectors import (
    PROJECTORS,
    apply_projector,
    init_projector,
    orthogonal_matrix,
)

ORTHO_TOL = 1e-5  # |A^T A - I| in float32, spec: orthogonal within 1e-5
RNG = jax.random.PRNGKey(0)


def features(shape, seed=0, scale=3.0, offset=1.5):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype(np.float32)


# ----- norms -----

def test_norm_names():
    assert set(NORMS) == {
        "none", "layernorm", "layernorm_teacher_only", "layernorm_affine",
        "layernorm_teacher_only_affine",
    }


def test_norm_params_structure():
    assert init_norm("none", 8) == {}
    assert init_norm("layernorm", 8) == {}
    assert init_norm("layernorm_teacher_only", 8) == {}
    p = init_norm("layernorm_teacher_only_affine", 8)
    assert set(p) == {"teacher"} and set(p["teacher"]) == {"scale", "bias"}
    p = init_norm("layernorm_affine", 8)
    assert set(p) == {"student", "teacher"}
    for leaf in jax.tree_util.tree_leaves(p):
        assert leaf.shape == (8,) and leaf.dtype == jnp.float32
    np.testing.assert_array_equal(p["student"]["scale"], np.ones(8))
    np.testing.assert_array_equal(p["student"]["bias"], np.zeros(8))


def test_layernorm_rows_standardized():
    s, t = features((2, 3, 16), 0), features((2, 3, 16), 1)
    ns, nt = apply_norm("layernorm", {}, s, t)
    assert ns.dtype == nt.dtype == jnp.float32
    for y, x in ((ns, s), (nt, t)):
        y64 = np.asarray(y, np.float64)
        np.testing.assert_allclose(y64.mean(-1), 0.0, atol=1e-5)
        # Biased variance with eps 1e-5: var(y) = var(x) / (var(x) + eps).
        var = x.astype(np.float64).var(-1)
        np.testing.assert_allclose(y64.var(-1), var / (var + 1e-5), rtol=1e-5)


def test_which_side_is_normalized():
    s, t = features((4, 16), 2), features((4, 16), 3)
    ref_s, ref_t = apply_norm("layernorm", {}, s, t)
    for name in NORMS:
        ns, nt = apply_norm(name, init_norm(name, 16), s, t)
        student_side = name in ("layernorm", "layernorm_affine")
        teacher_side = name != "none"
        # Affine at init (scale 1, bias 0) is identity-equivalent to the plain LayerNorm.
        np.testing.assert_allclose(ns, ref_s if student_side else s, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(nt, ref_t if teacher_side else t, rtol=1e-6, atol=1e-6)


def test_gradient_reaches_teacher_affine():
    s, t = jnp.asarray(features((3, 8), 4)), jnp.asarray(features((3, 8), 5))
    params = init_norm("layernorm_teacher_only_affine", 8)

    def loss(p):
        ns, nt = apply_norm("layernorm_teacher_only_affine", p, s, jax.lax.stop_gradient(t))
        return jnp.mean((ns - nt) ** 2)

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["teacher"]["scale"]).sum()) > 0
    assert float(jnp.abs(grads["teacher"]["bias"]).sum()) > 0


def test_norm_errors():
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'; valid: none, layernorm, "):
        init_norm("batchnorm", 8)
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'"):
        apply_norm("batchnorm", {}, np.zeros((2, 8)), np.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"expects params with keys \['student', 'teacher'\]"):
        apply_norm("layernorm_affine", {}, np.zeros((2, 8)), np.zeros((2, 8)))


# ----- projectors -----

def test_projector_names():
    assert set(PROJECTORS) == {"none", "linear", "mlp", "mlp_64", "mlp_256", "orthogonal"}


@pytest.mark.parametrize("name", PROJECTORS)
def test_projector_shapes(name):
    s_dim, t_dim = (6, 6) if name == "none" else (6, 10)
    params = init_projector(name, RNG, s_dim, t_dim)
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == jnp.float32
    x = features((2, 3, s_dim))
    y = apply_projector(name, params, x)
    assert y.shape == (2, 3, t_dim)


def test_dense_init_bounds_and_hidden_sizes():
    p = init_projector("linear", RNG, 16, 10)
    assert p["kernel"].shape == (16, 10) and p["bias"].shape == (10,)
    for leaf in (p["kernel"], p["bias"]):
        assert float(jnp.abs(leaf).max()) <= 1 / 4 and float(jnp.abs(leaf).max()) > 0.15
    assert init_projector("mlp", RNG, 16, 10)["dense1"]["kernel"].shape == (16, 64)
    assert init_projector("mlp_64", RNG, 16, 10)["dense2"]["kernel"].shape == (64, 10)
    p = init_projector("mlp_256", RNG, 16, 10)
    assert p["dense1"]["kernel"].shape == (16, 256)
    # Second layer's bound uses its own fan-in (256).
    assert float(jnp.abs(p["dense2"]["kernel"]).max()) <= 1 / 16


def test_linear_and_mlp_formulas():
    x = features((5, 4))
    p = init_projector("linear", RNG, 4, 3)
    np.testing.assert_allclose(
        apply_projector("linear", p, x), x @ np.asarray(p["kernel"]) + np.asarray(p["bias"]),
        rtol=1e-5, atol=1e-5,
    )
    p = init_projector("mlp", RNG, 4, 3)
    h = np.maximum(x @ np.asarray(p["dense1"]["kernel"]) + np.asarray(p["dense1"]["bias"]), 0)
    ref = h @ np.asarray(p["dense2"]["kernel"]) + np.asarray(p["dense2"]["bias"])
    np.testing.assert_allclose(apply_projector("mlp", p, x), ref, rtol=1e-5, atol=1e-5)


def assert_orthonormal_columns(a):
    a = np.asarray(a, np.float64)
    np.testing.assert_allclose(a.T @ a, np.eye(a.shape[1]), atol=ORTHO_TOL)


def test_orthogonal_init_and_formula():
    params = init_projector("orthogonal", RNG, 5, 12)
    w = np.asarray(params["weight"])
    assert w.shape == (12, 12) and np.abs(w).max() <= 1 / np.sqrt(12)
    a = orthogonal_matrix(params, 5)
    assert a.shape == (12, 5)
    assert_orthonormal_columns(a)
    assert_orthonormal_columns(orthogonal_matrix(params))  # the full square A
    x = features((2, 3, 5))
    np.testing.assert_allclose(
        apply_projector("orthogonal", params, x), x @ np.asarray(a).T, rtol=1e-5, atol=1e-5
    )
    # An orthogonal projection preserves norms.
    np.testing.assert_allclose(
        np.linalg.norm(apply_projector("orthogonal", params, x), axis=-1),
        np.linalg.norm(x, axis=-1), rtol=1e-5,
    )


def test_orthogonal_stays_orthogonal_under_adam():
    s_dim, t_dim = 5, 12
    params = init_projector("orthogonal", RNG, s_dim, t_dim)
    x = jnp.asarray(features((32, s_dim), 6))
    target = jnp.asarray(features((32, t_dim), 7))

    def loss(p):
        return jnp.mean((apply_projector("orthogonal", p, x) - target) ** 2)

    opt = optax.adam(0.05)
    state = opt.init(params)

    @jax.jit
    def step(p, st):
        value, g = jax.value_and_grad(loss)(p)
        updates, st = opt.update(g, st, p)
        return optax.apply_updates(p, updates), st, value

    first = None
    for _ in range(5):
        params, state, value = step(params, state)
        first = float(value) if first is None else first
    assert float(loss(params)) < first  # it trains...
    assert_orthonormal_columns(orthogonal_matrix(params, s_dim))  # ...and stays orthogonal


def test_projector_errors():
    with pytest.raises(ValueError, match=r"unknown projector 'conv'; valid: none, linear, mlp"):
        init_projector("conv", RNG, 4, 4)
    with pytest.raises(ValueError, match=r"unknown projector 'conv'"):
        apply_projector("conv", {}, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"'none' needs equal feature sizes, got student 4 and teacher 8"):
        init_projector("none", RNG, 4, 8)
    with pytest.raises(ValueError, match=r"'orthogonal' needs student_dim <= teacher_dim.*student 8 and teacher 4"):
        init_projector("orthogonal", RNG, 8, 4)
    with pytest.raises(ValueError, match=r"student_dim must be a positive int, got 0"):
        init_projector("linear", RNG, 0, 4)
