"""Building a run from its config: each piece by a named function, in the order `build_run`
calls them (teacher and tokenizer, student, objective, data, optimizer, mesh and placement).

Nothing here writes a file but the token cache: a run is built, and checked, before its records
are written. The benchmark (tools/bench_throughput.py), `record_teacher` and the tests build
theirs with the same functions.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from distil_jax import data, hf, models, sharding, student, teacher_cache
from distil_jax import workdir as workdir_lib
from distil_jax.config import DTYPES
from distil_jax.objectives.objective import Objective
from distil_jax.train_step import StepConfig, create_train_state, make_optimizer
from distil_jax.training.on_policy import OnPolicy

log = logging.getLogger("distil_jax")


def use_compilation_cache(path: Optional[str]) -> Optional[str]:
    """Turn on jax's persistent compilation cache for this process (a process-wide jax setting), so
    that a resumed, restarted or repeated run reads its compiled step back instead of compiling it
    again. `path`: train.compilation_cache; None: jax's own folder (JAX_COMPILATION_CACHE_DIR) if
    it has one, else <distil_jax cache>/jax_compilation; "": off. Returns the folder, None if off.

    A folder that cannot be created is a one-line error when the config names it; the default
    one only turns the cache off, with a warning (a read-only home must not stop a run)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    from distil_jax.demo.teacher import cache_root

    current, enabled = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
    if path == "" or (path is None and not enabled):  # off here, or in jax's own settings
        if enabled:
            jax.config.update("jax_enable_compilation_cache", False)
            cc.reset_cache()
        return None
    folder = str(Path(path).expanduser().resolve()) if path else current or str(cache_root() / "jax_compilation")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if path:
            raise ValueError(f"train.compilation_cache={path!r}: cannot create it ({e.strerror}); name a "
                             "writable folder, or \"\" for no compilation cache") from None
        log.warning("no compilation cache: cannot create %s (%s); set train.compilation_cache", folder, e.strerror)
        return use_compilation_cache("")
    if folder != current or not enabled:
        jax.config.update("jax_enable_compilation_cache", True)
        cc.set_cache_dir(folder)
        cc.reset_cache()  # jax reads its cache settings once per process, at the first compile
    return folder


def load_tokenizer(name_or_path: str):
    """The tokenizer of a local folder or hub id (only its tokenizer files are fetched)."""
    import transformers

    folder = hf.resolve_folder(name_or_path, allow_patterns=["*.json", "*.txt", "*.model"])
    return transformers.AutoTokenizer.from_pretrained(folder)


def sequence_length(config, teacher_cfg, tokenizer) -> int:
    """The run's row length: dataset.max_seq_len, capped (with a warning) by the teacher's
    positions and the tokenizer's model_max_length."""
    return data.row_length(config.dataset.max_seq_len, teacher_cfg.max_positions,
                           getattr(tokenizer, "model_max_length", None))


def with_demo_inputs(config, workdir: Path):
    """The demo's teacher and corpus paths filled in (written into the workdir if missing); the
    config unchanged when `demo_teacher.enabled` is off."""
    if not config.demo_teacher.enabled:
        return config
    from distil_jax import demo

    config = ml_collections.ConfigDict(config.to_dict())
    if not config.dataset.uri:
        config.dataset.uri = str(demo.ensure_corpus(workdir))
    if not config.teacher.model_name_or_path:
        config.teacher.model_name_or_path = str(
            demo.ensure_teacher(workdir, config.demo_teacher, config.dataset, seed=config.train.seed))
    return config


def train_batches(config: ml_collections.ConfigDict, rows: Mapping,
                  process_rows: Optional[slice] = None) -> data.BatchIterator:
    """The run's batches: batch_size x grad_accum rows per step, shuffled by the run's seed,
    the last, partial batch of an epoch kept (filled with empty rows), as HF's sampler does.
    process_rows: the rows of each batch this process builds (sharding.process_rows)."""
    return data.BatchIterator(rows, config.train.batch_size * config.train.grad_accum, shuffle=True,
                              seed=config.train.seed, drop_last=False, process_rows=process_rows)


def run_steps(train_cfg: Mapping, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: train.max_steps if > 0, else ceil(num_epochs x steps per
    epoch) (the last, partial batch of an epoch is a step, as HF counts them)."""
    if train_cfg["max_steps"] > 0:
        return int(train_cfg["max_steps"])
    return int(np.ceil(train_cfg["num_epochs"] * steps_per_epoch))



def load_teacher(config) -> tuple:
    """(teacher config, teacher params in teacher.dtype, tokenizer, sequence length). With a
    teacher cache the weights are read only when the student's initialization copies teacher
    modules (params None otherwise): the step never runs the teacher."""
    path = config.teacher.model_name_or_path
    if config.teacher.cache and not teacher_cache.student_needs_teacher_weights(config.student.to_dict()):
        teacher_cfg, teacher_params = hf.load_config(path), None
    else:
        teacher_cfg, teacher_params = hf.load_pretrained(path, DTYPES[config.teacher.dtype])
    tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.teacher.model_name_or_path)
    data.check_vocab(tokenizer, teacher_cfg.vocab_size, f"the teacher {path!r}")
    seq_len = sequence_length(config, teacher_cfg, tokenizer)
    return teacher_cfg, teacher_params, tokenizer, seq_len


def load_teacher_weights(config):
    """The teacher's parameters on the host (a cached run that evaluates the teacher itself)."""
    return hf.load_pretrained(config.teacher.model_name_or_path, DTYPES[config.teacher.dtype])[1]


def open_teacher_cache(config, teacher_cfg, tokenizer, seq_len: int, train_rows):
    """The run's TeacherCache (checked against this run's teacher, tokenizer, rows, temperature
    and k), or None when the run computes the teacher online."""
    if not config.teacher.cache:
        return None
    pins = teacher_cache.run_pins(config, teacher_cfg, tokenizer, seq_len, train_rows,
                                  teacher_cache.teacher_fingerprint(config.teacher.model_name_or_path))
    k = teacher_cache.effective_k(config.teacher.cache_k, teacher_cfg.vocab_size)
    return teacher_cache.TeacherCache.open(config.teacher.cache, pins, train_rows, k)


def build_student(student_section: Mapping, teacher_cfg, teacher_params, rng, seq_len: int) -> tuple:
    """(student config, float32 student params, bool mask of the trainable ones) from the config's
    `student` section; dropout off unless `student.dropout`. Refuses a student that cannot hold
    `seq_len` positions."""
    section = dict(student_section)
    student_cfg, student_params, trainable = student.build_student(teacher_cfg, teacher_params,
                                                                   section, rng)
    if not section.get("dropout", True):
        student_cfg = student_cfg.without_dropout()
    if seq_len > student_cfg.max_positions:
        raise ValueError(f"sequence length {seq_len} exceeds the student's maximum of "
                         f"{student_cfg.max_positions} positions; lower dataset.max_seq_len")
    return student_cfg, student_params, trainable


def build_objective(objective_section: Mapping, student_cfg, teacher_cfg) -> Objective:
    """The bound objective of the config's `objective` section (logits_chunk_tokens -1: automatic)."""
    section = dict(objective_section)
    chunk = section.get("logits_chunk_tokens")
    if chunk is not None and chunk < 0:
        section["logits_chunk_tokens"] = None
    return Objective.from_config(section).bind(student_cfg, teacher_cfg)


def trained_params(objective: Objective, student_params, student_trainable, rng, student_cfg,
                   teacher_cfg, seq_len: int) -> tuple[dict, dict]:
    """(params, trainable): the tree the optimizer trains, {"student", "objective"}, and its bool
    mask (`trainable_mask`)."""
    objective_params = objective.init_params(rng, student_cfg, teacher_cfg, seq_len)
    params = {"student": student_params, "objective": objective_params}
    return params, trainable_mask(student_trainable, objective_params)


def trainable_mask(student_trainable, objective_params) -> dict:
    """The bool mask of the trained tree: the student's own (frozen modules False); every
    projector and norm parameter of the objective trains."""
    return {"student": student_trainable,
            "objective": jax.tree_util.tree_map(lambda _: True, objective_params)}


def build_data(config, tokenizer, seq_len: int, cache_dir: Optional[Path]) -> tuple:
    """(train rows, {evaluator: rows} with "heldout" first, data stats).

    In a run of several processes, process 0 tokenizes first and writes the token cache; the
    others wait for it, then read the cache instead of tokenizing the corpus again (when the
    workdir is shared, as a multi-host run's must be for its checkpoints; otherwise each
    tokenizes for itself, with the same result). Every process then holds the same rows."""
    if jax.process_count() == 1:
        return _build_data(config, tokenizer, seq_len, cache_dir)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        out = _build_data(config, tokenizer, seq_len, cache_dir)
        multihost_utils.sync_global_devices("distil_jax: token cache written")
        return out
    multihost_utils.sync_global_devices("distil_jax: token cache written")
    return _build_data(config, tokenizer, seq_len, cache_dir)


def _build_data(config, tokenizer, seq_len: int, cache_dir: Optional[Path]) -> tuple:
    train_rows, test_rows, data_stats = data.build_datasets(
        config.dataset, tokenizer, seq_len, config.dataset.layout, cache_dir=cache_dir)
    eval_sets = {"heldout": test_rows}
    for name, spec in config.eval.evaluators.items():
        # Every sampled row of an extra evaluator is an evaluation row, laid out as the run's.
        eval_sets[name], _ = data.spec_to_eval_set(
            spec, tokenizer, seq_len, config.dataset.layout, cache_dir, name,
            truncate=config.dataset.truncate, append_eos=config.dataset.append_eos,
            loss_on=config.dataset.loss_on)
    return train_rows, eval_sets, data_stats


def step_config(config, teacher_cfg, student_cfg, objective: Objective) -> StepConfig:
    """The train step's static settings from the config's `train`, `student` and `dataset`."""
    return StepConfig(teacher=teacher_cfg, student=student_cfg, objective=objective,
                      dtype=DTYPES[config.train.dtype],
                      remat=config.train.remat_policy if config.train.remat else False,
                      grad_accum=config.train.grad_accum, dropout=config.student.dropout,
                      attention_impl=config.train.attention,
                      single_document_rows=config.dataset.layout == "pad")


@dataclasses.dataclass
class Run:
    """A run built from its config: models, objective, data, optimizer, step; on the devices."""

    config: ml_collections.ConfigDict  # the demo's teacher and corpus paths filled in
    teacher_cfg: Any
    teacher_params: Any  # sharded over the mesh by the family's logical axes
    teacher_fingerprint: str
    tokenizer: Any
    seq_len: int
    student_cfg: Any
    eval_sets: dict
    data_stats: dict
    batches: data.BatchIterator
    total_steps: int
    tx: Any
    schedule: Any
    step_config: StepConfig
    mesh: Any  # the (data, fsdp, tensor) mesh of train.mesh
    state: Any  # the TrainState at step 0, placed by `placement`
    placement: Any = None  # sharding.Placement: where state, teacher and batches live
    trainable: Any = None  # the bool mask of the trained tree (grad_norm covers its student part)
    cache: Any = None  # the teacher cache the batches come with (teacher.cache), or None
    on_policy: Any = None  # OnPolicy: sampled completions on some steps (objective.on_policy)

    @property
    def step_placement(self):
        """The step's shardings: from a teacher cache, no teacher argument to place."""
        if self.cache is None or self.placement is None:
            return self.placement
        return dataclasses.replace(self.placement, teacher=None)

    @property
    def rows_per_step(self) -> int:
        return self.config.train.batch_size * self.config.train.grad_accum


def build_run(config, workdir: Path) -> Run:
    """Everything the run needs, in memory (tokens are cached in WORKDIR/cache). The student and
    the objective come before the data, so that their errors need no tokenization."""
    config = with_demo_inputs(config, workdir)
    teacher_cfg, teacher_params, tokenizer, seq_len = load_teacher(config)
    rng_student, rng_objective, rng_state = jax.random.split(jax.random.PRNGKey(config.train.seed), 3)
    student_cfg, student_params, student_trainable = build_student(
        config.student.to_dict(), teacher_cfg, teacher_params, rng_student, seq_len)
    objective = build_objective(config.objective.to_dict(), student_cfg, teacher_cfg)
    params, trainable = trained_params(objective, student_params, student_trainable, rng_objective,
                                       student_cfg, teacher_cfg, seq_len)
    train_rows, eval_sets, data_stats = build_data(config, tokenizer, seq_len, workdir / "cache")
    cache = open_teacher_cache(config, teacher_cfg, tokenizer, seq_len, train_rows)
    # The mesh and where every array lives on it (a mesh that does not fit the devices or the
    # models is a one-line error here, before any compilation).
    mesh = sharding.make_mesh(config.train.mesh.to_dict())
    for field in ("train.batch_size", "eval.batch_size"):
        size = config[field.split(".")[0]].batch_size
        if size % sharding.batch_shards(mesh):
            raise ValueError(f"{field}={size} is not divisible by the "
                             f"{sharding.batch_shards(mesh)} batch shards of train.mesh (data x "
                             f"fsdp of {dict(mesh.shape)}); use a multiple")
    # Each process builds only its own devices' rows of every batch.
    mine = sharding.process_rows(mesh, config.train.batch_size * config.train.grad_accum)
    if cache is not None:  # the same batches, with the teacher's cached targets attached
        batches = cache.batches(train_rows, config.train.batch_size * config.train.grad_accum,
                                seed=config.train.seed, drop_last=False, process_rows=mine)
    else:
        batches = train_batches(config, train_rows, mine)
    total_steps = run_steps(config.train, batches.steps_per_epoch)
    tx, schedule = make_optimizer(config.optimizer.to_dict(), total_steps, trainable)
    state = create_train_state(params, tx, rng_state)
    if cache is not None:
        # Read only to build the student (if at all); the step runs no teacher.
        fingerprint = teacher_cache.teacher_fingerprint(config.teacher.model_name_or_path)
        teacher_params = None
    else:
        fingerprint = workdir_lib.fingerprint(teacher_params)
    placement = sharding.make_placement(
        mesh, state, student_cfg, teacher_cfg,
        teacher_params if teacher_params is not None else models.param_shapes(teacher_cfg))
    s_config = step_config(config, teacher_cfg, student_cfg, objective)
    if cache is not None:
        s_config = dataclasses.replace(s_config, teacher_cache_k=cache.k)
    return Run(config=config, teacher_cfg=teacher_cfg,
               teacher_params=None if teacher_params is None else placement.put_teacher(teacher_params),
               teacher_fingerprint=fingerprint, tokenizer=tokenizer,
               seq_len=seq_len, student_cfg=student_cfg, eval_sets=eval_sets, data_stats=data_stats,
               batches=batches, total_steps=total_steps, tx=tx, schedule=schedule,
               step_config=s_config, mesh=mesh,
               state=placement.put_state(state), placement=placement, trainable=trainable,
               cache=cache, on_policy=OnPolicy.from_config(config, teacher_cfg=teacher_cfg,
                                                           student_cfg=student_cfg, tokenizer=tokenizer,
                                                           seq_len=seq_len, dtype=DTYPES[config.train.dtype]))


