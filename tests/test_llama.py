"""The Flax Llama family against transformers' LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM and MistralForCausalLM (the references), on tiny random models built here.

TOL: float32 max abs difference of logits, every hidden state and attention probabilities.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from distil_jax import hf, models
from distil_jax.models import llama
from tests.llama_utils import tiny_hf_model, torch_forward

TOL = 1e-5  # float32, max abs

# llama3 frequencies with theta 20000 and head_dim 8: wavelengths 6.3 (kept: < 128/4), 75
# (blended: between 32 and 128) and 888, 10^4 (divided by the factor): all three branches.
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=128)
CONFIGS = {
    # GQA, llama3 rope scaling, untied head, attention and MLP biases.
    "llama": ("llama", dict(num_key_value_heads=2, rope=LLAMA3, rope_theta=20000.0,
                            max_position_embeddings=256, attention_bias=True, mlp_bias=True)),
    # q/k/v biases, tied head, multi-query attention.
    "qwen2": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # q/k norms, head_dim 12 where hidden_size // heads is 8, GQA, tied head.
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)),
    # GQA, a sliding window no shorter than the sequences, untied head.
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=32)),
    # linear rope scaling, multi-head attention, tied head.
    "llama-linear": ("llama", dict(rope=dict(rope_type="linear", factor=2.0), rope_theta=1000.0,
                                   tie_word_embeddings=True)),
}


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def hf_to_params(config, state):
    """HF state dict -> params through hf.py's generic converter (the family's name mapping:
    hf_to_path, hf_transposed, lm_head_path), which checks every key and shape."""
    return hf.hf_state_dict_to_params(config, state)


def params_to_hf(config, params):
    return {k: np.asarray(v) for k, v in hf.params_to_hf_state_dict(config, params).items()}


# One jitted forward for every test: a compile per (config, shapes, options) instead of the
# per-primitive compiles of op-by-op execution. Compiling is most of this file's time, and
# LLVM's optimizations (not XLA's graph passes, which decide the arithmetic) about half of it:
# tiny models run as fast without them.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
fwd = jax.jit(llama.forward, static_argnums=0, static_argnames=(
    "output_hidden_states", "output_attentions", "deterministic", "dtype", "remat",
    "return_last_hidden"), compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _load(key, seed=1):
    """(HF model, Config, params) for CONFIGS[key], converted with the family's name mapping."""
    model_type, overrides = CONFIGS[key]
    model = tiny_hf_model(model_type, seed, **overrides)
    config = llama.config_from_hf(model.config.to_dict())
    params = hf_to_params(config, {k: v.numpy() for k, v in model.state_dict().items()})
    return model, config, params


def _run(config, params, ids, mask, seg):
    """The parity call: every hidden state, the first and last layer's attention maps (the
    middle of the three layers attends fused). Plain, padded and packed rows share one compile
    per config (all [3, 12], with a mask and segments)."""
    return fwd(config, params, ids, mask, segment_ids=seg, output_hidden_states=True,
               output_attentions=(0, -1))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("key", list(CONFIGS))
def test_parity_with_transformers(key):
    """Logits, every hidden state and the requested attention maps, without and with (right)
    padding."""
    model, config, params = _load(key)
    rng = np.random.RandomState(0)
    B, S = 3, 12
    ids = rng.randint(0, config.vocab_size, (B, S))
    padded = np.ones((B, S), np.int32)
    padded[1, 7:] = 0  # right padding, as the data pipeline produces
    padded[2, 3:] = 0
    ones = np.ones((B, S), np.int32)
    for mask, ref_mask in ((ones, None), (padded, padded)):
        ref = torch_forward(model, ids, ref_mask)
        # Segments all 1 (one document per row) leave the padding to the attention mask, as HF:
        # a padded query still attends to the real keys before it, so every position compares.
        out = _run(config, params, ids, mask, ones)
        assert out.logits.dtype == jnp.float32
        assert _maxdiff(out.logits, ref.logits.numpy()) < TOL
        assert len(out.hidden_states) == config.num_layers + 1
        for mine, theirs in zip(out.hidden_states, ref.hidden_states):
            assert _maxdiff(mine, theirs.numpy()) < TOL
        # The first and the last layer (a negative index) materialize; the middle one attends
        # fused (jax.nn.dot_product_attention, GQA included), checked through the hidden states.
        assert sorted(out.attentions) == [0, 2] and config.num_layers == 3
        for layer, probs in out.attentions.items():
            assert probs.shape == (B, config.num_heads, S, S)  # per query head, GQA or not
            assert _maxdiff(probs, ref.attentions[layer].numpy()) < TOL


@pytest.mark.parametrize("key", list(CONFIGS))
def test_packed_rows_match_documents_alone(key):
    """Documents packed in rows (one row with padding after its documents) give each document
    what transformers gives it alone: positions restart, attention stays inside."""
    model, config, params = _load(key)
    rng = np.random.RandomState(2)
    a, b, c, d, e, f = (rng.randint(0, config.vocab_size, n) for n in (7, 5, 6, 4, 3, 9))
    ids = np.stack([np.concatenate([a, b]), np.concatenate([c, d, [0, 0]]), np.concatenate([e, f])])
    seg = np.array([[1] * 7 + [2] * 5, [1] * 6 + [2] * 4 + [0] * 2, [1] * 3 + [2] * 9])
    out = _run(config, params, ids, (seg > 0).astype(np.int32), seg)
    last = config.num_layers - 1
    for row, start, doc in ((0, 0, a), (0, 7, b), (1, 0, c), (1, 6, d), (2, 0, e), (2, 3, f)):
        ref = torch_forward(model, doc[None])
        span = slice(start, start + len(doc))
        assert _maxdiff(out.logits[row, span], ref.logits[0].numpy()) < TOL
        for mine, theirs in zip(out.hidden_states, ref.hidden_states):
            assert _maxdiff(mine[row, span], theirs[0].numpy()) < TOL
        for layer in (0, last):
            assert _maxdiff(out.attentions[layer][row][:, span, span],
                            ref.attentions[layer][0].numpy()) < TOL
    # No attention crosses a document boundary.
    assert float(jnp.max(out.attentions[last][0, :, 7:, :7])) == 0.0


def _inputs(config, seed):
    """Ids [3, 12] with an all-ones mask and one segment per row: `_run`'s compiled shapes."""
    ids = np.random.RandomState(seed).randint(0, config.vocab_size, (3, 12))
    ones = np.ones((3, 12), np.int32)
    return ids, ones


def test_rope_scaling_matters():
    """The parity tests would catch a rope-scaling slip: transformers without the scaling (the
    same weights: rotary embeddings have none) is far more than TOL from us with it."""
    for key in ("llama", "llama-linear"):
        _, config, params = _load(key)
        model_type, overrides = CONFIGS[key]
        plain = tiny_hf_model(model_type, 1, **{**overrides, "rope": None})
        ids, ones = _inputs(config, 3)
        ours = _run(config, params, ids, ones, ones).logits
        assert _maxdiff(ours, torch_forward(plain, ids).logits.numpy()) > 1e-2


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("key", list(CONFIGS))
def test_config_round_trip_and_architecture(key):
    model_type, overrides = CONFIGS[key]
    hf_config = tiny_hf_model(model_type, 0, **overrides).config
    config = llama.config_from_hf(hf_config.to_dict())
    back = llama.config_to_hf(config)
    assert type(back) is type(hf_config)
    assert back.architectures == [llama.HF_ARCHITECTURES[model_type]]
    assert llama.hf_architecture(config) == llama.HF_ARCHITECTURES[model_type]
    assert llama.config_from_hf(back.to_dict()) == config
    assert models.family(model_type) is llama and models.config_from_hf(hf_config) == config
    assert hash(config) == hash(llama.config_from_hf(back.to_dict()))
    assert (config.num_layers, config.num_heads, config.width, config.max_positions) == (
        hf_config.num_hidden_layers, hf_config.num_attention_heads, hf_config.hidden_size,
        hf_config.max_position_embeddings)
    assert config.head_size == getattr(hf_config, "head_dim", 8)  # Qwen2Config has no head_dim
    assert config.num_kv_heads == hf_config.num_key_value_heads


def test_config_from_a_hub_config_json():
    """An older-format config.json (rope_theta and rope_scaling at the top level, as the hub
    serves Llama 3.2 1B's) reads like transformers 5's rope_parameters."""
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
         "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
         "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
         "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
         "tie_word_embeddings": True, "vocab_size": 128256, "bos_token_id": 128000,
         "eos_token_id": [128001, 128008, 128009], "pretraining_tp": 1, "torch_dtype": "bfloat16",
         "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "use_cache": True}
    config = llama.config_from_hf(d)
    assert config.head_dim is None and config.head_size == 64  # derived: follows hidden/heads
    assert config.num_kv_heads == 8 and config.tie_word_embeddings
    assert config.rope_theta == 500000.0 and config.rope_type == "llama3"
    assert config.rope_scaling_dict["factor"] == 32.0
    assert config.eos_token_id == (128001, 128008, 128009)
    hf = llama.config_to_hf(config)
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["rope_theta"] == 500000.0
    assert llama.config_from_hf(hf.to_dict()) == config
    # Qwen3 without head_dim: transformers' default is 128, not hidden_size // heads.
    q3 = llama.config_from_hf({"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16,
                               "num_key_value_heads": 8})
    assert q3.head_size == 128


@pytest.mark.parametrize("model_type, fields, named", [
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ("qwen2", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("mistral", {"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ("qwen3", {"rope_parameters": {"full_attention": {"rope_type": "default"},
                                   "sliding_attention": {"rope_type": "default"}}}, "per-layer"),
    ("gemma", {}, "model_type"),
])
def test_config_from_hf_refuses_by_name(model_type, fields, named):
    d = {"model_type": model_type, "hidden_size": 32, "num_attention_heads": 4, **fields}
    with pytest.raises(ValueError, match=named):
        llama.config_from_hf(d)


def test_config_refusals_and_replace():
    config = llama.config_from_hf(tiny_hf_model("qwen2", 0).config.to_dict())
    with pytest.raises(ValueError, match="no_such_field.*valid fields"):
        config.replace(no_such_field=1)
    with pytest.raises(ValueError, match="attention_bias"):
        config.replace(attention_bias=True)  # Qwen2's biases are fixed by the architecture
    with pytest.raises(ValueError, match="num_key_value_heads"):
        config.replace(num_key_value_heads=3)
    with pytest.raises(ValueError, match="'ntk'"):
        config.replace(rope_scaling={"rope_type": "ntk", "factor": 2.0})
    assert config.replace(attention_dropout=0.1).without_dropout().attention_dropout == 0.0
    # Derived fields follow the overrides (a student narrower than its teacher).
    assert config.num_key_value_heads is None and config.head_dim is None
    narrow = config.replace(hidden_size=16, num_attention_heads=2)
    assert narrow.head_size == 8 and narrow.num_kv_heads == 2
    # pretraining_tp only sliced the same matmuls: accepted and ignored.
    assert llama.config_from_hf({**config_to_dict(config), "pretraining_tp": 2}) == config


def config_to_dict(config):
    return llama.config_to_hf(config).to_dict()


def test_forward_refuses_long_sequences():
    _, config, params = _load("mistral")
    ids = np.zeros((1, 33), np.int32)
    with pytest.raises(ValueError, match="sliding_window=32"):
        llama.forward(config, params, ids)
    # A window as long as the sequence is the causal mask (traced only: nothing to compute).
    jax.eval_shape(lambda p: llama.forward(config, p, ids[:, :32]), params)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        llama.forward(config.replace(sliding_window=None), params, np.zeros((1, 65), np.int32))
    # Qwen's window counts only with use_sliding_window, on layers from max_window_layers on.
    q = llama.Config(model_type="qwen2", hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                     sliding_window=8, use_sliding_window=True, max_window_layers=2)
    assert q.attention_window is None
    assert q.replace(max_window_layers=1).attention_window == 8
    assert q.replace(layer_types=("full_attention", "sliding_attention")).attention_window == 8
    assert q.replace(use_sliding_window=False, max_window_layers=0).attention_window is None


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("key", ["llama", "qwen3"])
def test_state_dict_round_trip_and_reload(key):
    """HF state dict -> params -> the identical state dict; and a transformers model built from
    config_to_hf loads it strictly and gives the original's logits."""
    model, config, params = _load(key)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF saves the tied head once, as the embedding
    back = params_to_hf(config, params)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)

    rebuilt = transformers.AutoModelForCausalLM.from_config(llama.config_to_hf(config),
                                                            attn_implementation="eager").eval()
    assert type(rebuilt).__name__ == llama.HF_ARCHITECTURES[config.model_type]
    missing, unexpected = rebuilt.load_state_dict({k: torch.tensor(v) for k, v in back.items()},
                                                  strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and \
        (not missing or config.tie_word_embeddings)
    ids = np.random.RandomState(4).randint(0, config.vocab_size, (2, 10))
    np.testing.assert_array_equal(torch_forward(rebuilt, ids).logits.numpy(),
                                  torch_forward(model, ids).logits.numpy())


@pytest.mark.parametrize("key, dtype", [("mistral", None), ("qwen2", jnp.bfloat16)])
def test_folder_round_trip_through_transformers(tmp_path, key, dtype):
    """save_pretrained (transformers) -> hf.load_pretrained -> hf.save_pretrained ->
    from_pretrained: the right class, no missing or unexpected keys, identical logits (float32),
    and a bfloat16 export stays bfloat16."""
    model, config, _ = _load(key)
    model.save_pretrained(tmp_path / "src")
    loaded_config, params = hf.load_pretrained(tmp_path / "src")
    assert loaded_config == config
    hf.save_pretrained(config, params, tmp_path / "out", dtype=dtype)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager", dtype="auto")
    assert type(back).__name__ == llama.HF_ARCHITECTURES[config.model_type]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = np.random.RandomState(8).randint(0, config.vocab_size, (2, 10))
    if dtype is None:
        np.testing.assert_array_equal(torch_forward(back.eval(), ids).logits.numpy(),
                                      torch_forward(model, ids).logits.numpy())
    else:
        assert back.model.embed_tokens.weight.dtype == torch.bfloat16
        _, reread = hf.load_pretrained(tmp_path / "out", dtype=jnp.bfloat16)
        np.testing.assert_array_equal(
            np.asarray(reread["model"]["norm"]["scale"], np.float32),
            np.asarray(params["model"]["norm"]["scale"].astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("key", list(CONFIGS))
def test_param_tree_is_hf_state_dict(key):
    """init_params has exactly the HF model's parameters: names, shapes, count."""
    model, config, _ = _load(key)
    shapes = models.hf_param_shapes(config)  # HF's per-layer view of the stacked blocks
    names = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    hf_shape = lambda p, v: models.hf_shape(config, p, v.shape)  # noqa: E731 (vocabulary unpadded)
    assert {llama.path_to_hf(p): (hf_shape(p, v)[::-1] if llama.hf_transposed(p) else hf_shape(p, v))
            for p, v in _flatten(shapes).items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items() if k in names}
    assert models.param_count(config) == sum(p.numel() for p in model.parameters())


def test_init_params_like_hf():
    """HF's init: normal(0, initializer_range) weights, zero biases, RMSNorm weights 1, the
    padding row of the embedding zero; and param_dtype. (One block, with attention and MLP
    biases: the random init compiles slowly on CPU, and every block is initialized alike.)"""
    _, config, _ = _load("llama")
    config = config.replace(pad_token_id=3, num_hidden_layers=1)
    init = jax.jit(llama.init_params, static_argnums=(0, 2), compiler_options=FAST_COMPILE)
    flat = _flatten(init(config, jax.random.PRNGKey(0), jnp.float32))
    for path, value in flat.items():
        if path[-1] == "bias":
            assert float(jnp.abs(value).max()) == 0.0, path
        elif path[-1] == "scale":
            assert float(jnp.abs(value - 1).max()) == 0.0, path
        else:
            std = float(jnp.std(value))
            assert abs(std - config.initializer_range) < 0.25 * config.initializer_range, path
    emb = flat[("model", "embed_tokens", "embedding")]
    assert float(jnp.abs(emb[3]).max()) == 0.0  # as nn.Embedding(padding_idx) starts
    bf16 = jax.eval_shape(lambda r: llama.init_params(config, r, jnp.bfloat16), jax.random.PRNGKey(0))
    assert {v.dtype for v in jax.tree_util.tree_leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_lm_head_and_names():
    for key, tied in (("llama", False), ("qwen2", True)):
        _, config, params = _load(key)
        head = llama.lm_head(config, params)
        assert head.shape == (config.width, config.vocab_size)
        assert llama.lm_head_path(config) == (
            ("model", "embed_tokens", "embedding") if tied else ("lm_head", "kernel"))
        new = llama.with_lm_head(config, params, head * 2)
        np.testing.assert_array_equal(llama.lm_head(config, new), head * 2)
        np.testing.assert_array_equal(llama.lm_head(config, params), head)  # not mutated
        ids, ones = _inputs(config, 0)
        out = _run(config, params, ids, ones, ones)
        np.testing.assert_allclose(out.last_hidden_state @ head, out.logits, atol=TOL, rtol=0)
        no_head = jax.eval_shape(lambda p: llama.forward(config, p, ids, return_last_hidden=True), params)
        assert no_head.logits is None and no_head.last_hidden_state.shape == (3, 12, config.width)
    assert llama.hf_to_path("model.layers.3.self_attn.q_norm.weight") == (
        "model", "layers", "3", "self_attn", "q_norm", "scale")
    assert llama.hf_to_path("model.rotary_emb.inv_freq") is None
    assert llama.path_to_hf(("lm_head", "kernel")) == "lm_head.weight"
    assert not llama.hf_transposed(("model", "embed_tokens", "embedding"))
    assert llama.module_path("model.layers.3") == llama.block_path(3) == ("model", "layers", "3")
    assert llama.module_path("lm_head") == ("lm_head",)
    with pytest.raises(ValueError, match="model.layers.N"):
        llama.module_path("transformer.h.0")


# ----------------------------------------------------------------------------- compute modes


def test_bfloat16_compute_stays_close():
    """bf16 compute (float32 RMSNorm statistics, rotary tables and softmax; float32 logits) stays
    within BF16_TOL of the float32 logits, as transformers' own bf16 model does. bf16 keeps 8
    mantissa bits (4e-3 relative per rounding); over three blocks that compounds to ~5% of
    logits reaching ~4 with these weights: measured 0.05-0.18 here across the five configs, and
    0.08-0.16 for transformers in bf16. A real slip (a norm, rope or head) moves logits by O(1)."""
    BF16_TOL = 0.25
    model, config, params = _load("llama")  # biases and llama3 rope: the largest bf16 error
    ids, ones = _inputs(config, 5)
    f32 = _run(config, params, ids, ones, ones)
    bf16 = fwd(config, params, ids, ones, segment_ids=ones, dtype=jnp.bfloat16,
               output_hidden_states=True, output_attentions=(0, -1))
    assert bf16.logits.dtype == jnp.float32 and bf16.attentions[0].dtype == jnp.float32
    assert bf16.last_hidden_state.dtype == jnp.bfloat16
    assert float(jnp.abs(f32.logits).max()) > 1.0
    assert _maxdiff(bf16.logits, f32.logits) < BF16_TOL
    # A copy: casting the cached model there and back would round its float32 weights.
    hf_bf16 = torch_forward(copy.deepcopy(model).to(torch.bfloat16), ids).logits.float().numpy()
    assert _maxdiff(bf16.logits, hf_bf16) < BF16_TOL


def test_remat_identical_outputs_and_gradients():
    """remat=True: the same outputs (logits, hidden states, attention maps) and gradients. On
    one block, since backward compiles are the slow part of this file on CPU."""
    _, config, params = _load("llama")
    one = config.replace(num_hidden_layers=1)
    params = {**params, "model": {**params["model"], "layers": jax.tree_util.tree_map(
        lambda x: x[:1], params["model"]["layers"])}}
    ids = np.random.RandomState(6).randint(0, config.vocab_size, (2, 8))

    def loss(p, remat):
        out = llama.forward(one, p, ids, remat=remat, output_hidden_states=True,
                            output_attentions=(0,))
        value = jnp.mean(jax.nn.log_softmax(out.logits) ** 2) + jnp.mean(out.attentions[0] ** 2)
        return value, out

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1,
                   compiler_options=FAST_COMPILE)
    (l0, out0), g0 = grad(params, False)
    for policy in (True, "dots"):  # "full" recompute, and keeping the matmul outputs
        (l1, out1), g1 = grad(params, policy)
        assert float(l0) == float(l1)
        for a, b in zip(jax.tree_util.tree_leaves(out0), jax.tree_util.tree_leaves(out1)):
            np.testing.assert_array_equal(a, b)  # remat changes the backward pass only
        # The backward recomputes (part of) the block, and XLA fuses the recomputation
        # differently: the gradients agree to float32 rounding (observed ~5e-7 on entries up to
        # ~1), not bitwise.
        for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_attention_dropout():
    _, config, params = _load("qwen2")
    config = config.replace(attention_dropout=0.5)
    ids, ones = _inputs(config, 7)

    def train(key):
        return fwd(config, params, ids, ones, segment_ids=ones, deterministic=False,
                   dropout_rng=key).logits

    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(train(key), train(key))
    eval_logits = _run(config.without_dropout(), params, ids, ones, ones).logits  # compiled
    assert _maxdiff(train(key), eval_logits) > 1e-3
    with pytest.raises(ValueError, match="dropout_rng"):
        llama.forward(config, params, ids, deterministic=False)
