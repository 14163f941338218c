"""The offline demo's teacher: a small GPT-2 that distil_jax trains itself, with no network.

The corpus is the docstrings of the Python standard library (on every machine with Python), the
tokenizer a byte-level BPE trained on it with `tokenizers`, and the teacher is trained with the
hard next-token loss by the same jitted train step the distillation uses (clm-only objective, no
teacher). The result is a real HF folder (`WORKDIR/teacher`), cached: a second run reuses it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from distil_jax import data, hf, models
from distil_jax.demo import corpus
from distil_jax.objectives.objective import Component, Objective
from distil_jax.train_step import (StepConfig, create_train_state, make_optimizer,
                                   make_train_step)

log = logging.getLogger(__name__)

CORPUS_FILE = "data/stdlib_docstrings.jsonl"


TEACHER_DIR = "teacher"
RECIPE_FILE = "demo_teacher.json"  # in the teacher's folder: what it was trained with


def corpus_path(workdir: Path) -> Path:
    return Path(workdir) / CORPUS_FILE


def teacher_path(workdir: Path) -> Path:
    return Path(workdir) / TEACHER_DIR


def ensure_corpus(workdir: Path) -> Path:
    """WORKDIR/data/stdlib_docstrings.jsonl (written once)."""
    path = corpus_path(workdir)
    if not path.exists():
        docs = corpus.stdlib_docstrings()
        path.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_jsonl(docs, path)
        log.info("wrote the offline corpus: %d stdlib docstring documents -> %s", len(docs), path)
    return path


def ensure_teacher(workdir: Path, cfg, dataset_spec, seed: int = 0) -> Path:
    """Train (or reuse) the demo teacher in WORKDIR/teacher; returns its folder.

    cfg: the `demo_teacher` config section; dataset_spec: the run's dataset section (the teacher
    trains on the same train split, so the held-out split stays unseen by both models).
    """
    out = teacher_path(workdir)
    recipe = _recipe(cfg, seed)
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        saved = _saved_recipe(out)
        if saved is None or saved == recipe:  # None: a teacher from before recipes were recorded
            log.info("reusing the demo teacher in %s", out)
            return out
        log.warning("the demo teacher in %s was trained with other settings than this config's "
                    "demo_teacher; training a new one", out)
    t0 = time.time()
    train_texts, _ = data.load_texts(dataset_spec)
    tokenizer = corpus.train_tokenizer(train_texts, vocab_size=cfg.vocab_size,
                                       model_max_length=cfg.n_positions)
    config = models.config_from_hf(dict(
        model_type="gpt2", vocab_size=len(tokenizer), n_positions=cfg.n_positions,
        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    # Cached where the distillation looks, so its tokenization of the same texts is a cache hit.
    docs = data.tokenize_cached(train_texts, tokenizer, Path(workdir) / "cache")
    rows = data.pack(docs, cfg.n_positions, tokenizer.eos_token_id)
    batches = data.BatchIterator(rows, cfg.batch_size, shuffle=True, seed=seed)

    objective = Objective(logits=Component(weight=0.0), clm_weight=1.0).bind(config, config)
    sc = StepConfig(teacher=config, student=config, objective=objective, dtype=jnp.float32)
    params = {"student": models.init_params(config, jax.random.PRNGKey(seed))}
    trainable = jax.tree_util.tree_map(lambda _: True, params)
    opt = dict(learning_rate=cfg.learning_rate, warmup_ratio=0.05, lr_end=cfg.learning_rate * 0.05,
               max_grad_norm=1.0, weight_decay=0.01)
    tx, schedule = make_optimizer(opt, cfg.steps, trainable)
    state = create_train_state(params, tx, jax.random.PRNGKey(seed + 1))
    step = make_train_step(sc, tx, schedule)
    log.info("training the demo teacher (%d params, %d layers) for %d steps on %d rows of %d tokens",
             models.param_count(config), config.num_layers, cfg.steps, len(rows["input_ids"]), cfg.n_positions)
    bar = tqdm(range(cfg.steps), desc="demo teacher", unit="step", dynamic_ncols=True)
    losses = []
    for i in bar:
        state, metrics = step(state, None, next(batches))
        losses.append(metrics["loss/clm"])
        if (i + 1) % 25 == 0 or i + 1 == cfg.steps:
            loss = float(np.mean(jax.device_get(losses)))
            losses.clear()
            if not np.isfinite(loss):
                raise FloatingPointError(f"demo teacher loss became {loss} at step {i + 1}; lower "
                                         "demo_teacher.learning_rate")
            bar.set_postfix(loss=f"{loss:.3f}")
    hf.save_pretrained(config, jax.device_get(state.params["student"]), out, tokenizer=tokenizer,
                       extra_files={RECIPE_FILE: json.dumps(recipe, indent=2, sort_keys=True)})
    log.info("demo teacher saved to %s (%.0f s)", out, time.time() - t0)
    return out


def _recipe(cfg, seed: int) -> dict:
    """What the demo teacher is trained with (its config section and the seed), as JSON values.
    (The dataset is not in it: a resume refuses a changed dataset, and a teacher reused on a
    fresh start with other data is still a teacher of this shape.)"""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {"demo_teacher": json.loads(json.dumps(d, default=str)), "seed": int(seed)}


def _saved_recipe(folder: Path):
    try:
        return json.loads((folder / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None
