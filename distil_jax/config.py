"""The run configuration: its schema, Distily's defaults, and validation.

`default_config()` is the schema: every field a run may set, with a comment, and values that
reproduce Distily's reference run (spec section 1). A config file (`configs/*.py`) returns a
modified copy; `validate` refuses any key the schema does not have, naming the closest valid one.
"""

from __future__ import annotations

import difflib
from typing import Any

import jax.numpy as jnp
import ml_collections

# The dtype names a config (and the export) accepts.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.teacher = ml_collections.ConfigDict()
    # HF folder or hub id of a causal LM whose model_type is gpt2, llama, qwen2, qwen3 or mistral
    c.teacher.model_name_or_path = "gpt2"
    c.teacher.dtype = "bfloat16"  # dtype the teacher's weights are held in (it is never trained)
    # A teacher cache folder (python -m distil_jax.record_teacher writes one): train from the
    # teacher's recorded top-k log-probabilities instead of running it; "" = run the teacher.
    # Logits-only objectives (kl, reverse_kl, cakld, jsd, ce); see docs/teacher_cache.md.
    c.teacher.cache = ""
    c.teacher.cache_k = 64  # top-k tokens per position recorded (training may use fewer)
    c.teacher.cache_dtype = "float16"  # stored log-probabilities: float16 or float32

    c.tokenizer_name_or_path = ""  # "" = the teacher's tokenizer

    c.student = ml_collections.ConfigDict()
    c.student.model_name_or_path = ""  # a pretrained student (weights loaded); "" = random init
    c.student.config_name_or_path = "distilbert/distilgpt2"  # student config; "" = the teacher's
    # HF config fields of the student's family, e.g. {"n_layer": 6} (GPT-2) or
    # {"num_hidden_layers": 16} (Llama, Qwen, Mistral)
    c.student.overrides = ml_collections.ConfigDict()
    # (HF module name, frozen) pairs, e.g. ("lm_head", False), ("model.layers.0", True)
    c.student.copy_teacher_modules = [("lm_head", False)]
    # Student blocks initialized from teacher blocks: a tuple with one teacher block index per
    # student block, "uniform" (evenly spaced, first and last included), or None = none
    c.student.init_from_teacher_layers = None
    c.student.dropout = True  # HF trains in train mode: dropout as in the student's config

    c.dataset = ml_collections.ConfigDict()
    c.dataset.uri = "wikimedia/wikipedia"  # hub id, or a local .txt/.json(l)/.parquet/.csv path
    c.dataset.subset = "20231101.en"
    c.dataset.split = "train"
    c.dataset.column = "text"
    c.dataset.sample_size = 5000  # first N rows (None = all)
    c.dataset.shuffle = False  # Distily takes the first N rows unshuffled
    c.dataset.seed = 42  # seed of the train/test split
    c.dataset.test_size = 0.002  # held-out fraction: 5000 rows -> 4990 train / 10 test
    c.dataset.sample_by = "document"  # .txt only: document | paragraph | line
    # "pack": documents joined with EOS into full rows, attention kept inside each document (no
    # compute on padding). "pad": Distily's one document per row, padding masked out of losses.
    c.dataset.layout = "pack"
    c.dataset.max_seq_len = 1024  # rows are min(this, model n_positions, tokenizer max) long

    c.objective = ml_collections.ConfigDict()
    c.objective.logits = dict(weight=1.0, loss_fn="kl")
    c.objective.hs = dict(weight=0.0)
    c.objective.attn = dict(weight=5.0, loss_fn="raw_mse", layer_mapper="layer-2",
                            norm="layernorm_teacher_only_affine", projector="orthogonal")
    c.objective.clm_weight = 0.0  # hard next-token loss (distilgpt2 used 0.5); 0 = Distily
    c.objective.temperature = 1.0  # logits losses on logits / T, scaled by T²
    c.objective.logits_chunk_tokens = -1  # tokens per chunk of the logits losses; -1 auto, 0 off

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.optimizer = "adamw"  # adamw | adam | lion (weight_decay 0 makes adamw = Adam)
    c.optimizer.learning_rate = 2e-4
    c.optimizer.adam_beta1 = 0.9
    c.optimizer.adam_beta2 = 0.999
    c.optimizer.adam_epsilon = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.lr_end = 1e-7  # polynomial schedule's end value (HF default)
    c.optimizer.power = 1.0  # polynomial schedule's power (1 = linear decay)
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.max_grad_norm = 1.0  # global-norm clipping; 0 = off

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # rows per optimizer step and micro-batch, all devices together
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.num_epochs = 1.0
    c.train.max_steps = -1  # > 0 overrides num_epochs
    c.train.seed = 42
    c.train.dtype = "bfloat16"  # compute dtype; master weights and optimizer state are float32
    c.train.remat = True  # gradient checkpointing of the student's blocks
    # Padding-aware logits (dataset.layout = "pad"): LM heads and logits losses run on the real
    # tokens only, rounded up to 1/N of each device's share of the batch (at most N compiled
    # variants of the step); 0 = off.
    c.train.logits_buckets = 8
    # Attention of the layers whose maps no loss reads: "xla" (any backend) or "cudnn" (cuDNN
    # flash attention; NVIDIA GPU and bfloat16 only; see docs/benchmarks.md).
    c.train.attention = "xla"
    c.train.log_steps = 25
    c.train.save_steps = 500
    c.train.save_total_limit = 2  # checkpoints kept (the newest)

    c.eval = ml_collections.ConfigDict()
    c.eval.eval_steps = 500  # also evaluated at start and end; 0 = start and end only
    c.eval.batch_size = 8
    # Extra evaluators (like Distily's enwikippl / frwikippl): name -> dataset fields
    # (uri, subset, split, column, sample_size). The held-out split is always "heldout".
    c.eval.evaluators = ml_collections.ConfigDict()

    # If set, the teacher is first trained by distil_jax itself on an offline corpus and saved
    # in WORKDIR/teacher (the offline demo); see distil_jax/demo.py.
    c.demo_teacher = ml_collections.ConfigDict()
    c.demo_teacher.enabled = False
    c.demo_teacher.vocab_size = 4096
    c.demo_teacher.n_layer = 4
    c.demo_teacher.n_embd = 192
    c.demo_teacher.n_head = 4
    c.demo_teacher.n_positions = 128
    c.demo_teacher.steps = 600
    c.demo_teacher.batch_size = 16
    c.demo_teacher.learning_rate = 2e-3

    c.license = "apache-2.0"  # for the model card
    return c


def _check(config: Any, schema: Any, prefix: str) -> None:
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ValueError(f"unknown config field {path!r}{hint} (valid: {', '.join(sorted(schema.keys()))})")
        sub, ref = config[key], schema[key]
        # Free-form sections: model overrides and evaluators are checked where they are used.
        if path in ("student.overrides", "eval.evaluators"):
            continue
        if isinstance(ref, ml_collections.ConfigDict) and isinstance(sub, (ml_collections.ConfigDict, dict)):
            _check(sub, ref, path + ".")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise ValueError on a key the schema lacks; returns the config."""
    _check(config, default_config(), "")
    if config.dataset.layout not in ("pack", "pad"):
        raise ValueError(f"dataset.layout={config.dataset.layout!r}: use 'pack' or 'pad'")
    for name in ("train.dtype", "teacher.dtype"):
        section, field = name.split(".")
        if config[section][field] not in DTYPES:
            raise ValueError(f"{name}={config[section][field]!r}: use 'float32' or 'bfloat16'")
    if config.train.batch_size <= 0 or config.train.grad_accum <= 0:
        raise ValueError("train.batch_size and train.grad_accum must be positive")
    if config.teacher.cache_k <= 0:
        raise ValueError(f"teacher.cache_k={config.teacher.cache_k}: use a positive number of "
                         "tokens per position (default 64)")
    if config.teacher.cache_dtype not in ("float16", "float32"):
        raise ValueError(f"teacher.cache_dtype={config.teacher.cache_dtype!r}: use 'float16' or "
                         "'float32'")
    if config.train.attention not in ("xla", "cudnn"):
        raise ValueError(f"train.attention={config.train.attention!r}: use 'xla' or 'cudnn'")
    if config.train.logits_buckets < 0:
        raise ValueError(f"train.logits_buckets={config.train.logits_buckets}: use 0 (off) or a "
                         "positive number of buckets (default 8)")
    return config


def load(spec: str) -> ml_collections.ConfigDict:
    """Load `path/to/config.py[:arg]` the way `--config` does (get_config(arg) if arg given)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_distil_jax_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return validate(module.get_config(arg) if arg else module.get_config())
