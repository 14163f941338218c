"""The training run: `train(config, workdir)` builds the run, checks and holds its workdir, then
runs one `Session`: the loop (a step, then the hooks: log, evaluation, checkpoint, SIGTERM's
stop) from the latest checkpoint to the last step, and the final evaluation and checkpoint.

Checkpoints (docs/design.md, "Checkpoints"): orbax's CheckpointManager decides when
(`should_save`: every train.save_steps, and the step jax's preemption service names), keeps
train.save_total_limit of them and writes them in the background. A state is saved only once
the metrics of the step that made it are finite, so no checkpoint holds a NaN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from distil_jax import checkpoint, fsio, hf, models, preemption, sharding, teacher_cache
from distil_jax import workdir as workdir_lib
from distil_jax.config import DTYPES, validate
from distil_jax.train_step import BucketedTrainStep, remat_choice
from distil_jax.training import report
from distil_jax.training.builders import Run, build_run, use_compilation_cache
from distil_jax.training.evaluation import Evaluations
from distil_jax.training.hooks import Hooks, itstime
from distil_jax.training.metrics import MetricsWriter, NotFinite, StepMetrics, StepTimer

log = logging.getLogger("distil_jax")


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run; the message says where and how to resume."""


class Preempted(Exception):
    """SIGTERM stopped the run after a checkpoint (`distil_jax.preemption`); the message says
    which, and how to resume."""


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
    use_compilation_cache(config.train.compilation_cache)
    # Refuse an attention implementation this machine cannot run before any download or work;
    # likewise an objective that a teacher cache cannot feed, or a missing / incomplete cache.
    models.check_attention_impl(config.train.attention, DTYPES[config.train.dtype])
    teacher_cache.check_config(config)
    workdir = Path(workdir).resolve()
    given = json.loads(config.to_json_best_effort())
    # Process 0 holds the workdir and writes its records; the other processes of a multi-host
    # run share it (same path on every host) and write only their part of the checkpoints.
    held = workdir_lib.held(workdir) if sharding.is_writer() else contextlib.nullcontext(False)
    with held as created:
        try:
            changes = workdir_lib.resume_config_changes(workdir, given)
            run = build_run(config, workdir)
            mngr = checkpoint.manager(workdir, max_to_keep=config.train.save_total_limit or None,
                                      save_steps=config.train.save_steps, asynchronous=True)
            start, progress = resume(run, workdir, mngr)
        except BaseException:
            if created:
                workdir_lib.remove_new_workdir(workdir)
            raise
        if sharding.is_writer():
            workdir_lib.write_records(workdir, run.tokenizer, hf.config_to_hf(run.student_cfg), given,
                                      changes, start)
        summary = _finished_summary(workdir, run, start, mngr)
        if summary is None:
            summary = Session(run, workdir, mngr, start, progress, t_start).train()
            if sharding.is_writer():
                fsio.write_json(workdir / "run_summary.json", summary)
        if sharding.is_writer():
            report.print_table(summary)
        return {"step": run.total_steps, **summary.get("final_metrics", {}), "eval": summary["evaluation"]}


def _finished_summary(workdir: Path, run: Run, start: int, mngr):
    """The summary of a run that is already complete, or None."""
    path = workdir / "run_summary.json"
    if start < run.total_steps or not path.exists():
        return None
    log.info("the run in %s is complete (step %d); nothing to do", workdir, start)
    mngr.close()
    return json.loads(path.read_text())


def resume(run: Run, workdir: Path, mngr) -> tuple[int, dict]:
    """(start step, progress totals of the earlier sessions): `run.state` and `run.batches` are
    moved to the latest checkpoint, which must have been trained against this very teacher."""
    progress = {"train_tokens": 0.0, "train_time_s": 0.0, "wall_time_s": 0.0, "started_at": report.now()}
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


class Session:
    """One session of a run: the loop from `start` to the end, its evaluations and checkpoints,
    and the totals over every session (saved with each checkpoint)."""

    def __init__(self, run: Run, workdir: Path, mngr, start: int, progress: dict, t_start: float):
        self.run, self.mngr, self.start, self.step = run, mngr, start, start
        self.timer = StepTimer()
        self.metrics = StepMetrics(self.timer, progress.pop("grad_norms", []))
        self.progress, self.t_start = progress, t_start
        self.last_saved = start or None  # the newest checkpoint step
        self.stop_at = None  # the step SIGTERM's notice stops the run at
        self.last = {}  # the last logged metrics
        self.writer = MetricsWriter(workdir, start, enabled=sharding.is_writer())
        self.evals = Evaluations(run, workdir, self.writer, resumed=bool(start))
        self.bar = tqdm(total=run.total_steps, initial=start, desc="distill", unit="step",
                        dynamic_ncols=True, disable=not sharding.is_writer())

    def hooks(self) -> Hooks:
        """The periodic work after a step, in this order."""
        cfg, total = self.run.config, self.run.total_steps
        hooks = Hooks()
        hooks.add("log", self.log, lambda s: itstime(s, cfg.train.log_steps, last=total))
        hooks.add("eval", lambda s: self.evals("", s),
                  lambda s: itstime(s, cfg.eval.eval_steps) and s < total)
        # The last step's state is saved after the final evaluation, in `finish`.
        hooks.add("checkpoint", self.save,
                  lambda s: s < total and (s == self.stop_at or self.mngr.should_save(s)))
        hooks.add("stop", self.stop, lambda s: s == self.stop_at)
        return hooks

    def train(self) -> dict:
        """The session from `start` to the end; returns run_summary.json's content."""
        self._log_start()
        if self.start == 0:
            self.evals("student_start", 0)
        try:
            with preemption.Notice(self.mngr) as notice:
                self.loop(self.make_step(), self.hooks(), notice)
                self.finish()
        except NotFinite as e:
            kept = (f"the last good checkpoint (step {self.last_saved}) is kept" if self.last_saved
                    is not None else "(no checkpoint yet)")
            raise FloatingPointError(f"{e.what} at step {e.step}: lower optimizer.learning_rate or use "
                                     f"train.dtype=float32; {kept}") from None
        except KeyboardInterrupt:
            where = (f"the last checkpoint is step {self.last_saved}" if self.last_saved is not None
                     else "no checkpoint was written yet")
            raise Interrupted(f"interrupted at step {self.step} of {self.run.total_steps}: {where}; run "
                              "the same command again to resume from it") from None
        finally:
            self.bar.close()
            self.writer.close()
            self.mngr.close()  # waits for a checkpoint still being written
        return report.summary(self.run, self.evals.records, self.totals(), self.last)

    def loop(self, step_fn, hooks: Hooks, notice: preemption.Notice) -> None:
        """A step, then the hooks, to the last step. Metrics stay on the device until a hook
        fetches them (one host sync per log or save)."""
        run = self.run
        while self.step < run.total_steps:
            compiles_before = len(self.timer.compiles)
            batch = next(run.batches)
            if run.on_policy is not None:  # GKD: on some steps, the model's own completions
                batch = run.on_policy(self.step, batch, run.state.params["student"], run.teacher_params)
            run.state, metrics = step_fn(run.state, run.teacher_params, batch)
            self.step += 1
            preemption.check_ctrl_c()  # a Ctrl-C that a callback swallowed
            first = self.step == self.start + 1
            self.timer.step_done(compiles_before, first=first)
            self.metrics.add(self.step, metrics, timed=not first)
            if self.stop_at is None and notice.reached(self.step):
                self.stop_at = self.step
                log.warning("SIGTERM: saving the state after step %d, then stopping", self.step)
            if hooks.run(self.step):
                self.timer.restart()  # log, eval and checkpoint time is not training time
            self.bar.update(1)

    def finish(self) -> None:
        """The final held-out evaluation (it must be finite), then the final checkpoint."""
        run = self.run
        if run.cache is not None:
            run.batches.close()  # the prefetch thread
        self.last = self.metrics.flush() or self.last
        if self.start < run.total_steps or "student_end" not in self.evals.records.get("heldout", {}):
            ppl = self.evals("student_end", self.step)["student_end"]["ppl"]
            if not np.isfinite(ppl):
                raise NotFinite(self.step, f"held-out perplexity became {ppl}")
        if self.last_saved != self.step:
            self.save(self.step)

    # ------------------------------------------------------------------------- the hooks

    def log(self, step: int) -> None:
        record = self.metrics.flush()
        if record:
            self.last = record
            self.writer.write(step, {k: v for k, v in record.items() if k != "tokens"})
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}")

    def save(self, step: int) -> None:
        """Checkpoint the state after `step` once every step up to it is known finite (its loss
        and gradient norm: the update that made the state was finite). Orbax copies the arrays
        off the devices and writes them in the background."""
        self.metrics.flush()  # raises NotFinite: the state is not saved
        data_state = {**self.run.batches.state(), "progress": self.totals(),
                      "grad_norms": list(self.metrics.grad_norms),
                      "teacher_fingerprint": self.run.teacher_fingerprint}
        checkpoint.save(self.mngr, self.run.state, data_state, step=step, wait=False)
        self.last_saved = step

    def stop(self, step: int) -> None:
        self.mngr.wait_until_finished()
        raise Preempted(f"stopped by SIGTERM at step {step} of {self.run.total_steps}: the checkpoint "
                        f"of step {self.last_saved} is written; run the same command again to resume "
                        "from it")

    # ------------------------------------------------------------------------- helpers

    def totals(self) -> dict:
        p = self.progress
        return {"train_tokens": p["train_tokens"] + self.metrics.tokens,
                "train_time_s": p["train_time_s"] + self.metrics.time_s,
                "wall_time_s": p["wall_time_s"] + time.time() - self.t_start,
                "started_at": p["started_at"]}

    def make_step(self) -> BucketedTrainStep:
        run, cfg = self.run, self.run.config

        def on_compile(capacity):
            self.timer.compiling(run.state)
            if capacity is not None:
                log.info("compiling the step for batches with at most %d real tokens per device share "
                         "(train.logits_buckets=%d: the LM heads skip padding)", capacity,
                         cfg.train.logits_buckets)

        # Packed rows are all real tokens but for the run's last, partial batch: compiling a second
        # step for that one batch would cost more than it saves, so buckets are for padded rows.
        buckets = cfg.train.logits_buckets if cfg.dataset.layout == "pad" else 0
        return BucketedTrainStep(run.step_config, run.tx, run.schedule, buckets=buckets,
                                 on_compile=on_compile, placement=run.step_placement,
                                 trainable=run.trainable)

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
