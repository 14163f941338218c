"""GPT-2 in Flax, numerically matching `transformers.GPT2LMHeadModel`.

This module is the `gpt2` family of `distil_jax.models` (see its docstring for the interface):
`GPT2Config` (the subset of the HF config the model implements; any other option is refused by
name), the Flax Linen modules, `forward`, a pure function of `(config, params, input_ids, ...)`,
the LM head, and the mapping between parameter paths and HF state-dict names.

Why Linen and not NNX: the train step is a pure function over parameter pytrees (teacher and
student share one module definition and differ only in their params), orbax checkpoints plain
pytrees, and HF import/export is a rename of pytree paths. Linen gives exactly that with no
object state to split and merge.

Parameter paths mirror the HF state dict (without its `transformer.` prefix): `wte/embedding`,
`wpe/embedding`, `h/ln_1/{scale,bias}`, `h/attn/c_attn/{kernel,bias}`, `h/attn/c_proj`, `h/ln_2`,
`h/mlp/c_fc`, `h/mlp/c_proj`, `ln_f`, and `lm_head/kernel` only when the head is untied. Every
leaf under `h` is stacked on a leading [n_layer] axis (the blocks run as a scan, see
`distil_jax.models.stack`): HF's `transformer.h.N.attn.c_attn.weight` is slice N of
`h/attn/c_attn/kernel`. `hf_to_path` / `path_to_hf` name HF's per-layer view (`h/N/...`), which
`models.unstack_layers` / `stack_layers` convert. HF's Conv1D stores weights [in, out], as a
Dense kernel does. One leaf differs from HF's tensor by a reshape: c_attn's fused [q | k | v]
kernel is stored [n_layer, D, 3, D] and its bias [n_layer, 3, D] (`HF_FUSED`), so tensor
parallelism splits the heads of each of q, k and v.

Attention: layers whose probabilities are requested (`output_attentions`) compute them
explicitly (scores and softmax in float32) and return them; every other layer uses fused
`jax.nn.dot_product_attention`, which never has to materialize them on accelerators that fuse it.
Rows may be packed with several documents: `segment_ids` restricts attention to a token's own
document and restarts positions per document.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from distil_jax.models.common import (FusedAttention, KVCache, ModelOutput, attend,
                                      attention_mask_4d, collect_hidden, constrain, lm_forward,
                                      pad_vocab, padded_vocab_size, unpad_vocab, write_kv,
                                      zero_vocab_padding)
from distil_jax.models import stack

Array = jax.Array
GPT2Output = ModelOutput  # what `forward` returns

MODEL_TYPES = ("gpt2",)
HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel"}
# HF options the model does not implement, with the value that is safe to ignore.
_UNSUPPORTED_OPTIONS = {"add_cross_attention": False}
# Buffers that older HF checkpoints store with the weights; not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# GELU variants that HF names in `activation_function`.
_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# transformers.GPT2Config.attribute_map: the generic HF names of GPT-2's fields.
_HF_ALIASES = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
               "max_position_embeddings": "n_positions"}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The GPT-2 hyperparameters the model implements (names and defaults as in HF's GPT2Config).

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    model_type = "gpt2"  # a class attribute, not a field: HF's config carries it itself

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # None: 4 * n_embd, as in HF.
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256

    def __post_init__(self):
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported activation_function {self.activation_function!r}; "
                f"distil_jax implements: {', '.join(sorted(_ACTIVATIONS))}"
            )
        if self.reorder_and_upcast_attn:
            # HF's flag reorders the QK^T product for fp16 stability; we always take the softmax in
            # float32 but do not reproduce the reordered product, so refuse rather than differ.
            raise ValueError(
                "unsupported GPT-2 option reorder_and_upcast_attn=True: distil_jax does not implement "
                "it; set it to false in config.json"
            )
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # The generic names every family's config has (see distil_jax.models).
    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def num_heads(self) -> int:
        return self.n_head

    @property
    def width(self) -> int:
        return self.n_embd

    @property
    def max_positions(self) -> int:
        return self.n_positions

    @property
    def num_kv_heads(self) -> int:
        return self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim

    @property
    def mlp_width(self) -> int:
        return self.inner_dim

    @property
    def padded_vocab_size(self) -> int:
        """The rows `wte` and `lm_head` store: vocab_size rounded up (common.VOCAB_MULTIPLE)."""
        return padded_vocab_size(self.vocab_size)

    def without_dropout(self) -> "GPT2Config":
        return dataclasses.replace(self, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def replace(self, **overrides: Any) -> "GPT2Config":
        """A copy with `overrides`; an unknown field is a ValueError naming it. HF's generic
        names (`num_hidden_layers`, `hidden_size`, ...) are accepted for GPT-2's own, as
        transformers' GPT2Config does, so one override serves every family."""
        overrides = {_HF_ALIASES.get(k, k): v for k, v in overrides.items()}
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown GPT-2 config field(s) {unknown}; valid fields: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **overrides)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    # LayerNorm statistics in float32 whatever the compute dtype.
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=jnp.float32, name=name)


class Attention(nn.Module):
    """Causal self-attention (`h.N.attn`): c_attn -> heads -> attention -> c_proj."""

    config: GPT2Config
    dtype: Any = jnp.float32
    materialize: bool = False  # return post-softmax probabilities (explicit path)
    deterministic: bool = True
    fused: FusedAttention = FusedAttention()

    @nn.compact
    def __call__(self, x: Array, mask: Array, layer_idx: Array,
                 kv: Optional[tuple] = None) -> tuple[Array, Any]:
        """x: [B, S, D]; mask: [B, 1, S, S] bool (True = may attend), or [B, 1, S, T] with `kv`;
        layer_idx: int32 scalar (traced inside the scan); kv: generation's cache (keys, values
        [L, B, T, H, Dh], this layer, the first slot to write; `common.write_kv`), or None.
        Returns ([B, S, D], probs), or ([B, S, D], (keys, values) with this call's written)."""
        cfg = self.config
        B, S, D = x.shape
        H, Dh = cfg.n_head, cfg.head_dim
        std = cfg.initializer_range
        # c_attn's kernel [D, 3, D]: HF's [D, 3D] columns [q | k | v] with the three apart, so
        # the last dimension (the heads) splits over tensor in each of them (see PARAM_AXES).
        qkv = nn.DenseGeneral((3, D), dtype=self.dtype, kernel_init=_normal(std), name="c_attn")(x)
        q, k, v = jnp.split(qkv.reshape(B, S, 3, H, Dh), 3, axis=2)
        # [B, S, H, Dh], heads split over tensor: each device attends with whole heads of its own.
        q, k, v = (constrain(t[:, :, 0], ("batch", None, "heads", None)) for t in (q, k, v))
        if kv is not None:  # generation: attend over the cache with this call's keys written in
            kv, (k, v) = write_kv(kv, k, v)

        scale = 1.0 / math.sqrt(Dh) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            # HF divides the scores by layer_idx + 1; the index is traced in the scan, and the
            # fused kernel takes a static scale, so the queries carry the factor.
            q = (q.astype(jnp.float32) / (layer_idx + 1).astype(jnp.float32)).astype(q.dtype)

        use_dropout = not self.deterministic and cfg.attn_pdrop > 0.0
        dropout = nn.Dropout(cfg.attn_pdrop, deterministic=False) if use_dropout else None
        out, probs = attend(q, k, v, mask, scale, materialize=self.materialize, dropout=dropout,
                            fused=self.fused, dtype=self.dtype)
        out = out.reshape(B, S, D)
        c_proj_std = std / math.sqrt(2 * cfg.n_layer)  # HF scales residual projections
        out = nn.Dense(D, dtype=self.dtype, kernel_init=_normal(c_proj_std), name="c_proj")(out)
        out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=self.deterministic)
        return out, probs if kv is None else kv


class MLP(nn.Module):
    """The feed-forward block (`h.N.mlp`): c_fc -> activation -> c_proj."""

    config: GPT2Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, S, D] -> [B, S, D]."""
        cfg = self.config
        std = cfg.initializer_range
        h = nn.Dense(cfg.inner_dim, dtype=self.dtype, kernel_init=_normal(std), name="c_fc")(x)
        h = constrain(_ACTIVATIONS[cfg.activation_function](h), ("batch", None, "mlp"))
        c_proj_std = std / math.sqrt(2 * cfg.n_layer)
        h = nn.Dense(cfg.n_embd, dtype=self.dtype, kernel_init=_normal(c_proj_std), name="c_proj")(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=self.deterministic)


class Block(nn.Module):
    """One transformer block (`h.N`; one slice of the stacked `h`), pre-LayerNorm as in GPT-2."""

    config: GPT2Config
    dtype: Any = jnp.float32
    materialize: bool = False
    deterministic: bool = True
    fused: FusedAttention = FusedAttention()

    @nn.compact
    def __call__(self, x: Array, mask: Array, layer_idx: Array,
                 kv: Optional[tuple] = None) -> tuple[Array, Any]:
        """x: [B, S, D]; mask: [B, 1, S, S]; layer_idx: int32 scalar; kv: see `Attention`.
        Returns ([B, S, D], probs [B, H, S, S] or None, or the updated (keys, values) with kv)."""
        cfg = self.config
        h = _layer_norm(cfg, "ln_1")(x).astype(self.dtype)
        a, probs = Attention(cfg, self.dtype, self.materialize, self.deterministic, self.fused,
                             name="attn")(h, mask, layer_idx, kv)
        x = x + a
        h = _layer_norm(cfg, "ln_2")(x).astype(self.dtype)
        x = x + MLP(cfg, self.dtype, self.deterministic, name="mlp")(h)
        return constrain(x, ("batch", None, None)), probs


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its LM head. See `forward` for the arguments."""

    config: GPT2Config
    dtype: Any = jnp.float32  # compute dtype; parameters stay in their own dtype
    attention_layers: tuple = ()
    hidden_layers: tuple = ()  # indices into the n_layer + 1 hidden states to return
    remat: bool | str = False  # False, True ("full") or a REMAT_POLICIES name
    deterministic: bool = True
    fused: FusedAttention = FusedAttention()
    scan_layers: bool = True  # False: one unrolled block per layer (the tests' reference)

    @nn.compact
    def __call__(self, input_ids: Array, mask: Array, positions: Array,
                 cache: Optional[KVCache] = None):
        """-> (last hidden state [B, S, D] after ln_f, hidden states or None, attentions), or
        with `cache` (mask [B, 1, S, T]): (last hidden state, None, the new (keys, values))."""
        cfg = self.config
        std = cfg.initializer_range
        wte = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, embedding_init=_normal(std), name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=_normal(std), name="wpe")
        x = wte(input_ids) + wpe(positions)
        x = nn.Dropout(cfg.embd_pdrop)(x, deterministic=self.deterministic).astype(self.dtype)
        x = constrain(x, ("batch", None, None))  # the residual stream: rows split, width whole
        x, hidden, attentions = self._blocks(x, mask, cache)
        x = constrain(_layer_norm(cfg, "ln_f")(x).astype(self.dtype), ("batch", None, None))
        hidden_states = collect_hidden(hidden, x, cfg.n_layer, self.hidden_layers)
        if not cfg.tie_word_embeddings and self.is_initializing():
            # The untied head's parameters; `forward` applies the head through `lm_head`.
            nn.Dense(cfg.padded_vocab_size, use_bias=False, kernel_init=_normal(std),
                     name="lm_head")(x[:, :1])
        return x, hidden_states, attentions

    def _blocks(self, x: Array, mask: Array, cache: Optional[KVCache] = None):
        """The stack `h`: every block parameter stacked on a leading [n_layer] axis, run by
        `stack.run` (a scan cut at the requested layers), or `stack.run_cached` with a cache."""
        cfg = self.config

        def block(materialize: bool = False) -> Block:
            return Block(cfg, self.dtype, materialize, self.deterministic, self.fused, parent=None)

        params = stack.stacked_params(self, "h", block(), cfg.n_layer, x, mask, jnp.int32(0))

        def block_fn(layer, x, idx, materialize, rng):
            rngs = None if rng is None else {"dropout": rng}
            return block(materialize).apply({"params": layer}, x, mask, idx, rngs=rngs)

        if cache is not None:
            x, kv = stack.run_cached(lambda p, x, idx, kv: block().apply({"params": p}, x, mask, idx, kv),
                                     params, x, cache.key, cache.value, cache.index)
            return x, {}, kv
        rng = None if self.deterministic else self.make_rng("dropout")
        return stack.run(block_fn, params, x, n_layer=cfg.n_layer, materialize=self.attention_layers,
                         hidden=self.hidden_layers, scan=self.scan_layers, remat=self.remat, rng=rng)


def forward(
    config: GPT2Config,
    params: Mapping,
    input_ids: Array,
    attention_mask: Optional[Array] = None,
    *,
    output_hidden_states: bool | Sequence[int] = False,
    output_attentions: Sequence[int] = (),
    segment_ids: Optional[Array] = None,
    positions: Optional[Array] = None,
    deterministic: bool = True,
    dropout_rng: Optional[Array] = None,
    dtype: Any = jnp.float32,
    remat: bool | str = False,
    return_last_hidden: bool = False,
    attention_impl: str = "xla",
    single_document_rows: bool = False,
    scan_layers: bool = True,
    cache: Optional[KVCache] = None,
) -> GPT2Output:
    """Run GPT-2.

    Args:
      config: the model's `GPT2Config`.
      params: the parameter tree (HF-named paths, see the module docstring).
      input_ids: [B, S] int token ids, S <= config.n_positions.
      attention_mask: [B, S] 1 for real tokens, 0 for padding (masks padded keys), or None.
      output_hidden_states: True: also return the n_layer + 1 hidden states; a sequence of
        indices into them (negative allowed): a tuple of n_layer + 1 entries, None except those.
      output_attentions: layer indices (negative allowed) whose post-softmax probabilities to
        return; only these layers materialize them.
      segment_ids: [B, S] int document ids for packed rows (attention stays inside a document,
        positions restart per document); 0 marks padding.
      positions: [B, S] explicit position ids (default: from segment_ids, else 0..S-1).
      deterministic: False enables dropout (needs dropout_rng).
      dtype: compute dtype (float32 or bfloat16); LayerNorm and softmax always run in float32.
      remat: rematerialize each block in the backward pass (gradient checkpointing): True or
        "full" recomputes the block, "dots" keeps its matmul outputs (common.REMAT_POLICIES).
      return_last_hidden: skip the LM head and return `last_hidden_state` only (logits None).
      attention_impl: the layers that return no probabilities: "xla" (XLA's attention, any
        backend) or "cudnn" (cuDNN flash attention: NVIDIA GPU, bfloat16 or float16 compute).
        Layers in `output_attentions`, and every layer when attention dropout is on, compute
        the probabilities explicitly either way.
      single_document_rows: the caller's promise that every row is one document from position 0
        followed only by padding (the pad layout). The cudnn path then runs plain causal
        attention without the mask: exact for every real token, since all padding comes after
        them (padding positions differ, and no loss reads them). The xla path ignores it.
      scan_layers: run the blocks as a scan (default); False unrolls them (same parameters).
      cache: generation's key/value cache (`common.KVCache`, T slots): the S tokens are written
        at its index and attend over its real tokens up to their own slot; `positions` must be
        given; the output's `cache` is the updated one. Not with hidden states, attentions,
        segment_ids or dropout.
    """
    length = input_ids.shape[1] if cache is None else cache.valid.shape[1]
    if length > config.n_positions:
        raise ValueError(
            f"sequence length {length} exceeds the model's n_positions={config.n_positions}; "
            f"truncate inputs to at most {config.n_positions} tokens"
        )
    return lm_forward(
        GPT2LMHeadModel, config, params, input_ids, attention_mask,
        None if return_last_hidden else lm_head(config, params),
        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        segment_ids=segment_ids, positions=positions, deterministic=deterministic,
        dropout_rng=dropout_rng, dtype=dtype, remat=remat, attention_impl=attention_impl,
        single_document_rows=single_document_rows, scan_layers=scan_layers, cache=cache)


def init_params(config: GPT2Config, rng: Array, param_dtype: Any = jnp.float32) -> dict:
    """Random parameters with HF GPT-2's init: normal(0, initializer_range) weights, residual
    `c_proj` weights with std / sqrt(2 * n_layer), zero biases, LayerNorm 1 / 0; the padded
    vocabulary entries zero."""
    model = GPT2LMHeadModel(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    mask = attention_mask_4d(1, 1, None, None)
    params = model.init(rng, ids, mask, jnp.zeros((1, 1), jnp.int32))["params"]
    params = dict(flax.core.unfreeze(params) if hasattr(flax.core, "unfreeze") else params)
    params["wte"] = {"embedding": zero_vocab_padding(params["wte"]["embedding"], 0, config.vocab_size)}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": zero_vocab_padding(params["lm_head"]["kernel"], 1,
                                                          config.vocab_size)}
    return jax.tree_util.tree_map(lambda p: p.astype(param_dtype), params)


# ----------------------------------------------------------------------------- the LM head


def lm_head_path(config: GPT2Config) -> tuple[str, ...]:
    """Where the head lives: the token embedding when tied (GPT-2's default), else lm_head."""
    return ("wte", "embedding") if config.tie_word_embeddings else ("lm_head", "kernel")


def lm_head(config: GPT2Config, params: Mapping) -> Array:
    """The LM head as a [D, V] matrix: the stored [D, padded V] cut to the vocab_size real
    columns, so every logit anyone computes is a real token's (docs/design.md, "The
    vocabulary: padded inside, exact outside")."""
    if config.tie_word_embeddings:
        return unpad_vocab(params["wte"]["embedding"], 0, config.vocab_size).T
    return unpad_vocab(params["lm_head"]["kernel"], 1, config.vocab_size)


def with_lm_head(config: GPT2Config, params: Mapping, head: Array) -> dict:
    """A copy of `params` whose LM head is `head` [D, V] (tied: the token embedding is head.T),
    stored zero-padded to the padded vocabulary."""
    if config.tie_word_embeddings:
        return {**params, "wte": {**params["wte"],
                                  "embedding": pad_vocab(head.T, 0, config.vocab_size)}}
    return {**params, "lm_head": {**params.get("lm_head", {}),
                                  "kernel": pad_vocab(head, 1, config.vocab_size)}}


# ----------------------------------------------------------------------------- sharding

# Logical axes of every parameter (see distil_jax.sharding.RULES for the mesh axes). Dense
# kernels are [in, out]. c_attn is stored [D, 3, D] (q, k, v apart, `HF_FUSED`), so "heads"
# splits each of q, k and v over tensor: a device holds the columns of its own heads, as
# Llama's separate q/k/v projections; c_proj of attention reads the heads ("heads" on its
# input rows).
PARAM_AXES = (
    (r"wte/embedding", ("vocab", "embed")),
    (r"wpe/embedding", ("positions", "embed")),
    (r"h/attn/c_attn/kernel", ("layers", "embed", None, "heads")),
    (r"h/attn/c_attn/bias", ("layers", None, "heads")),
    (r"h/attn/c_proj/kernel", ("layers", "heads", "embed")),
    (r"h/mlp/c_fc/kernel", ("layers", "embed", "mlp")),
    (r"h/mlp/c_fc/bias", ("layers", "mlp")),
    (r"h/mlp/c_proj/kernel", ("layers", "mlp", "embed")),
    (r"h/(attn|mlp)/c_proj/bias", ("layers", "bias")),
    (r"h/ln_[12]/(scale|bias)", ("layers", "norm")),
    (r"ln_f/(scale|bias)", ("norm",)),
    (r"lm_head/kernel", ("embed", "vocab")),
)


# ----------------------------------------------------------------------------- HF names


def config_from_hf(d: Mapping) -> GPT2Config:
    """An HF GPT-2 config.json dict -> `GPT2Config` (strict: options not implemented are refused)."""
    for key, ok in _UNSUPPORTED_OPTIONS.items():
        if d.get(key, ok) != ok:
            raise ValueError(f"unsupported GPT-2 option {key}={d[key]!r}: distil_jax does not implement it")
    names = {f.name for f in dataclasses.fields(GPT2Config)}
    return GPT2Config(**{k: d[k] for k in names if k in d})


def config_to_hf(config: GPT2Config):
    """`GPT2Config` -> `transformers.GPT2Config` for a GPT2LMHeadModel."""
    import transformers

    hf = transformers.GPT2Config(**dataclasses.asdict(config))
    hf.architectures = [HF_ARCHITECTURES["gpt2"]]
    return hf


def hf_to_path(name: str) -> Optional[tuple[str, ...]]:
    """HF state-dict name -> parameter path; None for the buffers old checkpoints carry.
    `transformer.h.0.attn.c_attn.weight` -> ("h", "0", "attn", "c_attn", "kernel")."""
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    *mod, leaf = name.removeprefix("transformer.").split(".")
    if mod and mod[0] in ("wte", "wpe"):
        leaf = "embedding" if leaf == "weight" else leaf
    elif mod and mod[-1].startswith("ln_"):
        leaf = {"weight": "scale"}.get(leaf, leaf)
    else:
        leaf = {"weight": "kernel"}.get(leaf, leaf)
    return tuple(mod) + (leaf,)


def path_to_hf(path: tuple[str, ...]) -> str:
    *mod, leaf = path
    leaf = {"embedding": "weight", "scale": "weight", "kernel": "weight"}.get(leaf, leaf)
    name = ".".join(list(mod) + [leaf])
    return name if mod[0] == "lm_head" else "transformer." + name


def hf_transposed(path: tuple[str, ...]) -> bool:
    """HF's Conv1D stores [in, out] like a Dense kernel; only the torch Linear head is [V, D]."""
    return path == ("lm_head", "kernel")


def module_path(name: str) -> tuple[str, ...]:
    """'transformer.h.0.attn' / 'h.0.attn' / 'lm_head' -> ('h', '0', 'attn')."""
    return tuple(name.removeprefix("transformer.").split("."))


def block_path(i: int) -> tuple[str, ...]:
    """Block i's path in HF's per-layer view (`models.unstack_layers`): slice i of `LAYERS_PATH`."""
    return ("h", str(i))


# Parameters stored with HF's last dimension split in two (an exact reshape, the same values in
# the same order): path in the stacked tree -> the first factor. c_attn's [D, 3D] columns are
# [q | k | v], each H x Dh with the heads contiguous: stored [D, 3, D] (bias [3, D]), so that
# the heads dimension is one of its own (PARAM_AXES). `models.unstack_layers` / `stack_layers`
# reshape between the two.
HF_FUSED = {("h", "attn", "c_attn", "kernel"): 3, ("h", "attn", "c_attn", "bias"): 3}

# Where the blocks' parameters are stacked on a leading [n_layer] axis (HF's `transformer.h.N`
# is slice N; `models.stack_layers` / `unstack_layers` convert).
LAYERS_PATH = ("h",)


# Module names in transformers' order (its state dict's, `named_parameters()`'s: the order the
# modules are registered), outermost first; the card lists parameters in it. A parameter tree is
# a dict, which jax keeps sorted by key, so the order is a fact of the family, written here.
MODULE_ORDER = ("transformer", "wte", "wpe", "h", "ln_1", "attn", "c_attn", "ln_2", "mlp", "c_fc",
                "c_proj", "ln_f", "lm_head", "weight", "bias")
