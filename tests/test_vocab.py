"""The vocabulary padded inside, exact outside: the embedding and LM head store
`padded_vocab_size` rows (a multiple of models.common.VOCAB_MULTIPLE), every logit anyone sees is
one of the vocab_size real tokens', HF tensors have exactly vocab_size rows, and the padded axis
splits over tensor (GPT-2's 50257 could not).

Tolerances: the padded rows set to 1e9 must leave the loss and the real parameters' gradients
bit-for-bit equal (the head is cut before the matmul, so the same float32 operations run).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import traverse_util
from jax.sharding import AbstractMesh, PartitionSpec as P

from distil_jax import hf, models, sharding
from distil_jax import train_step as ts
from distil_jax.models.gpt2 import GPT2Config
from tests import tiny_setup as T

HUGE = 1e9


def _poison_padded_rows(config, params):
    """params with every padded vocabulary entry (embedding rows, head columns) set to HUGE."""
    flat = traverse_util.flatten_dict(dict(params))
    for path, x in flat.items():
        for d in models.vocab_dims(config, path):
            idx = [slice(None)] * x.ndim
            idx[d] = slice(config.vocab_size, None)
            flat[path] = jnp.asarray(flat[path]).at[tuple(idx)].set(HUGE)
    return traverse_util.unflatten_dict(flat)


def test_padded_sizes():
    assert GPT2Config().padded_vocab_size == 50304  # 393 x 128
    assert T.TEACHER_CONFIG.padded_vocab_size == 128
    assert models.config_from_hf(dict(model_type="llama", vocab_size=128256)).padded_vocab_size == 128256


@pytest.mark.parametrize("untied", [False, True])
def test_padded_rows_never_reach_a_loss(untied):
    """KL + hard-label loss through chunked heads: huge padded rows in the teacher's and the
    student's heads change neither the loss nor any real parameter's gradient, and the padded
    rows get a zero gradient."""
    tc, tp = T.teacher()
    overrides = {"n_layer": 2, "tie_word_embeddings": not untied}
    sc, sp, _ = T.student(tc, tp, overrides=overrides, copy_teacher_modules=[])
    obj = T.objective(sc, tc, attn=dict(weight=0.0), clm_weight=0.5, logits_chunk_tokens=24)
    batch = {k: jnp.asarray(v) for k, v in T.batch(T.ROWS_4).items()}
    B, S = batch["input_ids"].shape
    step_cfg = ts.for_batch_shape(ts.StepConfig(tc, sc, obj), B, S)
    fn = jax.jit(jax.value_and_grad(lambda p, t, b: ts.distill_loss(step_cfg, p, t, b, None)[0]))
    params = T.params_tree(obj, sc, tc, sp)
    loss, grads = fn(params, tp, batch)
    poisoned = dict(params, student=_poison_padded_rows(sc, params["student"]))
    loss_p, grads_p = fn(poisoned, _poison_padded_rows(tc, tp), batch)
    assert np.isfinite(float(loss)) and float(loss) > 1.0
    assert float(loss_p) == float(loss)
    for path, g in traverse_util.flatten_dict(grads_p["student"]).items():
        want = traverse_util.flatten_dict(grads["student"])[path]
        np.testing.assert_array_equal(np.asarray(g), np.asarray(want), err_msg="/".join(path))
        for d in models.vocab_dims(sc, path):
            pad = np.take(np.asarray(g), np.arange(sc.vocab_size, sc.padded_vocab_size), axis=d)
            assert not pad.any(), "/".join(path)  # the padded rows learn nothing
    out = models.forward(sc, poisoned["student"], batch["input_ids"])
    assert out.logits.shape == (B, S, sc.vocab_size)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_tensors_have_exactly_vocab_size_rows(family, tmp_path):
    """Import pads with zero rows; export cuts them: transformers loads the folder with no size
    mismatch and the same logits."""
    if family == "gpt2":
        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97, n_positions=16,
                            tie_word_embeddings=False)
    else:
        config = models.config_from_hf(dict(
            model_type="llama", vocab_size=97, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16))
    params = models.init_params(config, jax.random.PRNGKey(0))
    state = hf.params_to_hf_state_dict(config, params)
    for name, x in state.items():
        if "embed" in name or "wte" in name or "lm_head" in name:
            assert x.shape[0] == 97, (name, x.shape)  # torch layout: [V, D] for both
    back = hf.hf_state_dict_to_params(config, {k: np.asarray(v) for k, v in state.items()})
    for path, x in traverse_util.flatten_dict(back).items():
        dims = models.vocab_dims(config, path)
        for d in dims:
            assert x.shape[d] == config.padded_vocab_size
            assert not np.take(np.asarray(x), np.arange(97, config.padded_vocab_size), axis=d).any()
    folder = hf.save_pretrained(config, params, tmp_path / "m")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.get_output_embeddings().weight.shape[0] == 97
    ids = np.random.RandomState(0).randint(0, 97, (2, 8))
    import torch

    with torch.no_grad():
        theirs = model.eval()(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(models.forward(config, params, jnp.asarray(ids)).logits)
    assert ours.shape == theirs.shape == (2, 8, 97)
    assert np.abs(ours - theirs).max() < 1e-4


def _fraction_per_device(config, mesh):
    """The share of the model's parameters one device holds (the specs' splits)."""
    shapes = models.param_shapes(config)
    specs = traverse_util.flatten_dict(sharding.param_specs(config, shapes, mesh))
    held = total = 0
    for path, x in traverse_util.flatten_dict(shapes).items():
        n = int(np.prod(x.shape))
        split = 1
        for axes in specs[path]:
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                split *= mesh.shape[a]
        held, total = held + n / split, total + n
    return held / total


def test_gpt2_embedding_splits_over_tensor():
    """GPT-2 at data=2 x fsdp=2 x tensor=2: the padded embedding is split over tensor x fsdp
    (it was whole along the vocabulary before), so the distilgpt2-shaped student's parameters are
    0.253 of replicated instead of 0.404 (0.285 while the fused c_attn was split over fsdp only;
    the position table and the vectors keep it above 1/4); a tensor size that does not divide the
    padded vocabulary leaves it unsplit."""
    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    student = GPT2Config(n_layer=6)
    specs = sharding.param_specs(student, models.param_shapes(student), mesh)
    assert specs["wte"]["embedding"] == P("tensor", "fsdp")
    untied = student.replace(tie_word_embeddings=False)
    assert sharding.param_specs(untied, models.param_shapes(untied), mesh)["lm_head"]["kernel"] == \
        P("fsdp", "tensor")
    assert _fraction_per_device(student, mesh) < 0.26
    three = AbstractMesh((1, 1, 3), sharding.MESH_AXES)
    odd = GPT2Config(n_layer=1, n_embd=48, n_head=3, vocab_size=101)  # 3 heads; 128 rows
    assert sharding.param_specs(odd, models.param_shapes(odd), three)["wte"]["embedding"] == \
        P(None, None)
