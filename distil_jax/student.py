"""Build the student from the teacher: its config, its initial weights, and what stays frozen.

Distily's student options: a pretrained student (weights loaded), a student config from a path or
hub id (e.g. `distilbert/distilgpt2`), or the teacher's config with overrides in the family's HF
field names (e.g. `{"n_layer": 6}` for GPT-2, `{"num_hidden_layers": 16}` for Llama); the
vocabulary is always the teacher's; random init as HF does; `copy_teacher_modules` copies teacher
modules in by their HF module names (optionally frozen); and optionally student blocks initialized
from chosen teacher blocks (distilgpt2 used [0, 2, 4, 7, 9, 11]; "uniform" picks evenly spaced
ones). Everything architecture-specific goes through `distil_jax.models`.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import hf, models

log = logging.getLogger(__name__)


def _get(tree: Mapping, path: tuple[str, ...], what: str, name: Optional[tuple[str, ...]] = None):
    node = tree
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            raise ValueError(
                f"copy_teacher_modules: module {'.'.join(name or path)!r} not found in the {what}; "
                f"top-level modules are: {', '.join(sorted(tree))}"
            )
        node = node[k]
    return node


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of `tree` with the subtree at `path` replaced."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def _locate(config, path: tuple[str, ...]) -> tuple[tuple[str, ...], Optional[int]]:
    """A path in HF's per-layer view ("h", "3", "attn") -> (the stacked path ("h", "attn"),
    layer 3); a path outside the blocks (or the whole stack "h") -> (path, None)."""
    stacked = models.family(config).LAYERS_PATH
    n = len(stacked)
    if path[:n] != stacked or len(path) == n:
        return path, None
    if not path[n].isdigit() or int(path[n]) >= config.num_layers:
        raise ValueError(f"copy_teacher_modules: module {'.'.join(path)!r} not found: the model has "
                         f"blocks 0..{config.num_layers - 1}")
    return stacked + path[n + 1:], int(path[n])


def _get_module(tree: Mapping, config, path: tuple[str, ...], what: str):
    """The subtree at HF-view `path`: a slice of the stacked leaves for a path inside block N."""
    at, layer = _locate(config, path)
    node = _get(tree, at, what, path)
    return node if layer is None else jax.tree_util.tree_map(lambda x: x[layer], node)


def _set_module(tree: dict, config, path: tuple[str, ...], value) -> dict:
    """A copy of `tree` with the subtree at HF-view `path` replaced (one slice inside block N)."""
    at, layer = _locate(config, path)
    if layer is not None:
        value = jax.tree_util.tree_map(lambda full, v: full.at[layer].set(v), _get(tree, at, "student"), value)
    return _set(tree, at, value)


def _freeze(trainable: dict, config, path: tuple[str, ...]) -> dict:
    """The trainable mask with the module at HF-view `path` frozen. A leaf's mask is a bool, or,
    for a stacked leaf frozen in some layers only, a numpy bool array [num_layers] (True =
    that layer trains; `frozen_layers` applies it)."""
    at, layer = _locate(config, path)

    def freeze(t):
        if layer is None:
            return False
        per_layer = np.broadcast_to(np.asarray(t, bool), (config.num_layers,)).copy()
        per_layer[layer] = False
        return bool(per_layer.all()) if per_layer.all() or not per_layer.any() else per_layer
    return _set(trainable, at, jax.tree_util.tree_map(freeze, _get(trainable, at, "student")))


def trains(t) -> bool:
    """Whether a trainable-mask leaf (a bool, or a per-layer bool array) trains any of it."""
    return bool(np.any(t))


def trained_part(x: jax.Array, t) -> jax.Array:
    """`x` (a stacked leaf's gradient or update [L, ...]) with the frozen layers of mask leaf
    `t` zeroed; `x` itself for a whole-leaf bool."""
    if isinstance(t, np.ndarray):
        return x * jnp.asarray(t, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return x


def frozen_layers(tx, trainable):
    """`tx` (the optimizer) for a mask with layers frozen inside stacked leaves: their gradients
    are zeroed before it (so clipping's global norm excludes them, as torch gives a frozen
    module no gradient) and their updates after it (so weight decay does not move them). `tx`
    unchanged when no leaf is frozen in part."""
    import optax

    if not any(isinstance(t, np.ndarray) for t in jax.tree_util.tree_leaves(trainable)):
        return tx
    zero = optax.stateless(lambda updates, params=None: jax.tree_util.tree_map(trained_part, updates, trainable))
    return optax.chain(zero, tx, zero)


def student_config(teacher, cfg: Mapping):
    """The student's config from the `student` config section.

    cfg.model_name_or_path: a pretrained student (its config); else cfg.config_name_or_path: a
    config only; else the teacher's config. cfg.overrides (dict of the family's HF config fields)
    is applied on top; an unknown key is a ValueError. The vocabulary is forced to the teacher's.
    """
    if cfg.get("model_name_or_path"):
        base = hf.load_config(cfg["model_name_or_path"])
    elif cfg.get("config_name_or_path"):
        base = hf.load_config(cfg["config_name_or_path"])
    else:
        base = teacher
    overrides = dict(cfg.get("overrides") or {})
    config = base.replace(**overrides)
    if config.vocab_size != teacher.vocab_size:
        if cfg.get("model_name_or_path"):
            raise ValueError(
                f"the pretrained student's vocab_size {config.vocab_size} differs from the "
                f"teacher's {teacher.vocab_size}: the logits losses compare them token by token; "
                "use a student of the teacher's family and tokenizer, or "
                "student.model_name_or_path='' for a random student with the teacher's vocabulary"
            )
        config = config.replace(vocab_size=teacher.vocab_size)
    return config


def uniform_layers(n_student: int, n_teacher: int) -> list[int]:
    """Evenly spaced teacher blocks for `n_student` student blocks, first and last included:
    6 of 12 -> [0, 2, 4, 7, 9, 11] (the distilgpt2 recipe), 16 of 32 -> [0, 2, 4, ..., 29, 31]."""
    if n_student > n_teacher:
        raise ValueError(f"init_from_teacher_layers='uniform': the student has {n_student} blocks, "
                         f"more than the teacher's {n_teacher}; list the teacher blocks explicitly")
    if n_student == 1:
        return [n_teacher - 1]
    return [int(x) for x in np.round(np.linspace(0, n_teacher - 1, n_student))]


def _teacher_layers(spec, n_student: int, n_teacher: int) -> list[int]:
    """init_from_teacher_layers -> one non-negative teacher block index per student block."""
    if isinstance(spec, str):
        if spec != "uniform":
            raise ValueError(f"init_from_teacher_layers={spec!r}: use 'uniform' or a list of "
                             "teacher block indices, one per student block")
        return uniform_layers(n_student, n_teacher)
    layers = list(spec)
    if len(layers) != n_student:
        raise ValueError(
            f"init_from_teacher_layers has {len(layers)} entries but the student has "
            f"{n_student} blocks; give one teacher block index per student block"
        )
    out = []
    for j in layers:
        j = j + n_teacher if j < 0 else j
        if not 0 <= j < n_teacher:
            raise ValueError(f"init_from_teacher_layers: teacher block {j} out of range "
                             f"(teacher has {n_teacher})")
        out.append(j)
    return out


def build_student(teacher_config, teacher_params: Mapping, cfg: Mapping,
                  rng: jax.Array) -> tuple[object, dict, dict]:
    """(student config, student params float32, trainable mask).

    cfg: the `student` config section: model_name_or_path, config_name_or_path, overrides,
      copy_teacher_modules (list of (HF module name, frozen) pairs; default [("lm_head", False)]),
      init_from_teacher_layers ("uniform", a list with one teacher block index per student block,
      or empty).
    The trainable mask is a pytree like params (False = frozen, never updated) of bools, or of
    per-layer bool arrays [num_layers] for a stacked leaf frozen in some blocks only (e.g.
    copy_teacher_modules [("transformer.h.0", True)]): see `frozen_layers`.
    """
    config = student_config(teacher_config, cfg)
    copies = list(cfg.get("copy_teacher_modules", [("lm_head", False)]) or [])
    if config.model_type != teacher_config.model_type and (
            cfg.get("init_from_teacher_layers") or any(m != "lm_head" for m, _ in copies)):
        # Only the LM head means the same in both families (its shape is checked below).
        raise ValueError(f"the student ({config.model_type}) and the teacher "
                         f"({teacher_config.model_type}) are different model families: only "
                         "'lm_head' can be copied between them")
    if cfg.get("model_name_or_path"):
        _, params = hf.load_pretrained(cfg["model_name_or_path"], jnp.float32)
        # Overrides that change the architecture would leave weights the config does not use
        # (e.g. n_layer=1 on a 2-block checkpoint silently ignores block 1): refuse them.
        if models.shape_problems(models.param_shapes(config), params):
            raise ValueError(
                f"the student overrides {dict(cfg.get('overrides') or {})} change the architecture "
                f"of the pretrained student {cfg['model_name_or_path']!r}, whose weights no longer "
                "fit; use config_name_or_path (random init) to change its shape"
            )
    else:
        params = models.init_params(config, rng)
    trainable = jax.tree_util.tree_map(lambda _: True, params)
    fam, t_fam = models.family(config), models.family(teacher_config)

    spec = cfg.get("init_from_teacher_layers")
    if spec:
        layers = _teacher_layers(spec, config.num_layers, teacher_config.num_layers)
        # The blocks are stacked: one gather of the chosen teacher layers per leaf.
        picked = jax.tree_util.tree_map(lambda x: x[np.asarray(layers)],
                                        _get(teacher_params, t_fam.LAYERS_PATH, "teacher"))
        value = _copy_checked(picked, _get(params, fam.LAYERS_PATH, "student"), f"blocks {layers}")
        params = _set(params, fam.LAYERS_PATH, value)
        log.info("student blocks initialized from teacher blocks %s", layers)

    for module, frozen in copies:
        if module == "lm_head":
            # Whether the head is tied is the family's business: copy the teacher's [D, V] head
            # into wherever the student's head lives (its token embedding when tied).
            head = _copy_checked(models.lm_head(teacher_config, teacher_params),
                                 models.lm_head(config, params), module)
            params = models.with_lm_head(config, params, head)
            mask_path = fam.lm_head_path(config)
        else:
            path = fam.module_path(module)
            value = _copy_checked(_get_module(teacher_params, teacher_config, t_fam.module_path(module),
                                              "teacher"),
                                  _get_module(params, config, path, "student"), module)
            params = _set_module(params, config, path, value)
            mask_path = path
        if frozen:
            trainable = _freeze(trainable, config, mask_path)
        log.info("copied teacher module %s into the student%s", module, " (frozen)" if frozen else "")
    return config, params, trainable


def _copy_checked(src, dst, name: str):
    """A float32 copy of `src` after checking it has `dst`'s structure and shapes."""
    s_shapes = jax.tree_util.tree_map(jnp.shape, src)
    d_shapes = jax.tree_util.tree_map(jnp.shape, dst)
    if s_shapes != d_shapes:
        raise ValueError(
            f"cannot copy teacher module {name!r} into the student: shapes differ "
            f"(teacher {s_shapes}, student {d_shapes}); the student needs the teacher's width"
        )
    return jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), src)

