"""distil_jax.student: the student's config (teacher + overrides, config path, pretrained path),
its initial weights (HF init, copied / frozen teacher modules, blocks from teacher blocks), errors.

Copies are checked bitwise; init statistics within 5% (about 5 standard errors of the estimate).
"""

import jax
import numpy as np
import pytest
import transformers

from distil_jax import models
from distil_jax import student as student_lib
from tests import hf_utils
from tests import tiny_setup as T

RNG = jax.random.PRNGKey(7)


@pytest.fixture(scope="module")
def teacher():
    return T.teacher()


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _h(params):
    """The GPT-2 blocks in HF's per-layer view ({"0": block 0, ...}): slices of the stacked `h`."""
    n = jax.tree_util.tree_leaves(params["h"])[0].shape[0]
    return {str(i): jax.tree_util.tree_map(lambda x, i=i: x[i], params["h"]) for i in range(n)}


def _all_true(tree):
    return all(jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- config


def test_config_from_teacher_with_overrides(teacher):
    tc, _ = teacher
    s_cfg = student_lib.student_config(tc, {"overrides": {"n_layer": 2, "n_embd": 16}})
    assert s_cfg == tc.replace(n_layer=2, n_embd=16)
    assert student_lib.student_config(tc, {}) == tc
    with pytest.raises(ValueError, match="n_layers"):
        student_lib.student_config(tc, {"overrides": {"n_layers": 2}})


def test_vocab_is_forced_to_the_teachers(teacher, tmp_path):
    tc, _ = teacher
    assert student_lib.student_config(tc, {"overrides": {"vocab_size": 50}}).vocab_size == T.VOCAB
    transformers.GPT2Config(n_layer=3, n_embd=24, n_head=4, vocab_size=50, n_positions=32).save_pretrained(tmp_path)
    s_cfg = student_lib.student_config(tc, {"config_name_or_path": str(tmp_path)})
    assert (s_cfg.n_layer, s_cfg.n_embd, s_cfg.n_head, s_cfg.n_positions, s_cfg.vocab_size) == (3, 24, 4, 32, T.VOCAB)
    # A pretrained student keeps its embedding, so its vocabulary cannot be forced: refused.
    with pytest.raises(ValueError, match="vocab_size 50 differs from the teacher's 101: .* or "
                                         "student.model_name_or_path='' for a random student"):
        student_lib.student_config(tc, {"model_name_or_path": str(tmp_path)})


def test_student_from_config_path(teacher, tmp_path):
    tc, tp = teacher
    transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=T.VOCAB, n_positions=32,
                            n_inner=64).save_pretrained(tmp_path)
    s_cfg, sp, trainable = student_lib.build_student(
        tc, tp, {"config_name_or_path": str(tmp_path), "overrides": {"n_layer": 2}}, RNG)
    assert (s_cfg.n_layer, s_cfg.n_embd, s_cfg.inner_dim) == (2, 32, 64)
    assert sorted(_h(sp)) == ["0", "1"] and _h(sp)["0"]["mlp"]["c_fc"]["kernel"].shape == (32, 64)
    # Default copy_teacher_modules: the (tied) LM head, i.e. the token embedding, trainable.
    assert np.array_equal(sp["wte"]["embedding"], tp["wte"]["embedding"])
    assert _all_true(trainable)
    # A narrower config cannot receive the teacher's head: a clear error.
    transformers.GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=T.VOCAB,
                            n_positions=32).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match="lm_head.*shapes differ"):
        student_lib.build_student(tc, tp, {"config_name_or_path": str(tmp_path / "narrow")}, RNG)


def test_student_from_pretrained_path_loads_weights(teacher, tmp_path):
    tc, tp = teacher
    hf_model = hf_utils.save_tiny(tmp_path, seed=3, vocab_size=T.VOCAB, n_layer=2, n_embd=32,
                                  n_head=4, n_positions=32)
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    s_cfg, sp, _ = student_lib.build_student(tc, tp, {"model_name_or_path": str(tmp_path),
                                                   "copy_teacher_modules": []}, RNG)
    assert s_cfg.n_layer == 2
    np.testing.assert_array_equal(sp["wte"]["embedding"][:T.VOCAB], sd["transformer.wte.weight"])
    # HF's per-layer view (the fused c_attn back to HF's [D, 3D]) holds HF's tensor.
    hf_view = models.unstack_layers(s_cfg, sp)["h"]
    np.testing.assert_array_equal(hf_view["1"]["attn"]["c_attn"]["kernel"], sd["transformer.h.1.attn.c_attn.weight"])
    np.testing.assert_array_equal(hf_view["1"]["attn"]["c_attn"]["bias"], sd["transformer.h.1.attn.c_attn.bias"])
    np.testing.assert_array_equal(_h(sp)["0"]["ln_2"]["bias"], sd["transformer.h.0.ln_2.bias"])
    np.testing.assert_array_equal(sp["ln_f"]["scale"], sd["transformer.ln_f.weight"])
    # With the default copy_teacher_modules the embedding is the teacher's, the blocks stay loaded.
    _, sp2, _ = student_lib.build_student(tc, tp, {"model_name_or_path": str(tmp_path)}, RNG)
    assert np.array_equal(sp2["wte"]["embedding"], tp["wte"]["embedding"])
    assert _leaves_equal(sp2["h"], sp["h"])
    # Overrides that do not change the shapes are fine; ones that do would leave weights unused.
    sc3, sp3, _ = student_lib.build_student(tc, tp, {"model_name_or_path": str(tmp_path),
                                                     "overrides": {"resid_pdrop": 0.0}}, RNG)
    assert sc3.resid_pdrop == 0.0 and _leaves_equal(sp3["h"], sp["h"])
    with pytest.raises(ValueError, match="n_layer.*architecture"):
        student_lib.build_student(tc, tp, {"model_name_or_path": str(tmp_path),
                                           "overrides": {"n_layer": 1}}, RNG)
    # A pretrained student with another vocabulary cannot be distilled into.
    hf_utils.save_tiny(tmp_path / "v50", vocab_size=50, n_layer=2, n_embd=32, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        student_lib.build_student(tc, tp, {"model_name_or_path": str(tmp_path / "v50")}, RNG)


# ----------------------------------------------------------------------------- copied modules


def test_copy_lm_head_frozen_and_other_modules(teacher):
    tc, tp = teacher
    s_cfg, sp, trainable = T.student(tc, tp, copy_teacher_modules=[("lm_head", True),
                                                                ("transformer.h.1.mlp", False),
                                                                ("ln_f", True)])
    assert np.array_equal(sp["wte"]["embedding"], tp["wte"]["embedding"])
    assert sp["wte"]["embedding"] is not tp["wte"]["embedding"]
    assert _leaves_equal(_h(sp)["1"]["mlp"], _h(tp)["1"]["mlp"])
    assert _leaves_equal(sp["ln_f"], tp["ln_f"])
    assert not _leaves_equal(_h(sp)["1"]["attn"], _h(tp)["1"]["attn"])  # not copied
    assert not _leaves_equal(_h(sp)["0"]["mlp"], _h(tp)["0"]["mlp"])  # only slice 1 was copied
    # Frozen: exactly the wte and ln_f leaves are False.
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    frozen = sorted(k for k, v in flat.items() if not v)
    assert frozen == ["['ln_f']['bias']", "['ln_f']['scale']", "['wte']['embedding']"]
    assert jax.tree_util.tree_structure(trainable) == jax.tree_util.tree_structure(sp)


def test_copy_lm_head_into_untied_student(teacher):
    tc, tp = teacher
    s_cfg, sp, trainable = T.student(tc, tp, overrides={"n_layer": 2, "tie_word_embeddings": False},
                                  copy_teacher_modules=[("lm_head", True)])
    np.testing.assert_array_equal(models.lm_head(s_cfg, sp), np.asarray(tp["wte"]["embedding"])[:tc.vocab_size].T)
    assert trainable["lm_head"]["kernel"] is False and trainable["wte"]["embedding"] is True


def test_init_from_teacher_layers_copies_blocks(teacher):
    tc, tp = teacher
    _, sp, trainable = T.student(tc, tp, init_from_teacher_layers=[0, -1])
    assert _leaves_equal(_h(sp)["0"], _h(tp)["0"])
    assert _leaves_equal(_h(sp)["1"], _h(tp)["3"])
    assert _all_true(trainable)


def test_errors_bad_module_and_wrong_layer_count(teacher):
    tc, tp = teacher
    with pytest.raises(ValueError, match="h.0.atn"):
        T.student(tc, tp, copy_teacher_modules=[("transformer.h.0.atn", False)])
    with pytest.raises(ValueError, match="3 entries.*2 blocks"):
        T.student(tc, tp, init_from_teacher_layers=[0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        T.student(tc, tp, init_from_teacher_layers=[0, 4])


# ----------------------------------------------------------------------------- random init


def test_random_init_has_hf_statistics(teacher):
    tc, tp = teacher
    s_cfg, sp, _ = T.student(tc, tp, copy_teacher_modules=[])
    std, n = s_cfg.initializer_range, s_cfg.n_layer

    def cat(name_fn):
        return np.concatenate([np.ravel(name_fn(_h(sp)[str(i)])) for i in range(n)])

    c_proj = np.concatenate([cat(lambda b: b["attn"]["c_proj"]["kernel"]),
                             cat(lambda b: b["mlp"]["c_proj"]["kernel"])])
    others = np.concatenate([cat(lambda b: b["attn"]["c_attn"]["kernel"]),
                             cat(lambda b: b["mlp"]["c_fc"]["kernel"]),
                             np.ravel(sp["wte"]["embedding"]), np.ravel(sp["wpe"]["embedding"])])
    for x, expected in ((c_proj, std / np.sqrt(2 * n)), (others, std)):
        assert x.size > 5000
        assert abs(x.std() / expected - 1) < 0.05, (x.std(), expected)
        assert abs(x.mean()) < 5 * expected / np.sqrt(x.size)
    for b in _h(sp).values():
        for mod in (b["attn"]["c_attn"], b["attn"]["c_proj"], b["mlp"]["c_fc"], b["mlp"]["c_proj"]):
            assert not np.any(mod["bias"])
        for ln in (b["ln_1"], b["ln_2"]):
            assert np.all(ln["scale"] == 1) and not np.any(ln["bias"])
    assert np.all(sp["ln_f"]["scale"] == 1) and not np.any(sp["ln_f"]["bias"])
    assert sp["wte"]["embedding"].dtype == np.float32
    # A different rng gives different weights; the same one the same weights.
    _, sp2, _ = T.student(tc, tp, copy_teacher_modules=[], seed=2)
    _, sp3, _ = T.student(tc, tp, copy_teacher_modules=[])
    assert not np.array_equal(sp["h"]["attn"]["c_attn"]["kernel"], sp2["h"]["attn"]["c_attn"]["kernel"])
    # Each layer is drawn from its own rng: no two blocks start alike.
    assert not np.array_equal(_h(sp)["0"]["attn"]["c_attn"]["kernel"], _h(sp)["1"]["attn"]["c_attn"]["kernel"])
    assert _leaves_equal(sp, sp3)
