"""The run configuration: its schema, Distily's defaults, and validation.

`default_config()` is the schema: every field a run may set, with a comment, and values that
reproduce Distily's reference run (configs/base.py, docs/design.md) except the data's sample:
the default takes every row and holds out 1 % (at most 2,000 rows), so pointing dataset.uri
at your own data trains on all of it; configs/base.py sets Distily's 5000 rows and 0.002. A config file (`configs/*.py`) returns a
modified copy; `validate` refuses any key the schema does not have, naming the closest valid one.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

# The dtype names a config (and the export) accepts.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def placeholder(kind: type, value: Any = None):
    """A field that may be None and still takes ``--config.FIELD=VALUE`` of its type (a plain
    None field has no type for the command line to parse into)."""
    ref = ml_collections.config_dict.placeholder(kind)
    ref.set(value)
    return ref


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
    # Tokens drawn per position from the teacher's distribution outside the top k (recorded
    # with them; kl and ce estimate the tail's share from them without bias). 0 = none. What they
    # buy on the demo's perplexity: docs/teacher_cache.md.
    c.teacher.cache_tail_samples = 8

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
    # Hub id, or a local .txt/.json(l)/.parquet/.csv file or folder (docs/usage.md, "Your own
    # data"). configs/base.py takes Distily's 5000 Wikipedia rows; the default is every row.
    c.dataset.uri = "wikimedia/wikipedia"
    c.dataset.subset = "20231101.en"  # hub config name (None = the dataset's only one)
    c.dataset.split = "train"
    # The rows' shape: None = detected from the columns ("messages": chat, "prompt" +
    # "completion": prompt/completion, "text": plain text); or the text / messages column, or
    # the prompt column when completion_column is set.
    c.dataset.column = placeholder(str)
    c.dataset.completion_column = placeholder(str)  # the completion column of prompt/completion rows
    # Which tokens the losses and the perplexity count: "all", or "completion" (only the
    # assistant turns of chat rows, or the completions): chat templates render chat rows.
    c.dataset.loss_on = "all"
    c.dataset.sample_size = placeholder(int)  # first N rows (None = all)
    c.dataset.shuffle = False  # Distily takes the first N rows unshuffled
    # Hub datasets: stream the first sample_size rows instead of downloading the whole split
    # (also done without it when sample_size is set and shuffle is off, as before).
    c.dataset.streaming = False
    c.dataset.seed = 42  # seed of the train/test split
    # Held out: a fraction of the rows (at least 1) or a row count (a whole number >= 1)
    c.dataset.test_size = 0.01
    c.dataset.max_test_rows = placeholder(int, 2000)  # cap on a fraction's rows (None = no cap)
    # Tokenizing processes (datasets.map's num_proc); None = 1 (datasets forks its workers, which
    # can hang once JAX's threads run; the fast tokenizers already use every core)
    c.dataset.num_proc = placeholder(int)
    c.dataset.sample_by = "document"  # .txt only: document | paragraph | line
    # "pack": several documents per row, attention kept inside each document (little compute on
    # padding). "pad": Distily's one document per row, padding masked out of losses.
    c.dataset.layout = "pack"
    c.dataset.max_seq_len = 1024  # rows are min(this, model n_positions, tokenizer max) long
    # True (Distily): each document is cut to its first seq_len tokens and is one segment of one
    # row in either layout. False: no token is lost; a longer document goes on in further
    # segments (pack: documents are concatenated and cut into rows; pad: the rest in more rows),
    # whose positions restart at 0.
    c.dataset.truncate = True
    c.dataset.append_eos = False  # end each document with EOS (before truncation); Distily: no

    c.objective = ml_collections.ConfigDict()
    c.objective.logits = dict(weight=1.0, loss_fn="kl")
    c.objective.hs = dict(weight=0.0)
    c.objective.attn = dict(weight=5.0, loss_fn="raw_mse", layer_mapper="layer-2",
                            norm="layernorm_teacher_only_affine", projector="orthogonal")
    c.objective.clm_weight = 0.0  # hard next-token loss (distilgpt2 used 0.5); 0 = Distily
    c.objective.temperature = 1.0  # logits losses on logits / T, scaled by T²
    c.objective.logits_chunk_tokens = -1  # tokens per chunk of the logits losses; -1 auto, 0 off
    # On-policy distillation (GKD, docs/on_policy.md): on a fraction lmbda of the steps (chosen
    # from train.seed and the step) the student continues each batch row's prompt and the loss
    # is taken on its own completion. 0 = off (the dataset's tokens, as Distily).
    c.objective.on_policy = ml_collections.ConfigDict()
    c.objective.on_policy.lmbda = 0.0  # fraction of steps on the student's samples (TRL's lmbda)
    c.objective.on_policy.max_new_tokens = 16  # tokens sampled per prompt
    c.objective.on_policy.temperature = 1.0  # sampling temperature (0 = greedy)
    c.objective.on_policy.top_k = 0  # 0 = off
    c.objective.on_policy.top_p = 1.0  # 1 = off
    c.objective.on_policy.seq_kd = False  # sample from the TEACHER instead (sequence-level KD)
    c.objective.on_policy.prompt_tokens = 8  # plain text: each row's first tokens are the prompt

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
    # The objective's own parameters (projector, norm affine) are a second optimizer group, as
    # in Distily, which builds it with torch.optim.AdamW's defaults: lr 1e-3 (scaled over the
    # run by the same factor as the student's), weight decay 0.01 on every one of them, and not
    # clipped (HF clips the student's parameters only). None: the student's value.
    c.optimizer.objective_learning_rate = 1e-3
    c.optimizer.objective_weight_decay = 0.01
    c.optimizer.objective_clip = False

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # rows per optimizer step and micro-batch, all devices together
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.num_epochs = 1.0
    c.train.max_steps = -1  # > 0 overrides num_epochs
    c.train.seed = 42
    c.train.dtype = "bfloat16"  # compute dtype; master weights and optimizer state are float32
    c.train.remat = True  # gradient checkpointing of the student's blocks
    # What a checkpointed block keeps for its backward pass: "full" (its input only; recomputes
    # everything, as HF's gradient checkpointing), "dots" (also its weight matmuls' outputs:
    # recomputes only elementwise work; more activation memory, fewer FLOPs) or "auto": "dots"
    # when what it keeps fits in a tenth of the device's memory, else "full" (the run logs which).
    c.train.remat_policy = "auto"
    # Padding-aware logits (dataset.layout = "pad"): LM heads and logits losses run on the real
    # tokens only, rounded up to 1/N of each device's share of the batch (at most N compiled
    # variants of the step); 0 = off.
    c.train.logits_buckets = 8
    # Attention of the layers whose maps no loss reads: "xla" (any backend) or "cudnn" (cuDNN
    # flash attention; NVIDIA GPU and bfloat16 only; see docs/benchmarks.md).
    c.train.attention = "xla"
    # Device mesh (docs/scaling.md): batch rows split over data x fsdp; fsdp also splits each
    # large parameter and its Adam state, tensor splits attention heads / MLP columns; -1 = the
    # rest of the devices (of all processes); the product must equal the device count.
    c.train.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Multi-host (jax.distributed): "" = one process; "auto" = detect SLURM / TPU pod /
    # Open MPI from the environment; "host:port" = the coordinator (process 0), with the two
    # fields below.
    c.train.coordinator_address = ""
    c.train.num_processes = 1  # processes in the run (with an explicit coordinator_address)
    c.train.process_id = 0  # this process's rank, 0 .. num_processes - 1
    # Seconds without a heartbeat after which a lost process fails the whole run (the others
    # exit with an error instead of waiting in a collective forever).
    c.train.heartbeat_timeout_s = 100
    # jax's persistent compilation cache, so a resumed or repeated run reads its compiled step
    # back: a folder; None = JAX_COMPILATION_CACHE_DIR if set, else <distil_jax cache>/jax_compilation
    # ($DISTIL_JAX_CACHE, else ~/.cache/distil_jax); "" = none.
    c.train.compilation_cache = placeholder(str)
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

    # The card's license: "" takes the teacher's, where its own card or config states one (never
    # invented); set it when you know the student's terms.
    c.license = ""
    return c


def _unknown(path: str, key: str, keys) -> ValueError:
    close = difflib.get_close_matches(key, list(keys), n=1)
    prefix = path[: len(path) - len(key)]
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return ValueError(f"unknown config field {path!r}{hint} (valid: {', '.join(sorted(keys))})")


def check_field_path(path: str) -> None:
    """Raise ValueError (with the closest valid name) if `path` ("train.batch_size") is not a
    field of the schema; inside the free-form sections any name goes."""
    node = default_config()
    parts = path.split(".")
    for i, key in enumerate(parts):
        prefix = ".".join(parts[:i])
        if prefix in _FREE_FORM:
            return
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            keys = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
            raise _unknown(".".join(parts[: i + 1]), key, keys)
        node = node[key]


# Free-form sections: model overrides and evaluators are checked where they are used.
_FREE_FORM = ("student.overrides", "eval.evaluators")


def _check(config: Any, schema: Any, prefix: str) -> None:
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            raise _unknown(path, key, schema.keys())
        sub, ref = config[key], schema[key]
        if path in _FREE_FORM:
            continue
        if isinstance(ref, ml_collections.ConfigDict) and isinstance(sub, (ml_collections.ConfigDict, dict)):
            _check(sub, ref, path + ".")


# ----------------------------------------------------------------------------- value ranges


class _Checker:
    """Range checks that name the field, its value and what to use instead, in one line."""

    def __init__(self, config):
        self.config = config

    def get(self, path: str) -> Any:
        node = self.config
        for key in path.split("."):
            node = node[key]
        return node

    def fail(self, path: str, value: Any, want: str) -> None:
        raise ValueError(f"{path}={value!r}: {want}")

    def number(self, path: str, lo: float | None = None, hi: float | None = None, *,
               lo_open: bool = False, hi_open: bool = False, integer: bool = False,
               allowed: tuple = (), hint: str = "") -> None:
        v = self.get(path)
        if v in allowed and not isinstance(v, bool):
            return
        if integer:
            ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        if ok and not math.isfinite(float(v)):
            ok = False
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            kind = "an integer" if integer else "a finite number"
            bounds = []
            if lo is not None:
                bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
            if hi is not None:
                bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
            extra = "".join(f" or {a!r}" for a in allowed)
            self.fail(path, v, f"use {kind}{' ' + ' and '.join(bounds) if bounds else ''}{extra}"
                               + (f" ({hint})" if hint else ""))

    def choice(self, path: str, options) -> None:
        v = self.get(path)
        if v not in tuple(options):
            self.fail(path, v, "use one of " + ", ".join(repr(o) for o in options))

    def boolean(self, path: str) -> None:
        v = self.get(path)
        if not isinstance(v, (bool, np.bool_)):
            self.fail(path, v, "use True or False")

    def text(self, path: str, *, empty_ok: bool = True, none_ok: bool = False, hint: str = "") -> None:
        v = self.get(path)
        if v is None and none_ok:
            return
        if not isinstance(v, str) or (not empty_ok and not v.strip()):
            self.fail(path, v, "use a non-empty string" + (f" ({hint})" if hint else ""))


_DATASET_FIELDS = ("uri", "subset", "split", "column", "completion_column", "loss_on",
                   "sample_size", "shuffle", "streaming", "seed", "sample_by", "num_proc")


def _check_dataset(c: _Checker, prefix: str, *, demo: bool) -> None:
    """The fields of a dataset spec (the train dataset, or an extra evaluator)."""
    c.text(f"{prefix}.uri", empty_ok=demo,
           hint="a hub dataset id or a local .txt/.json/.jsonl/.parquet/.csv path")
    spec = c.get(prefix)
    for field in ("subset", "column", "completion_column"):
        if field in spec:
            c.text(f"{prefix}.{field}", empty_ok=field == "subset", none_ok=True)
    if "split" in spec:
        c.text(f"{prefix}.split", empty_ok=False)
    if "loss_on" in spec:
        c.choice(f"{prefix}.loss_on", ("all", "completion"))
    for field, hint in (("sample_size", "None = every row"), ("num_proc", "None = automatic")):
        if field in spec:
            c.number(f"{prefix}.{field}", 1, integer=True, allowed=(None,), hint=hint)
    for field in ("shuffle", "streaming"):
        if field in spec:
            c.boolean(f"{prefix}.{field}")
    if spec.get("streaming") and spec.get("sample_size") is None:
        c.fail(f"{prefix}.streaming", True, f"set {prefix}.sample_size (the rows to stream) or "
               "streaming=False")
    if "seed" in spec:
        c.number(f"{prefix}.seed", 0, integer=True)
    if "sample_by" in spec:
        c.choice(f"{prefix}.sample_by", ("document", "paragraph", "line"))


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    c = _Checker(config)
    demo = bool(config.demo_teacher.enabled)
    c.boolean("demo_teacher.enabled")
    _check_models(c, config, demo)
    _check_train_data(c, config, demo)
    _check_objective(c, config)
    _check_optimizer(c, config)
    _check_train(c)
    _check_eval(c, config)
    if demo:
        _check_demo(c, config)
    c.text("license")


def _check_models(c: _Checker, config, demo: bool) -> None:
    """Where the models come from. "" means "the demo's" only when the demo is on."""
    c.text("teacher.model_name_or_path", empty_ok=demo,
           hint="an HF folder or hub id, or demo_teacher.enabled=True")
    c.choice("teacher.dtype", tuple(DTYPES))
    c.text("tokenizer_name_or_path")
    c.text("student.model_name_or_path")
    c.text("student.config_name_or_path")
    if not isinstance(config.student.overrides, (ml_collections.ConfigDict, dict)):
        c.fail("student.overrides", config.student.overrides, "use a dict of model config fields")
    modules = config.student.copy_teacher_modules
    if not isinstance(modules, (list, tuple)) or not all(
            isinstance(m, (list, tuple)) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], bool)
            for m in modules):
        c.fail("student.copy_teacher_modules", modules, 'use a list of (module, frozen) pairs, '
               'e.g. [("lm_head", False)]')
    layers = config.student.init_from_teacher_layers
    if layers is not None and layers != "uniform" and (not isinstance(layers, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        c.fail("student.init_from_teacher_layers", layers, "use a list of teacher block indices, "
               "one per student block, 'uniform', or None for none")
    c.boolean("student.dropout")


def _check_train_data(c: _Checker, config, demo: bool) -> None:
    from distil_jax.data import test_rows

    _check_dataset(c, "dataset", demo=demo)
    try:  # data.test_rows says what test_size means (a whole float >= 1 is a row count)
        test_rows(config.dataset.test_size)
    except ValueError:
        c.number("dataset.test_size", 0, 1, lo_open=True, hi_open=True,
                 hint="a fraction of the rows, or an integer row count")
        c.fail("dataset.test_size", config.dataset.test_size, "use a fraction of the rows in (0, 1) "
               "or an integer row count")
    c.number("dataset.max_test_rows", 1, integer=True, allowed=(None,), hint="None = no cap")
    c.choice("dataset.layout", ("pack", "pad"))
    c.number("dataset.max_seq_len", 2, integer=True, hint="next-token losses need 2 tokens")


def _check_objective(c: _Checker, config) -> None:
    """The objective: component names are checked by the objective itself."""
    from distil_jax.objectives.layer_mappers import get_layer_mapper
    from distil_jax.objectives.losses import LOSSES
    from distil_jax.objectives.norms import NORMS
    from distil_jax.objectives.projectors import PROJECTORS

    for name in ("logits", "hs", "attn"):
        comp = dict(config.objective[name])
        path = f"objective.{name}"
        weight = comp.get("weight", 0.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            c.fail(f"{path}.weight", weight, "use a finite number >= 0 (0 = off)")
        if weight:
            if comp.get("loss_fn", "raw_mse") not in LOSSES:
                c.fail(f"{path}.loss_fn", comp.get("loss_fn"), "use one of " + ", ".join(sorted(LOSSES)))
            if comp.get("norm", "none") not in NORMS:
                c.fail(f"{path}.norm", comp.get("norm"), "use one of " + ", ".join(NORMS))
            if comp.get("projector", "none") not in PROJECTORS:
                c.fail(f"{path}.projector", comp.get("projector"), "use one of " + ", ".join(PROJECTORS))
            try:
                mapper = comp.get("layer_mapper", "all")
                get_layer_mapper(tuple(map(tuple, mapper)) if isinstance(mapper, (list, tuple)) else mapper)
            except (ValueError, TypeError) as e:
                c.fail(f"{path}.layer_mapper", comp.get("layer_mapper"), str(e).splitlines()[0])
    c.number("objective.clm_weight", 0, hint="0 = off")
    c.number("objective.temperature", 0, lo_open=True)
    c.number("objective.logits_chunk_tokens", -1, integer=True, hint="-1 automatic, 0 off")
    _check_on_policy(c, config)
    if not (config.objective.clm_weight or any(config.objective[n].get("weight", 0) for n in ("logits", "hs", "attn"))):
        raise ValueError("objective: every weight is 0, so nothing would be trained; give "
                         "objective.logits.weight (or hs, attn, clm_weight) a positive value")


def _check_on_policy(c: _Checker, config) -> None:
    """objective.on_policy: the sampling settings, and what on-policy steps cannot run with."""
    p = "objective.on_policy"
    c.number(f"{p}.lmbda", 0, 1, hint="the fraction of steps on sampled completions; 0 = off")
    c.number(f"{p}.max_new_tokens", 1, integer=True)
    c.number(f"{p}.temperature", 0, hint="0 = greedy")
    c.number(f"{p}.top_k", 0, integer=True, hint="0 = off")
    c.number(f"{p}.top_p", 0, 1, lo_open=True, hint="1 = off")
    c.boolean(f"{p}.seq_kd")
    c.number(f"{p}.prompt_tokens", 1, integer=True)
    op = config.objective.on_policy
    if not op.lmbda:
        return
    seq = config.dataset.max_seq_len
    if op.max_new_tokens >= seq:
        c.fail(f"{p}.max_new_tokens", op.max_new_tokens, f"use fewer than dataset.max_seq_len={seq} "
               "tokens (each row holds a prompt and its completion)")
    if op.prompt_tokens + op.max_new_tokens > seq:
        c.fail(f"{p}.prompt_tokens", op.prompt_tokens, f"prompt_tokens + max_new_tokens must fit a "
               f"row of dataset.max_seq_len={seq}; use at most {seq - op.max_new_tokens}")
    if config.teacher.cache:
        raise ValueError(f"{p}.lmbda={op.lmbda} with teacher.cache: the cache holds the teacher's "
                         "targets for the dataset's tokens, not for sampled completions; set "
                         "teacher.cache='' or objective.on_policy.lmbda=0")


def _check_optimizer(c: _Checker, config) -> None:
    c.choice("optimizer.optimizer", ("adamw", "adam", "lion"))
    c.number("optimizer.learning_rate", 0, lo_open=True, hint="e.g. 2e-4")
    c.number("optimizer.lr_end", 0, config.optimizer.learning_rate, hi_open=True,
             hint="the schedule decays from optimizer.learning_rate down to it")
    c.number("optimizer.adam_beta1", 0, 1, hi_open=True)
    c.number("optimizer.adam_beta2", 0, 1, hi_open=True)
    c.number("optimizer.adam_epsilon", 0, lo_open=True)
    c.number("optimizer.weight_decay", 0)
    c.number("optimizer.power", 0, lo_open=True, hint="1 = linear decay")
    c.number("optimizer.warmup_steps", 0, integer=True)
    c.number("optimizer.warmup_ratio", 0, 1, hi_open=True)
    c.number("optimizer.max_grad_norm", 0, hint="0 = no clipping")


def _check_train(c: _Checker) -> None:
    c.number("train.batch_size", 1, integer=True)
    c.number("train.grad_accum", 1, integer=True)
    c.number("train.num_epochs", 0, lo_open=True, hint="or set train.max_steps")
    c.number("train.max_steps", 1, integer=True, allowed=(-1,), hint="-1 = train.num_epochs decides")
    c.number("train.seed", 0, integer=True)
    c.choice("train.dtype", tuple(DTYPES))
    c.boolean("train.remat")
    c.number("train.logits_buckets", 0, integer=True, hint="0 = off, default 8")
    c.choice("train.attention", ("xla", "cudnn"))
    c.number("train.log_steps", 1, integer=True)
    c.number("train.save_steps", 0, integer=True, hint="0 = only at the end")
    c.number("train.save_total_limit", 0, integer=True, allowed=(None,), hint="0 or None = keep all")


def _check_eval(c: _Checker, config) -> None:
    c.number("eval.eval_steps", 0, integer=True, hint="0 = at start and end only")
    c.number("eval.batch_size", 1, integer=True)
    evaluators = config.eval.evaluators
    if not isinstance(evaluators, (ml_collections.ConfigDict, dict)):
        c.fail("eval.evaluators", evaluators, "use a dict: name -> dataset fields")
    for name, spec in evaluators.items():
        path = f"eval.evaluators.{name}"
        if name == "heldout" or not str(name).strip():
            c.fail(path, name, "name it something else ('heldout' is the held-out split)")
        if not isinstance(spec, (ml_collections.ConfigDict, dict)):
            c.fail(path, spec, "use a dict of dataset fields (uri, subset, split, column, sample_size)")
        unknown = sorted(set(spec) - set(_DATASET_FIELDS))
        if unknown:
            c.fail(path, dict(spec), f"unknown field(s) {unknown}; valid: {', '.join(_DATASET_FIELDS)}")
        if "uri" not in spec:
            c.fail(path, dict(spec), "give it a uri (hub dataset id or local path)")
        _check_dataset(c, path, demo=False)


def _check_demo(c: _Checker, config) -> None:
    d = config.demo_teacher
    c.number("demo_teacher.vocab_size", 257, integer=True, hint="256 bytes + the end-of-text token")
    for field in ("n_layer", "n_embd", "n_head", "steps", "batch_size"):
        c.number(f"demo_teacher.{field}", 1, integer=True)
    c.number("demo_teacher.n_positions", 2, integer=True)
    c.number("demo_teacher.learning_rate", 0, lo_open=True)
    if d.n_embd % d.n_head:
        c.fail("demo_teacher.n_embd", d.n_embd, f"use a multiple of demo_teacher.n_head={d.n_head}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise ValueError (one line: the field, its value, what to use) on a key the schema lacks
    or a value outside the range that makes sense; returns the config. Pure: reads nothing,
    writes nothing, so a run checks its whole config before touching the workdir."""
    _check(config, default_config(), "")
    _check_ranges(config)
    _check_mesh(config.train)
    if config.teacher.cache_k <= 0:
        raise ValueError(f"teacher.cache_k={config.teacher.cache_k}: use a positive number of "
                         "tokens per position (default 64)")
    if config.train.remat_policy not in ("auto", "full", "dots"):
        raise ValueError(f"train.remat_policy={config.train.remat_policy!r}: use 'auto', 'full' or 'dots'")
    if config.teacher.cache_tail_samples < 0:
        raise ValueError(f"teacher.cache_tail_samples={config.teacher.cache_tail_samples}: use 0 "
                         "(none) or a positive number of tokens per position (e.g. 8)")
    if config.teacher.cache_dtype not in ("float16", "float32"):
        raise ValueError(f"teacher.cache_dtype={config.teacher.cache_dtype!r}: use 'float16' or "
                         "'float32'")
    return config


def _check_mesh(train: Any) -> None:
    """train.mesh and the multi-host fields (whether the mesh fits the devices and the models is
    checked when it is built: distil_jax.sharding)."""
    axes = ("data", "fsdp", "tensor")
    for axis, size in train.mesh.items():
        if axis not in axes:
            raise ValueError(f"train.mesh: unknown axis {axis!r}; the axes are {', '.join(axes)}")
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"train.mesh.{axis}={size!r}: use a positive size or -1 (the rest "
                             f"of the devices)")
    if sum(train.mesh.get(a, 1) == -1 for a in axes) > 1:
        raise ValueError("train.mesh: at most one axis may be -1 (the rest of the devices)")
    addr, n, rank = train.coordinator_address, train.num_processes, train.process_id
    if n < 1:
        raise ValueError(f"train.num_processes={n}: use 1 or more")
    if not 0 <= rank < n:
        raise ValueError(f"train.process_id={rank} is outside 0..{n - 1} "
                         f"(train.num_processes={n})")
    if train.heartbeat_timeout_s < 1:
        raise ValueError(f"train.heartbeat_timeout_s={train.heartbeat_timeout_s}: use 1 or more")
    if addr not in ("", "auto") and ":" not in addr:
        raise ValueError(f"train.coordinator_address={addr!r}: use host:port, 'auto' or ''")
    if n > 1 and addr in ("", "auto"):
        raise ValueError(f"train.num_processes={n} needs train.coordinator_address=host:port "
                         f"(or leave num_processes 1 with 'auto' to detect SLURM / TPU pods)")


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
