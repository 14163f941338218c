"""The distillation objective: Distily's components put together.

Total loss = Σ_component weight · mean over mapped layer pairs of
`loss_fn(norm(projector(student feature)), norm(teacher feature), mask)`, for the components
`logits`, `hs` (hidden states) and `attn` (attention probabilities), plus an optional hard-label
next-token cross-entropy (`clm`). A component with weight 0 computes nothing and asks the models
for no extra features (docs/design.md, "The objective").

Packed rows: the attention component's projector and norm act on the key-position axis of each
attention row, so each row is first moved into its own document's frame (`document_frame`):
every per-token loss then equals the one the same document gets alone in a padded row.

`Objective` is static (hashable, built once from the config); its trainable parameters (projectors
and norms) are an ordinary pytree that lives next to the student's parameters.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp

from distil_jax.models.common import ModelOutput, constrain, head_logits, segment_positions
from distil_jax.objectives.layer_mappers import get_layer_mapper
from distil_jax.objectives.losses import LOG_PROB_ROWS, LOSSES, get_loss, masked_mean, topk_loss
from distil_jax.objectives.norms import apply_norm, init_norm
from distil_jax.objectives.projectors import apply_projector, init_projector

Array = jax.Array

# Losses whose inputs are logits over the vocabulary (temperature applies to these).
_DISTRIBUTION_LOSSES = ("kl", "reverse_kl", "cakld", "jsd", "ce", "soft_mse")
# By default the logits losses run chunked only when their full-size float32 arrays would take
# more than this share of the device's memory: chunking recomputes both LM heads in the backward
# pass (its cost: docs/benchmarks.md), so it is for memory that would not fit otherwise.
AUTO_CHUNK_MEMORY_SHARE = 0.25
# float32 bytes per logit (B·S·V entries) held at once unchunked: both models' logits, the
# student's gradient and one softmax residual.
BYTES_PER_LOGIT = 16
DEFAULT_CHUNK_TOKENS = 2048


def device_memory_bytes() -> int:
    """Memory of the first local device: the allocator's limit on an accelerator, the physical
    RAM on a CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclasses.dataclass(frozen=True)
class Component:
    """One feature component (Distily's `LossComponent`)."""

    weight: float = 0.0
    loss_fn: str = "raw_mse"
    layer_mapper: Any = "all"  # a name, or a tuple of (student, teacher) index pairs
    norm: str = "none"
    projector: str = "none"

    @property
    def active(self) -> bool:
        return self.weight != 0.0


def _as_tuple(x):
    if isinstance(x, (list, tuple)):
        return tuple(_as_tuple(v) for v in x)
    return x


def _component(d: Optional[Mapping], kind: str) -> Component:
    if d is None:
        return Component()
    d = dict(d)
    known = {f.name for f in dataclasses.fields(Component)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown objective.{kind} field(s) {unknown}; valid: {sorted(known)}")
    if "layer_mapper" in d:
        d["layer_mapper"] = _as_tuple(d["layer_mapper"])
    comp = Component(**d)
    if comp.active:
        get_loss(comp.loss_fn)  # validates the name
        get_layer_mapper(comp.layer_mapper)
    return comp


# The batch keys that carry a teacher cache's targets (see CachedTeacher); the tail samples'
# two are present only when the cache holds tail samples.
CACHE_BATCH_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_rest_logmass")
CACHE_TAIL_KEYS = ("teacher_tail_ids", "teacher_tail_logprobs")


@flax.struct.dataclass
class CachedTeacher:
    """The teacher's side of the logits losses read from a teacher cache instead of computed
    (docs/teacher_cache.md). Passed to the objective in place of the teacher's ModelOutput.

    ids: [B, S, k] int (uint16 or int32 as stored), the teacher's top-k token ids per position.
    logprobs: [B, S, k] (float16 or float32 as stored), their log-probabilities at the
      temperature the cache was recorded at.
    rest: [B, S] float32, log of the teacher's mass outside the top k.
    tail_ids, tail_logprobs: [B, S, m], m tokens drawn from the teacher's distribution outside
      the top k and their log-probabilities, or None (a cache recorded without tail samples).
    Positions that are not real tokens hold fillers (finite, masked out of every loss).
    """

    ids: jax.Array
    logprobs: jax.Array
    rest: jax.Array
    tail_ids: Optional[jax.Array] = None
    tail_logprobs: Optional[jax.Array] = None

    @classmethod
    def from_batch(cls, batch: Mapping) -> "CachedTeacher":
        return cls(*(batch[k] for k in CACHE_BATCH_KEYS), *(batch.get(k) for k in CACHE_TAIL_KEYS))


def next_token_targets(input_ids: Array, segment_ids: Array) -> tuple[Array, Array]:
    """(labels [B, S], valid [B, S] bool): the token after each position, valid only where it is
    in the same document (the hard loss's and the perplexity's targets). The last column is
    never valid."""
    labels = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    valid = jnp.concatenate([same_doc, jnp.zeros_like(same_doc[:, :1])], axis=1)
    return labels, valid


def counted_positions(segment_ids: Array, loss_mask: Optional[Array] = None) -> Array:
    """[B, S] bool: the positions every loss and the perplexity count: real tokens (segment > 0)
    and, with a loss mask (dataset.loss_on="completion": 1 where the next token is an assistant
    / completion token), only those it keeps."""
    mask = segment_ids > 0
    return mask if loss_mask is None else mask & (loss_mask > 0)


def real_token_positions(mask: Array, groups: int, capacity: int) -> Array:
    """Where the real tokens are, for the logits losses to skip padding.

    mask: [B, S] bool (True = real token). The B·S positions are split into `groups` equal
    contiguous groups (one per data-parallel device, so that the gather stays on its device) and
    each group's real positions are listed in order: [groups, capacity] int32 offsets into the
    group's B·S/groups positions, -1 after the last one. The caller guarantees that no group has
    more than `capacity` real tokens (`train_step.logits_capacity` picks it from the batch).
    """
    return jax.vmap(lambda m: jnp.nonzero(m, size=capacity, fill_value=-1)[0].astype(jnp.int32))(
        mask.reshape(groups, -1))


def gather_positions(x: Array, positions: Array) -> Array:
    """x [B, S, ...] -> [G·C, ...]: the entries at `positions` ([G, C] from
    `real_token_positions`), flattened; the -1 fill gathers position 0 (the caller masks it)."""
    G = positions.shape[0]
    grouped = x.reshape((G, -1) + x.shape[2:])
    picked = jax.vmap(lambda g, i: g[i])(grouped, jnp.maximum(positions, 0))
    return picked.reshape((-1,) + x.shape[2:])


def document_frame(maps: Array, segment_ids: Array) -> Array:
    """Attention rows moved into their own document's frame: [B, H, S, S] -> [B, H, S, S].

    In a packed row, a query of the document that starts at offset o attends to keys o..o+q
    only (the mask keeps it in its document). Its row is shifted left by o: key o + j becomes
    key j, and the keys past the row's end come in as 0, which is what the attention
    probabilities are at the keys outside the document anyway. The result is exactly the row
    that the same document gets when it starts a padded row at key 0; that matters because the
    projector (an S x S matrix mixing key positions) and the norm (per key position affine) are
    not shift-invariant. Rows of padding (segment 0) are shifted too and stay masked out.

    maps: [B, H, S, S] attention probabilities (query, key); segment_ids: [B, S] (0 = padding).
    """
    S = maps.shape[-1]
    # The offset of each query's document: its position in the row minus its position in the
    # document.
    offset = jnp.arange(S, dtype=jnp.int32)[None, :] - segment_positions(segment_ids)  # [B, S]
    keys = offset[:, None, :, None] + jnp.arange(S, dtype=jnp.int32)  # [B, 1, S(query), S(key)]
    inside = keys < S
    shifted = jnp.take_along_axis(maps, jnp.minimum(keys, S - 1), axis=-1)
    return jnp.where(inside, shifted, jnp.zeros((), maps.dtype))


def _per_position(loss_fn, student: Array, teacher: Array) -> Array:
    """A loss's value at every position: [..., F], [..., F] -> [...] float32.

    Every loss of losses.py reduces each position over the feature axis and then averages the
    positions, so its value on a single position is that position's loss."""
    lead = student.shape[:-1]
    flat = jax.vmap(lambda s, t: loss_fn(s[None], t[None]))(
        student.reshape((-1, student.shape[-1])), teacher.reshape((-1, teacher.shape[-1])))
    return flat.reshape(lead)


def _check_heads(student, teacher) -> None:
    if student.num_heads != teacher.num_heads:
        field = "n_head" if student.model_type == "gpt2" else "num_attention_heads"
        raise ValueError(
            f"the attn component compares attention maps head by head, but the student has "
            f"{student.num_heads} query heads and the teacher {teacher.num_heads}; give the "
            f"student {field}={teacher.num_heads} or set objective.attn.weight=0"
        )


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static description of the objective (hashable: usable as a jit static argument).

    Built with `Objective.from_config(cfg)`, where cfg has `logits`, `hs`, `attn` (each with
    weight, loss_fn, layer_mapper, norm, projector), `clm_weight`, `temperature` and
    `logits_chunk_tokens` (None: automatic, 0: never chunk).
    """

    logits: Component = Component(weight=1.0, loss_fn="kl")
    hs: Component = Component()
    attn: Component = Component()
    clm_weight: float = 0.0
    temperature: float = 1.0
    logits_chunk_tokens: Optional[int] = None
    # The models' layer counts, fixed by `bind` before the loss is traced (pairs are static).
    n_student: Optional[int] = None
    n_teacher: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: Mapping) -> "Objective":
        cfg = dict(cfg)
        cfg.pop("on_policy", None)  # how the batches are sampled (training/on_policy.py), not the loss
        known = {"logits", "hs", "attn", "clm_weight", "temperature", "logits_chunk_tokens"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown objective field(s) {unknown}; valid: {sorted(known)}")
        obj = cls(
            logits=_component(cfg.get("logits"), "logits"),
            hs=_component(cfg.get("hs"), "hs"),
            attn=_component(cfg.get("attn"), "attn"),
            clm_weight=float(cfg.get("clm_weight", 0.0)),
            temperature=float(cfg.get("temperature", 1.0)),
            logits_chunk_tokens=cfg.get("logits_chunk_tokens"),
        )
        if obj.logits.active and obj.logits.loss_fn not in _DISTRIBUTION_LOSSES + ("raw_mse", "cos"):
            raise ValueError(f"logits loss_fn {obj.logits.loss_fn!r} is not a logits loss")
        if obj.temperature <= 0:
            raise ValueError(f"objective.temperature must be > 0, got {obj.temperature}")
        return obj

    # ------------------------------------------------------------------ layer pairs

    def hs_pairs(self, n_student: int, n_teacher: int) -> tuple[tuple[int, int], ...]:
        """(student, teacher) indices into the n_layer + 1 hidden states; () when off."""
        if not self.hs.active:
            return ()
        return tuple(get_layer_mapper(self.hs.layer_mapper)(n_student + 1, n_teacher + 1))

    def attn_pairs(self, n_student: int, n_teacher: int) -> tuple[tuple[int, int], ...]:
        """(student, teacher) block indices whose attention maps are compared; () when off."""
        if not self.attn.active:
            return ()
        return tuple(get_layer_mapper(self.attn.layer_mapper)(n_student, n_teacher))

    def features(self, student, teacher) -> dict:
        """What each model must return: {"student"/"teacher": dict(output_hidden_states,
        output_attentions)}, each the mapped layers' indices only. The models run their blocks
        as a scan cut at exactly these layers (`models.stack`), so only the mapped attention
        maps [B, H, S, S] and hidden states are ever held, not every layer's."""
        attn = self.attn_pairs(student.num_layers, teacher.num_layers)
        hs = self.hs_pairs(student.num_layers, teacher.num_layers)
        return {
            "student": dict(output_hidden_states=tuple(sorted({s for s, _ in hs})),
                            output_attentions=tuple(sorted({s for s, _ in attn}))),
            "teacher": dict(output_hidden_states=tuple(sorted({t for _, t in hs})),
                            output_attentions=tuple(sorted({t for _, t in attn}))),
        }

    def chunk_tokens(self, batch: int, seq: int, vocab: int) -> int:
        """Tokens per chunk for the logits losses, 0 for unchunked: the one place that decides
        it, on the host (train_step.for_batch_shape), never while tracing. batch: rows per device.
        Automatic (logits_chunk_tokens None): chunked when the unchunked logits arrays would
        take more than AUTO_CHUNK_MEMORY_SHARE of the device's memory."""
        if self.logits_chunk_tokens is not None:
            return int(self.logits_chunk_tokens)
        need = BYTES_PER_LOGIT * batch * seq * vocab
        return DEFAULT_CHUNK_TOKENS if need > AUTO_CHUNK_MEMORY_SHARE * device_memory_bytes() else 0

    # ------------------------------------------------------------------ parameters

    def init_params(self, rng: Array, student, teacher, seq_len: int) -> dict:
        """Projector and norm parameters, sized from the configs (attention maps: seq_len)."""
        params = {}
        k_hs, k_attn = jax.random.split(rng)
        if self.hs.active:
            params["hs"] = {
                "projector": init_projector(self.hs.projector, k_hs, student.width, teacher.width),
                "norm": init_norm(self.hs.norm, teacher.width),
            }
        if self.attn.active:
            _check_heads(student, teacher)
            params["attn"] = {
                "projector": init_projector(self.attn.projector, k_attn, seq_len, seq_len),
                "norm": init_norm(self.attn.norm, seq_len),
            }
        return params

    # ------------------------------------------------------------------ the loss

    def __call__(
        self,
        params: Mapping,
        student_out: ModelOutput,
        teacher_out: ModelOutput,
        segment_ids: Array,
        input_ids: Array,
        student_head: Optional[Array] = None,
        teacher_head: Optional[Array] = None,
        logits_positions: Optional[Array] = None,
        logits_chunk: int = 0,
        single_document_rows: bool = False,
        loss_mask: Optional[Array] = None,
    ) -> tuple[Array, dict]:
        """The total loss and its components (float32 scalars).

        student_out / teacher_out: the models' outputs (teacher's already stop_gradient'ed).
        segment_ids: [B, S] (0 = padding); input_ids: [B, S] (labels for the clm loss).
        student_head / teacher_head: [D, V] LM head matrices, needed when the outputs carry no
          logits (chunked logits losses, or `logits_positions`): the objective then applies the
          heads to `last_hidden_state` itself.
        logits_positions: [G, C] from `real_token_positions`: apply the LM heads and the logits
          losses to these (real) tokens only. Padding never counts in a loss, so this changes
          nothing but the work: no LM head or softmax over the vocabulary on padding.
        logits_chunk: tokens per chunk when the objective applies the heads (0: in one piece),
          decided on the host by `chunk_tokens`.
        single_document_rows: the caller's promise that every row is one document from
          position 0 followed only by padding (the pad layout): the attention rows are then
          already in their document's frame and `document_frame` is skipped (it would be the
          identity on every real token).
        loss_mask: [B, S] or None: only the positions it keeps count (`counted_positions`).
        """
        if self.n_student is None:
            raise ValueError("call Objective.bind(student_config, teacher_config) before computing the loss")
        mask = counted_positions(segment_ids, loss_mask)
        parts = {}
        total = jnp.zeros((), jnp.float32)
        if self.logits.active or self.clm_weight:
            logit_loss, clm_loss = self._logits_losses(
                student_out, teacher_out, segment_ids, input_ids, student_head, teacher_head,
                logits_positions, logits_chunk, loss_mask)
            if self.logits.active:
                parts["loss/logits"] = logit_loss
                total += self.logits.weight * logit_loss
            if self.clm_weight:
                parts["loss/clm"] = clm_loss
                total += self.clm_weight * clm_loss
        features = self._feature_losses(params, student_out, teacher_out, segment_ids,
                                        single_document_rows)
        for name, comp in (("hs", self.hs), ("attn", self.attn)):
            if name in features:
                loss = masked_mean(features[name], mask)
                parts[f"loss/{name}"] = loss
                total += comp.weight * loss
        parts["loss"] = total
        return total, parts

    def per_token(
        self,
        params: Mapping,
        student_out: ModelOutput,
        teacher_out: ModelOutput,
        segment_ids: Array,
        input_ids: Array,
        single_document_rows: bool = False,
        loss_mask: Optional[Array] = None,
    ) -> dict:
        """Each active component's loss at every token: {"loss/<component>": [B, S] float32},
        0 on padding (and, for clm, where no next token of the same document exists).

        The losses `__call__` returns are the means of these over the real tokens (clm: over the
        valid labels). Needs the outputs' logits (not `return_last_hidden`) for the logits and
        clm components. For inspection and tests; training uses `__call__`.
        """
        if self.n_student is None:
            raise ValueError("call Objective.bind(student_config, teacher_config) before computing the loss")
        mask = counted_positions(segment_ids, loss_mask)
        out = {}
        if self.logits.active or self.clm_weight:
            s = student_out.logits.astype(jnp.float32)
            if self.logits.active:
                t = teacher_out.logits.astype(jnp.float32)
                fn = get_loss(self.logits.loss_fn)
                T = self.temperature
                if self.logits.loss_fn in _DISTRIBUTION_LOSSES and T != 1.0:
                    values = _per_position(fn, s / T, t / T) * (T * T)
                else:
                    values = _per_position(fn, s, t)
                out["loss/logits"] = jnp.where(mask, values, 0.0)
            if self.clm_weight:
                labels, label_ok = next_token_targets(input_ids, segment_ids)
                label_ok = label_ok & mask
                logp = jax.nn.log_softmax(s, axis=-1)
                nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
                out["loss/clm"] = jnp.where(label_ok, nll, 0.0)
        for name, values in self._feature_losses(params, student_out, teacher_out, segment_ids,
                                                 single_document_rows).items():
            out[f"loss/{name}"] = jnp.where(mask, values, 0.0)
        return out

    def _feature_losses(self, params, student_out, teacher_out, segment_ids,
                        single_document_rows) -> dict:
        """{"hs" / "attn": per-token loss [B, S]} of the active feature components (every
        position, padding included: the caller masks), each the mean over its layer pairs."""
        out = {}
        if self.hs.active:
            pairs = self.hs_pairs(self.n_student, self.n_teacher)
            out["hs"] = self._pairs_loss(self.hs, params["hs"], pairs, student_out.hidden_states,
                                         teacher_out.hidden_states)
        if self.attn.active:
            pairs = self.attn_pairs(self.n_student, self.n_teacher)
            s_maps, t_maps = student_out.attentions, teacher_out.attentions
            if not single_document_rows:
                # Packed rows: the projector and norm act on key positions, so each row must be
                # in its document's frame (pad layout: it already is).
                s_maps = {i: document_frame(s_maps[i], segment_ids) for i, _ in pairs}
                t_maps = {j: document_frame(t_maps[j], segment_ids) for _, j in pairs}
            # [B, H, S] per (head, query) row -> [B, S]: the mean over heads, so that the mean over
            # real tokens is the mean over every real (head, query) row, as before.
            out["attn"] = self._pairs_loss(self.attn, params["attn"], pairs, s_maps, t_maps).mean(1)
        return out

    def bind(self, student, teacher) -> "Objective":
        """A copy with the models' layer counts fixed; mapper errors surface here, not in jit."""
        bound = dataclasses.replace(self, n_student=student.num_layers, n_teacher=teacher.num_layers)
        bound.hs_pairs(student.num_layers, teacher.num_layers)
        bound.attn_pairs(student.num_layers, teacher.num_layers)
        if self.attn.active:
            _check_heads(student, teacher)
        return bound

    def check_cacheable(self) -> None:
        """ValueError (one line, naming the fix) unless every component can be computed from a
        teacher cache, which holds the teacher's top-k log-probabilities and nothing else."""
        for name in ("hs", "attn"):
            if getattr(self, name).active:
                raise ValueError(
                    f"objective.{name} needs the teacher's "
                    f"{'hidden states' if name == 'hs' else 'attention maps'}, which a teacher "
                    f"cache does not hold: set objective.{name}.weight=0 or train without "
                    f"teacher.cache")
        if self.logits.active and self.logits.loss_fn not in LOG_PROB_ROWS:
            raise ValueError(
                f"objective.logits.loss_fn={self.logits.loss_fn!r} needs the teacher's logits, "
                f"which a teacher cache does not hold (only top-k log-probabilities): use one "
                f"of {', '.join(LOG_PROB_ROWS)} or train without teacher.cache")

    def _pairs_loss(self, comp: Component, params, pairs, student_feats, teacher_feats) -> Array:
        """Per-position loss [...] (the features' shape without the last axis), averaged over
        the layer pairs: projector (student side) -> norm -> loss, in float32."""
        loss_fn = get_loss(comp.loss_fn)
        losses = []
        for s_idx, t_idx in pairs:
            s = apply_projector(comp.projector, params["projector"], student_feats[s_idx].astype(jnp.float32))
            s, t = apply_norm(comp.norm, params["norm"], s, teacher_feats[t_idx].astype(jnp.float32))
            losses.append(_per_position(loss_fn, s, t))
        return sum(losses) / len(losses)

    def _logits_losses(self, student_out, teacher_out, segment_ids, input_ids, s_head, t_head,
                       positions=None, c: int = 0, loss_mask=None):
        """(distillation loss on logits, hard next-token loss), each a mean over the counted
        tokens (`counted_positions`). teacher_out: the teacher's ModelOutput, a CachedTeacher,
        or None (clm only)."""
        B, S = segment_ids.shape
        mask = counted_positions(segment_ids, loss_mask)
        labels, label_ok = next_token_targets(input_ids, segment_ids)
        label_ok = label_ok & mask
        cached = isinstance(teacher_out, CachedTeacher)
        if student_out.logits is not None:
            t_logits = teacher_out if cached else (teacher_out.logits if teacher_out is not None else None)
            return self._logits_chunk(student_out.logits, t_logits, mask, labels, label_ok, mean=True)
        # The objective applies the LM heads to the final hidden states itself.
        hs = student_out.last_hidden_state
        # Without a teacher (clm only) the teacher slot carries the student's states, unused; a
        # cache's targets are gathered and chunked along with the student's states.
        ht = teacher_out if cached else (teacher_out.last_hidden_state if teacher_out is not None else hs)
        n_tokens, n_labels = mask.sum(), label_ok.sum()  # before any compaction
        tokens = (hs, ht, mask, labels, label_ok)
        if positions is not None:  # only the real tokens (the fill entries are masked out)
            tokens = jax.tree_util.tree_map(lambda x: gather_positions(x, positions), tokens)
            listed = (positions >= 0).reshape(-1)  # False on the -1 fill
            tokens = tokens[:2] + (tokens[2] & listed, tokens[3], tokens[4] & listed)
        else:
            tokens = jax.tree_util.tree_map(lambda x: x.reshape((B * S,) + x.shape[2:]), tokens)
        # Tokens stay split like the rows they came from (on a mesh): otherwise XLA splits the
        # hidden states by width to meet the FSDP-sharded head and gathers them whole.
        tokens = jax.tree_util.tree_map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)),
                                        tokens)
        n = tokens[0].shape[0]

        def losses(h_s, h_t, m, lab, lab_ok):
            if cached:
                t_logits = h_t
            else:
                t_logits = head_logits(h_t, t_head) if t_head is not None else None
            return self._logits_chunk(head_logits(h_s, s_head), t_logits, m, lab, lab_ok,
                                      mean=False)

        if not c or c >= n:
            ls, lc = losses(*tokens)
        else:
            # Chunked over tokens: logits of neither model are ever held in full; each chunk's
            # are recomputed in the backward pass.
            pad = (-n) % c
            xs = jax.tree_util.tree_map(
                lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((-1, c) + x.shape[1:]),
                tokens)

            @jax.checkpoint
            def chunk(carry, x):
                ls, lc = losses(*x)
                return (carry[0] + ls, carry[1] + lc), None

            zero = jnp.zeros((), jnp.float32)
            (ls, lc), _ = jax.lax.scan(chunk, (zero, zero), xs)
        return ls / jnp.maximum(n_tokens, 1), lc / jnp.maximum(n_labels, 1)

    def _logits_chunk(self, s_logits, t_logits, mask, labels, label_ok, mean: bool):
        """Logits losses on one chunk [..., V]: means (mean=True) or sums over its tokens.
        t_logits: the teacher's logits [..., V], or a CachedTeacher ([..., k] targets)."""
        s = s_logits.astype(jnp.float32)
        ls = lc = jnp.zeros((), jnp.float32)
        if self.logits.active:
            T = self.temperature
            if isinstance(t_logits, CachedTeacher):
                # The cache holds the teacher's log-probabilities at temperature T already
                # (recorded at the run's temperature, checked at startup): only the student's
                # logits are softened, and the T² scale is the online loss's.
                c = t_logits
                ls = topk_loss(self.logits.loss_fn, s / T if T != 1.0 else s, c.ids, c.logprobs,
                               c.rest, mask, c.tail_ids, c.tail_logprobs) * (T * T)
            else:
                t = t_logits.astype(jnp.float32)
                if self.logits.loss_fn in _DISTRIBUTION_LOSSES and T != 1.0:
                    # Softened distributions, scaled by T² so gradients keep their size (Hinton et al.).
                    ls = get_loss(self.logits.loss_fn)(s / T, t / T, mask) * (T * T)
                else:
                    ls = get_loss(self.logits.loss_fn)(s, t, mask)
            if not mean:
                ls = ls * mask.sum()
        if self.clm_weight:
            lc = LOSSES["clm"](s, labels, label_ok)
            if not mean:
                lc = lc * label_ok.sum()
        return ls, lc
