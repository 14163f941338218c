"""The Llama family in Flax, numerically matching transformers' `LlamaForCausalLM`,
`Qwen2ForCausalLM`, `Qwen3ForCausalLM` and `MistralForCausalLM`.

The four HF model types share one architecture and differ in a few switches, which `Config`
derives from `model_type`:

  llama    q/k/v/o biases iff `attention_bias`, MLP biases iff `mlp_bias`
  qwen2    q/k/v biases always, no o_proj bias, no MLP bias
  qwen3    q/k/v/o biases iff `attention_bias`; RMSNorm over head_dim on q and k (q_norm, k_norm)
  mistral  no biases

Each block: x + o_proj(attention(rope(q), rope(k), v)) on input_layernorm(x), then
x + down_proj(silu(gate_proj(h)) * up_proj(h)) on post_attention_layernorm(x); the final
`model.norm`, then the LM head (tied to `model.embed_tokens` or a separate `lm_head`).
RMSNorm statistics and rotary tables are float32 whatever the compute dtype; attention scores
and softmax are float32 in the layers whose probabilities are returned (`common.attend`).

Parameter paths mirror the HF state dict names (a rename away from it):
`model/embed_tokens/embedding`, `model/layers/self_attn/{q,k,v,o}_proj/{kernel,bias}`,
`model/layers/self_attn/{q_norm,k_norm}/scale` (qwen3), `model/layers/mlp/{gate,up,down}_proj/
{kernel,bias}`, `model/layers/{input_layernorm,post_attention_layernorm}/scale`,
`model/norm/scale`, and `lm_head/kernel` only when the head is untied. Every leaf under
`model/layers` is stacked on a leading [num_hidden_layers] axis (the blocks run as a scan,
`distil_jax.models.stack`): HF's `model.layers.N.mlp.up_proj.weight` is slice N (transposed) of
`model/layers/mlp/up_proj/kernel`; `hf_to_path` / `path_to_hf` name HF's per-layer view
(`model/layers/N/...`, `models.unstack_layers`). torch Linear weights are
[out, in] and Dense kernels [in, out], so every `kernel` is stored transposed in HF
(`hf_transposed`).

Not implemented, and refused by name rather than silently computed differently: rope types other
than default/linear/llama3, partial rotary, hidden_act other than silu, quantized checkpoints,
and sliding-window attention (a model whose window is shorter than the sequence is refused at
`forward`; with sequences no longer than the window the sliding mask equals the causal one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distil_jax.models.common import (FusedAttention, KVCache, ModelOutput, attend,
                                      attention_mask_4d, collect_hidden, constrain, lm_forward,
                                      pad_vocab, padded_vocab_size, unpad_vocab, write_kv,
                                      zero_vocab_padding)
from distil_jax.models import stack

Array = jax.Array

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
_HF_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                      "mistral": "MistralConfig"}
ROPE_TYPES = ("default", "linear", "llama3")
# The rope_scaling keys each type needs (HF's ROPE_INIT_FUNCTIONS read exactly these).
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _hashable(v: Any) -> Any:
    """Lists (and dicts) from JSON -> tuples, so a Config stays hashable (a jit static arg)."""
    if isinstance(v, Mapping):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


@dataclasses.dataclass(frozen=True)
class Config:
    """The Llama-family hyperparameters (HF field names; defaults are HF LlamaConfig's).

    Frozen and hashable, so it can be a static argument of `jax.jit`. Two fields may be None and
    are then derived, so that overriding the width or head count keeps them consistent:
    `num_key_value_heads` (None: as many as query heads; see `num_kv_heads`) and `head_dim` (None:
    hidden_size // num_attention_heads; see `head_size`). `config_from_hf` stores them as None
    when they equal the derived value.

    rope_scaling: None (plain RoPE) or a sorted tuple of (key, value) items including
      "rope_type" ("linear" or "llama3") and that type's parameters; a dict is accepted and
      converted. `rope_scaling_dict` gives it back as a dict.
    sliding_window / use_sliding_window / max_window_layers / layer_types: Mistral's and Qwen's
      sliding-window switches, kept for the HF round trip; `attention_window` says what they
      amount to. Llama has none of them.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    sliding_window: Optional[int] = None
    use_sliding_window: bool = False
    max_window_layers: Optional[int] = None
    layer_types: Optional[tuple] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2  # int, a tuple of ints (Llama 3), or None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        # Normalize JSON containers to hashable tuples (a frozen dataclass needs __setattr__).
        for name in ("rope_scaling", "layer_types", "eos_token_id"):
            object.__setattr__(self, name, _hashable(getattr(self, name)))
        if self.rope_scaling is not None:
            # One spelling per rope: HF's legacy "type" key becomes "rope_type", and plain RoPE
            # is None, so that equal configs compare (and hash) equal.
            d = self.rope_scaling_dict
            if "type" in d:
                d.setdefault("rope_type", d.pop("type"))
            plain = d.get("rope_type", "default") == "default" and set(d) <= {"rope_type"}
            object.__setattr__(self, "rope_scaling", None if plain else _hashable(d))
        t = self.model_type
        if t not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {t!r} for the Llama family; valid: "
                             f"{', '.join(MODEL_TYPES)}")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported {t} option hidden_act={self.hidden_act!r}: distil_jax "
                             f"implements the SwiGLU MLP with 'silu' only")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{t} config field {name}={getattr(self, name)} must be positive")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}; set head_dim")
        if t == "llama" and self.hidden_size % self.num_attention_heads:
            # transformers' LlamaConfig refuses this even with an explicit head_dim.
            raise ValueError(f"llama needs hidden_size={self.hidden_size} divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_kv_heads < 1 or self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be positive")
        self._check_rope_scaling()
        # Switches a model type does not have would be silently ignored by HF's class for that
        # type (and lost on export): refuse them rather than carry a meaningless value.
        if self.attention_bias and t not in ("llama", "qwen3"):
            fixed = "q/k/v biases and no o_proj bias" if t == "qwen2" else "no attention biases"
            raise ValueError(f"{t} has no attention_bias option ({t} always has {fixed}); "
                             f"leave attention_bias=False")
        if self.mlp_bias and t != "llama":
            raise ValueError(f"{t} has no mlp_bias option (its MLP has no biases)")
        if t == "llama" and self.sliding_window is not None:
            raise ValueError("llama has no sliding_window option; leave it None")
        if t in ("llama", "mistral") and (self.use_sliding_window or self.layer_types is not None
                                          or self.max_window_layers is not None):
            raise ValueError(f"{t} has no use_sliding_window/max_window_layers/layer_types "
                             f"options (Qwen2/Qwen3 only)")
        if self.layer_types is not None:
            bad = sorted(set(self.layer_types) - set(_LAYER_TYPES))
            if bad:
                raise ValueError(f"unsupported layer_types {bad}; valid: {', '.join(_LAYER_TYPES)}")
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"num_hidden_layers={self.num_hidden_layers}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be positive (or None)")

    def _check_rope_scaling(self) -> None:
        d = self.rope_scaling_dict
        if not d:
            return
        if "rope_theta" in d:
            raise ValueError("rope_scaling holds no rope_theta here: set the rope_theta field")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"unsupported partial_rotary_factor={d['partial_rotary_factor']}: "
                             f"distil_jax rotates the whole head")
        rope_type = d.get("rope_type")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r} (rope_scaling): distil_jax "
                             f"implements {', '.join(ROPE_TYPES)}")
        missing = [k for k in _ROPE_REQUIRED[rope_type] if k not in d]
        if missing:
            raise ValueError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")
        if rope_type == "llama3" and d["high_freq_factor"] <= d["low_freq_factor"]:
            raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")

    # ------------------------------------------------------------------ derived and generic

    @property
    def num_kv_heads(self) -> int:
        """The number of key/value heads (num_key_value_heads, or all query heads)."""
        n = self.num_key_value_heads
        return self.num_attention_heads if n is None else n

    @property
    def head_size(self) -> int:
        """The per-head dimension (head_dim, or hidden_size // num_attention_heads)."""
        if self.head_dim is None:
            return self.hidden_size // self.num_attention_heads
        return self.head_dim

    @property
    def rope_scaling_dict(self) -> dict:
        """rope_scaling as a dict ({} for plain RoPE)."""
        return dict(self.rope_scaling) if self.rope_scaling else {}

    @property
    def rope_type(self) -> str:
        return self.rope_scaling_dict.get("rope_type", "default")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.o_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type in ("llama", "qwen3") and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Qwen3's per-head RMSNorm of q and k (before the rotary embedding)."""
        return self.model_type == "qwen3"

    @property
    def attention_window(self) -> Optional[int]:
        """The sliding window some layer applies, as HF's class for this type reads the switches
        (Qwen: only with use_sliding_window, on the layers layer_types or max_window_layers
        mark), or None when every layer attends to the whole causal prefix."""
        if self.model_type == "mistral":
            return self.sliding_window
        if self.model_type in ("qwen2", "qwen3") and self.use_sliding_window and self.sliding_window:
            if self.layer_types is not None:
                slides = "sliding_attention" in self.layer_types
            else:
                first = self.max_window_layers if self.max_window_layers is not None else 28
                slides = first < self.num_hidden_layers
            return self.sliding_window if slides else None
        return None

    # The generic names every family's config has (see distil_jax.models).
    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        """Query heads (what an attention map [B, H, S, S] has)."""
        return self.num_attention_heads

    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size

    @property
    def padded_vocab_size(self) -> int:
        """The rows `embed_tokens` and `lm_head` store: vocab_size rounded up
        (common.VOCAB_MULTIPLE)."""
        return padded_vocab_size(self.vocab_size)

    def replace(self, **overrides: Any) -> "Config":
        """A copy with `overrides` (validated again); an unknown field is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown {self.model_type} config field(s) {unknown}; valid fields: "
                             f"{', '.join(sorted(known))}")
        return dataclasses.replace(self, **overrides)

    def without_dropout(self) -> "Config":
        return self.replace(attention_dropout=0.0)


# ----------------------------------------------------------------------------- HF configs

# HF's class defaults for the fields a config.json may leave out (they differ by type: Qwen3's
# head_dim is 128, not hidden_size // heads; Mistral has 8 KV heads and a 4096 window).
_HF_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=None,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, bos_token_id=None, eos_token_id=None),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, bos_token_id=None, eos_token_id=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None,
                    max_position_embeddings=4096 * 32, sliding_window=4096, bos_token_id=1,
                    eos_token_id=2),
}
_COMMON_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                  "max_position_embeddings", "rms_norm_eps", "attention_dropout",
                  "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
                  "pad_token_id")
_QWEN_WINDOW_FIELDS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
# The fields HF's class for each type reads (others in a config.json are ignored there too).
_TYPE_FIELDS = {
    "llama": _COMMON_FIELDS + ("attention_bias", "mlp_bias"),
    "qwen2": _COMMON_FIELDS + _QWEN_WINDOW_FIELDS,
    "qwen3": _COMMON_FIELDS + ("attention_bias",) + _QWEN_WINDOW_FIELDS,
    "mistral": _COMMON_FIELDS + ("sliding_window",),
}


def _rope_from_hf(d: Mapping) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling dict or None) from either config format: transformers 5's
    `rope_parameters` (theta inside) or the older `rope_theta` + `rope_scaling`."""
    t = d.get("model_type")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if any(isinstance(v, Mapping) for v in rope.values()):
        raise ValueError(f"unsupported {t} option: per-layer-type rope_parameters "
                         f"({', '.join(rope)}); distil_jax implements one RoPE for all layers")
    rope = dict(rope)
    theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.get("type", "default"))
    rope.pop("type", None)
    partial = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"unsupported {t} option partial_rotary_factor={partial}: distil_jax "
                         f"rotates the whole head")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported {t} rope type {rope_type!r}: distil_jax implements "
                         f"{', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        # As HF's standardize_rope_params: the pretraining length defaults to the model's.
        rope.setdefault("original_max_position_embeddings",
                        d.get("max_position_embeddings", _HF_DEFAULTS[t]["max_position_embeddings"]))
    return theta, {"rope_type": rope_type, **rope}


def config_from_hf(d: Mapping) -> Config:
    """A config.json dict (or `transformers.PretrainedConfig.to_dict()`) -> Config (strict).

    Fields the dict leaves out take the HF class defaults of its model_type. Options that would
    change the math and are not implemented raise ValueError naming them. `pretraining_tp` is
    accepted and ignored: it only split the projections' matmuls into slices summed back (the
    same function), and transformers 5 no longer reads it.
    """
    d = dict(d)
    t = d.get("model_type")
    if t not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {t!r} for the Llama family; valid: "
                         f"{', '.join(MODEL_TYPES)}")
    if d.get("quantization_config"):
        raise ValueError(f"unsupported {t} option quantization_config: distil_jax loads "
                         f"unquantized weights only")
    kw = dict(_HF_DEFAULTS[t])
    kw.update({k: d[k] for k in _TYPE_FIELDS[t] if k in d})
    kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(d)
    if t in ("qwen2", "qwen3"):
        if not kw.get("use_sliding_window"):
            # HF's Qwen configs drop the window unless use_sliding_window is set.
            kw["sliding_window"], kw["layer_types"] = None, None
    heads = kw["num_attention_heads"]
    if kw.get("num_key_value_heads") in (None, heads):
        kw["num_key_value_heads"] = None  # derived: follows num_attention_heads
    if kw.get("head_dim") is not None and kw["head_dim"] * heads == kw["hidden_size"]:
        kw["head_dim"] = None  # derived: follows hidden_size // num_attention_heads
    return Config(model_type=t, **kw)


def hf_architecture(config: Config) -> str:
    """The transformers class an export of `config` loads as (e.g. "Qwen2ForCausalLM")."""
    return HF_ARCHITECTURES[config.model_type]


def config_to_hf(config: Config):
    """Config -> the transformers config class of its model_type, `architectures` set."""
    import transformers

    t = config.model_type
    kw = {k: getattr(config, k) for k in _TYPE_FIELDS[t] if k != "layer_types"}
    kw["num_key_value_heads"] = config.num_kv_heads
    kw["head_dim"] = config.head_size  # explicit: Qwen3's class default (128) is not derived
    if isinstance(config.eos_token_id, tuple):
        kw["eos_token_id"] = list(config.eos_token_id)
    if config.layer_types is not None:
        kw["layer_types"] = list(config.layer_types)
    if t in ("qwen2", "qwen3") and config.max_window_layers is None:
        kw.pop("max_window_layers")
    rope = config.rope_scaling_dict
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = {"rope_type": "default", **rope, "rope_theta": config.rope_theta}
    else:
        kw["rope_theta"], kw["rope_scaling"] = config.rope_theta, rope or None
    hf = getattr(transformers, _HF_CONFIG_CLASSES[t])(**kw)
    hf.architectures = [HF_ARCHITECTURES[t]]
    return hf


# ----------------------------------------------------------------------------- rotary


def rope_inv_freq(config: Config) -> np.ndarray:
    """The rotary inverse frequencies [head_size // 2] float32, computed as transformers'
    modeling_rope_utils does (float32 arithmetic) for rope types default, linear and llama3.
    A host constant: it depends on the config only."""
    dim = config.head_size
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    d = config.rope_scaling_dict
    if config.rope_type == "linear":
        inv_freq = inv_freq / np.float32(d["factor"])
    elif config.rope_type == "llama3":
        factor, low, high = d["factor"], d["low_freq_factor"], d["high_freq_factor"]
        old_len = d["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        # Long wavelengths are divided by factor, short ones kept, the band between them blended.
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(config: Config, positions: Array) -> tuple[Array, Array]:
    """cos, sin [B, S, head_size] float32 for position ids [B, S] (HF's LlamaRotaryEmbedding:
    the frequencies concatenated twice, as rotate_half pairs dimension i with i + head_size/2)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, S, heads, Dh]; cos, sin: [B, S, Dh] float32. Rotated in float32 (the tables are
    float32 and this costs a few elementwise ops), returned in x's dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- modules


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, times
    the weight (`scale`, initialized to 1). Normalizes over the last axis."""

    eps: float
    dtype: Any = jnp.float32  # the output dtype (the compute dtype)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        normed = (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class Attention(nn.Module):
    """Self-attention (`model.layers.N.self_attn`): q/k/v projections, Qwen3's q/k norms, RoPE,
    grouped-query attention through `common.attend`, o_proj."""

    config: Config
    dtype: Any = jnp.float32
    materialize: bool = False  # return post-softmax probabilities (explicit path)
    deterministic: bool = True
    fused: FusedAttention = FusedAttention()

    @nn.compact
    def __call__(self, x: Array, mask: Array, cos: Array, sin: Array,
                 kv: Optional[tuple] = None) -> tuple[Array, Any]:
        """x: [B, S, D]; mask: [B, 1, S, S] bool, or [B, 1, S, T] with `kv`; cos, sin: [B, S, Dh]
        float32; kv: generation's cache (keys, values [L, B, T, K, Dh], this layer, the first
        slot to write; `common.write_kv`), or None. Returns ([B, S, D], probs [B, H, S, S]
        float32 or None), or ([B, S, D], (keys, values) with this call's written) with `kv`."""
        cfg = self.config
        B, S, _ = x.shape
        H, K, Dh = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_size
        init = _normal(cfg.initializer_range)

        def proj(n, name, bias):
            return nn.Dense(n, use_bias=bias, dtype=self.dtype, kernel_init=init, name=name)

        q = proj(H * Dh, "q_proj", cfg.qkv_bias)(x).reshape(B, S, H, Dh)
        k = proj(K * Dh, "k_proj", cfg.qkv_bias)(x).reshape(B, S, K, Dh)
        v = proj(K * Dh, "v_proj", cfg.qkv_bias)(x).reshape(B, S, K, Dh)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Heads split over tensor: each device attends with whole query and key/value heads.
        q = constrain(q, ("batch", None, "heads", None))
        k, v = (constrain(t, ("batch", None, "kv_heads", None)) for t in (k, v))
        if kv is not None:  # generation: attend over the cache with this call's keys written in
            kv, (k, v) = write_kv(kv, k, v)

        def dropout(p):  # on the probabilities, train mode only (forces the explicit path)
            return nn.Dropout(cfg.attention_dropout)(p, deterministic=False)

        use_dropout = not self.deterministic and cfg.attention_dropout > 0.0
        out, probs = attend(q, k, v, mask, Dh ** -0.5, materialize=self.materialize,
                            dropout=dropout if use_dropout else None, fused=self.fused,
                            dtype=self.dtype)
        out = proj(cfg.hidden_size, "o_proj", cfg.o_bias)(out.reshape(B, S, H * Dh))
        return out, probs if kv is None else kv


class MLP(nn.Module):
    """SwiGLU (`model.layers.N.mlp`): down_proj(silu(gate_proj(x)) * up_proj(x))."""

    config: Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, S, D] -> [B, S, D]."""
        cfg = self.config
        init = _normal(cfg.initializer_range)

        def dense(n, name):
            return nn.Dense(n, use_bias=cfg.mlp_bias, dtype=self.dtype, kernel_init=init, name=name)

        h = jax.nn.silu(dense(cfg.intermediate_size, "gate_proj")(x)) * \
            dense(cfg.intermediate_size, "up_proj")(x)
        h = constrain(h, ("batch", None, "mlp"))
        return dense(cfg.hidden_size, "down_proj")(h)


class DecoderLayer(nn.Module):
    """One block (`model.layers.N`), pre-RMSNorm."""

    config: Config
    dtype: Any = jnp.float32
    materialize: bool = False
    deterministic: bool = True
    fused: FusedAttention = FusedAttention()

    @nn.compact
    def __call__(self, x: Array, mask: Array, cos: Array, sin: Array,
                 kv: Optional[tuple] = None) -> tuple[Array, Any]:
        """x: [B, S, D] -> ([B, S, D], probs [B, H, S, S] or None, or the updated (keys, values)
        with `kv`, see `Attention`)."""
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        a, probs = Attention(cfg, self.dtype, self.materialize, self.deterministic, self.fused,
                             name="self_attn")(h, mask, cos, sin, kv)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, self.dtype, name="mlp")(h)
        return constrain(x, ("batch", None, None)), probs


class ForCausalLM(nn.Module):
    """The parameters of HF's *ForCausalLM: `model` (embed_tokens -> layers -> norm) and, when
    untied, `lm_head`. Returns the last hidden state [B, S, D] after the final norm, the hidden
    states (or None) and the attentions dict; `forward` applies the head through `lm_head`."""

    config: Config
    dtype: Any = jnp.float32  # compute dtype; parameters stay in their own dtype
    attention_layers: tuple = ()
    hidden_layers: tuple = ()  # indices into the num_layers + 1 hidden states to return
    remat: bool | str = False  # False, True ("full") or a REMAT_POLICIES name
    deterministic: bool = True
    fused: FusedAttention = FusedAttention()
    scan_layers: bool = True  # False: one unrolled block per layer (the tests' reference)

    @nn.compact
    def __call__(self, input_ids: Array, mask: Array, positions: Array,
                 cache: Optional[KVCache] = None):
        x, hidden, attentions = _Model(
            self.config, self.dtype, self.attention_layers, self.hidden_layers, self.remat,
            self.deterministic, self.fused, self.scan_layers, name="model")(input_ids, mask,
                                                                            positions, cache)
        hidden_states = collect_hidden(hidden, x, self.config.num_hidden_layers, self.hidden_layers)
        if not self.config.tie_word_embeddings and self.is_initializing():
            # The untied head's parameter; `forward` applies the head through `lm_head`.
            nn.Dense(self.config.padded_vocab_size, use_bias=False,
                     kernel_init=_normal(self.config.initializer_range), name="lm_head")(x[:, :1])
        return x, hidden_states, attentions


class _Model(nn.Module):
    """`model`: embed_tokens -> layers -> norm. Returns (last hidden [B, S, D] after the norm,
    {k: block k's input} for the requested k, the attentions dict), or with `cache` (mask
    [B, 1, S, T]): (last hidden, {}, the new (keys, values))."""

    config: Config
    dtype: Any = jnp.float32
    attention_layers: tuple = ()
    hidden_layers: tuple = ()  # indices into the num_layers + 1 hidden states to return
    remat: bool | str = False  # False, True ("full") or a REMAT_POLICIES name
    deterministic: bool = True
    fused: FusedAttention = FusedAttention()
    scan_layers: bool = True  # False: one unrolled block per layer (the tests' reference)

    @nn.compact
    def __call__(self, input_ids: Array, mask: Array, positions: Array,
                 cache: Optional[KVCache] = None):
        cfg = self.config
        embed = nn.Embed(cfg.padded_vocab_size, cfg.hidden_size,
                         embedding_init=_normal(cfg.initializer_range), name="embed_tokens")
        x = embed(input_ids).astype(self.dtype)
        x = constrain(x, ("batch", None, None))  # the residual stream: rows split, width whole
        cos, sin = rope_tables(cfg, positions)  # once for all layers, as HF does
        x, hidden, attentions = self._layers(x, mask, cos, sin, cache)
        x = constrain(RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x), ("batch", None, None))
        return x, hidden, attentions

    def _layers(self, x: Array, mask: Array, cos: Array, sin: Array,
                cache: Optional[KVCache] = None):
        """The stack `model.layers`: every block parameter stacked on a leading [num_layers]
        axis, run by `stack.run` (a scan cut at the requested layers), or `stack.run_cached`."""
        cfg = self.config

        def layer(materialize: bool = False) -> DecoderLayer:
            return DecoderLayer(cfg, self.dtype, materialize, self.deterministic, self.fused,
                                parent=None)

        params = stack.stacked_params(self, "layers", layer(), cfg.num_hidden_layers, x, mask, cos,
                                      sin)

        def block_fn(p, x, idx, materialize, rng):
            rngs = None if rng is None else {"dropout": rng}
            return layer(materialize).apply({"params": p}, x, mask, cos, sin, rngs=rngs)

        if cache is not None:
            x, kv = stack.run_cached(
                lambda p, x, idx, kv: layer().apply({"params": p}, x, mask, cos, sin, kv),
                params, x, cache.key, cache.value, cache.index)
            return x, {}, kv
        rng = None if self.deterministic else self.make_rng("dropout")
        return stack.run(block_fn, params, x, n_layer=cfg.num_hidden_layers,
                         materialize=self.attention_layers, hidden=self.hidden_layers,
                         scan=self.scan_layers, remat=self.remat, rng=rng)


# ----------------------------------------------------------------------------- functions


def forward(
    config: Config,
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
) -> ModelOutput:
    """Run the model.

    Args:
      config: the model's `Config`.
      params: the parameter tree (HF-named paths, see the module docstring).
      input_ids: [B, S] int token ids, S <= config.max_position_embeddings (and <= the sliding
        window, if the model has one).
      attention_mask: [B, S] 1 for real tokens, 0 for padding (masks padded keys), or None.
      output_hidden_states: True: also return the num_hidden_layers + 1 hidden states; a
        sequence of indices into them (negative allowed): a tuple of num_hidden_layers + 1
        entries, None except those.
      output_attentions: layer indices (negative allowed) whose post-softmax probabilities
        [B, H_q, S, S] to return; only these layers materialize them.
      segment_ids: [B, S] int document ids for packed rows (attention stays inside a document,
        rotary positions restart per document); 0 marks padding.
      positions: [B, S] explicit position ids (default: from segment_ids, else 0..S-1).
      deterministic: False enables attention dropout (needs dropout_rng).
      dtype: compute dtype (float32 or bfloat16); RMSNorm statistics, the rotary tables and the
        materialized softmax are float32 either way, and logits are float32.
      remat: rematerialize each block in the backward pass (gradient checkpointing): True or
        "full" recomputes the block, "dots" keeps its matmul outputs (common.REMAT_POLICIES).
      return_last_hidden: skip the LM head (logits None); `last_hidden_state` is [B, S, D].
      attention_impl, single_document_rows: how the layers that return no probabilities attend
        ("xla" or "cudnn"; see `common.attend`).
      scan_layers: run the blocks as a scan (default); False unrolls them (same parameters).
      cache: generation's key/value cache (`common.KVCache`, T slots): the S tokens are written
        at its index and attend over its real tokens up to their own slot; `positions` must be
        given; the output's `cache` is the updated one. Not with hidden states, attentions,
        segment_ids or dropout.
    """
    length = input_ids.shape[1] if cache is None else cache.valid.shape[1]
    if length > config.max_position_embeddings:
        raise ValueError(f"sequence length {length} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}; truncate inputs to at most "
                         f"{config.max_position_embeddings} tokens")
    window = config.attention_window
    if window is not None and length > window:
        raise ValueError(f"sequence length {length} exceeds the {config.model_type} sliding_window="
                         f"{window}, and distil_jax does not implement sliding-window attention; "
                         f"use sequences of at most {window} tokens")
    return lm_forward(
        ForCausalLM, config, params, input_ids, attention_mask,
        None if return_last_hidden else lm_head(config, params),
        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        segment_ids=segment_ids, positions=positions, deterministic=deterministic,
        dropout_rng=dropout_rng, dtype=dtype, remat=remat, attention_impl=attention_impl,
        single_document_rows=single_document_rows, scan_layers=scan_layers, cache=cache)


def init_params(config: Config, rng: Array, param_dtype: Any = jnp.float32) -> dict:
    """Random parameters with HF's init: normal(0, initializer_range) for every Linear and the
    embedding (whose pad_token_id row is zero, as nn.Embedding(padding_idx) starts), zero
    biases, RMSNorm weights 1; the padded vocabulary entries zero."""
    model = ForCausalLM(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = model.init(rng, ids, attention_mask_4d(1, 1, None, None), ids)["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(param_dtype), dict(params))
    emb = zero_vocab_padding(params["model"]["embed_tokens"]["embedding"], 0, config.vocab_size)
    pad = config.pad_token_id
    if pad is not None and 0 <= pad < config.vocab_size:
        emb = emb.at[pad].set(0)
    params["model"] = {**params["model"], "embed_tokens": {"embedding": emb}}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": zero_vocab_padding(params["lm_head"]["kernel"], 1,
                                                          config.vocab_size)}
    return params


def param_shapes(config: Config) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation)."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- the LM head

_EMBEDDING = ("model", "embed_tokens", "embedding")
_LM_HEAD = ("lm_head", "kernel")


def lm_head_path(config: Config) -> tuple:
    """The parameter path holding the head: the embedding [V, D] when tied, else lm_head/kernel
    [D, V]."""
    return _EMBEDDING if config.tie_word_embeddings else _LM_HEAD


def lm_head(config: Config, params: Mapping) -> Array:
    """The LM head as [D, V] (the tied embedding transposed, or the separate head): the stored
    [D, padded V] cut to the vocab_size real columns, so every logit anyone computes is a real
    token's (docs/design.md, "The vocabulary: padded inside, exact outside")."""
    if config.tie_word_embeddings:
        return unpad_vocab(params["model"]["embed_tokens"]["embedding"], 0, config.vocab_size).T
    return unpad_vocab(params["lm_head"]["kernel"], 1, config.vocab_size)


def with_lm_head(config: Config, params: Mapping, head: Array) -> dict:
    """params (copied along the changed path) with the head set to `head` [D, V], stored
    zero-padded to the padded vocabulary."""
    path = lm_head_path(config)
    value = pad_vocab(head.T, 0, config.vocab_size) if config.tie_word_embeddings else \
        pad_vocab(head, 1, config.vocab_size)
    out = dict(params)
    node = out
    for k in path[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    node[path[-1]] = value
    return out


# ----------------------------------------------------------------------------- sharding

# Logical axes of every parameter (see distil_jax.sharding.RULES for the mesh axes). Dense
# kernels are [in, out]: q/o projections carry the query heads (H x Dh), k/v the key/value
# heads (K x Dh), so tensor parallelism keeps whole heads when it divides K.
PARAM_AXES = (
    (r"model/embed_tokens/embedding", ("vocab", "embed")),
    (r"model/layers/self_attn/q_proj/kernel", ("layers", "embed", "heads")),
    (r"model/layers/self_attn/q_proj/bias", ("layers", "heads")),
    (r"model/layers/self_attn/[kv]_proj/kernel", ("layers", "embed", "kv_heads")),
    (r"model/layers/self_attn/[kv]_proj/bias", ("layers", "kv_heads")),
    (r"model/layers/self_attn/o_proj/kernel", ("layers", "heads", "embed")),
    (r"model/layers/self_attn/o_proj/bias", ("layers", "bias")),
    (r"model/layers/self_attn/[qk]_norm/scale", ("layers", "norm")),
    (r"model/layers/mlp/(gate|up)_proj/kernel", ("layers", "embed", "mlp")),
    (r"model/layers/mlp/(gate|up)_proj/bias", ("layers", "mlp")),
    (r"model/layers/mlp/down_proj/kernel", ("layers", "mlp", "embed")),
    (r"model/layers/mlp/down_proj/bias", ("layers", "bias")),
    (r"model/layers/(input|post_attention)_layernorm/scale", ("layers", "norm")),
    (r"model/norm/scale", ("norm",)),
    (r"lm_head/kernel", ("embed", "vocab")),
)


# ----------------------------------------------------------------------------- HF names

_NORM_SUFFIXES = ("norm", "layernorm")  # input_layernorm, q_norm, model.norm, ...


def hf_to_path(name: str) -> Optional[tuple]:
    """HF state-dict name -> parameter path, or None for a buffer (rotary inv_freq).
    "model.layers.0.self_attn.q_proj.weight" -> ("model", "layers", "0", "self_attn", "q_proj",
    "kernel"). A name that is no parameter of any config still maps (the converter reports it)."""
    *mod, leaf = name.split(".")
    if leaf not in ("weight", "bias") or not mod:
        return None
    if leaf == "weight":
        if mod[-1] == "embed_tokens":
            leaf = "embedding"
        elif mod[-1].endswith(_NORM_SUFFIXES):
            leaf = "scale"
        else:
            leaf = "kernel"
    return tuple(mod) + (leaf,)


def path_to_hf(path: Sequence[str]) -> str:
    """Parameter path -> HF state-dict name (the inverse of `hf_to_path`)."""
    *mod, leaf = path
    return ".".join(list(mod) + ["bias" if leaf == "bias" else "weight"])


def hf_transposed(path: Sequence[str]) -> bool:
    """True where HF stores the leaf transposed: every Dense kernel [in, out] is a torch Linear
    weight [out, in] (the untied lm_head included); embeddings and norms are not."""
    return path[-1] == "kernel"


def module_path(name: str) -> tuple:
    """HF module name -> parameter path: "model.embed_tokens", "model.norm", "lm_head",
    "model.layers.N" (and anything below a layer, e.g. "model.layers.3.mlp")."""
    parts = tuple(name.split("."))
    ok = parts in (("model", "embed_tokens"), ("model", "norm"), ("lm_head",)) or (
        len(parts) >= 3 and parts[:2] == ("model", "layers") and parts[2].isdigit())
    if not ok:
        raise ValueError(f"unknown module {name!r} for the Llama family; valid: model.embed_tokens, "
                         f"model.norm, lm_head, model.layers.N")
    return parts


def block_path(i: int) -> tuple:
    """Block i's path in HF's per-layer view (HF's model.layers.i): slice i of `LAYERS_PATH`."""
    return ("model", "layers", str(i))


# Where the blocks' parameters are stacked on a leading [num_layers] axis (HF's
# `model.layers.N` is slice N; `models.stack_layers` / `unstack_layers` convert).
LAYERS_PATH = ("model", "layers")

# Every parameter is stored in HF's own shape (q, k and v are separate projections; see
# gpt2.HF_FUSED for a family whose fused tensor is stored reshaped).
HF_FUSED: dict = {}


# Module names in transformers' order (its state dict's; see gpt2.MODULE_ORDER): HF registers a
# layer's attention and MLP before its two norms.
MODULE_ORDER = ("model", "embed_tokens", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj",
                "q_norm", "k_norm", "mlp", "gate_proj", "up_proj", "down_proj", "input_layernorm",
                "post_attention_layernorm", "norm", "lm_head", "weight", "bias")
