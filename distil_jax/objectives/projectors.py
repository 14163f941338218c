"""Feature projectors of the distillation objective (Distily's ``projector`` option).

This module owns the trainable maps from the student's feature size (last axis) to the
teacher's, applied to the student side after layer mapping and before the norm:

* ``none``: identity (the sizes must already match).
* ``linear``: dense with bias.
* ``mlp`` / ``mlp_64`` / ``mlp_256``: dense -> ReLU -> dense, hidden 64 / 64 / 256.
* ``orthogonal``: a square trainable ``W [teacher_dim, teacher_dim]``;
  ``A = expm((W - W^T) / 2)`` is orthogonal (exponential of a skew-symmetric matrix), its first
  ``student_dim`` columns are kept and ``projected = x @ A[:, :student_dim]^T``. For attention
  maps the last axis is the key position, so the reference run's W is 1024 x 1024.

Dense weights follow torch ``nn.Linear``'s default init (kernel and bias
``U(-1/sqrt(in), 1/sqrt(in))``), stored flax-style as ``kernel [in, out]``. Parameters are dict
pytrees of float32 leaves, sized from the config rather than lazily from the first batch as in
Distily, so they are ordinary trainable, checkpointed parameters. Everything is computed in
float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

__all__ = ["PROJECTORS", "init_projector", "apply_projector", "orthogonal_matrix"]

# name -> hidden size of the MLP projectors.
_MLP_HIDDEN = {"mlp": 64, "mlp_64": 64, "mlp_256": 256}

PROJECTORS: tuple[str, ...] = ("none", "linear", "mlp", "mlp_64", "mlp_256", "orthogonal")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; valid: {', '.join(PROJECTORS)}")


def _check_dim(what: str, dim) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"projector {what} must be a positive int, got {dim!r}")


def _dense_init(rng: jax.Array, n_in: int, n_out: int) -> dict:
    """torch ``nn.Linear`` default init: kernel ``[in, out]`` and bias ``[out]`` ~ U(+-1/sqrt(in))."""
    bound = 1.0 / (n_in ** 0.5)
    k_kernel, k_bias = jax.random.split(rng)
    return {
        "kernel": jax.random.uniform(k_kernel, (n_in, n_out), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(k_bias, (n_out,), jnp.float32, -bound, bound),
    }


def _dense(params: Mapping, x: jax.Array) -> jax.Array:
    return x @ jnp.asarray(params["kernel"], jnp.float32) + jnp.asarray(params["bias"], jnp.float32)


def init_projector(name: str, rng: jax.Array, student_dim: int, teacher_dim: int) -> dict:
    """Initial parameters of projector ``name`` mapping ``student_dim`` to ``teacher_dim``.

    Returns ``{}`` for ``none``; ``{"kernel", "bias"}`` for ``linear``;
    ``{"dense1": ..., "dense2": ...}`` for the MLPs; ``{"weight": [teacher_dim, teacher_dim]}``
    for ``orthogonal``. All leaves float32.
    """
    _check_name(name)
    _check_dim("student_dim", student_dim)
    _check_dim("teacher_dim", teacher_dim)
    if name == "none":
        if student_dim != teacher_dim:
            raise ValueError(
                f"projector 'none' needs equal feature sizes, got student {student_dim} and "
                f"teacher {teacher_dim}; choose a projector such as 'linear' or 'orthogonal'"
            )
        return {}
    if name == "linear":
        return _dense_init(rng, student_dim, teacher_dim)
    if name in _MLP_HIDDEN:
        hidden = _MLP_HIDDEN[name]
        k1, k2 = jax.random.split(rng)
        return {
            "dense1": _dense_init(k1, student_dim, hidden),
            "dense2": _dense_init(k2, hidden, teacher_dim),
        }
    # orthogonal
    if student_dim > teacher_dim:
        raise ValueError(
            f"projector 'orthogonal' needs student_dim <= teacher_dim (it keeps the first "
            f"student_dim columns of a teacher_dim x teacher_dim orthogonal matrix), got "
            f"student {student_dim} and teacher {teacher_dim}"
        )
    bound = 1.0 / (teacher_dim ** 0.5)
    weight = jax.random.uniform(rng, (teacher_dim, teacher_dim), jnp.float32, -bound, bound)
    return {"weight": weight}


def orthogonal_matrix(params: Mapping, student_dim: int | None = None) -> jax.Array:
    """``A[:, :student_dim]`` with ``A = expm((W - W^T) / 2)``: ``[teacher_dim, student_dim]``.

    ``student_dim=None`` returns the whole square A. Computed in float32 at "highest" matmul
    precision: on GPUs the default float32 matmul may use TF32, which would make A visibly
    non-orthogonal. (The setting is read while tracing, so it holds under jit and grad.)
    """
    w = jnp.asarray(params["weight"], jnp.float32)
    with jax.default_matmul_precision("highest"):
        a = jax.scipy.linalg.expm((w - w.T) / 2.0)
    return a if student_dim is None else a[:, :student_dim]


def apply_projector(name: str, params: Mapping, x: jax.Array) -> jax.Array:
    """Project student features ``x [..., student_dim]`` to ``[..., teacher_dim]`` in float32.

    ``none`` returns ``x`` unchanged (not even upcast).
    """
    _check_name(name)
    if name == "none":
        return x
    x = jnp.asarray(x, jnp.float32)
    if name == "linear":
        return _dense(params, x)
    if name in _MLP_HIDDEN:
        return _dense(params["dense2"], jax.nn.relu(_dense(params["dense1"], x)))
    # orthogonal
    teacher_dim = params["weight"].shape[0]
    student_dim = x.shape[-1]
    if student_dim > teacher_dim:
        raise ValueError(
            f"projector 'orthogonal' got features of size {student_dim} but its matrix is "
            f"{teacher_dim} x {teacher_dim}"
        )
    return x @ orthogonal_matrix(params, student_dim).T
