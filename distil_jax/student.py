"""Build the student from the teacher: its config, its initial weights, and what stays frozen.

Distily's student options (spec section 4): a pretrained student (weights loaded), a student
config from a path or hub id (e.g. `distilbert/distilgpt2`), or the teacher's config with
overrides (e.g. `{"n_layer": 6}`); the vocabulary is always the teacher's; random init as HF
GPT-2 does; `copy_teacher_modules` copies teacher modules in (optionally frozen); and optionally
student blocks initialized from chosen teacher blocks (distilgpt2 used [0, 2, 4, 7, 9, 11]).
"""

from __future__ import annotations

import logging
from typing import Mapping

import jax
import jax.numpy as jnp

from distil_jax import hf
from distil_jax.models.gpt2 import GPT2Config, init_params, param_shapes

log = logging.getLogger(__name__)


def _path(module: str) -> tuple[str, ...]:
    """'transformer.h.0.attn' / 'h.0.attn' / 'lm_head' -> ('h', '0', 'attn')."""
    return tuple(module.removeprefix("transformer.").split("."))


def _get(tree: Mapping, path: tuple[str, ...], what: str):
    node = tree
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            raise ValueError(
                f"copy_teacher_modules: module {'.'.join(path)!r} not found in the {what}; "
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


def student_config(teacher: GPT2Config, cfg: Mapping) -> GPT2Config:
    """The student's GPT2Config from the `student` config section.

    cfg.model_name_or_path: a pretrained student (its config); else cfg.config_name_or_path: a
    config only; else the teacher's config. cfg.overrides (dict) is applied on top; an unknown
    key is a ValueError. The vocabulary is forced to the teacher's.
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
                f"teacher's {teacher.vocab_size}; distillation needs a shared vocabulary"
            )
        config = config.replace(vocab_size=teacher.vocab_size)
    return config


def build_student(
    teacher_config: GPT2Config,
    teacher_params: Mapping,
    cfg: Mapping,
    rng: jax.Array,
) -> tuple[GPT2Config, dict, dict]:
    """(student config, student params float32, trainable mask).

    cfg: the `student` config section: model_name_or_path, config_name_or_path, overrides,
      copy_teacher_modules (list of (module, frozen) pairs; default [("lm_head", False)]),
      init_from_teacher_layers (list, one teacher block index per student block, or None).
    The trainable mask is a pytree of bools like params (False = frozen, never updated).
    """
    config = student_config(teacher_config, cfg)
    if cfg.get("model_name_or_path"):
        _, params = hf.load_pretrained(cfg["model_name_or_path"], jnp.float32)
        # Overrides that change the architecture would leave weights the config does not use
        # (e.g. n_layer=1 on a 2-block checkpoint silently ignores block 1): refuse them.
        want = jax.tree_util.tree_map(lambda x: x.shape, param_shapes(config))
        got = jax.tree_util.tree_map(jnp.shape, params)
        if want != got:
            raise ValueError(
                f"the student overrides {dict(cfg.get('overrides') or {})} change the architecture "
                f"of the pretrained student {cfg['model_name_or_path']!r}, whose weights no longer "
                "fit; use config_name_or_path (random init) to change its shape"
            )
    else:
        params = init_params(config, rng)
    trainable = jax.tree_util.tree_map(lambda _: True, params)

    layers = cfg.get("init_from_teacher_layers")
    if layers:
        layers = list(layers)
        if len(layers) != config.n_layer:
            raise ValueError(
                f"init_from_teacher_layers has {len(layers)} entries but the student has "
                f"{config.n_layer} blocks; give one teacher block index per student block"
            )
        h = dict(params["h"])
        for i, j in enumerate(layers):
            j = j + teacher_config.n_layer if j < 0 else j
            if not 0 <= j < teacher_config.n_layer:
                raise ValueError(f"init_from_teacher_layers: teacher block {j} out of range "
                                 f"(teacher has {teacher_config.n_layer})")
            h[str(i)] = _copy_checked(teacher_params["h"][str(j)], params["h"][str(i)], f"h.{j}")
        params = dict(params, h=h)

    for module, frozen in cfg.get("copy_teacher_modules", [("lm_head", False)]) or []:
        path = _path(module)
        if path == ("lm_head",):
            # GPT-2 ties lm_head to wte: copying the head is copying the token embedding.
            src = _head_as_embedding(teacher_config, teacher_params)
            dst_path = ("wte", "embedding") if config.tie_word_embeddings else ("lm_head", "kernel")
            if not config.tie_word_embeddings:
                src = src.T
            value = _copy_checked(src, _get(params, dst_path, "student"), module)
            params = _set(params, dst_path, value)
            mask_path = dst_path
        else:
            value = _copy_checked(_get(teacher_params, path, "teacher"), _get(params, path, "student"), module)
            params = _set(params, path, value)
            mask_path = path
        if frozen:
            trainable = _set(trainable, mask_path, jax.tree_util.tree_map(lambda _: False,
                                                                       _get(trainable, mask_path, "student")))
        log.info("copied teacher module %s into the student%s", module, " (frozen)" if frozen else "")
    return config, params, trainable


def _head_as_embedding(config: GPT2Config, params: Mapping):
    """The teacher's LM head as a [V, D] matrix (the tied wte, or lm_head transposed)."""
    if config.tie_word_embeddings:
        return params["wte"]["embedding"]
    return params["lm_head"]["kernel"].T


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
