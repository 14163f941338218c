"""Layer mappers: which student layer is compared with which teacher layer.

This module owns Distily's named layer mappers and explicit user-given pairings. A mapper is
``fn(n_student, n_teacher) -> ((student_index, teacher_index), ...)``: non-negative indices into
the stacked per-layer features of each model (the caller passes ``n_layer + 1`` for hidden
states, which include the embedding output, and ``n_layer`` for attentions). A component's loss
is the mean of the loss over the pairs.

Names (Distily's): ``all``, ``last``, ``layer-2/3/4``, ``last_k_2/3/4``,
``uniform_cons``, ``uniform+last``. Distily's ``uniform_cons`` and ``uniform+last`` crash on
tuples; here they return plain pair tuples like the others.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

__all__ = ["LAYER_MAPPERS", "get_layer_mapper", "Pairs", "LayerMapper"]

Pairs = tuple[tuple[int, int], ...]
LayerMapper = Callable[[int, int], Pairs]


def _check_counts(n_student: int, n_teacher: int, need: int = 1) -> None:
    for side, n in (("student", n_student), ("teacher", n_teacher)):
        if isinstance(n, bool) or not isinstance(n, int) or n < need:
            raise ValueError(f"layer mapper needs at least {need} {side} layer(s), got {n!r}")


def _all(n_student: int, n_teacher: int) -> Pairs:
    """Every layer, one to one; the counts must be equal."""
    _check_counts(n_student, n_teacher)
    if n_student != n_teacher:
        raise ValueError(
            f"layer_mapper 'all' needs equal layer counts, got student {n_student} "
            f"and teacher {n_teacher}"
        )
    return tuple((i, i) for i in range(n_student))


def _last(n_student: int, n_teacher: int) -> Pairs:
    """Only the last layer of each model."""
    _check_counts(n_student, n_teacher)
    return ((n_student - 1, n_teacher - 1),)


def _layer_k(k: int) -> LayerMapper:
    """Only layer -k of each model (``layer-2`` with 6 and 12: student 4 <-> teacher 10)."""

    def mapper(n_student: int, n_teacher: int) -> Pairs:
        _check_counts(n_student, n_teacher, need=k)
        return ((n_student - k, n_teacher - k),)

    mapper.__name__ = f"layer_{k}"
    mapper.__doc__ = f"Only layer -{k} of each model."
    return mapper


def _last_k(k: int) -> LayerMapper:
    """The last k layers of each model, paired in order."""

    def mapper(n_student: int, n_teacher: int) -> Pairs:
        _check_counts(n_student, n_teacher, need=k)
        return tuple((n_student - k + i, n_teacher - k + i) for i in range(k))

    mapper.__name__ = f"last_k_{k}"
    mapper.__doc__ = f"The last {k} layers of each model, paired in order."
    return mapper


def _uniform_cons(n_student: int, n_teacher: int) -> Pairs:
    """Student layer i <-> each teacher layer in ``[k*i, min(k*(i+1), n_t))``, k = ceil(n_t/n_s).

    One pair per (student, teacher) combination, so a student layer mapped to several teacher
    layers contributes several terms to the mean.
    """
    _check_counts(n_student, n_teacher)
    k = math.ceil(n_teacher / n_student)
    return tuple(
        (i, j) for i in range(n_student) for j in range(k * i, min(k * (i + 1), n_teacher))
    )


def _uniform_plus_last(n_student: int, n_teacher: int) -> Pairs:
    """Student layer i <-> teacher layer ``i*n_t//n_s`` and <-> the teacher's last layer.

    Duplicate pairs are dropped, first occurrence kept.
    """
    _check_counts(n_student, n_teacher)
    pairs: list[tuple[int, int]] = []
    for i in range(n_student):
        for pair in ((i, i * n_teacher // n_student), (i, n_teacher - 1)):
            if pair not in pairs:
                pairs.append(pair)
    return tuple(pairs)


LAYER_MAPPERS: dict[str, LayerMapper] = {
    "all": _all,
    "last": _last,
    "layer-2": _layer_k(2),
    "layer-3": _layer_k(3),
    "layer-4": _layer_k(4),
    "last_k_2": _last_k(2),
    "last_k_3": _last_k(3),
    "last_k_4": _last_k(4),
    "uniform_cons": _uniform_cons,
    "uniform+last": _uniform_plus_last,
}


def _valid_names() -> str:
    return ", ".join(LAYER_MAPPERS)


def _is_int(x) -> bool:
    # bool is an int subclass, but True/False as a layer index is surely a mistake.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _explicit(pairs: Sequence[Sequence[int]]) -> LayerMapper:
    """A mapper returning fixed ``(student, teacher)`` pairs; negative indices count from the end."""
    if len(pairs) == 0:
        raise ValueError("explicit layer_mapper is empty; give at least one (student, teacher) pair")
    fixed: list[tuple[int, int]] = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2 or not all(_is_int(i) for i in pair):
            raise ValueError(
                f"explicit layer_mapper entries must be (student, teacher) int pairs, got {pair!r}"
            )
        fixed.append((int(pair[0]), int(pair[1])))

    def mapper(n_student: int, n_teacher: int) -> Pairs:
        _check_counts(n_student, n_teacher)
        out = []
        for s, t in fixed:
            if not (-n_student <= s < n_student and -n_teacher <= t < n_teacher):
                raise ValueError(
                    f"layer_mapper pair ({s}, {t}) is out of range for {n_student} student "
                    f"and {n_teacher} teacher layers"
                )
            out.append((s % n_student, t % n_teacher))
        return tuple(out)

    mapper.__name__ = "explicit"
    return mapper


def get_layer_mapper(spec: str | Sequence[Sequence[int]]) -> LayerMapper:
    """The layer mapper for ``spec``.

    Args:
      spec: one of the names in ``LAYER_MAPPERS``, or an explicit sequence of
        ``(student_index, teacher_index)`` int pairs (negative indices allowed).

    Returns ``fn(n_student, n_teacher) -> ((s, t), ...)`` with non-negative in-range indices.
    Raises ValueError for an unknown name or malformed pairs here, and for out-of-range
    indices when the returned function is called.
    """
    if isinstance(spec, str):
        if spec not in LAYER_MAPPERS:
            raise ValueError(f"unknown layer_mapper {spec!r}; valid: {_valid_names()}")
        return LAYER_MAPPERS[spec]
    if isinstance(spec, Sequence):
        return _explicit(spec)
    raise ValueError(
        f"layer_mapper must be a name or a sequence of (student, teacher) pairs, got {spec!r}; "
        f"valid names: {_valid_names()}"
    )
