"""The offline demo's teacher: a small GPT-2 that distil_jax trains itself, with no network.

The corpus is the docstrings of the Python standard library (on every machine with Python), the
tokenizer a byte-level BPE trained on it with `tokenizers`, and the teacher is trained with the
hard next-token loss by the same jitted train step the distillation uses (clm-only objective, no
teacher). The result is a real HF folder, `WORKDIR/teacher`.

Training it is most of a first demo's time, so it is also cached outside the workdir, keyed by
its recipe (the train texts, the `demo_teacher` section, the seed, the tokenizer library):
`cache_root()/demo_teacher/<key>`. A fresh workdir with the same recipe copies it from there;
another recipe trains (and caches) its own. Cache entries are written whole or not at all
(`fsio.atomic_folder`), and one is used only if its recorded recipe is this run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from distil_jax import data, fsio, hf, models
from distil_jax.demo import corpus
from distil_jax.objectives.objective import Component, Objective
from distil_jax.train_step import (StepConfig, create_train_state, make_optimizer,
                                   make_train_step)

log = logging.getLogger(__name__)

CORPUS_FILE = "data/stdlib_docstrings.jsonl"


TEACHER_DIR = "teacher"
RECIPE_FILE = "demo_teacher.json"  # in the teacher's folder: what it was trained with
CACHE_ENV = "DISTIL_JAX_CACHE"  # the cache root; default $XDG_CACHE_HOME/distil_jax
# Bumped when the training below changes what a recipe produces, so older entries are not reused.
RECIPE_VERSION = 1
_ESTIMATE_AFTER = 10  # steps timed (after the compiling first) for the logged time estimate


def corpus_path(workdir: Path) -> Path:
    return Path(workdir) / CORPUS_FILE


def teacher_path(workdir: Path) -> Path:
    return Path(workdir) / TEACHER_DIR


def cache_root() -> Path:
    """$DISTIL_JAX_CACHE, else $XDG_CACHE_HOME/distil_jax, else ~/.cache/distil_jax."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(xdg) / "distil_jax"


def cached_teacher_path(recipe: dict) -> Path:
    """The cache entry of a recipe: cache_root()/demo_teacher/<sha256 of its JSON, 16 hex>."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "demo_teacher" / key


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
    """The demo teacher in WORKDIR/teacher: kept if there with these settings, else copied from
    the cache entry of this recipe (cached_teacher_path), else trained into the cache and copied.
    Returns its folder.

    cfg: the `demo_teacher` config section; dataset_spec: the run's dataset section (the teacher
    trains on the same train split, so the held-out split stays unseen by both models).
    """
    out = teacher_path(workdir)
    if _is_teacher(out):
        saved = _saved_recipe(out)
        # The workdir's own teacher is kept whatever texts it was trained on (a resume refuses
        # another dataset; a fresh start on other data still gets a teacher of this shape).
        # None: a teacher from before recipes were recorded.
        kept = saved is None or {k: saved.get(k) for k in ("demo_teacher", "seed")} == _settings(cfg, seed)
        if kept:
            log.info("reusing the demo teacher in %s", out)
            return out
        log.warning("the demo teacher in %s was trained with other demo_teacher settings or seed "
                    "than this run's; using one of this run's", out)
    train_texts, _ = data.load_texts(dataset_spec)
    recipe = _recipe(cfg, seed, train_texts)
    cached = cached_teacher_path(recipe)
    if _is_teacher(cached) and _saved_recipe(cached) == recipe:
        log.info("reusing the cached demo teacher %s (same recipe; %s=DIR moves the cache)",
                 cached, CACHE_ENV)
    else:
        _train(cached, cfg, train_texts, recipe, Path(workdir) / "cache", seed)
    with fsio.atomic_folder(out) as tmp:
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
    return out


def _train(out: Path, cfg, train_texts: list[str], recipe: dict, token_cache: Path, seed: int):
    """Trains the tokenizer and the teacher on `train_texts`; writes both (and the recipe) to
    `out` atomically."""
    t0 = time.time()
    tokenizer = corpus.train_tokenizer(train_texts, vocab_size=cfg.vocab_size,
                                       model_max_length=cfg.n_positions)
    config = models.config_from_hf(dict(
        model_type="gpt2", vocab_size=len(tokenizer), n_positions=cfg.n_positions,
        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    # Cached where the distillation looks, so its tokenization of the same texts is a cache hit.
    docs = data.tokenize_cached(train_texts, tokenizer, token_cache)
    rows = data.pack(docs, cfg.n_positions, tokenizer.eos_token_id)
    log.info("training the demo teacher (%d params, %d layers, %d steps on %d rows of %d tokens; "
             "cached in %s for the next run) ...", models.param_count(config), config.num_layers,
             cfg.steps, len(rows["input_ids"]), cfg.n_positions, out)
    params = _fit(config, rows, cfg, seed)
    hf.save_pretrained(config, params, out, tokenizer=tokenizer,
                       extra_files={RECIPE_FILE: json.dumps(recipe, indent=2, sort_keys=True)})
    log.info("demo teacher trained in %.1f min, saved to %s", (time.time() - t0) / 60, out)


def _fit(config, rows, cfg, seed: int):
    """cfg.steps of Adam on the next-token loss; the trained params (host arrays)."""
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
    bar = tqdm(range(cfg.steps), desc="demo teacher", unit="step", dynamic_ncols=True)
    losses = []
    for i in bar:
        state, metrics = step(state, None, next(batches))
        losses.append(metrics["loss/clm"])
        if i == 0:
            jax.block_until_ready(metrics)
            t1 = time.time()  # the first step compiles: the estimate times the next ones
        elif i == _ESTIMATE_AFTER:
            jax.block_until_ready(metrics)
            per_step = (time.time() - t1) / i
            log.info("demo teacher: %.2f s/step here, about %.1f min for its %d steps", per_step,
                     per_step * cfg.steps / 60, cfg.steps)
        if (i + 1) % 25 == 0 or i + 1 == cfg.steps:
            loss = float(np.mean(jax.device_get(losses)))
            losses.clear()
            if not np.isfinite(loss):
                raise FloatingPointError(f"demo teacher loss became {loss} at step {i + 1}; lower "
                                         "demo_teacher.learning_rate")
            bar.set_postfix(loss=f"{loss:.3f}")
    return jax.device_get(state.params["student"])


def _settings(cfg, seed: int) -> dict:
    """The demo teacher's config section and the seed, as JSON values."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {"demo_teacher": json.loads(json.dumps(d, default=str)), "seed": int(seed)}


def _recipe(cfg, seed: int, train_texts: list[str]) -> dict:
    """What the demo teacher is made from (its cache key): the settings, the train texts (their
    sha256) and the tokenizer library's version (the BPE it trains)."""
    import tokenizers

    texts = hashlib.sha256(json.dumps(train_texts, ensure_ascii=False).encode()).hexdigest()
    return {**_settings(cfg, seed), "train_texts_sha256": texts,
            "tokenizers": tokenizers.__version__, "version": RECIPE_VERSION}


def _is_teacher(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and (folder / "config.json").exists()


def _saved_recipe(folder: Path):
    try:
        return json.loads((folder / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None
