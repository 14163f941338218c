"""distil_jax.models, the one model interface: the registry, its errors, the shared shape check,
and the rule that nothing outside models/ knows an architecture."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax import models, student as student_lib
from tests import tiny_setup as T

PACKAGE = Path(__file__).resolve().parents[1] / "distil_jax"


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert': distil_jax supports gpt2"):
        models.config_from_hf({"model_type": "bert"})
    with pytest.raises(ValueError, match="unsupported model_type None"):
        models.config_from_hf({})


def test_registry_dispatches_on_model_type():
    tc = T.TEACHER_CONFIG
    assert models.family(tc) is models.family("gpt2")
    assert models.config_from_hf(models.config_to_hf(tc)) == tc
    n = models.param_count(tc)
    stored = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(models.param_shapes(tc)))
    # HF's count: the tied embedding's padded rows (common.VOCAB_MULTIPLE) are not parameters.
    assert n == stored - (tc.padded_vocab_size - tc.vocab_size) * tc.width


def test_lm_head_is_the_tied_embedding_or_the_separate_head():
    tc, tp = T.teacher()
    V = tc.vocab_size  # the real rows of the stored (padded) vocabulary
    assert tp["wte"]["embedding"].shape == (tc.padded_vocab_size, tc.width)
    np.testing.assert_array_equal(models.lm_head(tc, tp), np.asarray(tp["wte"]["embedding"])[:V].T)
    new = models.with_lm_head(tc, tp, jnp.ones((tc.width, V)))
    assert new["wte"]["embedding"].shape == (tc.padded_vocab_size, tc.width)
    assert float(new["wte"]["embedding"].sum()) == tc.width * V  # the padded rows are zero
    untied = tc.replace(tie_word_embeddings=False)
    up = models.init_params(untied, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(models.lm_head(untied, up), up["lm_head"]["kernel"][:, :V])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_logits_gradients_equal_autodiff_of_the_plain_product(dtype):
    # head_logits' custom VJP only reorders the two gradient matmuls for the CPU backend's
    # layouts; jax's own autodiff of the float32-accumulating product is the reference. The
    # same products summed in another order: equal to float32 rounding (|x| <= 10 here).
    from distil_jax.models.common import head_logits

    def plain(h, w):
        return jnp.matmul(h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    h = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16)).astype(dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), (16, 40)) * 0.3
    ct = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 40))
    (y, vjp), (y_ref, vjp_ref) = jax.vjp(head_logits, h, w), jax.vjp(plain, h, w)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, y_ref)
    for got, want in zip(vjp(ct), vjp_ref(ct)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=1e-6, atol=1e-5)


def test_shape_problems_names_every_difference():
    want = {"a": {"k": jnp.zeros((2, 3))}, "b": jnp.zeros(4)}
    assert models.shape_problems(want, want) == []
    got = {"a": {"k": jnp.zeros((3, 2))}, "c": jnp.zeros(1)}
    assert models.shape_problems(want, got) == ["a/k: (3, 2), expected (2, 3)", "missing b", "unexpected c"]


def test_no_architecture_outside_models():
    """Only distil_jax/models/ imports a family module or tests for a family's config class."""
    offenders = []
    for f in PACKAGE.rglob("*.py"):
        if "models" in f.relative_to(PACKAGE).parts[:1]:
            continue
        text = f.read_text()
        if re.search(r"models\.(gpt2|llama)|models import .*(gpt2|llama)|GPT2Config|llama\.Config", text):
            offenders.append(str(f.relative_to(PACKAGE)))
    assert offenders == []


@pytest.mark.parametrize("n_student,n_teacher,expected", [
    (6, 12, [0, 2, 4, 7, 9, 11]),  # the distilgpt2 recipe
    (2, 4, [0, 3]),
    (1, 4, [3]),
    (4, 4, [0, 1, 2, 3]),
])
def test_uniform_layers(n_student, n_teacher, expected):
    assert student_lib.uniform_layers(n_student, n_teacher) == expected


def test_uniform_init_copies_evenly_spaced_teacher_blocks():
    tc, tp = T.teacher()
    _, sp, _ = T.student(tc, tp, init_from_teacher_layers="uniform")
    for i, j in enumerate([0, 3]):
        for a, b in zip(jax.tree_util.tree_leaves(sp["h"]), jax.tree_util.tree_leaves(tp["h"])):
            np.testing.assert_array_equal(a[i], b[j])
    with pytest.raises(ValueError, match="more than the teacher's 4"):
        T.student(tc, tp, overrides={"n_layer": 5}, init_from_teacher_layers="uniform")
    with pytest.raises(ValueError, match="use 'uniform' or a list"):
        T.student(tc, tp, init_from_teacher_layers="evenly")


def test_gpt2_accepts_hf_generic_names_in_overrides():
    """`student.overrides = {"num_hidden_layers": k}` serves every family (HF's attribute_map)."""
    tc = T.TEACHER_CONFIG
    assert tc.replace(num_hidden_layers=2, hidden_size=16) == tc.replace(n_layer=2, n_embd=16)
    with pytest.raises(ValueError, match=r"unknown GPT-2 config field\(s\) \['num_layers'\]"):
        tc.replace(num_layers=2)
