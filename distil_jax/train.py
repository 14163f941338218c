"""The training run: `python -m distil_jax.train --config CONFIG.py --workdir DIR [--config.x=y]`.

`train(config, workdir)` does the whole Distily run, in this order (and this file reads in it):

1. build the run (`build_run`): the teacher and its tokenizer, the student, the objective, the
   data, the optimizer and the step, each by a named function the benchmark and the tests use too;
2. check the workdir (its lock, a resume's config and teacher) and write the run's records;
3. the loop (`Session.train`: progress bar, TensorBoard and JSON-lines metrics, evaluation at
   start / every eval_steps / end, orbax checkpoints; `StepTimer` keeps training time apart from
   compilation, evaluation and checkpointing);
4. the run summary for the model card (`Session.summary`).

Re-running the same command with the same workdir resumes from the latest checkpoint, exactly:
the data iterator's position and the RNG are part of the checkpoint. What a kill, Ctrl-C, SIGTERM
(a checkpoint, then exit: `distil_jax.preemption`), a second run, a changed config or a NaN do:
docs/usage.md, "What happens when".

Workdir layout: config.json, tokenizer/, student/config.json, checkpoints/, metrics.jsonl,
tb/ (TensorBoard events), evals.json, run_summary.json, sessions.jsonl, .lock, cache/ (tokenized
data), teacher_cache/ (python -m distil_jax.record_teacher's default output; see
docs/teacher_cache.md), and for the offline demo teacher/ and data/.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import resource
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from distil_jax import checkpoint, data, fsio, hf, models, preemption, sharding, student, teacher_cache
from distil_jax import workdir as workdir_lib
from distil_jax.config import DTYPES, validate
from distil_jax.objectives.objective import Objective
from distil_jax.train_step import (BucketedTrainStep, StepConfig, create_train_state, make_eval_step,
                                   make_optimizer, remat_choice, shard_batch)
from distil_jax.versions import package_versions

log = logging.getLogger("distil_jax")

GRAD_NORM_WINDOW = 16  # grad norms in grad_norm_var (Distily's)



# ----------------------------------------------------------------------------- small helpers


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _peak_device_memory() -> Optional[int]:
    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _tokenizer(name_or_path: str):
    import transformers

    folder = hf.resolve_folder(name_or_path, allow_patterns=["*.json", "*.txt", "*.model"])
    return transformers.AutoTokenizer.from_pretrained(folder)


class MetricsWriter:
    """metrics.jsonl + TensorBoard scalars, one record per logged step."""

    def __init__(self, workdir: Path, resume_step: int, enabled: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.enabled = enabled  # False: a process other than 0 of a multi-host run writes nothing
        if not enabled:
            return
        if self.path.exists():
            # Keep the records up to the checkpoint we resume from (none for a start from
            # scratch): the steps after it run again and are logged again. A line cut short by a
            # kill is dropped.
            keep = []
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and resume_step and rec.get("step", 0) <= resume_step:
                    keep.append(line)
            fsio.write_text(self.path, "".join(line + "\n" for line in keep))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        # A non-finite figure (a diverged perplexity) is null: NaN / Infinity are not JSON.
        rec = fsio.json_safe({"step": step, **{k: float(v) for k, v in scalars.items()}})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        for k, v in scalars.items():
            self.tb.add_scalar(k, float(v), step)
        self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.tb.close()


# ----------------------------------------------------------------------------- evaluation


def evaluate(eval_fn, params, eval_set: data.EvalSet, batch_size: int, mesh) -> dict:
    """Held-out perplexity of one model on one evaluator's rows.

    ppl: token-weighted, exp(total NLL / tokens) over every predicted token of `eval_set.rows`
      (the run's layout; the figure to use).
    distily_ppl: Distily's figure, from `eval_set.distily_rows` (BOS + the first S - 1 tokens of
      each document, so the first token is scored too): the mean over documents of
      exp(the document's mean NLL).
    tokens / documents: of `rows` (predicted tokens) / of `distily_rows` (scored documents).
    """
    nll = tokens = 0.0
    t0, timed_tokens = None, 0.0
    for batch in data.eval_batches(eval_set.rows, batch_size):
        out = jax.device_get(eval_fn(params, shard_batch(batch, mesh)))
        nll -= float(out["logprob_sum"])
        tokens += float(out["tokens"])
        if t0 is None:
            t0 = time.time()  # the first batch compiles: not timed
        else:
            timed_tokens += float(out["tokens"])
    dt = time.time() - t0 if t0 is not None else 0.0
    doc_nll, doc_tok = [np.zeros(0)], [np.zeros(0)]
    for batch in data.eval_batches(eval_set.distily_rows, batch_size):
        out = jax.device_get(eval_fn(params, shard_batch(batch, mesh)))
        has = out["doc_tokens"] > 0
        doc_nll.append(-out["doc_logprob"][has])
        doc_tok.append(out["doc_tokens"][has])
    doc_nll, doc_tok = np.concatenate(doc_nll), np.concatenate(doc_tok)
    return {
        "ppl": float(np.exp(nll / max(tokens, 1.0))),
        "distily_ppl": float(np.mean(np.exp(doc_nll / doc_tok))) if len(doc_tok) else float("nan"),
        "tokens": int(tokens),
        "documents": int(len(doc_tok)),
        "tokens_per_s": float(timed_tokens / dt) if dt > 0 and timed_tokens else None,
    }


def train_batches(config: ml_collections.ConfigDict, rows: Mapping) -> data.BatchIterator:
    """The run's batches: batch_size x grad_accum rows per step, shuffled by the run's seed,
    the last, partial batch of an epoch kept (filled with empty rows), as HF's sampler does."""
    return data.BatchIterator(rows, config.train.batch_size * config.train.grad_accum, shuffle=True,
                              seed=config.train.seed, drop_last=False)


def run_steps(train_cfg: Mapping, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: train.max_steps if > 0, else ceil(num_epochs x steps per
    epoch) (the last, partial batch of an epoch is a step, as HF counts them)."""
    if train_cfg["max_steps"] > 0:
        return int(train_cfg["max_steps"])
    return int(np.ceil(train_cfg["num_epochs"] * steps_per_epoch))


def grad_norm_variance(grad_norms) -> Optional[float]:
    """Distily's grad_norm_var: the sample variance (statistics.variance) of the last
    GRAD_NORM_WINDOW grad norms, None until that many exist."""
    if len(grad_norms) < GRAD_NORM_WINDOW:
        return None
    return statistics.variance(list(grad_norms)[-GRAD_NORM_WINDOW:])


# ----------------------------------------------------------------------------- building a run
#
# Each piece of a run from its config, in the order `build_run` calls them. Nothing here writes
# a file but the token cache: a run is built, and checked, before its records are written. The
# benchmark (tools/bench_throughput.py) and the tests build theirs with the same functions.


def load_teacher(config) -> tuple:
    """(teacher config, teacher params in teacher.dtype, tokenizer, sequence length). With a
    teacher cache the weights are read only when the student's initialization copies teacher
    modules (params None otherwise): the step never runs the teacher."""
    path = config.teacher.model_name_or_path
    if config.teacher.cache and not teacher_cache.student_needs_teacher_weights(config.student.to_dict()):
        teacher_cfg, teacher_params = hf.load_config(path), None
    else:
        teacher_cfg, teacher_params = hf.load_pretrained(path, DTYPES[config.teacher.dtype])
    tokenizer = _tokenizer(config.tokenizer_name_or_path or config.teacher.model_name_or_path)
    tok_max = getattr(tokenizer, "model_max_length", None) or teacher_cfg.max_positions
    seq_len = int(min(config.dataset.max_seq_len, teacher_cfg.max_positions, tok_max))
    return teacher_cfg, teacher_params, tokenizer, seq_len


def _load_teacher_weights(config):
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
        eval_sets[name], _ = data.texts_to_eval_set(
            data.load_all_texts(spec), tokenizer, seq_len, config.dataset.layout, cache_dir,
            name, truncate=config.dataset.truncate, append_eos=config.dataset.append_eos)
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
    if config.demo_teacher.enabled:
        config = _with_demo_inputs(config, workdir)
    teacher_cfg, teacher_params, tokenizer, seq_len = load_teacher(config)
    rng_student, rng_objective, rng_state = jax.random.split(jax.random.PRNGKey(config.train.seed), 3)
    student_cfg, student_params, student_trainable = build_student(
        config.student.to_dict(), teacher_cfg, teacher_params, rng_student, seq_len)
    objective = build_objective(config.objective.to_dict(), student_cfg, teacher_cfg)
    params, trainable = trained_params(objective, student_params, student_trainable, rng_objective,
                                       student_cfg, teacher_cfg, seq_len)
    train_rows, eval_sets, data_stats = build_data(config, tokenizer, seq_len, workdir / "cache")
    cache = open_teacher_cache(config, teacher_cfg, tokenizer, seq_len, train_rows)
    if cache is not None:  # the same batches, with the teacher's cached targets attached
        batches = cache.batches(train_rows, config.train.batch_size * config.train.grad_accum,
                                seed=config.train.seed, drop_last=False)
    else:
        batches = train_batches(config, train_rows)
    total_steps = run_steps(config.train, batches.steps_per_epoch)
    tx, schedule = make_optimizer(config.optimizer.to_dict(), total_steps, trainable)
    # The mesh and where every array lives on it (a mesh that does not fit the devices or the
    # models is a one-line error here, before any compilation).
    mesh = sharding.make_mesh(config.train.mesh.to_dict())
    for field in ("train.batch_size", "eval.batch_size"):
        size = config[field.split(".")[0]].batch_size
        if size % sharding.batch_shards(mesh):
            raise ValueError(f"{field}={size} is not divisible by the "
                             f"{sharding.batch_shards(mesh)} batch shards of train.mesh (data x "
                             f"fsdp of {dict(mesh.shape)}); use a multiple")
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
               cache=cache)


def _with_demo_inputs(config, workdir: Path):
    """The demo's teacher and corpus paths filled in (written into the workdir if missing)."""
    from distil_jax import demo

    config = ml_collections.ConfigDict(config.to_dict())
    if not config.dataset.uri:
        config.dataset.uri = str(demo.ensure_corpus(workdir))
    if not config.teacher.model_name_or_path:
        config.teacher.model_name_or_path = str(
            demo.ensure_teacher(workdir, config.demo_teacher, config.dataset, seed=config.train.seed))
    return config


# ----------------------------------------------------------------------------- the workdir


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run; the message says where and how to resume."""


class Preempted(Exception):
    """SIGTERM stopped the run after a checkpoint (`distil_jax.preemption`); the message says
    which, and how to resume."""


def _resume_config_changes(workdir: Path, given: dict) -> Optional[dict]:
    """Compare the config of this session with the one the run in `workdir` started with.

    Returns the neutral changes to record ({} for none), or None when there is no earlier run to
    continue (a fresh workdir, or one whose earlier start left no checkpoint: it starts over).
    Raises ConfigChanged naming every field that would change the result."""
    path = workdir / "config.json"
    if not path.exists():
        if checkpoint.available_steps(workdir):
            raise ValueError(f"{workdir} holds checkpoints but no config.json, the record of the "
                             "config they were trained with: restore it, or use a new --workdir")
        return None
    try:
        first = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}), the config this run started with: restore it, "
                         "or use a new --workdir") from None
    refused, allowed = workdir_lib.config_changes(first, given)
    if not checkpoint.available_steps(workdir):
        if refused or allowed:
            log.warning("%s holds no checkpoint yet: starting it over with this config (changed: %s)",
                        workdir, workdir_lib.describe_changes({**refused, **allowed}))
        return None
    if refused:
        raise workdir_lib.ConfigChanged(
            f"the run in {workdir} was started with another config, and resuming it with this one "
            f"would change its result: {workdir_lib.describe_changes(refused)}; rerun with the values "
            f"of {path}, or use a new --workdir")
    return allowed


def _resume(run: Run, workdir: Path, mngr) -> tuple[int, dict]:
    """(start step, progress totals of the earlier sessions): `run.state` and `run.batches` are
    moved to the latest checkpoint, which must have been trained against this very teacher."""
    progress = {"train_tokens": 0.0, "train_time_s": 0.0, "wall_time_s": 0.0, "started_at": _now()}
    if mngr.latest_step() is None:  # a fresh run, or one started over (no checkpoint yet)
        return 0, progress
    state, data_state = checkpoint.restore(mngr, mngr.latest_step(), run.state)
    saved = data_state.get("teacher_fingerprint")
    if saved is not None and saved != run.teacher_fingerprint:
        raise workdir_lib.ConfigChanged(
            f"the teacher {run.config.teacher.model_name_or_path} is not the one the run in "
            f"{workdir} was trained against (weights fingerprint {run.teacher_fingerprint}, the "
            f"checkpoint's {saved}): put that teacher back, or use a new --workdir")
    # Restored straight into this run's shardings: a checkpoint saved on another mesh (or
    # number of devices) is resharded by Orbax on the way in.
    run.state = state
    run.batches.restore(data_state)
    progress.update(data_state.get("progress", {}))
    # The grad_norm_var window continues where it was (Distily's logs it from its 16th norm).
    progress["grad_norms"] = list(data_state.get("grad_norms", []))
    start = int(jax.device_get(run.state.step))
    log.info("resumed from the checkpoint at step %d in %s", start, checkpoint.checkpoint_dir(workdir))
    return start, progress


def _write_records(run: Run, workdir: Path, given: dict, neutral_changes: Optional[dict], start: int):
    """config.json (the first session only), this session in sessions.jsonl, tokenizer/ and
    student/ (what the export needs)."""
    if neutral_changes is None:
        fsio.write_json(workdir / "config.json", given)
    elif neutral_changes:
        log.info("config changes that do not change the result, recorded in %s: %s",
                 workdir / workdir_lib.SESSIONS_FILE, workdir_lib.describe_changes(neutral_changes))
    workdir_lib.record_session(workdir, start, neutral_changes or {})
    for name, obj in (("tokenizer", run.tokenizer), ("student", hf.config_to_hf(run.student_cfg))):
        if neutral_changes is None or not (workdir / name).exists():  # a resume has them already
            with fsio.atomic_folder(workdir / name) as tmp:
                obj.save_pretrained(tmp)


def _remove_new_workdir(workdir: Path) -> None:
    """Undo a workdir this call created, when the run failed before starting: nothing of it is
    kept but the demo's teacher and corpus (a run's own, reusable inputs, expensive to redo)."""
    from distil_jax import demo

    keep = {demo.teacher_path(workdir).name, demo.corpus_path(workdir).relative_to(workdir).parts[0],
            workdir_lib.LOCK_FILE}
    for p in workdir.iterdir():
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if all(p.name == workdir_lib.LOCK_FILE for p in workdir.iterdir()):
        shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- the run


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run (or resume) the distillation described by `config` in `workdir`; returns the final
    metrics: {"step", "loss", ..., "eval": {evaluator: {"teacher", "student_start", "student_end"}}}.

    Everything is checked before anything is written: the config's values (`config.validate`),
    then, under the workdir's lock, that a resume keeps the config and the teacher the run started
    with. A workdir this call created is removed again if the run fails before it starts."""
    t_start = time.time()
    config = validate(ml_collections.ConfigDict(config.to_dict()))
    # Before anything touches a device: a run over several processes joins them first.
    sharding.initialize_distributed(config.train.coordinator_address, config.train.num_processes,
                                    config.train.process_id, config.train.heartbeat_timeout_s)
    # Refuse an attention implementation this machine cannot run before any download or work.
    models.check_attention_impl(config.train.attention, DTYPES[config.train.dtype])
    # Likewise an objective that a teacher cache cannot feed, or a missing / incomplete cache.
    teacher_cache.check_config(config)
    workdir = Path(workdir).resolve()
    given = json.loads(config.to_json_best_effort())
    # Process 0 holds the workdir and writes its records; the other processes of a multi-host
    # run share it (same path on every host) and write only their part of the checkpoints.
    held = _held(workdir) if sharding.is_writer() else contextlib.nullcontext(False)
    with held as created:
        try:
            neutral_changes = _resume_config_changes(workdir, given)
            run = build_run(config, workdir)
            mngr = checkpoint.manager(workdir, max_to_keep=config.train.save_total_limit or None)
            start, progress = _resume(run, workdir, mngr)
        except BaseException:
            if created:
                _remove_new_workdir(workdir)
            raise
        if sharding.is_writer():
            _write_records(run, workdir, given, neutral_changes, start)
        summary_path = workdir / "run_summary.json"
        if start >= run.total_steps and summary_path.exists():
            log.info("the run in %s is complete (step %d); nothing to do", workdir, start)
            mngr.close()
            summary = json.loads(summary_path.read_text())
        else:
            session = Session(run, workdir, mngr, start, progress, t_start)
            summary = session.summary(session.train())
            if sharding.is_writer():
                fsio.write_json(summary_path, summary)
        if sharding.is_writer():
            _print_table(summary)
        return {"step": run.total_steps, **summary.get("final_metrics", {}), "eval": summary["evaluation"]}


@contextlib.contextmanager
def _held(workdir: Path):
    """Hold the workdir (created if missing) for this process; yields whether it was created."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} exists and is not a folder; use a folder path")
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir_lib.WorkdirLock(workdir)
    try:
        lock.acquire()
    except BaseException:
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        yield created
    finally:
        lock.release()


class StepTimer:
    """Training time between two log points. Not training time: a session's first step (its
    compilation), a new logits bucket's compilation (the steps queued before it run first, so
    only the compilation is taken out), evaluation and checkpointing (`restart` after them)."""

    def __init__(self):
        self.mark = time.time()
        self.compiles: list[float] = []  # start time of each compilation of the step

    def compiling(self, state) -> None:
        jax.block_until_ready(state)
        self.compiles.append(time.time())

    def step_done(self, compiles_before: int, first: bool) -> None:
        if first:
            log.info("first step (compilation included): %.1f s", time.time() - self.mark)
            self.restart()
        elif len(self.compiles) > compiles_before:
            self.mark += time.time() - self.compiles[-1]

    def elapsed(self) -> float:
        return time.time() - self.mark

    def restart(self) -> None:
        self.mark = time.time()


class Session:
    """One session of a run: the loop from `start` to the end, its evaluations and checkpoints,
    and the totals over every session (saved with each checkpoint)."""

    def __init__(self, run: Run, workdir: Path, mngr, start: int, progress: dict, t_start: float):
        self.run, self.workdir, self.mngr, self.start = run, workdir, mngr, start
        self.saved_norms = progress.pop("grad_norms", [])
        self.progress, self.t_start = progress, t_start
        self.train_tokens = self.train_time = 0.0
        self.last_saved: Optional[int] = start or None
        self.writer = MetricsWriter(workdir, start, enabled=sharding.is_writer())
        self.evals_path = workdir / "evals.json"
        self.evals = json.loads(self.evals_path.read_text()) if self.evals_path.exists() and start else {}
        dtype = run.step_config.dtype
        self.eval_student = make_eval_step(run.student_cfg, dtype, run.mesh)
        self.eval_teacher = make_eval_step(run.teacher_cfg, dtype, run.mesh)

    def evaluate(self, which: str, step: int) -> dict:
        """Student (and, once, teacher) perplexity on every evaluator; returns the held-out one."""
        run, bs = self.run, self.run.config.eval.batch_size
        for name, rows in run.eval_sets.items():
            rec = self.evals.setdefault(name, {})
            if "teacher" not in rec:  # the teacher does not change: once
                rec["teacher"] = self.teacher_eval(rows)
            res = evaluate(self.eval_student, run.state.params["student"], rows, bs, run.mesh)
            res["step"] = step
            if which:
                rec[which] = res
            rec.setdefault("history", []).append({"step": step, "ppl": res["ppl"]})
            self.writer.write(step, {f"eval/{name}/student_ppl": res["ppl"],
                                     f"eval/{name}/teacher_ppl": rec["teacher"]["ppl"]})
            log.info("eval %s step %d: student ppl %.3f (Distily's per-document mean %.3f), "
                     "teacher ppl %.3f", name, step, res["ppl"], res["distily_ppl"], rec["teacher"]["ppl"])
        if sharding.is_writer():
            fsio.write_json(self.evals_path, self.evals)
        return self.evals["heldout"]

    def totals(self) -> dict:
        p = self.progress
        return {"train_tokens": p["train_tokens"] + self.train_tokens,
                "train_time_s": p["train_time_s"] + self.train_time,
                "wall_time_s": p["wall_time_s"] + time.time() - self.t_start,
                "started_at": p["started_at"]}

    def teacher_eval(self, rows) -> dict:
        """The teacher's evaluation: from the teacher cache's manifest when it has these rows,
        else computed (loading the teacher's weights once if the run has not)."""
        run = self.run
        if run.cache is not None:
            recorded = run.cache.teacher_eval(rows)
            if recorded is not None:
                return recorded
            if run.teacher_params is None:
                run.teacher_params = run.placement.put_teacher(_load_teacher_weights(run.config))
        return evaluate(self.eval_teacher, run.teacher_params, rows, run.config.eval.batch_size, run.mesh)

    def save(self, state, step: int, data_state: dict) -> None:
        checkpoint.save(self.mngr, state, {**data_state, "teacher_fingerprint": self.run.teacher_fingerprint})
        self.last_saved = step

    def not_finite(self, step: int, what: str) -> FloatingPointError:
        kept = (f"the last good checkpoint (step {self.last_saved}) is kept" if self.last_saved is not None
                else "(no checkpoint yet)")
        return FloatingPointError(
            f"{what} at step {step}: lower optimizer.learning_rate or use train.dtype=float32; {kept}")

    def _log_start(self) -> None:
        run = self.run
        n_teacher, n_student = models.param_count(run.teacher_cfg), models.param_count(run.student_cfg)
        log.info("teacher %s (%s): %d layers, %s params; student: %d layers, %s params; %d devices (%s)",
                 run.config.teacher.model_name_or_path, run.teacher_cfg.model_type,
                 run.teacher_cfg.num_layers, f"{n_teacher:,}", run.student_cfg.num_layers,
                 f"{n_student:,}", run.mesh.devices.size, jax.devices()[0].device_kind)
        stats = run.data_stats["train"]
        log.info("train: %d rows of %d tokens (%s), %d real tokens, %.1f%% padding; %d steps of %d rows",
                 stats["rows"], run.seq_len, run.config.dataset.layout, stats["real_tokens"],
                 100 * stats["padding_fraction"], run.total_steps, run.rows_per_step)
        if run.step_config.remat == "auto":
            sc = dataclasses.replace(run.step_config, logits_groups=sharding.batch_shards(run.mesh))
            policy, kept = remat_choice(sc, run.rows_per_step, run.seq_len)
            log.info("gradient checkpointing: train.remat_policy=auto chose %s (keeping every student "
                     "block's matmul outputs takes %.2f GiB per device)", policy, kept / 2**30)

    def train(self) -> dict:
        """The loop, from `start` to the last step; returns the last logged metrics.

        Metrics stay on the device until a log step: one host sync per log interval. A checkpoint
        is written one step late: the state after step k is saved once step k+1 has computed a
        finite loss and gradient norm from it, so no saved state breaks the next step (the NaN
        guard's "last good checkpoint" is good); the final state once its held-out evaluation is
        finite."""
        run, cfg = self.run, self.run.config
        self._log_start()
        if self.start == 0:
            self.evaluate("student_start", 0)
        timer = StepTimer()

        def on_compile(capacity):
            timer.compiling(run.state)
            if capacity is not None:
                log.info("compiling the step for batches with at most %d real tokens per device share "
                         "(train.logits_buckets=%d: the LM heads skip padding)", capacity,
                         cfg.train.logits_buckets)

        # Packed rows are all real tokens but for the run's last, partial batch: compiling a second
        # step for that one batch would cost more than it saves, so buckets are for padded rows.
        buckets = cfg.train.logits_buckets if cfg.dataset.layout == "pad" else 0
        step_fn = BucketedTrainStep(run.step_config, run.tx, run.schedule, buckets=buckets,
                                    on_compile=on_compile, placement=run.step_placement,
                                    trainable=run.trainable)
        pending, grad_norms = [], collections.deque(self.saved_norms, maxlen=GRAD_NORM_WINDOW)
        untimed = []  # host metrics of the first step (compilation): logged, not in tokens/s
        last = {}
        to_save = None  # (host copy of the state after step k, k, the data position after it)
        bar = tqdm(total=run.total_steps, initial=self.start, desc="distill", unit="step", dynamic_ncols=True,
                   disable=not sharding.is_writer())
        step = self.start
        preempted_at = None  # the step whose state a SIGTERM saves (one step late, as any save)
        with preemption.Notice() as notice:
            try:
                while step < run.total_steps:
                    compiles_before = len(timer.compiles)
                    run.state, metrics = step_fn(run.state, run.teacher_params, next(run.batches))
                    step += 1
                    timer.step_done(compiles_before, first=step == self.start + 1)
                    if step == self.start + 1:
                        untimed = [jax.device_get(metrics)]
                    else:
                        pending.append(metrics)
                    if preempted_at is None and notice.reached(step):
                        preempted_at = step
                        log.warning("SIGTERM: saving the state after step %d once step %d has run finite "
                                    "on it, then stopping", step, step + 1)
                    do_log = step % cfg.train.log_steps == 0 or step == run.total_steps
                    do_save = ((cfg.train.save_steps > 0 and step % cfg.train.save_steps == 0)
                               or preempted_at == step)
                    do_eval = (cfg.eval.eval_steps > 0 and step % cfg.eval.eval_steps == 0
                               and step < run.total_steps)
                    if do_log or do_save or do_eval or to_save is not None:
                        timed = jax.device_get(pending)
                        dt = timer.elapsed()
                        host = untimed + timed
                        untimed, pending = [], []
                        self.train_tokens += float(sum(m["tokens"] for m in host))
                        self.train_time += dt if timed else 0.0
                        for i, m in enumerate(host):
                            for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
                                if not np.isfinite(m[key]):
                                    raise self.not_finite(step - len(host) + 1 + i, f"{name} became {m[key]}")
                        if to_save is not None:  # step k+1 ran finite on the state after step k
                            self.save(*to_save)
                            to_save = None
                        grad_norms.extend(float(m["grad_norm"]) for m in host)
                        if do_log:
                            last = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                            # As HF logs them: the last step's clipping norm and the rate its
                            # scheduler holds after the step.
                            last["learning_rate"] = float(host[-1]["learning_rate"])
                            last["grad_norm"] = float(host[-1]["grad_norm"])
                            var = grad_norm_variance(grad_norms)
                            if var is not None:
                                last["grad_norm_var"] = var
                            if timed and dt > 0:
                                last["tokens_per_s"] = float(sum(m["tokens"] for m in timed)) / dt
                            self.writer.write(step, {k: v for k, v in last.items() if k != "tokens"})
                            bar.set_postfix(loss=f"{last['loss']:.4f}",
                                            tok_s=f"{last.get('tokens_per_s', 0):.0f}")
                    bar.update(1)
                    if do_eval:
                        self.evaluate("", step)
                    if do_save and step < run.total_steps:
                        to_save = (jax.device_get(run.state), step,
                                   {**run.batches.state(), "progress": self.totals(),
                                    "grad_norms": list(grad_norms)})
                    if do_log or do_save or do_eval:
                        timer.restart()  # eval and checkpoint time is not training time
                    # Once the preempted step's state is saved. (A regular save may be pending
                    # again by then, with save_steps=1: the next step would save it, not this one.)
                    if preempted_at is not None and (self.last_saved or 0) >= preempted_at:
                        bar.close()
                        raise Preempted(f"stopped by SIGTERM at step {step} of {run.total_steps}: the "
                                        f"checkpoint of step {self.last_saved} is written; run the same "
                                        "command again to resume from it")
                bar.close()
                if run.cache is not None:
                    run.batches.close()  # the prefetch thread
                if self.start < run.total_steps or "student_end" not in self.evals.get("heldout", {}):
                    ppl = self.evaluate("student_end", step)["student_end"]["ppl"]
                    if not np.isfinite(ppl):
                        raise self.not_finite(step, f"held-out perplexity became {ppl}")
                if self.last_saved != step:
                    self.save(run.state, step, {**run.batches.state(), "progress": self.totals(),
                                                "grad_norms": list(grad_norms)})
            except KeyboardInterrupt:
                bar.close()
                where = (f"the last checkpoint is step {self.last_saved}" if self.last_saved is not None
                         else "no checkpoint was written yet")
                raise Interrupted(f"interrupted at step {step} of {run.total_steps}: {where}; run the same "
                                  "command again to resume from it") from None
            finally:
                self.writer.close()
                self.mngr.close()
        return last

    def summary(self, last: dict) -> dict:
        """run_summary.json: what the model card reports."""
        run, totals = self.run, self.totals()
        ds = run.config.dataset
        return {
            "started_at": totals["started_at"],
            "teacher": {"name_or_path": run.config.teacher.model_name_or_path,
                        "params": models.param_count(run.teacher_cfg), "n_layer": run.teacher_cfg.num_layers,
                        "config": hf.config_to_hf(run.teacher_cfg).to_dict(),
                        "fingerprint": run.teacher_fingerprint}
            | ({"cache": {**run.cache.summary(), "host_wait_s": run.batches.wait_s}}
               if run.cache is not None else {}),
            "student": {"params": models.param_count(run.student_cfg), "n_layer": run.student_cfg.num_layers,
                        "config": hf.config_to_hf(run.student_cfg).to_dict()},
            "dataset": {k: ds[k] for k in ("uri", "subset", "split", "column")}
            | {"layout": ds.layout, "seq_len": run.seq_len,
               "train": run.data_stats["train"], "test": run.data_stats["test"]},
            "evaluation": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                           for k, v in self.evals.items()},
            "resources": {
                "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
                "platform": jax.devices()[0].platform,
                "peak_memory_bytes": _peak_device_memory(),
                "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "cpus": os.cpu_count(), "host_ram_bytes": _host_ram(),
                "wall_time_s": totals["wall_time_s"],
                "tokens_per_s": (totals["train_tokens"] / totals["train_time_s"]
                                 if totals["train_time_s"] > 0 else None),
                "train_tokens": int(totals["train_tokens"]),
            },
            "steps": run.total_steps,
            "final_metrics": last,
            "versions": package_versions(),
            "finished_at": _now(),
        }


def _host_ram() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        return None


def _print_table(summary: Mapping) -> None:
    ev = summary["evaluation"].get("heldout", {})
    rows = [("teacher", ev.get("teacher"), summary["teacher"]["params"]),
            ("student at start", ev.get("student_start"), summary["student"]["params"]),
            ("student at end", ev.get("student_end"), summary["student"]["params"])]
    lines = [f"{'model':<18} {'held-out ppl':>13} {'Distily ppl*':>13} {'params':>13} {'eval tok/s':>11}"]
    for name, rec, n in rows:
        rec = rec or {}
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "n/a"  # noqa: E731
        lines.append(f"{name:<18} {fmt(rec.get('ppl'), '13.3f')} {fmt(rec.get('distily_ppl'), '13.3f')} "
                     f"{n:>13,} {fmt(rec.get('tokens_per_s'), '11.0f')}")
    res = summary["resources"]
    tps = res.get("tokens_per_s")
    lines.append(f"training: {summary['steps']} steps, {res['train_tokens']:,} real tokens, "
                 f"{tps:,.0f} tokens/s, wall {res['wall_time_s']:.0f} s" if tps else
                 f"training: {summary['steps']} steps")
    lines.append("* Distily's figure: its evaluator's mean of per-document perplexities, BOS prepended "
                 "(for comparison only)")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------- CLI


class UsageError(ValueError):
    """A command line that cannot be run: one line saying which argument and the fix."""


def parse_command_line(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """(config, workdir) from `--config FILE[:arg] --workdir DIR [--config.FIELD=VALUE ...]`.

    Every mistake is a UsageError naming the argument: an unknown field (with the closest valid
    one), a missing or broken config file, a value of the wrong type."""
    from absl import flags
    from ml_collections import config_flags

    from distil_jax import config as config_lib

    # Unknown fields first, with the schema's did-you-mean: ml_collections only says "'nope'".
    for arg in argv[1:]:
        if arg.startswith("--config."):
            config_lib.check_field_path(arg[len("--config."):].split("=", 1)[0])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Run directory (created; re-use it to resume).", flag_values=fv)
    spec = None  # the --config argument as given, for the messages
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    if spec is not None and not Path(spec.split(":", 1)[0]).is_file():
        raise UsageError(f"config file {spec.split(':', 1)[0]} not found; pass an existing file, e.g. "
                         "--config configs/tiny.py")
    try:
        fv(argv)
    except flags.Error as e:
        raise UsageError(str(e).strip().splitlines()[0]) from None
    except SyntaxError as e:
        raise UsageError(f"config file {e.filename or spec}: invalid Python at line {e.lineno}: {e.msg}; "
                         "fix the file") from None
    except Exception as e:  # raised by the config file's get_config, or by an override
        raise UsageError(f"cannot load --config {spec or ''}: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if fv["config"].value is None or not fv.workdir:
        raise UsageError("usage: python -m distil_jax.train --config CONFIG.py[:ARG] --workdir DIR "
                         "[--config.FIELD=VALUE ...] (both --config and --workdir are required)")
    try:
        config = fv.config
        config.to_dict()  # a file that failed to load raises here, not while parsing
    except Exception as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"cannot load --config {spec}: {first[0] if first else type(e).__name__}; "
                         "pass a file whose get_config() returns the config") from None
    return config, fv.workdir


def main(argv=None) -> int:
    """The command line; returns the exit status (0 done, 2 an error, 130 interrupted, 143 stopped
    by SIGTERM after a checkpoint)."""
    argv = list(sys.argv if argv is None else argv)
    try:
        config, workdir = parse_command_line(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # an unknown --config.FIELD
        print(f"error: {e}", file=sys.stderr)
        return 2
    for noisy in ("absl", "orbax", "jax._src", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with _progress_log():
        return _run(config, workdir)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirection)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


@contextlib.contextmanager
def _progress_log():
    """distil_jax's INFO messages on stderr for the length of a command. Its own handler, not
    the root logger's: importing orbax already gave the root a WARNING-level handler, and a
    library must not leave handlers behind when `main` is called in-process."""
    logger = logging.getLogger("distil_jax")
    handler, level, propagate = _StderrHandler(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _run(config, workdir) -> int:
    try:
        train(config, workdir)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except Preempted as e:
        print(f"\n{e}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # before the first step: nothing to resume yet
        print("\ninterrupted before the first step; run the same command again to continue",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError, ConnectionError, ImportError,
            workdir_lib.WorkdirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only workdir, a full disk
        print(f"error: {fsio.describe_os_error(e, 'use a writable --workdir')}", file=sys.stderr)
        return 2
    except Exception as e:
        if config.train.num_processes <= 1:
            raise
        # A multi-host run whose collective failed (most often: another process died). Exit now
        # with one line: jax.distributed's shutdown barrier at interpreter exit would wait for
        # the lost process, then abort with a C++ stack.
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: the multi-host run failed on process {config.train.process_id} "
              f"({type(e).__name__}: {first}); if another process died, its log has the cause; "
              f"rerun all processes to resume from the last checkpoint", file=sys.stderr, flush=True)
        os._exit(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
