"""The block stack of every family: each block parameter stacked on a leading "layers" axis and
the blocks run as a `jax.lax.scan` over that axis, in segments cut where a caller reads a
block's output.

Why a scan: an unrolled Python loop makes the step one graph with a copy of every block, so
compile time grows with depth and, under FSDP, XLA is free to gather every layer's weights at
once. A scan traces one block and runs it L times; each iteration gathers only its own layer's
weights (MaxText's `scan_layers`, flax's `nn.scan(variable_axes={"params": 0})`).

Why segments: the objective reads a few blocks' attention maps [B, H, S, S] and a few hidden
states. A scan's body is the same for every iteration, so returning maps from it would make
every layer compute them explicitly (no fused attention) and stack them as a [L, B, H, S, S]
output, and the backward pass would keep a buffer of them per iteration. Instead the layers are
cut at the requested ones: a block whose maps are read runs alone (explicit attention), a
hidden state read before block k is the carry where a segment ends at k, and the runs between
them are scans with the fused path. Memory holds the mapped layers' outputs only; the graph has
at most 2 x (mapped layers) + 1 segments, whatever the depth.

`scan=False` cuts after every block (one unrolled block per layer, the same parameters): the
tests' reference for the scan.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from distil_jax.models.common import remat_fn

Array = jax.Array
# block_fn(layer params, x [B, S, D], layer index (int32 scalar), materialize, dropout rng or
# None) -> (x [B, S, D], probs [B, H, S, S] or None).
BlockFn = Callable[[Any, Array, Array, bool, Optional[Array]], tuple]


def stacked_params(module: nn.Module, name: str, block: nn.Module, n_layer: int,
                   *example_args) -> dict:
    """`module`'s parameter `name`: `block`'s parameters stacked on a leading [n_layer] axis,
    each layer initialized from its own rng. `block` is unbound (parent=None); example_args: its
    inputs at init. A `variable` rather than `param`: `param` traces the init again at every
    apply to check shapes (a block's worth of tracing per step compile; `hf.py` and the
    checkpoint restore check shapes already)."""
    def init():
        one = lambda r: dict(block.init(r, *example_args)["params"])  # noqa: E731
        return jax.vmap(one)(jax.random.split(module.make_rng("params"), n_layer))
    return module.variable("params", name, init).value


def segments(n_layer: int, materialize: Sequence[int], hidden: Sequence[int],
             scan: bool = True) -> list[tuple[int, int]]:
    """[start, end) runs of blocks: cut before and after each block in `materialize` and before
    each block k in `hidden` (the hidden state read there is that block's input)."""
    cuts = {0, n_layer} | {k for k in hidden if k < n_layer}
    cuts |= {a for a in materialize} | {a + 1 for a in materialize}
    if not scan:
        cuts = set(range(n_layer + 1))
    cuts = sorted(cuts)
    return list(zip(cuts[:-1], cuts[1:]))


def run(block_fn: BlockFn, params: Any, x: Array, *, n_layer: int, materialize: Sequence[int] = (),
        hidden: Sequence[int] = (), scan: bool = True, remat: bool | str = False,
        rng: Optional[Array] = None) -> tuple[Array, dict, dict]:
    """Run the n_layer blocks over `x` [B, S, D] with `params` (every leaf [n_layer, ...]).

    materialize: blocks whose attention probabilities to return; hidden: k (0 <= k < n_layer)
    whose block input to return. remat: the policy per block (`common.remat_fn`). rng: the
    dropout key (None: deterministic); block i uses fold_in(rng, i).
    Returns (x after the last block, {k: [B, S, D]}, {i: [B, H, S, S]}).
    """
    materialize = set(materialize)
    # prevent_cse only matters outside a scan (XLA could merge the recomputation with the
    # forward); inside one it only blocks optimizations (MaxText: prevent_cse=not scan_layers).
    one = {m: remat_fn(_closed(block_fn, m, rng), remat) for m in (False, True)}
    body = remat_fn(_closed(block_fn, False, rng), remat, prevent_cse=False)
    states, maps = {}, {}
    for start, end in segments(n_layer, sorted(materialize), hidden, scan):
        if start in hidden:
            states[start] = x
        if end - start == 1:
            layer = jax.tree_util.tree_map(lambda p: _from_bits(p[start]), params)
            x, probs = one[start in materialize](layer, x, jnp.int32(start))
            if start in materialize:
                maps[start] = probs
            continue
        run_params = jax.tree_util.tree_map(lambda p: p[start:end], params)

        def step(carry, xs):
            layer, idx = xs
            return body(jax.tree_util.tree_map(_from_bits, layer), carry, idx)[0], None

        x, _ = jax.lax.scan(step, x, (run_params, jnp.arange(start, end, dtype=jnp.int32)))
    return x, states, maps


def run_cached(block_fn: Callable, params: Any, x: Array, keys: Array, values: Array,
               index: Array) -> tuple[Array, tuple[Array, Array]]:
    """The blocks over `x` [B, S, D] with a key/value cache (generation): one scan over the
    layers that carries the whole cache, each iteration writing its layer's keys and values at
    `index` (`common.write_kv`; a carried buffer is updated in place).

    block_fn(layer params, x, layer index, (keys, values, layer index, index)) -> (x, (keys,
    values)). keys, values: [L, B, T, K, Dh]. Returns (x, (keys, values)).
    """
    def step(carry, xs):
        x, keys, values = carry
        layer, idx = xs
        x, (keys, values) = block_fn(layer, x, idx, (keys, values, idx, index))
        return (x, keys, values), None

    n_layer = keys.shape[0]
    (x, keys, values), _ = jax.lax.scan(
        step, (x, keys, values), (params, jnp.arange(n_layer, dtype=jnp.int32)))
    return x, (keys, values)


def frozen_bits(params: Any) -> Any:
    """A model's stacked block parameters for a forward pass that is not differentiated (the
    teacher's): on XLA:CPU each bfloat16 leaf as its uint16 bits, which `run` reads back per
    layer inside the scan; elsewhere `params` as they are.

    Why: XLA:CPU computes bfloat16 matmuls in float32 and moves the conversion of a scan's
    loop-invariant weights out of the loop, so a bfloat16 teacher's whole stacked segment
    existed a second time in float32 (docs/scaling.md measures it on the Llama-3.1-8B-shaped
    teacher), and it all-gathers bfloat16 shards as float32. Integer bits are converted
    nowhere and gathered at two bytes; the bitcast back is free. The values are the same bits
    (tested). Integer leaves carry no gradient, hence only for a model that gets none."""
    from distil_jax.models.common import xla_cpu

    if not xla_cpu():
        return params
    return jax.tree_util.tree_map(
        lambda p: jax.lax.bitcast_convert_type(p, jnp.uint16) if p.dtype == jnp.bfloat16 else p,
        params)


def _from_bits(p):
    """A leaf of `frozen_bits` back in bfloat16 (other leaves as they are)."""
    return jax.lax.bitcast_convert_type(p, jnp.bfloat16) if p.dtype == jnp.uint16 else p


def _closed(block_fn: BlockFn, materialize: bool, rng: Optional[Array]):
    """block_fn with `materialize` fixed and the layer's dropout key derived from its index."""
    def fn(layer, x, idx):
        return block_fn(layer, x, idx, materialize, None if rng is None else jax.random.fold_in(rng, idx))
    return fn


# ----------------------------------------------------------------------------- HF's per-layer view


def unstack(params: dict, path: tuple[str, ...], n_layer: int) -> dict:
    """The per-layer view: the subtree at `path` (leaves [n_layer, ...]) becomes n_layer
    subtrees named "0".."n_layer-1" (HF's `h.N` / `layers.N`). Works on ShapeDtypeStructs
    through `jax.eval_shape`."""
    stacked = _get(params, path)
    layers = {str(i): jax.tree_util.tree_map(lambda p, i=i: p[i], stacked) for i in range(n_layer)}
    return _set(params, path, layers)


def stack(tree: dict, path: tuple[str, ...], n_layer: int) -> dict:
    """The inverse of `unstack`. Each leaf's per-layer arrays are released as soon as they are
    stacked, so loading a large model holds at most one extra stacked leaf."""
    layers = dict(_get(tree, path))
    if sorted(layers) != sorted(str(i) for i in range(n_layer)):
        raise ValueError(f"{'/'.join(path)} holds layers {sorted(layers)}, expected 0..{n_layer - 1}")
    treedef = jax.tree_util.tree_structure(layers["0"])
    per_layer = [jax.tree_util.tree_leaves(layers.pop(str(i))) for i in range(n_layer)]
    leaves = []
    for j in range(treedef.num_leaves):
        leaves.append(jnp.stack([per_layer[i][j] for i in range(n_layer)]))
        for i in range(n_layer):
            per_layer[i][j] = None
    return _set(tree, path, jax.tree_util.tree_unflatten(treedef, leaves))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
    if not path:
        return value
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}
