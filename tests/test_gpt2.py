"""The Flax GPT-2 against transformers.GPT2LMHeadModel (the reference), on tiny random configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax import hf
from distil_jax import models
from distil_jax.models import common
from distil_jax.models.gpt2 import GPT2Config
from tests.hf_utils import tiny_hf_model, torch_forward

TOL = 1e-5  # float32, max abs difference

CONFIGS = [
    dict(n_layer=2, n_embd=32, n_head=4),
    dict(n_layer=3, n_embd=48, n_head=3, n_inner=80, activation_function="gelu"),
    dict(n_layer=4, n_embd=16, n_head=2, tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True),
]


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("padded", [False, True])
def test_parity_with_transformers(overrides, padded):
    model = tiny_hf_model(seed=1, **overrides)
    config = hf.config_from_hf(model.config)
    params = hf.hf_state_dict_to_params(config, {k: v.numpy() for k, v in model.state_dict().items()})
    rng = np.random.RandomState(0)
    B, S = 3, 12
    ids = rng.randint(0, config.vocab_size, (B, S))
    mask = np.ones((B, S), np.int32)
    if padded:
        mask[1, 7:] = 0  # right padding, as the data pipeline produces
        mask[2, 3:] = 0
    ref = torch_forward(model, ids, mask if padded else None)
    # Request the first and the last layer (negative index): the others go through fused attention.
    out = jax.jit(
        lambda p, i, m: models.forward(config, p, i, m, output_hidden_states=True,
                                     output_attentions=(0, -1))
    )(params, ids, mask if padded else None)
    assert _maxdiff(out.logits, ref.logits.numpy()) < TOL
    assert len(out.hidden_states) == config.n_layer + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert _maxdiff(mine, theirs.numpy()) < TOL
    assert sorted(out.attentions) == [0, config.n_layer - 1]
    for layer, probs in out.attentions.items():
        assert probs.shape == (B, config.n_head, S, S)
        assert _maxdiff(probs, ref.attentions[layer].numpy()) < TOL


def test_all_layers_materialized_equals_fused():
    """Fused and explicit attention give the same logits (every layer explicit vs none)."""
    model = tiny_hf_model(seed=2, n_layer=3)
    config = hf.config_from_hf(model.config)
    params = hf.hf_state_dict_to_params(config, {k: v.numpy() for k, v in model.state_dict().items()})
    ids = np.random.RandomState(1).randint(0, config.vocab_size, (2, 9))
    fused = models.forward(config, params, ids)
    explicit = models.forward(config, params, ids, output_attentions=(0, 1, 2))
    assert fused.attentions == {}
    assert _maxdiff(fused.logits, explicit.logits) < TOL


def test_packed_rows_match_documents_alone():
    model = tiny_hf_model(seed=3)
    config = hf.config_from_hf(model.config)
    params = hf.hf_state_dict_to_params(config, {k: v.numpy() for k, v in model.state_dict().items()})
    rng = np.random.RandomState(2)
    doc_a, doc_b = rng.randint(0, config.vocab_size, 7), rng.randint(0, config.vocab_size, 5)
    row = np.concatenate([doc_a, doc_b])[None]
    seg = np.array([[1] * 7 + [2] * 5])
    packed = models.forward(config, params, row, segment_ids=seg, output_attentions=(-1,))
    alone_a = models.forward(config, params, doc_a[None])
    alone_b = models.forward(config, params, doc_b[None])
    assert _maxdiff(packed.logits[0, :7], alone_a.logits[0]) < TOL
    assert _maxdiff(packed.logits[0, 7:], alone_b.logits[0]) < TOL
    # No attention crosses the document boundary.
    assert float(jnp.max(packed.attentions[1][0, :, 7:, :7])) == 0.0


def test_segment_positions_restart():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert common.segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_bfloat16_compute_close_to_float32():
    model = tiny_hf_model(seed=4)
    config = hf.config_from_hf(model.config)
    params = hf.hf_state_dict_to_params(config, {k: v.numpy() for k, v in model.state_dict().items()})
    ids = np.random.RandomState(3).randint(0, config.vocab_size, (2, 8))
    f32 = models.forward(config, params, ids, output_attentions=(0,))
    bf16 = models.forward(config, params, ids, output_attentions=(0,), dtype=jnp.bfloat16)
    assert bf16.last_hidden_state.dtype == jnp.bfloat16
    # The LM head accumulates in float32: the losses' log-softmax sees unrounded logits.
    assert bf16.logits.dtype == jnp.float32
    assert bf16.attentions[0].dtype == jnp.float32  # softmax in float32
    # bf16 has ~3 significant digits; tiny logits are O(1).
    assert _maxdiff(bf16.logits, f32.logits) < 5e-2


def test_remat_and_last_hidden_same_values():
    model = tiny_hf_model(seed=5, tie_word_embeddings=False)
    config = hf.config_from_hf(model.config)
    params = hf.hf_state_dict_to_params(config, {k: v.numpy() for k, v in model.state_dict().items()})
    ids = np.random.RandomState(4).randint(0, config.vocab_size, (2, 8))
    base = models.forward(config, params, ids)
    out = models.forward(config, params, ids, remat=True, return_last_hidden=True)
    assert out.logits is None
    logits = out.last_hidden_state @ models.lm_head(config, params)  # the real columns
    assert _maxdiff(logits, base.logits) < TOL

    def loss(p, remat):
        return jnp.mean(models.forward(config, p, ids, remat=remat).logits ** 2)

    g0 = jax.grad(loss)(params, False)
    for policy in (True, "dots"):  # "full" recompute, and keeping the matmul outputs
        g1 = jax.grad(loss)(params, policy)
        assert max(_maxdiff(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1))) < TOL
    with pytest.raises(ValueError, match="train.remat_policy='some': use one of full, dots"):
        models.forward(config, params, ids, remat="some")


def test_dropout_needs_rng_and_changes_output():
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    params = models.init_params(config, jax.random.PRNGKey(0))
    ids = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="dropout_rng"):
        models.forward(config, params, ids, deterministic=False)
    a = models.forward(config, params, ids, deterministic=False, dropout_rng=jax.random.PRNGKey(1))
    b = models.forward(config, params, ids)
    assert _maxdiff(a.logits, b.logits) > 1e-4


def test_too_long_sequence_is_refused():
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8)
    params = models.init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="exceeds the model's n_positions=8"):
        models.forward(config, params, jnp.zeros((1, 9), jnp.int32))


def test_unknown_override_and_unsupported_option():
    with pytest.raises(ValueError, match="unknown GPT-2 config field"):
        GPT2Config().replace(n_layers=6)
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        GPT2Config(reorder_and_upcast_attn=True)
    with pytest.raises(ValueError, match="unsupported activation_function 'tanh'"):
        GPT2Config(activation_function="tanh")


def test_param_counts_match_hf():
    assert models.param_count(GPT2Config()) == 124_439_808  # gpt2
    assert models.param_count(GPT2Config(n_layer=6)) == 81_912_576  # distilgpt2
    model = tiny_hf_model(n_layer=3, tie_word_embeddings=False)
    assert models.param_count(hf.config_from_hf(model.config)) == model.num_parameters()


def test_init_statistics_follow_hf():
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=512, n_positions=64)
    p = models.init_params(config, jax.random.PRNGKey(0))
    assert abs(float(jnp.std(p["wte"]["embedding"])) - 0.02) < 1e-3
    assert abs(float(jnp.std(p["h"]["attn"]["c_attn"]["kernel"][0])) - 0.02) < 1e-3
    want = 0.02 / np.sqrt(2 * 4)
    assert abs(float(jnp.std(p["h"]["mlp"]["c_proj"]["kernel"][0])) - want) < 1e-3
    assert float(jnp.abs(p["h"]["mlp"]["c_fc"]["bias"][0]).max()) == 0.0
    assert float(jnp.min(p["ln_f"]["scale"])) == 1.0


@pytest.mark.parametrize("single_document_rows", [False, True])
def test_cudnn_attention_contract(monkeypatch, single_document_rows):
    """No GPU here, so this checks distil_jax's side of the cuDNN path: the unmapped layers call
    `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True, mask=...)` (no mask
    for single-document rows), mapped layers stay explicit, and those arguments mean the same
    attention as the default path for every real token (run here through XLA's implementation
    of the same call): on packed rows with padding, or on the pad layout's rows."""
    model = tiny_hf_model(seed=5, n_layer=3)
    config = hf.config_from_hf(model.config)
    params = hf.hf_state_dict_to_params(config, {k: v.numpy() for k, v in model.state_dict().items()})
    rng = np.random.RandomState(4)
    ids = rng.randint(0, config.vocab_size, (2, 12))
    if single_document_rows:  # the pad layout: one document from position 0, then padding
        seg = np.array([[1] * 8 + [0] * 4, [1] * 12])
    else:
        seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
    real = jax.nn.dot_product_attention
    calls = []

    def cudnn_on_xla(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
        calls.append((implementation, kw.get("is_causal"), None if mask is None else mask.shape))
        return real(q, k, v, bias, mask, implementation="xla", **kw)

    default = models.forward(config, params, ids, segment_ids=seg, output_attentions=(1,), dtype=jnp.bfloat16)
    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_on_xla)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cudnn = models.forward(config, params, ids, segment_ids=seg, output_attentions=(1,), dtype=jnp.bfloat16,
                         attention_impl="cudnn", single_document_rows=single_document_rows)
    mask_shape = None if single_document_rows else (2, 1, 12, 12)
    assert calls == [("cudnn", True, mask_shape)] * 2  # layers 0 and 2; layer 1 is explicit
    real_tokens = seg > 0
    np.testing.assert_array_equal(np.asarray(cudnn.logits, np.float32)[real_tokens],
                                  np.asarray(default.logits, np.float32)[real_tokens])
    np.testing.assert_array_equal(np.asarray(cudnn.attentions[1])[real_tokens[:, None, :].repeat(
        config.n_head, 1)], np.asarray(default.attentions[1])[real_tokens[:, None, :].repeat(config.n_head, 1)])


def test_attention_impl_errors(monkeypatch):
    config = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    params = models.init_params(config, jax.random.PRNGKey(0))
    ids = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'; valid: xla, cudnn"):
        models.forward(config, params, ids, attention_impl="flash")
    with pytest.raises(ValueError, match=r"needs an NVIDIA GPU, but jax runs on 'cpu'; use attention 'xla'"):
        models.forward(config, params, ids, attention_impl="cudnn", dtype=jnp.bfloat16)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match=r"needs bfloat16 .* not float32; set the compute dtype to bfloat16"):
        models.forward(config, params, ids, attention_impl="cudnn")
