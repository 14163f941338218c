"""distil_jax.objectives.layer_mappers: every named mapper's pairs, explicit pairs, errors."""

import numpy as np
import pytest

from distil_jax.objectives.layer_mappers import LAYER_MAPPERS, get_layer_mapper

# Expected pairs written out by hand from Distily's definitions for (6 student, 12 teacher) and (6, 6).
EXPECTED = {
    ("last", 6, 12): ((5, 11),),
    ("layer-2", 6, 12): ((4, 10),),
    ("layer-3", 6, 12): ((3, 9),),
    ("layer-4", 6, 12): ((2, 8),),
    ("last_k_2", 6, 12): ((4, 10), (5, 11)),
    ("last_k_3", 6, 12): ((3, 9), (4, 10), (5, 11)),
    ("last_k_4", 6, 12): ((2, 8), (3, 9), (4, 10), (5, 11)),
    # k = ceil(12 / 6) = 2: student i <-> teacher 2i and 2i + 1.
    ("uniform_cons", 6, 12): (
        (0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5),
        (3, 6), (3, 7), (4, 8), (4, 9), (5, 10), (5, 11),
    ),
    # student i <-> teacher 2i, and <-> teacher 11 (the (5, 10) / (5, 11) pair is not duplicated).
    ("uniform+last", 6, 12): (
        (0, 0), (0, 11), (1, 2), (1, 11), (2, 4), (2, 11),
        (3, 6), (3, 11), (4, 8), (4, 11), (5, 10), (5, 11),
    ),
    ("all", 6, 6): tuple((i, i) for i in range(6)),
    ("last", 6, 6): ((5, 5),),
    ("layer-2", 6, 6): ((4, 4),),
    ("layer-3", 6, 6): ((3, 3),),
    ("layer-4", 6, 6): ((2, 2),),
    ("last_k_2", 6, 6): ((4, 4), (5, 5)),
    ("last_k_3", 6, 6): ((3, 3), (4, 4), (5, 5)),
    ("last_k_4", 6, 6): ((2, 2), (3, 3), (4, 4), (5, 5)),
    ("uniform_cons", 6, 6): tuple((i, i) for i in range(6)),
    # (5, 5) appears twice (i*n_t//n_s and the last layer) and is kept once.
    ("uniform+last", 6, 6): (
        (0, 0), (0, 5), (1, 1), (1, 5), (2, 2), (2, 5), (3, 3), (3, 5), (4, 4), (4, 5), (5, 5),
    ),
}


def test_names():
    assert set(LAYER_MAPPERS) == {
        "all", "last", "layer-2", "layer-3", "layer-4", "last_k_2", "last_k_3", "last_k_4",
        "uniform_cons", "uniform+last",
    }
    assert {name for name, _, _ in EXPECTED} == set(LAYER_MAPPERS)


@pytest.mark.parametrize("name,n_s,n_t", sorted(EXPECTED))
def test_named_pairs(name, n_s, n_t):
    got = get_layer_mapper(name)(n_s, n_t)
    assert got == EXPECTED[name, n_s, n_t]
    assert isinstance(got, tuple) and all(type(s) is int and type(t) is int for s, t in got)


def test_uniform_cons_uneven_counts():
    # k = ceil(5 / 2) = 3: student 0 <-> 0, 1, 2; student 1 <-> 3, 4 (clipped at n_t).
    assert get_layer_mapper("uniform_cons")(2, 5) == ((0, 0), (0, 1), (0, 2), (1, 3), (1, 4))


def test_explicit_pairs():
    mapper = get_layer_mapper([(0, 0), (-1, -1), (2, -3), (np.int64(1), 5)])
    assert mapper(6, 12) == ((0, 0), (5, 11), (2, 9), (1, 5))
    assert get_layer_mapper(((4, 10),))(6, 12) == ((4, 10),)


def test_all_needs_equal_counts():
    with pytest.raises(ValueError, match=r"'all' needs equal layer counts, got student 6 and teacher 12"):
        get_layer_mapper("all")(6, 12)


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown layer_mapper 'layer-5'; valid: all, last, .*uniform\+last"):
        get_layer_mapper("layer-5")


@pytest.mark.parametrize(
    "spec,match",
    [
        ([], "empty"),
        ([(0, 1, 2)], r"\(student, teacher\) int pairs, got \(0, 1, 2\)"),
        ([(0.5, 1)], r"int pairs, got \(0.5, 1\)"),
        (["ab"], r"int pairs, got 'ab'"),
        (3, r"must be a name or a sequence .*valid names: all"),
    ],
)
def test_malformed_explicit(spec, match):
    with pytest.raises(ValueError, match=match):
        get_layer_mapper(spec)


@pytest.mark.parametrize("pair", [(6, 0), (0, 12), (-7, 0), (0, -13)])
def test_explicit_out_of_range(pair):
    mapper = get_layer_mapper([pair])
    with pytest.raises(ValueError, match=r"out of range for 6 student and 12 teacher layers"):
        mapper(6, 12)


def test_too_few_layers():
    with pytest.raises(ValueError, match=r"at least 4 student layer"):
        get_layer_mapper("last_k_4")(3, 12)
    with pytest.raises(ValueError, match=r"at least 2 teacher layer"):
        get_layer_mapper("layer-2")(6, 1)
