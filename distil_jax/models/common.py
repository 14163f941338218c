"""What every model family shares: the forward's output, masks and positions of packed rows,
and the attention core (explicit probabilities for the layers a loss reads, fused otherwise).

A family module (`gpt2.py`, `llama.py`) builds its own projections, norms and MLP around these;
`distil_jax.models` (the package) is the registry that dispatches on `config.model_type`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Array = jax.Array


@flax.struct.dataclass
class ModelOutput:
    """What a family's `forward` returns.

    logits: [B, S, V] float32 (the LM head accumulates in float32), or None when
        `return_last_hidden` is set.
    last_hidden_state: [B, S, D] after the final norm, in the compute dtype (what a caller that
        applies the LM head itself, `lm_head(config, params)`, multiplies).
    hidden_states: tuple of num_layers + 1 entries [B, S, D] (embedding output, then each block's
        output, the last one after the final norm as in HF), None for a state not requested
        (`forward`'s output_hidden_states), or None when none is.
    attentions: dict {layer index (non-negative): [B, H, S, S] float32 post-softmax
        probabilities} for exactly the requested layers (H = query heads).
    """

    logits: Optional[Array]
    last_hidden_state: Array
    hidden_states: Optional[tuple]
    attentions: dict
    cache: Optional["KVCache"] = None  # the updated cache, when `forward` was given one


@flax.struct.dataclass
class KVCache:
    """Every layer's keys and values for generation (`distil_jax.generate`), stacked on the
    layer axis like the block parameters (the blocks' scan carries one layer's slice each).

    key, value: [L, B, T, K, Dh] in the compute dtype (K = num_kv_heads: grouped-query heads
      are cached once, not once per query head).
    valid: [B, T] bool, True where the slot holds a real token (left padding and slots not
      written yet are False).
    index: int32 scalar, the first slot the next `forward(..., cache=)` call writes.
    """

    key: Array
    value: Array
    valid: Array
    index: Array

    @classmethod
    def empty(cls, num_layers: int, batch: int, length: int, kv_heads: int, head_size: int,
              dtype: Any = jnp.float32) -> "KVCache":
        zeros = jnp.zeros((num_layers, batch, length, kv_heads, head_size), dtype)
        return cls(zeros, zeros, jnp.zeros((batch, length), bool), jnp.int32(0))

    def mask(self, attention_mask: Optional[Array], seq: int) -> tuple[Array, Array]:
        """(mask [B, 1, S, T] for `seq` new tokens written at `index`, the new `valid`): a new
        token attends to the real tokens in the slots up to its own (causal over the cache)."""
        B, T = self.valid.shape
        new = jnp.ones((B, seq), bool) if attention_mask is None else attention_mask.astype(bool)
        valid = jax.lax.dynamic_update_slice(self.valid, new, (0, self.index))
        slots = jnp.arange(T, dtype=jnp.int32)
        causal = slots[None, :] <= self.index + jnp.arange(seq, dtype=jnp.int32)[:, None]
        return causal[None, None] & valid[:, None, None, :], valid

    def written(self, kv: tuple[Array, Array], valid: Array, seq: int) -> "KVCache":
        """The cache after a call that wrote `seq` tokens: the blocks' new (keys, values) and
        `mask`'s new `valid`."""
        return self.replace(key=kv[0], value=kv[1], valid=valid, index=self.index + seq)


def write_kv(kv: tuple, k: Array, v: Array) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """Write one layer's k, v [B, S, K, Dh] into the stacked cache `kv` = (keys, values
    [L, B, T, K, Dh], layer, index) at slots index..index+S-1 of `layer`.

    Returns ((keys, values) written, (key, value) [B, T, K, Dh]: the layer's slots, what it
    attends over). The write goes into the whole stack, which the layer scan and the decoding
    loop carry: XLA updates a carried buffer in place, so a step writes S slots per layer
    instead of copying every layer's cache.
    """
    keys, values, layer, index = kv
    at = (layer, 0, index, 0, 0)
    keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), at)
    values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), at)
    return (keys, values), (keys[layer], values[layer])


@dataclasses.dataclass(frozen=True)
class FusedAttention:
    """How the layers that return no probabilities attend (see `forward`'s attention_impl and
    single_document_rows). One hashable field that the modules pass down unchanged."""

    impl: str = "xla"
    single_document_rows: bool = False


ATTENTION_IMPLS = ("xla", "cudnn")


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """Within this context (entered while the step is traced), `constrain` pins activations to
    `mesh` by the logical `rules`: flax's `logical_axis_rules` on jax's abstract mesh. Outside
    it, or on one device, `constrain` is a no-op, so one device and the tests see plain code."""
    if mesh.size == 1:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def constrain(x: Array, names: Sequence[Optional[str]]) -> Array:
    """Pin activation `x` to its logical axes `names` (e.g. ("batch", None, "heads", None)).

    Why: from the parameters' shardings alone XLA may split an FSDP activation along the width
    (as the weights are) instead of the batch, and then rematerializes it whole on every device;
    on the reference run that tripled the temporaries. A dimension that its mesh axes do not
    divide (a small micro-batch) is left to XLA (unconstrained) rather than padded.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = nn.logical_to_mesh_axes(tuple(names))
    fitted = []
    for dim, name, split in zip(x.shape, names, axes):
        split = (split,) if isinstance(split, str) else tuple(split or ())
        n = math.prod(mesh.shape[a] for a in split)
        fitted.append(PartitionSpec.UNCONSTRAINED if n > 1 and dim % n else name)
    return nn.with_logical_constraint(x, tuple(fitted))


# Gradient checkpointing of each block (train.remat_policy): "full" saves only the block's input
# and recomputes the whole block in the backward pass (HF's gradient_checkpointing, Distily's);
# "dots" also saves the outputs of the weight matmuls (no batch dimensions: not the S x S
# attention scores), so the backward pass recomputes only the cheap elementwise work. "auto"
# (train.remat_policy's default) is not a policy: train_step.for_batch_shape resolves it to one
# of these per batch shape.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# "auto" picks "dots" when what it keeps (every block's matmul outputs, per device) takes at
# most this share of the device's memory: the student's forward matmuls are then not
# recomputed (about 10 % of a distillation step's FLOPs) for activation memory that fits.
AUTO_REMAT_MEMORY_SHARE = 0.1


def remat_fn(fn, remat, prevent_cse: bool = True):
    """`fn` as is (remat False), or under jax.checkpoint with the policy `remat` names (True is
    "full"). One place for both families: `stack.run` wraps each block with it (prevent_cse=False
    inside the scan, where jax's docs say it is not needed)."""
    if not remat:
        return fn
    name = "full" if remat is True else remat
    if name == "auto":
        raise ValueError("remat='auto' is decided per batch shape: pass the StepConfig through "
                         "train_step.for_batch_shape first")
    if name not in REMAT_POLICIES:
        raise ValueError(f"train.remat_policy={name!r}: use one of {', '.join(REMAT_POLICIES)}")
    if prevent_cse and REMAT_POLICIES[name] is None and xla_cpu():
        return _remat_after_cotangent(fn)
    return jax.checkpoint(fn, policy=REMAT_POLICIES[name], prevent_cse=prevent_cse)


def xla_cpu() -> bool:
    """Whether jax compiles for XLA:CPU, whose compiler differs from the accelerators' in two
    ways that cost memory here (docs/scaling.md, "Two XLA:CPU behaviours"): it drops
    optimization barriers before common-subexpression elimination (`_remat_after_cotangent`),
    and it computes bfloat16 in float32, converting a scan's loop-invariant bfloat16 weights
    whole before the loop (`stack.frozen_bits`)."""
    return jax.default_backend() == "cpu"


def _remat_after_cotangent(fn):
    """fn under full gradient checkpointing, recomputed in the backward pass inside a
    conditional on the cotangent (both branches the same recomputation and VJP).

    Why: jax.checkpoint keeps its recomputation apart from the forward with an optimization
    barrier, and XLA:CPU removes barriers before its common-subexpression elimination, which
    then merges the recomputation into the forward: a block outside a scan (the objective's
    mapped layers) silently keeps every activation, attention probabilities included, from
    its forward to its backward pass. A branch of a conditional is a computation of its own
    that CSE does not merge across, and it can only run once the cotangent exists. Values and
    gradients are jax.checkpoint's (tested); accelerators keep jax.checkpoint, whose barriers
    their compilers respect (a conditional would cost a device-to-host sync there)."""
    @jax.custom_vjp
    def f(*args):
        return fn(*args)

    def fwd(*args):
        return fn(*args), args

    def bwd(args, g):
        def vjp(args, g):
            return jax.vjp(fn, *args)[1](g)
        # Any value computed from the cotangent serves; x == x is true but for a NaN, and
        # either way the same branch runs.
        first = jax.tree_util.tree_leaves(g)[0].ravel()[0]
        return jax.lax.cond(first == first, vjp, vjp, args, g)

    f.defvjp(fwd, bwd)
    return f


def check_attention_impl(attention_impl: str, dtype: Any) -> None:
    """ValueError naming the fix when `attention_impl` cannot run here (checked before tracing,
    so the user gets this line rather than a lowering error)."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {attention_impl!r}; valid: "
                         f"{', '.join(ATTENTION_IMPLS)}")
    if attention_impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention 'cudnn' (cuDNN flash attention) needs an NVIDIA GPU, but "
                             f"jax runs on {jax.default_backend()!r}; use attention 'xla'")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"attention 'cudnn' needs bfloat16 (or float16) compute, not "
                             f"{jnp.dtype(dtype).name}; set the compute dtype to bfloat16 or use "
                             f"attention 'xla'")


def normalize_layers(layers: Sequence[int], n_layer: int) -> tuple[int, ...]:
    """Layer indices (negative allowed) -> sorted unique non-negative indices; range-checked."""
    out = set()
    for i in layers:
        j = i + n_layer if i < 0 else i
        if not 0 <= j < n_layer:
            raise ValueError(f"attention layer {i} out of range for a model with {n_layer} layers")
        out.add(j)
    return tuple(sorted(out))


def hidden_layers(output_hidden_states, n_layer: int) -> tuple[int, ...]:
    """forward's output_hidden_states -> sorted indices into the n_layer + 1 hidden states:
    True is every one, False or () none, a sequence those (negative allowed; range-checked)."""
    if output_hidden_states is True:
        return tuple(range(n_layer + 1))
    if not output_hidden_states:
        return ()
    return normalize_layers(output_hidden_states, n_layer + 1)


def collect_hidden(states: dict, last: Array, n_layer: int, wanted: tuple) -> Optional[tuple]:
    """ModelOutput.hidden_states: n_layer + 1 entries, each block's input from `states` and the
    final normed state `last` (as HF), None where not `wanted`; None when nothing is wanted."""
    if not wanted:
        return None
    return tuple((last if k == n_layer else states[k]) if k in wanted else None
                 for k in range(n_layer + 1))


def segment_positions(segment_ids: Array) -> Array:
    """Positions that restart at 0 at the start of each segment. [B, S] int -> [B, S] int32."""
    S = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], dtype=bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
        axis=-1,
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)
    return idx - start_idx


def attention_mask_4d(
    batch: int, seq: int, attention_mask: Optional[Array], segment_ids: Optional[Array]
) -> Array:
    """The boolean [B, 1, S, S] mask: causal, keys not padded, and same segment when packed."""
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None]
    mask = jnp.broadcast_to(causal, (batch, 1, seq, seq))
    if segment_ids is not None:
        # Padding carries segment 0 and attends only to padding, so no row is ever empty.
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if attention_mask is not None:
        # HF semantics: padded keys are masked; a padded query still attends to earlier real keys.
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    return mask


def default_positions(input_ids: Array, segment_ids: Optional[Array],
                      positions: Optional[Array], cache: Optional[KVCache] = None) -> Array:
    """[B, S] position ids: `positions` if given, else restarting per segment, else 0..S-1.
    With a `cache` they must be given: the S tokens sit after the cache's, not at 0..S-1."""
    if positions is not None:
        return positions
    if cache is not None:
        raise ValueError("a forward with a key/value cache needs positions: pass positions [B, S], "
                         "each token's position in its sequence (generate.prompt_positions)")
    if segment_ids is not None:
        return segment_positions(segment_ids)
    B, S = input_ids.shape
    return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))


def lm_forward(module: type, config: Any, params: Any, input_ids: Array, attention_mask: Optional[Array],
               head: Optional[Array], *, output_hidden_states: bool | Sequence[int],
               output_attentions: Sequence[int], segment_ids: Optional[Array], positions: Optional[Array],
               deterministic: bool, dropout_rng: Optional[Array], dtype: Any, remat: bool | str,
               attention_impl: str, single_document_rows: bool, scan_layers: bool,
               cache: Optional[KVCache]) -> ModelOutput:
    """Every family's `forward` after its own length checks (the arguments are its, see
    `gpt2.forward`): builds `module` (the family's *LMHeadModel / *ForCausalLM) for the layers
    to return, runs it on the positions and the mask (the cache's when generating), and the LM
    head `head` [D, V] on the last hidden state [B, S, D] (None: logits None)."""
    check_attention_impl(attention_impl, dtype)
    if not deterministic and dropout_rng is None:
        raise ValueError("forward(deterministic=False) needs a dropout_rng")
    B, S = input_ids.shape
    positions = default_positions(input_ids, segment_ids, positions, cache)
    if cache is None:
        mask = attention_mask_4d(B, S, attention_mask, segment_ids)
    else:
        mask, valid = cache.mask(attention_mask, S)
    model = module(
        config,
        dtype=dtype,
        attention_layers=normalize_layers(output_attentions, config.num_layers),
        hidden_layers=hidden_layers(output_hidden_states, config.num_layers),
        remat=remat,
        deterministic=deterministic,
        fused=FusedAttention(attention_impl, single_document_rows),
        scan_layers=scan_layers,
    )
    rngs = None if deterministic else {"dropout": dropout_rng}
    x, hidden_states, attentions = model.apply({"params": params}, input_ids, mask, positions,
                                               cache, rngs=rngs)
    if cache is not None:  # the blocks returned the new (keys, values) in the attentions' place
        cache, attentions = cache.written(attentions, valid, S), {}
    # The head accumulates in float32 (head_logits): logits feed float32 softmax-based losses.
    logits = None if head is None else head_logits(x, head)
    return ModelOutput(logits, x, hidden_states, attentions, cache)


def attend(q: Array, k: Array, v: Array, mask: Array, scale: float, *, materialize: bool,
           dropout: Optional[Callable[[Array], Array]], fused: FusedAttention,
           dtype: Any) -> tuple[Array, Optional[Array]]:
    """Scaled dot-product attention of one layer.

    q: [B, S, H, Dh]; k, v: [B, S, K, Dh] with K dividing H (grouped-query attention: each group
    of H/K query heads shares a key/value head); mask: [B, 1, S, S] bool (True = may attend).
    materialize: return the post-softmax probabilities [B, H, S, S] float32 (scores and softmax
      in float32; the explicit path). dropout: attention dropout on the probabilities (train
      mode), or None; fused attention has no dropout, so dropout forces the explicit path too.
    Returns (out [B, S, H, Dh] in `dtype`, probs or None).
    """
    H, K = q.shape[2], k.shape[2]
    if materialize or dropout is not None:
        if K != H:  # repeat each key/value head for its group of query heads (HF's repeat_kv)
            k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        weights = dropout(probs) if dropout is not None else probs
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v.astype(dtype))
        return out, probs if materialize else None
    if fused.impl == "cudnn":
        # cuDNN flash attention: is_causal lets it skip the blocks above the diagonal; a mask
        # (documents, padding) becomes an additive bias [B, 1, S, S]. With one document per row
        # and padding after it, causal alone is exact for every real token, and the plain causal
        # kernel is cuDNN's fastest and best-trodden path. No [B, H, S, S] probabilities are
        # written in either pass.
        cudnn_mask = None if fused.single_document_rows else mask
        out = jax.nn.dot_product_attention(q, k, v, mask=cudnn_mask, scale=scale, is_causal=True,
                                           implementation="cudnn")
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    return out, None


# The embedding and the LM head store the vocabulary padded to a multiple of this (the rows past
# `vocab_size` are inert: no token id reaches them and `lm_head` drops them), so the vocabulary
# axis divides every power-of-two mesh axis up to 128 and can be split (GPT-2's 50257 = 29 x 1733
# divides by none). 128 is also a whole number of TPU lanes / GPU tiles. docs/design.md, "The
# vocabulary: padded inside, exact outside".
VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
    """vocab_size rounded up to a multiple of VOCAB_MULTIPLE: the rows the parameters store."""
    return -(-int(vocab_size) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def pad_vocab(x: Array, axis: int, vocab_size: int) -> Array:
    """x, whose `axis` has vocab_size entries, zero-padded along it to padded_vocab_size."""
    if x.shape[axis] != vocab_size:
        raise ValueError(f"expected {vocab_size} vocabulary entries along axis {axis}, got shape "
                         f"{tuple(x.shape)}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded_vocab_size(vocab_size) - vocab_size)
    return jnp.pad(x, widths)


def unpad_vocab(x: Array, axis: int, vocab_size: int) -> Array:
    """x with its (padded) vocabulary `axis` cut to the vocab_size real entries."""
    return jax.lax.slice_in_dim(x, 0, vocab_size, axis=axis)


def zero_vocab_padding(x: Array, axis: int, vocab_size: int) -> Array:
    """x with its padded vocabulary entries set to zero: what init, import and `with_lm_head`
    store, so that a copied head or embedding equals its source whole."""
    return pad_vocab(unpad_vocab(x, axis, vocab_size), axis, vocab_size)


def head_logits(hidden: Array, head: Array) -> Array:
    """hidden [..., D] (compute dtype) @ head [D, V] -> logits [..., V] float32.

    The product accumulates in float32 (`preferred_element_type`) so the float32 log-softmax of
    every loss sees unrounded logits: rounding them to bfloat16 first would move the KL of a
    token with logits around -80 by up to 1e-2.
    """
    return _head_matmul(hidden, head.astype(hidden.dtype))


@jax.custom_vjp
def _head_matmul(hidden: Array, head: Array) -> Array:
    return jnp.matmul(hidden, head, preferred_element_type=jnp.float32)


def _head_matmul_fwd(hidden, head):
    return _head_matmul(hidden, head), (hidden, head)


def _head_matmul_bwd(res, g):
    """The two vocabulary-sized gradient matmuls, written so that neither reads the logits'
    gradient g [N, V] transposed: d_head = hidden^T g [D, V] transposes the small [N, D] states
    instead. Left to autodiff, XLA's CPU backend computes the tied embedding's gradient as
    g^T hidden [V, D] and writes a transposed copy of g for it (recomputing the softmax
    backward into it, a large fusion of the CPU bench's step (docs/benchmarks.md)."""
    hidden, head = res
    # The same mixed-dtype products (float32 g, compute-dtype operands, float32 accumulation)
    # and casts as autodiff's: the gradients equal its up to the order of float32 sums.
    d_hidden = jax.lax.dot_general(g, head, (((g.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    flat_h, flat_g = hidden.reshape(-1, hidden.shape[-1]), g.reshape(-1, g.shape[-1])
    d_head = jax.lax.dot_general(flat_h, flat_g, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_head.astype(head.dtype)


_head_matmul.defvjp(_head_matmul_fwd, _head_matmul_bwd)
