"""Where every array of a run lives: the named mesh, the logical-axis rules, and placement.

The mesh has three named axes (`MESH_AXES`):

  data    pure data parallelism: the batch is split, every parameter is whole on each device
          (gradients all-reduced).
  fsdp    fully sharded data parallelism (ZeRO-3): the batch is split AND each large parameter,
          with its Adam moments, is split along its `embed` dimension; XLA all-gathers a layer's
          weights just before it is used and reduce-scatters its gradient.
  tensor  tensor (Megatron) parallelism: attention heads and MLP columns are split; the batch
          is not (each device of a tensor group sees the same rows).

The batch is split over data x fsdp. Parameters are described once per model family by
*logical* axis names (each family's `PARAM_AXES`: a path regex -> one name per dimension, e.g.
an MLP up-projection [D, F] is ("embed", "mlp")); `RULES` maps each logical name to mesh axes,
in flax's `logical_axis_rules` format (as MaxText and t5x do). The teacher uses the same rules
on the same mesh, so a teacher larger than one device is sharded like the student.

Why `vocab` goes to tensor: the embedding and the LM head are the largest single parameters of
a small model (GPT-2's 38.6 M of the student's 81.9 M). The models store the vocabulary padded to
a multiple of 128 (`models.common.VOCAB_MULTIPLE`; GPT-2's 50257 = 29 x 1733 alone divides by no
mesh size), so it splits over tensor while `embed` splits over fsdp: 1/(fsdp x tensor) of the
embedding per device, and the head's logits and their softmax are split over the vocabulary
(Megatron's vocabulary-parallel head; XLA inserts the reductions). A tensor size that does not
divide the padded vocabulary (3, 6, ...) leaves it unsplit rather than refusing the mesh.
GPT-2's fused attention kernel: HF's c_attn columns are laid out [q | k | v] (each H x Dh), so
a contiguous split of them over tensor would give one device all the query heads and another
all the values. The model therefore stores it [D, 3, D] (the family's `HF_FUSED`; HF's [D, 3D]
on import and export), and its last dimension is `heads`: each device holds the q, k and v
columns of its own heads, as with Llama's separate projections.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distil_jax import models

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch's rows are split over

# Logical axis name -> mesh axis (or tuple of mesh axes, or None: not split). Flax semantics:
# a name takes its mesh axis unless another dimension of the same array already took it.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),       # model width: every large matrix has one such dimension
    ("heads", "tensor"),     # query heads x head_dim (attention q / output projections)
    ("kv_heads", "tensor"),  # key/value heads x head_dim (grouped-query attention)
    ("mlp", "tensor"),       # MLP hidden columns
    ("vocab", "tensor"),     # the padded vocabulary, see the module docstring
    ("positions", None),     # learned position embeddings' rows
    ("norm", None),          # norm scales and biases: tiny, replicated
    ("bias", None),          # biases added after a projection back to the width: tiny
    ("proj", "fsdp"),        # the objective's projector matrices' rows
    # The stacked blocks' leading layer axis: never split, so each scan iteration gathers its
    # own layer's shards only (splitting it would hand each device whole layers: pipeline-like
    # placement the scan does not schedule).
    ("layers", None),
)


class MeshError(ValueError):
    """A mesh that does not fit the devices or the models (one line naming the fix)."""


# ----------------------------------------------------------------------------- the mesh


def mesh_shape(spec: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """{"data": -1, "fsdp": 2} -> {"data": n/2, "fsdp": 2, "tensor": 1} (-1: the rest of the
    devices; an axis left out is 1). MeshError when the product is not `n_devices`."""
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"train.mesh: unknown axis {unknown[0]!r}; the axes are "
                        f"{', '.join(MESH_AXES)}")
    sizes = {a: int(spec.get(a, 1)) for a in MESH_AXES}
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise MeshError(f"train.mesh: only one axis may be -1 (the rest of the devices), got "
                        f"{', '.join(rest)}")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise MeshError(f"train.mesh: {bad[0]}={sizes[bad[0]]}; use a positive size or -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n_devices % fixed:
            raise MeshError(f"train.mesh: {_fmt(sizes)} needs a multiple of {fixed} devices, but "
                            f"there are {n_devices}; change the fixed axes")
        sizes[rest[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise MeshError(f"train.mesh: {_fmt(sizes)} has {fixed} devices but there are "
                        f"{n_devices}; make the product {n_devices} or set one axis to -1")
    return sizes


def _fmt(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{a}={s}" for a, s in sizes.items())


def make_mesh(spec: Optional[Mapping[str, int]] = None, devices: Optional[Sequence] = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    Devices are laid out in `jax.devices()` order (process-major), so the outer `data` axis
    spans hosts and `tensor`, the innermost, stays within one host's fast interconnect.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(spec if spec is not None else {"data": -1}, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(tuple(sizes.values())), MESH_AXES)


def axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


def batch_shards(mesh: Mesh) -> int:
    """How many parts the batch's rows are split into (data x fsdp)."""
    return math.prod(axis_size(mesh, a) for a in BATCH_AXES)


def batch_spec(mesh: Mesh) -> P:
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return P(axes if len(axes) > 1 else axes[0])


# ----------------------------------------------------------------------------- logical axes


def logical_spec(names: Sequence[Optional[str]], rules=RULES) -> P:
    """Logical names of an array's dimensions -> its PartitionSpec (flax's rule semantics)."""
    return nn.logical_to_mesh_axes(tuple(names), rules)


def _spec_for(names: Sequence[Optional[str]], shape: tuple, mesh: Mesh, what: str, path: str,
              strict: bool) -> P:
    """The PartitionSpec of an array with logical axis `names` on `mesh`, mesh axes of size 1
    dropped; a split that does not divide its dimension is a MeshError (strict) or left
    unsplit (always so for the padded vocabulary: see the module docstring)."""
    spec = logical_spec(names)
    out = []
    for dim, name, axes in zip(shape, names, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if axis_size(mesh, a) > 1)
        n = math.prod(axis_size(mesh, a) for a in names)
        if names and dim % n:
            if strict and name != "vocab":  # the vocabulary is split only where it divides
                axis = " x ".join(f"{a}={axis_size(mesh, a)}" for a in names)
                raise MeshError(f"train.mesh: {axis} does not divide the {what}'s {name} dimension "
                                f"{dim} ({what}.{path}); choose an axis size that divides {dim}")
            names = ()
        out.append(names[0] if len(names) == 1 else (names or None))
    return P(*out)


def param_specs(config, params: Mapping, mesh: Mesh, what: str = "student") -> dict:
    """PartitionSpecs of a model's parameter tree (arrays or ShapeDtypeStructs) on `mesh`, from
    its family's logical axes. MeshError (one line) when a mesh axis does not divide a dimension
    it splits, or `tensor` does not divide the heads."""
    tensor = axis_size(mesh, "tensor")
    if tensor > 1:
        for n, field in ((config.num_heads, "query heads"), (config.num_kv_heads, "key/value heads")):
            if n % tensor:
                raise MeshError(f"train.mesh: tensor={tensor} does not divide the {what}'s {n} "
                                f"{field}; use a tensor size that divides {n}")
    names = models.logical_axes(config, params)
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict({
        p: _spec_for(names[p], tuple(x.shape), mesh, what, ".".join(p), True)
        for p, x in flat.items()})


def objective_specs(obj_params: Mapping, mesh: Mesh) -> Any:
    """The objective's parameters: each matrix's rows split over fsdp where fsdp divides them
    (the 1024 x 1024 orthogonal projector: 1/fsdp of it and of its Adam moments per device),
    vectors replicated. Never an error: the sizes come from the sequence length or the widths,
    and a few MB replicated cost less than refusing the mesh."""
    def spec(path, x):
        names = ("proj",) + (None,) * (x.ndim - 1) if x.ndim >= 2 else (None,) * x.ndim
        return _spec_for(names, tuple(x.shape), mesh, "objective", jax.tree_util.keystr(path),
                         False)
    return jax.tree_util.tree_map_with_path(spec, obj_params)


def opt_state_specs(tx: optax.GradientTransformation, opt_state: Any, params_specs: Mapping) -> Any:
    """PartitionSpecs of `tx`'s state: each copy of the parameter tree in it (Adam's mu and nu,
    ...) is placed like the parameters; anything else (step counts) is replicated. Leaves a
    masked transformation holds no state for (optax.MaskedNode) stay as they are."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_utils.tree_map_params(
        tx, lambda x, spec: x if masked(x) else spec, opt_state, params_specs,
        transform_non_params=lambda x: P(), is_leaf=masked)


# ----------------------------------------------------------------------------- placement


@dataclasses.dataclass(frozen=True)
class Placement:
    """The shardings of the step's arguments on one mesh: `state` (a TrainState of
    NamedShardings), `teacher` (a tree of NamedShardings) and the batch's rows over data x fsdp.
    `make_train_step` takes them as its in/out shardings."""

    mesh: Mesh
    state: Any
    teacher: Any

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, batch_spec(self.mesh))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_shards(self) -> int:
        return batch_shards(self.mesh)

    def put_state(self, state):
        return jax.device_put(state, self.state)

    def put_teacher(self, teacher_params):
        return jax.device_put(teacher_params, self.teacher)

    def put_batch(self, rows: Mapping, global_rows: Optional[int] = None) -> dict:
        """See `place_batch`: this process's rows, or the whole batch."""
        return place_batch(rows, self.mesh, global_rows)


def make_placement(mesh: Mesh, state: Any, student_config, teacher_config,
                   teacher_params: Mapping) -> Placement:
    """The Placement of a TrainState (arrays or ShapeDtypeStructs; its params are
    {"student", "objective"}) and teacher parameters on `mesh`. MeshError (one line) when the
    mesh does not fit the models."""
    s_specs = param_specs(student_config, state.params["student"], mesh, "student")
    p_specs = {"student": s_specs}
    if "objective" in state.params:
        p_specs["objective"] = objective_specs(state.params["objective"], mesh)
    t_specs = param_specs(teacher_config, teacher_params, mesh, "teacher")
    if state.tx is None:
        raise ValueError("make_placement needs the optimizer that made the state: build it with "
                         "train_step.create_train_state")
    state_specs = state.replace(step=P(), params=p_specs,
                                opt_state=opt_state_specs(state.tx, state.opt_state, p_specs),
                                rng=P())
    named = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda x: isinstance(x, P))
    return Placement(mesh, named(state_specs), named(t_specs))


def place_batch(rows: Mapping, mesh: Mesh, global_rows: Optional[int] = None) -> dict:
    """Host rows ([R, ...] numpy) -> global arrays of `global_rows` rows split over data x fsdp.

    rows: this process's rows (`process_rows(mesh, global_rows)` of the global batch: a
    multi-host loader builds only those), or the whole global batch (R == global_rows; None: the
    rows are the whole batch). Either way each process transfers only its own devices' rows
    (`jax.make_array_from_process_local_data`).
    """
    n = batch_shards(mesh)
    local = np.shape(next(iter(rows.values())))[0]
    b = local if global_rows is None else int(global_rows)
    if b % n:
        raise ValueError(f"batch size {b} is not divisible by the {n} batch shards of the mesh "
                         f"(data x fsdp); use a multiple of {n}")
    mine = process_rows(mesh, b)
    if local not in (b, mine.stop - mine.start):
        raise ValueError(f"{local} host rows for a global batch of {b}: pass the whole batch or "
                         f"this process's {mine.stop - mine.start} rows (sharding.process_rows)")
    sharding = NamedSharding(mesh, batch_spec(mesh))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                      (b,) + np.shape(v)[1:])
            for k, v in rows.items()}


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a global batch array `x` [B, ...] (`place_batch`'s inverse):
    [R, ...] numpy, R = the rows of `process_rows(mesh, B)`. Resharded over data x fsdp first,
    so `x` may come out of a computation in any layout."""
    x = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, batch_spec(mesh)))(x)
    mine = process_rows(mesh, x.shape[0])
    out = np.empty((mine.stop - mine.start,) + x.shape[1:], x.dtype)
    for shard in x.addressable_shards:  # the devices of a tensor group hold the same rows
        lo = (shard.index[0].start or 0) - mine.start
        out[lo:lo + shard.data.shape[0]] = np.asarray(shard.data)
    return out


def process_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows of a `global_rows` batch that this process's devices hold: one contiguous range
    (the mesh lays devices out process-major, the batch is split over its outer axes)."""
    sharding = NamedSharding(mesh, batch_spec(mesh))
    starts = {idx[0].start or 0 for idx in sharding.addressable_devices_indices_map(
        (global_rows,)).values()}
    size = global_rows // batch_shards(mesh)
    lo, hi = min(starts), max(starts) + size
    if (hi - lo) != size * len(starts):
        raise MeshError(f"train.mesh: this process's devices hold rows that are not contiguous "
                        f"({sorted(starts)}); lay the mesh out process-major (sharding.make_mesh)")
    return slice(lo, hi)


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings` (a
    matching tree of NamedShardings): the largest shard of each leaf, summed."""
    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        shard = s.shard_shape(tuple(x.shape))
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


# ----------------------------------------------------------------------------- multi-host


def initialize_distributed(coordinator_address: str = "", num_processes: int = 1,
                           process_id: int = 0, heartbeat_timeout_s: int = 100) -> bool:
    """`jax.distributed.initialize` for a run that spans processes (the config's
    train.coordinator_address / num_processes / process_id); True if it did. Call before
    anything touches a device.

    "" : one process, nothing to do. "auto": jax detects SLURM, TPU pods or Open MPI from the
    environment. "host:port": the coordinator, which process 0 serves.
    If another process dies, the coordination service notices within `heartbeat_timeout_s`
    and this process exits with an error instead of waiting forever in a collective.
    """
    if not coordinator_address:
        return False
    # CPU devices of different processes need a collectives library (harmless on GPU / TPU,
    # which bring their own): without it a multi-process CPU run cannot all-reduce.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    return True


def is_writer() -> bool:
    """Only process 0 writes metrics, TensorBoard, summaries and exports (every process takes
    part in the checkpoint save, which Orbax coordinates)."""
    return jax.process_index() == 0
