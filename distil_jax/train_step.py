"""The one jitted train step (and the eval step), the optimizer, and data-parallel placement.

`make_train_step(...)` returns `step(state, teacher_params, batch) -> (state, metrics)`, jitted
once with `state` donated. The teacher's parameters are a separate, non-donated argument: never
in the optimizer, never in the checkpoint, run under `stop_gradient`. The trained tree is
`{"student": ..., "objective": ...}`: the objective's projector and norm parameters are a second
optimizer group with their own learning rate, weight decay and clipping switch (Distily's).

`BucketedTrainStep` wraps it for the training loop: it takes host batches and runs the step
compiled for the batch's padding-aware logits capacity (`logits_capacity`), so the LM heads and
logits losses skip padding.

Placement: with a `distil_jax.sharding.Placement` (training, the bench and the tests build one
with `sharding.make_placement`) the one step is jitted with its shardings as
`in_shardings`/`out_shardings`: batch rows over data x fsdp, student, Adam state and teacher by
the families' logical-axis rules (data parallel, FSDP, tensor parallelism); XLA inserts the
collectives. Without one it runs wherever its arguments are (one device). One code path for
1..N devices and hosts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distil_jax import models, sharding, student
from distil_jax.data.batches import ROW_TOKENS
from distil_jax.models.common import AUTO_REMAT_MEMORY_SHARE
from distil_jax.objectives.objective import (CachedTeacher, Objective, device_memory_bytes,
                                             counted_positions, next_token_targets,
                                             real_token_positions)

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: Array  # int32 scalar
    params: Any  # {"student": ..., "objective": ...}, float32 master weights
    opt_state: Any
    rng: Array  # base key; step keys are fold_in(rng, step)
    # The optimizer that made `opt_state` (static, not checkpointed; as flax's TrainState): the
    # placement reads which parts of the state are parameter-shaped from it.
    tx: Any = flax.struct.field(pytree_node=False, default=None)


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                lr_end: float = 1e-7, power: float = 1.0) -> optax.Schedule:
    """HF's polynomial decay with linear warmup (get_polynomial_decay_schedule_with_warmup):
    lr(t) = lr0 · t / w for t < w, then (lr0 − lr_end)·(1 − (t − w)/(T − w))^power + lr_end."""
    decay = optax.polynomial_schedule(
        init_value=learning_rate, end_value=lr_end, power=power,
        transition_steps=max(total_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def warmup_steps(cfg: Mapping, total_steps: int) -> int:
    """warmup_steps if set (> 0), else ceil(warmup_ratio · total_steps), as HF does."""
    if cfg.get("warmup_steps", 0):
        return int(cfg["warmup_steps"])
    return int(np.ceil(cfg.get("warmup_ratio", 0.0) * total_steps))


def _decay_mask(params):
    # HF Trainer decays every weight but biases and LayerNorm scales.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def make_optimizer(cfg: Mapping, total_steps: int, trainable: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping + Adam/AdamW/Lion with the polynomial schedule, in two groups.

    trainable: a pytree of bools shaped like the params; frozen leaves get no update and no
    optimizer state. When it is `{"student": ..., "objective": ...}` (the train step's tree),
    the objective's leaves form a second group, as Distily adds them to the optimizer: their
    own learning rate (`objective_learning_rate`, scaled by the same schedule factor as the
    student's: objective_lr · schedule(t) / learning_rate, as HF's LambdaLR scales each group)
    and weight decay (`objective_weight_decay`, on every leaf of the group, as torch applies a
    group's weight decay), and clipped only if `objective_clip`. Clipping is one global norm over
    the clipped trainable leaves (HF clips the model's parameters only). A missing (or None)
    objective_* field means the student's value, i.e. one group.

    cfg: optimizer ("adamw" | "adam" | "lion"), learning_rate, adam_beta1, adam_beta2,
    adam_epsilon, weight_decay, lr_end, power, warmup_steps, warmup_ratio, max_grad_norm,
    objective_learning_rate, objective_weight_decay, objective_clip.
    Returns (transformation, the student's schedule).
    """
    lr = cfg["learning_rate"]
    schedule = lr_schedule(lr, total_steps, warmup_steps(cfg, total_steps),
                           cfg.get("lr_end", 1e-7), cfg.get("power", 1.0))
    name = cfg.get("optimizer", "adamw")
    b1, b2 = cfg.get("adam_beta1", 0.9), cfg.get("adam_beta2", 0.999)
    wd = cfg.get("weight_decay", 0.0)

    def opt(sched, weight_decay, mask):
        if name in ("adamw", "adam"):
            return optax.adamw(sched, b1=b1, b2=b2, eps=cfg.get("adam_epsilon", 1e-8),
                               weight_decay=weight_decay, mask=mask)
        if name == "lion":
            return optax.lion(sched, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
        raise ValueError(f"unknown optimizer {name!r}; valid: adamw, adam, lion")

    obj_lr = cfg.get("objective_learning_rate")
    obj_wd = cfg.get("objective_weight_decay")
    obj_clip = cfg.get("objective_clip")
    obj_lr = lr if obj_lr is None else obj_lr
    # An inherited weight decay is inherited with the student's mask (one group); an explicit
    # one applies to every leaf of the group, as torch applies a group's weight decay.
    obj_decay_mask = _decay_mask if obj_wd is None else None
    obj_wd = wd if obj_wd is None else obj_wd
    obj_clip = True if obj_clip is None else bool(obj_clip)
    if obj_lr == lr:
        obj_schedule = schedule
    elif lr > 0:
        obj_schedule = lambda t: schedule(t) * (obj_lr / lr)  # noqa: E731
    else:
        raise ValueError(f"optimizer.objective_learning_rate={obj_lr} with learning_rate={lr}: "
                         "the objective's rate is scaled by schedule(t) / learning_rate, so "
                         "learning_rate must be positive")
    grouped = isinstance(trainable, Mapping) and set(trainable) == {"student", "objective"}
    if grouped:
        labels = {"student": jax.tree_util.tree_map(lambda t: "student" if student.trains(t) else "frozen",
                                                    trainable["student"]),
                  "objective": jax.tree_util.tree_map(lambda t: "objective" if t else "frozen",
                                                      trainable["objective"])}
    else:
        labels = jax.tree_util.tree_map(lambda t: "student" if student.trains(t) else "frozen", trainable)
    groups = {"student": opt(schedule, wd, _decay_mask),
              "objective": opt(obj_schedule, obj_wd, obj_decay_mask),
              "frozen": optax.set_to_zero()}
    tx = optax.multi_transform(groups, labels)
    if cfg.get("max_grad_norm"):
        # One global norm over the clipped leaves only: the student's trainable ones (frozen
        # modules have no gradient in torch), plus the objective's if objective_clip.
        clipped = jax.tree_util.tree_map(
            lambda label: label == "student" or (label == "objective" and obj_clip), labels)
        tx = optax.chain(optax.masked(optax.clip_by_global_norm(cfg["max_grad_norm"]), clipped), tx)
    return student.frozen_layers(tx, trainable), schedule


def student_grad_norm(grads: Any, trainable: Any) -> Array:
    """The global norm of the student's trainable gradients (HF's clipping norm, logged as
    grad_norm). grads / trainable: the train step's `{"student", "objective"}` trees (a tree
    without those keys counts whole)."""
    if isinstance(trainable, Mapping) and "student" in trainable:
        grads, trainable = grads["student"], trainable["student"]
    leaves = [student.trained_part(g, t) for g, t in
              zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(trainable)) if student.trains(t)]
    return optax.tree.norm(leaves) if leaves else jnp.zeros((), jnp.float32)


def create_train_state(params: Mapping, tx: optax.GradientTransformation, rng: Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                      tx=tx)


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (hashable)."""

    teacher: Any  # the models' configs (any family of distil_jax.models)
    student: Any
    objective: Objective
    dtype: Any = jnp.float32  # compute dtype
    # The student's gradient checkpointing: False, True / "full", "dots", or "auto" (resolved by
    # `for_batch_shape` before the step is traced).
    remat: bool | str = False
    grad_accum: int = 1
    dropout: bool = False  # student dropout, as HF's train mode (teacher never)
    # Padding-aware logits: the LM heads and logits losses run on at most `logits_capacity` real
    # tokens per group of each micro-batch (None: on every position). `logits_groups` is the
    # number of data-parallel devices (a group per device). See `logits_capacity()`.
    logits_capacity: Optional[int] = None
    logits_groups: int = 1
    # Tokens per chunk of the logits losses, 0 = unchunked: decided once on the host by
    # `Objective.chunk_tokens` (see `for_batch_shape`), never while tracing.
    logits_chunk: int = 0
    attention_impl: str = "xla"  # fused attention of the unmapped layers: "xla" or "cudnn"
    single_document_rows: bool = False  # the pad layout's rows (see the models' forward)
    # > 0: the teacher is read from a teacher cache holding its top-k log-probabilities (k of
    # them per position, docs/teacher_cache.md) instead of run: the batch carries them under
    # objective.CACHE_BATCH_KEYS, the step gets no teacher parameters (None) and runs no teacher.
    teacher_cache_k: int = 0


def for_batch_shape(sc: StepConfig, rows: int, seq: int) -> StepConfig:
    """`sc` with its automatic settings decided for batches of `rows` rows of `seq` tokens (all
    devices together), on the host, never while tracing: `logits_chunk` (the objective's
    explicit setting, or its choice for each device's share) and a remat policy "auto"."""
    chunk = sc.objective.chunk_tokens(_rows_per_device(sc, rows), seq, sc.student.vocab_size)
    remat = remat_choice(sc, rows, seq)[0] if sc.remat == "auto" else sc.remat
    return dataclasses.replace(sc, logits_chunk=chunk, remat=remat)


def remat_choice(sc: StepConfig, rows: int, seq: int) -> tuple[str, int]:
    """(the policy train.remat_policy="auto" picks, the bytes "dots" would keep per device) for
    batches of `rows` rows of `seq` tokens: "dots" when every student block's matmul outputs for
    a device's share of a micro-batch fit in `AUTO_REMAT_MEMORY_SHARE` of its memory, else "full"."""
    tokens = _rows_per_device(sc, rows) * seq
    kept = (tokens * sc.student.num_layers * models.block_matmul_width(sc.student)
            * jnp.dtype(sc.dtype).itemsize)
    return ("dots" if kept <= AUTO_REMAT_MEMORY_SHARE * device_memory_bytes() else "full"), kept


def _rows_per_device(sc: StepConfig, rows: int) -> int:
    """Rows of one micro-batch on each data-parallel device (`logits_groups` of them)."""
    return max(rows // (sc.logits_groups * sc.grad_accum), 1)


def compute_kernels(params: Mapping, dtype) -> Mapping:
    """`params` with every matmul kernel (a leaf named "kernel") cast to the compute `dtype`.

    The models cast each kernel to the compute dtype anyway (flax's Dense(dtype=...), the LM
    head in `head_logits`), so the values and gradients are the same; casting before the model
    sees them moves the cast ahead of FSDP's per-layer all-gather, which then gathers bfloat16
    instead of the float32 master weights (half the bytes in flight and in temporaries).
    Embedding tables and norm parameters stay float32: the models read them in float32."""
    if jnp.dtype(dtype) == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x, params)


def distill_loss(sc: StepConfig, params: Mapping, teacher_params: Mapping, batch: Mapping,
                 rng: Optional[Array]) -> tuple[Array, dict]:
    """The objective on one (micro-)batch: (loss, metrics). params: {"student", "objective"} (the
    trained parameters); batch: input_ids, segment_ids [B, S], and with sc.teacher_cache_k the
    cached teacher targets (CachedTeacher.from_batch)."""
    ids, seg = batch["input_ids"], batch["segment_ids"]
    B, S = ids.shape
    obj = sc.objective
    feats = obj.features(sc.student, sc.teacher)
    uses_logits = bool(obj.logits.active or obj.clm_weight)
    compact = uses_logits and sc.logits_capacity is not None
    # The objective applies the LM heads itself when it chunks them or skips padding.
    own_heads = compact or (uses_logits and sc.logits_chunk > 0)
    common = dict(segment_ids=seg, dtype=sc.dtype, return_last_hidden=own_heads,
                  attention_impl=sc.attention_impl, single_document_rows=sc.single_document_rows)
    needs_teacher = obj.logits.active or obj.hs.active or obj.attn.active
    t_out = None
    if sc.teacher_cache_k and needs_teacher:
        obj.check_cacheable()  # startup checks this first; here so no path can trace past it
        t_out = CachedTeacher.from_batch(batch)
        if t_out.ids.shape[-1] != sc.teacher_cache_k:
            raise ValueError(f"the batch carries top-{t_out.ids.shape[-1]} teacher targets, the step "
                             f"was built for teacher_cache_k={sc.teacher_cache_k}")
        needs_teacher = False  # nothing of the teacher runs
    elif needs_teacher:  # a clm-only objective (pretraining) runs no teacher at all
        teacher_params = jax.lax.stop_gradient(teacher_params)
        t_out = models.forward(sc.teacher, models.frozen_layers(sc.teacher, teacher_params), ids,
                               **feats["teacher"], **common)
        t_out = jax.lax.stop_gradient(t_out)
    student_params = compute_kernels(params["student"], sc.dtype)
    s_out = models.forward(sc.student, student_params, ids, **feats["student"], **common,
                         remat=sc.remat, deterministic=not sc.dropout,
                         dropout_rng=rng if sc.dropout else None)
    heads = dict(logits_chunk=sc.logits_chunk)
    if own_heads:
        heads.update(student_head=models.lm_head(sc.student, student_params),
                     teacher_head=models.lm_head(sc.teacher, teacher_params) if needs_teacher else None)
    if compact:
        heads["logits_positions"] = real_token_positions(seg > 0, sc.logits_groups, sc.logits_capacity)
    return obj(params.get("objective", {}), s_out, t_out, seg, ids, **heads,
               single_document_rows=sc.single_document_rows, loss_mask=batch.get("loss_mask"))


def logits_capacity(segment_ids: np.ndarray, groups: int = 1, grad_accum: int = 1,
                    buckets: int = 8) -> Optional[int]:
    """The `StepConfig.logits_capacity` for a host batch: the most real tokens in any group
    (device share) of any micro-batch, rounded up to a 1/`buckets` step of the group's size, or
    None when that is the whole group (packed rows) or `buckets` is 0 (off).

    segment_ids: [A·b, S] host array (0 = padding). Rounding up to a bucket bounds the number of
    distinct capacities, hence of compilations of the step, to `buckets`.
    """
    seg = np.asarray(segment_ids)
    return capacity_of_rows((seg > 0).sum(-1), seg.shape[-1], groups, grad_accum, buckets)


def capacity_of_rows(row_tokens: np.ndarray, seq: int, groups: int = 1, grad_accum: int = 1,
                     buckets: int = 8) -> Optional[int]:
    """`logits_capacity` from each row's real tokens ([A·b] ints, every row of the global batch)
    and the row length `seq`: a group's real tokens are the sum over its rows."""
    if buckets <= 0:
        return None
    per_row = np.asarray(row_tokens).reshape(grad_accum, groups, -1)
    size = per_row.shape[-1] * seq
    quantum = -(-size // buckets)
    most = int(per_row.sum(-1).max())
    capacity = max(quantum, -(-most // quantum) * quantum)
    return None if capacity >= size else capacity


def _label_count(segment_ids: Array, loss_mask: Optional[Array] = None) -> Array:
    """Number of next-token labels (the clm loss's denominator): counted positions whose next
    token is in the same document."""
    _, valid = next_token_targets(segment_ids, segment_ids)  # only the validity is used
    return (valid & counted_positions(segment_ids, loss_mask)).sum().astype(jnp.float32)


def _token_count(batch: Mapping) -> Array:
    """Counted positions of a (micro-)batch (the feature and logits losses' denominator)."""
    return counted_positions(batch["segment_ids"], batch.get("loss_mask")).sum().astype(jnp.float32)


def make_train_step(sc: StepConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    placement: Optional[sharding.Placement] = None, trainable: Any = None):
    """The jitted `step(state, teacher_params, batch) -> (state, metrics)`.

    placement: the shardings of state, teacher and batch (in and out: the new state keeps the
    old one's, so the donated buffers are reused); None: wherever the arguments are (one device).

    With grad_accum = A, the batch [A·b, S] is split into A micro-batches whose gradients are
    summed, each weighted by its share of the real tokens (the clm loss, a mean over next-token
    labels, by its share of the labels), so the update equals the one-batch update.
    Metrics: loss, loss/<component>, grad_norm (the norm of the student's trainable gradients
    before clipping, HF's clipping norm; `trainable` is the bool tree given to make_optimizer,
    None = every student leaf), learning_rate (the student's rate after the step, as HF logs
    the rate its scheduler holds after stepping), tokens.
    """

    def step(state: TrainState, teacher_params, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        n_tokens = jnp.maximum(_token_count(batch), 1.0)
        if sc.grad_accum == 1:
            grad_fn = jax.value_and_grad(functools.partial(distill_loss, sc), has_aux=True)
            (_, metrics), grads = grad_fn(state.params, teacher_params, batch, rng)
        else:
            grads, metrics = _accumulated_grads(sc, state.params, teacher_params, batch, rng, n_tokens)
        return _apply_update(state, grads, metrics, tx, schedule, trainable, batch)

    return _jit_on(step, placement)


def _share_of_loss(sc: StepConfig, params, teacher_params, mb, rng, w_tok, w_lab):
    """A micro-batch's share of the full-batch loss: (share, its metrics). The feature components
    are means over real tokens (weight w_tok); the clm loss is a mean over next-token labels,
    whose count is not proportional to the real tokens (one label fewer per document), so it gets
    w_lab."""
    loss, m = distill_loss(sc, params, teacher_params, mb, rng)
    if sc.objective.clm_weight:
        clm = sc.objective.clm_weight * m["loss/clm"]
        return w_tok * (loss - clm) + w_lab * clm, m
    return w_tok * loss, m


def _accumulated_grads(sc: StepConfig, params, teacher_params, batch, rng, n_tokens):
    """(gradients, metrics) of the batch [A·b, S] as A micro-batches of b rows, summed under a
    scan, each weighted by its share of the real tokens (of the labels for clm): the one-batch
    gradient and metrics."""
    A = sc.grad_accum
    grad_fn = jax.value_and_grad(functools.partial(_share_of_loss, sc), has_aux=True)
    micro = jax.tree_util.tree_map(lambda x: x.reshape((A, -1) + x.shape[1:]), batch)
    n_labels = jnp.maximum(_label_count(batch["segment_ids"], batch.get("loss_mask")), 1.0)

    def body(carry, mb_i):
        mb, i = mb_i
        w_tok = _token_count(mb) / n_tokens
        w_lab = _label_count(mb["segment_ids"], mb.get("loss_mask")) / n_labels
        (share, m), g = grad_fn(params, teacher_params, mb, jax.random.fold_in(rng, i), w_tok, w_lab)
        acc_g, acc_m = carry
        acc_g = jax.tree_util.tree_map(jnp.add, acc_g, g)
        acc_m = {k: acc_m[k] + (share if k == "loss" else (w_lab if k == "loss/clm" else w_tok) * v)
                 for k, v in m.items()}
        return (acc_g, acc_m), None

    zeros_g = jax.tree_util.tree_map(jnp.zeros_like, params)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    m_shape = jax.eval_shape(lambda: distill_loss(sc, params, teacher_params, first, rng)[1])
    zeros_m = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, jnp.arange(A)))
    return grads, metrics


def _apply_update(state: TrainState, grads, metrics, tx, schedule, trainable, batch):
    """(the state after the optimizer's update, the step's metrics with grad_norm, learning_rate,
    tokens and, with a loss mask, counted_tokens added)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["grad_norm"] = student_grad_norm(
        grads, trainable if trainable is not None else jax.tree_util.tree_map(lambda _: True, grads))
    metrics["learning_rate"] = schedule(state.step + 1)
    # Real tokens (the throughput's); with a loss mask also the positions the losses counted.
    metrics["tokens"] = jnp.maximum((batch["segment_ids"] > 0).sum(), 1).astype(jnp.float32)
    if "loss_mask" in batch:
        metrics["counted_tokens"] = _token_count(batch)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _jit_on(step, placement: Optional[sharding.Placement]):
    """`step` jitted with its state donated: with a placement, traced on its mesh (the models pin
    their activations, rows over data x fsdp, heads and MLP columns over tensor, by the same
    logical rules as the parameters) with its shardings in and out; without, wherever its
    arguments are."""
    if placement is None:
        return jax.jit(step, donate_argnums=(0,))

    def on_mesh(state, teacher_params, batch):
        with models.activation_sharding(placement.mesh, sharding.RULES):
            return step(state, teacher_params, batch)

    return jax.jit(on_mesh, donate_argnums=(0,),
                   in_shardings=(placement.state, placement.teacher, placement.batch),
                   out_shardings=(placement.state, placement.replicated))


class BucketedTrainStep:
    """`step(state, teacher_params, host_batch) -> (state, metrics)` with padding-aware logits.

    Each host batch (numpy arrays, [A·b, S]) gets its `logits_capacity` bucket and runs the step
    compiled for that capacity (compiled on first use; at most `buckets` + 1 variants). Packed
    rows are nearly all real tokens, so they stay on the one step that covers every position.
    `on_compile(capacity)` is called before a variant is first built (to tell the user why the
    run pauses). buckets = 0: one step over every position.
    """

    def __init__(self, sc: StepConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                 buckets: int = 8, on_compile=None, placement: Optional[sharding.Placement] = None,
                 trainable: Any = None):
        # A group per batch shard (data x fsdp): each device compacts its own rows; the devices
        # of a tensor group hold the same rows and compact them alike.
        groups = placement.batch_shards if placement is not None else 1
        self._sc = dataclasses.replace(sc, logits_groups=groups)
        self._args = (tx, schedule, placement, trainable)
        self._placement = placement
        # Without logits losses there is nothing to compact: one step.
        uses_logits = bool(sc.objective.logits.active or sc.objective.clm_weight)
        self.buckets = buckets if uses_logits else 0
        self._on_compile = on_compile
        self._steps: dict = {}

    def capacity(self, host_batch: Mapping) -> Optional[int]:
        """The batch's logits bucket: from its `ROW_TOKENS` (a process-local batch) if it has
        them, else from its segment ids (then the whole global batch)."""
        if ROW_TOKENS in host_batch:
            return capacity_of_rows(host_batch[ROW_TOKENS], np.shape(host_batch["segment_ids"])[1],
                                    self._sc.logits_groups, self._sc.grad_accum, self.buckets)
        return logits_capacity(host_batch["segment_ids"], self._sc.logits_groups, self._sc.grad_accum,
                               self.buckets)

    def step_for(self, host_batch: Mapping):
        """(the jitted step for this batch's bucket, the batch placed on the devices).

        host_batch: the whole global batch ([A·b, S] numpy, the same on every process), or this
        process's rows of it with `ROW_TOKENS` (`data.BatchIterator(process_rows=...)`). Every
        process must run the same program, so the bucket (the most real tokens of any device's
        share) is decided from what every process holds alike: the global batch, or the real
        tokens of each of its rows (`ROW_TOKENS`, which the iterator gathers from counts of every
        training row made once per run). No collective: an all-reduce of the local maxima would
        make the host wait for the devices every step, losing the step's asynchronous dispatch.
        Each process transfers only its devices' rows."""
        cap = self.capacity(host_batch)
        rows = dict(host_batch)
        global_rows = len(rows.pop(ROW_TOKENS)) if ROW_TOKENS in rows else None
        if cap not in self._steps:
            if self._on_compile is not None:
                self._on_compile(cap)
            seq = np.shape(rows["input_ids"])[1]
            sc = for_batch_shape(dataclasses.replace(self._sc, logits_capacity=cap),
                                 global_rows or np.shape(rows["input_ids"])[0], seq)
            self._steps[cap] = make_train_step(sc, *self._args)
        if self._placement is not None:
            batch = self._placement.put_batch(rows, global_rows)
        else:
            batch = {k: jnp.asarray(v) for k, v in rows.items()}
        return self._steps[cap], batch

    def __call__(self, state: TrainState, teacher_params, host_batch: Mapping):
        step, batch = self.step_for(host_batch)
        return step(state, teacher_params, batch)


# ----------------------------------------------------------------------------- eval


def make_eval_step(config, dtype=jnp.float32, mesh: Optional[Mesh] = None):
    """Jitted `eval(params, batch) -> dict` of summed next-token log-likelihoods (the perplexity
    numerator) and token counts, counting every position whose next token is in its document:

      logprob_sum, tokens: scalars over the batch (token-weighted perplexity);
      doc_logprob, doc_tokens: [B, S] sums per (row, segment id) (Distily's per-document mean).

    mesh: the outputs are replicated on it, so every process of a multi-host run can read them;
    the parameters and batch stay where they are (sharded like the training step's).
    """

    def eval_step(params, batch):
        ids, seg = batch["input_ids"], batch["segment_ids"]
        S = ids.shape[1]
        # Not differentiated: the stacked blocks as frozen_layers, as the train step's teacher.
        logits = models.forward(config, models.frozen_layers(config, params), ids, segment_ids=seg,
                                dtype=dtype).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        labels, valid = next_token_targets(ids, seg)
        valid = valid & counted_positions(seg, batch.get("loss_mask"))
        lp = jnp.where(valid, jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0], 0.0)
        per_doc = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=S))
        return {"logprob_sum": lp.sum(), "tokens": valid.sum(),
                "doc_logprob": per_doc(lp, seg), "doc_tokens": per_doc(valid.astype(jnp.int32), seg)}

    if mesh is None:
        return jax.jit(eval_step)
    return jax.jit(eval_step, out_shardings=NamedSharding(mesh, P()))
