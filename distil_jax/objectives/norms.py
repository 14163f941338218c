"""Feature norms of the distillation objective (Distily's ``norm`` option).

This module owns the LayerNorm variants applied, over the last axis, to the (projected) student
features and the teacher features just before the loss, and their trainable parameters:

* ``none``: identity.
* ``layernorm``: LayerNorm on both sides, no affine.
* ``layernorm_teacher_only``: LayerNorm on the teacher side only, no affine.
* ``layernorm_affine``: both sides, each with its own trainable scale (init 1) and bias (init 0).
* ``layernorm_teacher_only_affine``: teacher side only, trainable (the reference run's choice,
  applied to the attention rows).

The parameters are ordinary trainable leaves (a dict pytree, float32) optimized with the
student. The teacher features arrive already ``stop_gradient``-ed; the teacher-side scale and
bias still get gradients because they are applied after that. eps = 1e-5 (torch's default);
everything is computed in float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

__all__ = ["NORMS", "LAYERNORM_EPS", "init_norm", "apply_norm", "layer_norm"]

LAYERNORM_EPS = 1e-5

# name -> (normalize the student side?, normalize the teacher side?, trainable affine?)
_SPECS: dict[str, tuple[bool, bool, bool]] = {
    "none": (False, False, False),
    "layernorm": (True, True, False),
    "layernorm_teacher_only": (False, True, False),
    "layernorm_affine": (True, True, True),
    "layernorm_teacher_only_affine": (False, True, True),
}

NORMS: tuple[str, ...] = tuple(_SPECS)


def _spec(name: str) -> tuple[bool, bool, bool]:
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown norm {name!r}; valid: {', '.join(NORMS)}") from None


def layer_norm(x: jax.Array, affine: dict | None = None, eps: float = LAYERNORM_EPS) -> jax.Array:
    """LayerNorm over the last axis in float32: ``[..., F] -> [..., F]``.

    Biased variance, like torch. ``affine`` is ``{"scale": [F], "bias": [F]}`` or None.
    """
    x = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if affine is not None:
        y = y * jnp.asarray(affine["scale"], jnp.float32) + jnp.asarray(affine["bias"], jnp.float32)
    return y


def init_norm(name: str, feature_dim: int) -> dict:
    """Initial parameters of norm ``name`` for features of size ``feature_dim``.

    Returns ``{}`` without affine; ``{"teacher": {"scale": [F], "bias": [F]}}`` for
    ``layernorm_teacher_only_affine``; ``{"student": {...}, "teacher": {...}}`` for
    ``layernorm_affine``. Scale starts at 1 and bias at 0 (identity affine), float32.
    """
    do_student, do_teacher, affine = _spec(name)
    if not affine:
        return {}
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
        raise ValueError(f"norm {name!r} needs a positive int feature_dim, got {feature_dim!r}")

    def ones_zeros() -> dict:
        return {
            "scale": jnp.ones((feature_dim,), jnp.float32),
            "bias": jnp.zeros((feature_dim,), jnp.float32),
        }

    params = {}
    if do_student:
        params["student"] = ones_zeros()
    if do_teacher:
        params["teacher"] = ones_zeros()
    return params


def apply_norm(
    name: str, params: dict, student: jax.Array, teacher: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Apply norm ``name`` to ``student [..., F]`` and ``teacher [..., F]``.

    Returns both in float32 (a side that is not normalized is only upcast). ``params`` is what
    :func:`init_norm` returned (possibly after optimizer updates).
    """
    do_student, do_teacher, affine = _spec(name)
    student = jnp.asarray(student, jnp.float32)
    teacher = jnp.asarray(teacher, jnp.float32)
    if affine:
        expected = {"student", "teacher"} if do_student else {"teacher"}
        if not isinstance(params, Mapping) or set(params) != expected:
            got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(f"norm {name!r} expects params with keys {sorted(expected)}, got {got}")
    if do_student:
        student = layer_norm(student, params["student"] if affine else None)
    if do_teacher:
        teacher = layer_norm(teacher, params["teacher"] if affine else None)
    return student, teacher
