"""The one place that knows model architectures: a registry of families keyed by the HF
`config.json` `model_type`, and the model interface everything else calls.

A family is one module (`gpt2.py`, `llama.py`) that provides:

  Config                      frozen, hashable config dataclass with HF's field names and the
                              generic properties model_type, num_layers, num_heads (query heads),
                              num_kv_heads, head_size (per head), width (hidden size), mlp_width,
                              max_positions, plus vocab_size, padded_vocab_size (the rows the
                              embedding and head store: a multiple of common.VOCAB_MULTIPLE),
                              tie_word_embeddings, initializer_range; `replace(**fields)` (an
                              unknown field is an error) and `without_dropout()`
  MODEL_TYPES                 the HF model_type values it implements
  HF_ARCHITECTURE             the transformers class an export loads as (e.g. "LlamaForCausalLM")
  config_from_hf(d)           config.json dict -> Config, refusing options it does not implement
  config_to_hf(config)        Config -> transformers config (architectures set)
  init_params(config, rng, param_dtype)
  forward(config, params, input_ids, attention_mask=None, *, ...) -> common.ModelOutput
                              (with cache=common.KVCache: generation's cached decoding)
  lm_head(config, params)     the LM head as [D, V]: the only place that knows tying (and cuts
                              the stored padded vocabulary to V, see `vocab_dims`)
  with_lm_head(config, params, head)  params with the head set to `head` [D, V]
  lm_head_path(config)        the parameter path that holds the head
  hf_to_path(name)            HF state-dict name -> parameter path (None: a buffer to skip)
  path_to_hf(path)            parameter path -> HF state-dict name
  hf_transposed(path)         True where HF stores the leaf transposed (torch Linear [out, in])
  module_path(name)           HF module name ("model.layers.3", "lm_head") -> parameter path
  block_path(i)               block i's path in HF's per-layer view ("h", "3")
  LAYERS_PATH                 where every block parameter is stacked on a leading [num_layers]
                              axis (the blocks run as a scan, `models.stack`); HF's block i is
                              slice i. hf_to_path, path_to_hf, hf_transposed, module_path and
                              block_path name the per-layer view (`unstack_layers`)
  HF_FUSED                    {path in the stacked tree: n}: a leaf stored with HF's last
                              dimension split as [n, last / n] (an exact reshape; GPT-2's
                              c_attn [q | k | v]); the per-layer view has HF's shape
  MODULE_ORDER                HF module names in transformers' order (its state dict's; `hf_order`)
  PARAM_AXES                  (path regex, logical axis names) pairs: one name per dimension of
                              each parameter ("embed", "heads", "mlp", ...), mapped to mesh axes
                              by `distil_jax.sharding.RULES`

A third family is one more module and one line in `_FAMILIES`.
"""

from __future__ import annotations

import functools
import math
import re
from types import ModuleType
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from distil_jax.models import gpt2, llama, stack
from distil_jax.models.common import (ATTENTION_IMPLS, FusedAttention, KVCache,  # noqa: F401
                                      ModelOutput,
                                      activation_sharding, check_attention_impl, constrain,
                                      normalize_layers, pad_vocab, unpad_vocab)

_FAMILIES: tuple[ModuleType, ...] = (gpt2, llama)
FAMILIES: dict[str, ModuleType] = {t: fam for fam in _FAMILIES for t in fam.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


class UnsupportedModelError(ValueError):
    """A model_type or option that distil_jax does not implement."""


def family(model_type_or_config: Any) -> ModuleType:
    """The family module for a model_type string or a config."""
    t = model_type_or_config if isinstance(model_type_or_config, str) else \
        getattr(model_type_or_config, "model_type", None)
    if t not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {t!r}: distil_jax supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    return FAMILIES[t]


def config_from_hf(hf_config: Any):
    """A transformers config, or a config.json dict, -> the family's Config (strict)."""
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    return family(d.get("model_type")).config_from_hf(d)


def config_to_hf(config):
    return family(config).config_to_hf(config)


def forward(config, params: Mapping, input_ids, attention_mask=None, **kwargs) -> ModelOutput:
    """Run the model (see the family's `forward` for the keyword arguments)."""
    return family(config).forward(config, params, input_ids, attention_mask, **kwargs)


def frozen_layers(config, params: Mapping) -> dict:
    """`params` with the stacked blocks in `stack.frozen_bits`'s form, for a forward pass that
    is not differentiated (the teacher's in the train step)."""
    path = family(config).LAYERS_PATH
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict(
        {k: stack.frozen_bits(v) if k[:len(path)] == path else v for k, v in flat.items()})


def init_cache(config, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty key/value cache of `length` slots for `batch` rows (`distil_jax.generate`):
    [num_layers, batch, length, num_kv_heads, head_size] keys and values in `dtype`."""
    return KVCache.empty(config.num_layers, batch, length, config.num_kv_heads, config.head_size,
                         dtype)


def init_params(config, rng: jax.Array, param_dtype: Any = jnp.float32) -> dict:
    """Random parameters with the family's HF init (see its `init_params`), as one compiled
    program, compiled once per config and dtype: run eagerly, flax's init dispatches (and
    compiles) each operation alone, seconds even for a tiny model."""
    return _jitted_init(config, rng, param_dtype)


@functools.partial(jax.jit, static_argnums=(0, 2))  # configs are frozen dataclasses: hashable
def _jitted_init(config, rng: jax.Array, param_dtype: Any) -> dict:
    return family(config).init_params(config, rng, param_dtype)


def lm_head(config, params: Mapping) -> jax.Array:
    """The LM head as a [D, V] matrix (the tied embedding transposed, or the separate head)."""
    return family(config).lm_head(config, params)


def with_lm_head(config, params: Mapping, head: jax.Array) -> dict:
    return family(config).with_lm_head(config, params, head)


def param_shapes(config) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s (no allocation)."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.PRNGKey(0))


def unstack_layers(config, params: Mapping) -> dict:
    """HF's per-layer view of `params`: the stacked blocks split into subtrees "0".."N-1"
    (`h/3/attn/...`), the paths `hf_to_path` / `path_to_hf` name, each leaf in HF's shape (the
    family's `HF_FUSED` leaves merged back). Arrays are slices (views on device);
    ShapeDtypeStructs work too."""
    fam = family(config)

    def view(p):
        return stack.unstack(_fused(p, fam.HF_FUSED, merge=True), fam.LAYERS_PATH, config.num_layers)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(params)):
        return jax.eval_shape(view, dict(params))
    return view(dict(params))


def stack_layers(config, tree: Mapping) -> dict:
    """The inverse of `unstack_layers`: per-layer subtrees in HF's shapes -> the stacked
    parameter tree as stored."""
    fam = family(config)
    return _fused(stack.stack(dict(tree), fam.LAYERS_PATH, config.num_layers), fam.HF_FUSED,
                  merge=False)


def _fused(params: dict, fused: Mapping, merge: bool) -> dict:
    """`params` with each `fused` leaf (path -> n) reshaped: stored [..., n, m] -> HF's
    [..., n * m] (merge), or back (the row-major order of the values is the same)."""
    flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)
    for path, n in fused.items():
        if path in flat:
            x = flat[path]
            flat[path] = x.reshape(x.shape[:-2] + (-1,)) if merge else \
                x.reshape(x.shape[:-1] + (n, x.shape[-1] // n))
    return traverse_util.unflatten_dict(flat)


def hf_param_shapes(config) -> dict:
    """`param_shapes` in HF's per-layer view (`unstack_layers`): one entry per HF tensor."""
    return unstack_layers(config, param_shapes(config))


def block_matmul_width(config) -> int:
    """Output features of one block's weight matmuls together (the `[in, out]` kernels' out):
    the values per token that remat policy "dots" keeps for each block's backward pass. 9 D
    for GPT-2 (qkv 3 D, attention out D, MLP 4 D + D)."""
    shapes = hf_param_shapes(config)
    for key in family(config).block_path(0):
        shapes = shapes[key]
    return sum(int(x.shape[-1]) for x in traverse_util.flatten_dict(shapes).values() if len(x.shape) == 2)


def vocab_dims(config, path: tuple) -> tuple[int, ...]:
    """The dimensions of parameter `path` (stacked or per-layer view) that index the vocabulary:
    stored padded to `config.padded_vocab_size`, vocab_size in HF's tensors (the family's
    PARAM_AXES name them "vocab")."""
    name = "/".join(path)
    rule = next((axes for pattern, axes in family(config).PARAM_AXES if re.fullmatch(pattern, name)), ())
    return tuple(i for i, axis in enumerate(rule) if axis == "vocab")


def hf_shape(config, path: tuple, shape: tuple) -> tuple:
    """A stored parameter's shape as HF's tensor has it: the vocabulary unpadded (not transposed)."""
    dims = vocab_dims(config, path)
    return tuple(config.vocab_size if i in dims else int(n) for i, n in enumerate(shape))


def pad_vocab_leaf(config, path: tuple, x: jax.Array) -> jax.Array:
    """An HF-shaped parameter (vocab_size entries per vocabulary dimension) -> the stored shape."""
    for d in vocab_dims(config, path):
        x = pad_vocab(x, d, config.vocab_size)
    return x


def unpad_vocab_leaf(config, path: tuple, x: jax.Array) -> jax.Array:
    """A stored parameter -> HF's shape: each vocabulary dimension cut to vocab_size."""
    for d in vocab_dims(config, path):
        x = unpad_vocab(x, d, config.vocab_size)
    return x


def param_count(config) -> int:
    """Number of parameters, as HF counts them (a tied head counted once; the vocabulary
    unpadded). No allocation."""
    flat = traverse_util.flatten_dict(param_shapes(config))
    return sum(math.prod(hf_shape(config, p, x.shape)) for p, x in flat.items())


def shape_problems(want: Mapping, got: Mapping) -> list[str]:
    """How parameter tree `got` differs from `want` (arrays or ShapeDtypeStructs): one entry per
    wrong shape, missing leaf or unexpected leaf, paths written `a/b/c`; [] when they match."""
    w, g = traverse_util.flatten_dict(dict(want)), traverse_util.flatten_dict(dict(got))
    shape = lambda x: tuple(getattr(x, "shape", ()))  # noqa: E731
    out = [f"{'/'.join(p)}: {shape(g[p])}, expected {shape(w[p])}"
           for p in w if p in g and shape(g[p]) != shape(w[p])]
    out += [f"missing {'/'.join(p)}" for p in w if p not in g]
    out += [f"unexpected {'/'.join(p)}" for p in g if p not in w]
    return out


def logical_axes(config, params: Optional[Mapping] = None) -> dict:
    """{path tuple: logical axis names, one per dimension} of every parameter, from the family's
    PARAM_AXES (first regex that fully matches the path written "a/b/c"). `params`: the tree
    (arrays or ShapeDtypeStructs), default `param_shapes(config)`. A parameter no rule
    describes is a ValueError, so a new parameter cannot silently go unsharded."""
    fam = family(config)
    params = param_shapes(config) if params is None else params
    out = {}
    for path, x in traverse_util.flatten_dict(dict(params)).items():
        name = "/".join(path)
        rule = next((axes for pattern, axes in fam.PARAM_AXES if re.fullmatch(pattern, name)), None)
        if rule is None:
            raise ValueError(f"{fam.__name__}.PARAM_AXES has no rule for the parameter {name}; add one")
        if len(rule) != len(x.shape):
            raise ValueError(f"{fam.__name__}.PARAM_AXES gives {name} {len(rule)} axis names but it "
                             f"has {len(x.shape)} dimensions")
        out[path] = tuple(rule)
    return out


def stale_layout(params: Mapping) -> Optional[str]:
    """The first leaf of a stored parameter tree (arrays, ShapeDtypeStructs or checkpoint
    metadata: anything with `.shape`; no config needed) whose number of dimensions is not the
    one its family's PARAM_AXES give it today, e.g. "h/attn/c_attn/kernel (2, 32, 96), stored
    now with 4 dimensions (layers, embed, -, heads)": a layout an older distil_jax wrote (GPT-2's
    c_attn before `gpt2.HF_FUSED`). None when every leaf fits; a leaf no rule names is left to
    the shape check (`shape_problems`)."""
    rules = [rule for fam in _FAMILIES for rule in fam.PARAM_AXES]
    for path, x in traverse_util.flatten_dict(dict(params)).items():
        name = "/".join(str(k) for k in path)
        axes = next((axes for pattern, axes in rules if re.fullmatch(pattern, name)), None)
        shape = tuple(getattr(x, "shape", ()))
        if axes is not None and len(axes) != len(shape):
            return (f"{name} {shape}, stored now with {len(axes)} dimensions "
                    f"({', '.join(a or '-' for a in axes)})")
    return None


def hf_order(config, name: str) -> tuple:
    """Sort key that puts HF state-dict names in transformers' own order (embeddings, block 0,
    ..., the final norm, the head), from the family's MODULE_ORDER; block numbers sort as numbers
    and a name the family does not list sorts last."""
    order = family(config).MODULE_ORDER
    return tuple((0, int(p), "") if p.isdigit() else (1, order.index(p), "") if p in order
                 else (2, 0, p) for p in name.split("."))
