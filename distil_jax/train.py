"""The training run: `python -m distil_jax.train --config CONFIG.py --workdir DIR [--config.x=y]`.

`train(config, workdir)` does the whole Distily run: load the teacher and its tokenizer, build
the data, the student and the objective, then the loop (progress bar, TensorBoard and JSON-lines
metrics, evaluation at start / every eval_steps / end, orbax checkpoints) and a run summary for
the model card. Re-running the same command with the same workdir resumes from the latest
checkpoint, exactly: the data iterator's position and the RNG are part of the checkpoint.

Workdir layout: config.json, tokenizer/, student/config.json, checkpoints/, metrics.jsonl,
tb/ (TensorBoard events), evals.json, run_summary.json, cache/ (tokenized data),
and for the offline demo teacher/ and data/.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from distil_jax import checkpoint, data, fsio, hf, models, student
from distil_jax import workdir as workdir_lib
from distil_jax.config import DTYPES, validate
from distil_jax.objectives.objective import Objective
from distil_jax.train_step import (BucketedTrainStep, StepConfig, create_train_state, make_eval_step,
                                   make_mesh, make_optimizer, replicate, shard_batch)
from distil_jax.versions import package_versions

log = logging.getLogger("distil_jax")



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

    def __init__(self, workdir: Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
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
        # A non-finite figure (a diverged perplexity) is null: NaN / Infinity are not JSON.
        rec = fsio.json_safe({"step": step, **{k: float(v) for k, v in scalars.items()}})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        for k, v in scalars.items():
            self.tb.add_scalar(k, float(v), step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


# ----------------------------------------------------------------------------- evaluation


def evaluate(eval_fn, params, arrays, batch_size: int, mesh) -> dict:
    """Held-out perplexity of one model on one set of rows.

    ppl: token-weighted, exp(total NLL / tokens) over every predicted token (the figure to use).
    distily_ppl: Distily's figure, the mean over documents of each document's perplexity
      (documents = (row, segment) pieces; with the pad layout, one per row).
    """
    nll = tokens = 0.0
    doc_nll, doc_tok = [], []
    t0, timed_tokens = None, 0.0
    for batch in data.eval_batches(arrays, batch_size):
        out = jax.device_get(eval_fn(params, shard_batch(batch, mesh)))
        nll -= float(out["logprob_sum"])
        tokens += float(out["tokens"])
        if t0 is None:
            t0 = time.time()  # the first batch compiles: not timed
        else:
            timed_tokens += float(out["tokens"])
        has = out["doc_tokens"] > 0
        doc_nll.append(-out["doc_logprob"][has])
        doc_tok.append(out["doc_tokens"][has])
    dt = time.time() - t0 if t0 is not None else 0.0
    doc_nll, doc_tok = np.concatenate(doc_nll), np.concatenate(doc_tok)
    return {
        "ppl": float(np.exp(nll / max(tokens, 1.0))),
        "distily_ppl": float(np.mean(np.exp(doc_nll / doc_tok))) if len(doc_tok) else float("nan"),
        "tokens": int(tokens),
        "documents": int(len(doc_tok)),
        "tokens_per_s": float(timed_tokens / dt) if dt > 0 and timed_tokens else None,
    }


# ----------------------------------------------------------------------------- the run


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run; the message says where and how to resume."""


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


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run (or resume) the distillation described by `config` in `workdir`; returns the final
    metrics: {"step", "loss", ..., "eval": {evaluator: {"teacher", "student_start", "student_end"}}}.

    Everything is checked before anything is written: the config's values (`config.validate`),
    then, under the workdir's lock, that a resume keeps the config and the teacher the run started
    with. A workdir this call created is removed again if the run fails before it starts."""
    config = validate(ml_collections.ConfigDict(config.to_dict()))
    # Refuse an attention implementation this machine cannot run before any download or work.
    models.check_attention_impl(config.train.attention, DTYPES[config.train.dtype])
    workdir = Path(workdir).resolve()
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
        return _train_locked(config, workdir, created)
    finally:
        lock.release()


def _train_locked(config, workdir: Path, created: bool) -> dict:
    t_start = time.time()
    given = json.loads(config.to_json_best_effort())
    started = False
    try:
        neutral_changes = _resume_config_changes(workdir, given)
        if config.demo_teacher.enabled:
            config = _with_demo_inputs(config, workdir)

        # Teacher, tokenizer, sequence length.
        teacher_cfg, teacher_params = hf.load_pretrained(config.teacher.model_name_or_path,
                                                         DTYPES[config.teacher.dtype])
        teacher_fingerprint = workdir_lib.fingerprint(teacher_params)
        tokenizer = _tokenizer(config.tokenizer_name_or_path or config.teacher.model_name_or_path)
        tok_max = getattr(tokenizer, "model_max_length", None) or teacher_cfg.max_positions
        seq_len = int(min(config.dataset.max_seq_len, teacher_cfg.max_positions, tok_max))

        # Student and objective (before the data: their errors need no tokenization).
        rng = jax.random.PRNGKey(config.train.seed)
        rng_student, rng_obj, rng_state = jax.random.split(rng, 3)
        student_cfg, student_params, trainable = student.build_student(
            teacher_cfg, teacher_params, config.student.to_dict(), rng_student)
        if not config.student.dropout:
            student_cfg = student_cfg.without_dropout()
        if seq_len > student_cfg.max_positions:
            raise ValueError(f"sequence length {seq_len} exceeds the student's maximum of "
                             f"{student_cfg.max_positions} positions; lower dataset.max_seq_len")
        obj_cfg = config.objective.to_dict()
        if obj_cfg.get("logits_chunk_tokens", -1) < 0:
            obj_cfg["logits_chunk_tokens"] = None
        objective = Objective.from_config(obj_cfg).bind(student_cfg, teacher_cfg)
        params = {"student": student_params,
                  "objective": objective.init_params(rng_obj, student_cfg, teacher_cfg, seq_len)}
        trainable = {"student": trainable,
                     "objective": jax.tree_util.tree_map(lambda _: True, params["objective"])}

        # Data.
        train_rows, test_rows, data_stats = data.build_datasets(
            config.dataset, tokenizer, seq_len, config.dataset.layout, cache_dir=workdir / "cache")
        eval_sets = {"heldout": test_rows}
        for name, spec in config.eval.evaluators.items():
            # Every sampled row of an extra evaluator is an evaluation row.
            eval_sets[name], _ = data.texts_to_rows(data.load_all_texts(spec), tokenizer, seq_len,
                                                    config.dataset.layout, workdir / "cache", name)

        # Steps and optimizer.
        rows_per_step = config.train.batch_size * config.train.grad_accum
        batches = data.BatchIterator(train_rows, rows_per_step, shuffle=True, seed=config.train.seed,
                                     drop_last=False)
        if config.train.max_steps > 0:
            total_steps = int(config.train.max_steps)
        else:
            total_steps = int(np.ceil(config.train.num_epochs * batches.steps_per_epoch))
        tx, schedule = make_optimizer(config.optimizer.to_dict(), total_steps, trainable)
        sc = StepConfig(teacher=teacher_cfg, student=student_cfg, objective=objective,
                        dtype=DTYPES[config.train.dtype], remat=config.train.remat,
                        grad_accum=config.train.grad_accum, dropout=config.student.dropout,
                        attention_impl=config.train.attention,
                        single_document_rows=config.dataset.layout == "pad")
        mesh = make_mesh()
        state = replicate(create_train_state(params, tx, rng_state), mesh)
        teacher_params = replicate(teacher_params, mesh)

        # Resume: the checkpoint must have been trained against this very teacher.
        mngr = checkpoint.manager(workdir, max_to_keep=config.train.save_total_limit or None)
        start = 0
        # Totals over every session of this run, saved with each checkpoint.
        progress = {"train_tokens": 0.0, "train_time_s": 0.0, "wall_time_s": 0.0, "started_at": _now()}
        if neutral_changes is not None and mngr.latest_step() is not None:
            state, data_state = checkpoint.restore(mngr, mngr.latest_step(), state)
            saved_fingerprint = data_state.get("teacher_fingerprint")
            if saved_fingerprint is not None and saved_fingerprint != teacher_fingerprint:
                raise workdir_lib.ConfigChanged(
                    f"the teacher {config.teacher.model_name_or_path} is not the one the run in "
                    f"{workdir} was trained against (weights fingerprint {teacher_fingerprint}, the "
                    f"checkpoint's {saved_fingerprint}): put that teacher back, or use a new --workdir")
            state = replicate(state, mesh)
            batches.restore(data_state)
            progress.update(data_state.get("progress", {}))
            start = int(jax.device_get(state.step))
            log.info("resumed from the checkpoint at step %d in %s", start,
                     checkpoint.checkpoint_dir(workdir))
        started = True
    except BaseException:
        if created and not started:
            _remove_new_workdir(workdir)
        raise

    # Everything checked: now the records.
    if neutral_changes is None:
        fsio.write_json(workdir / "config.json", given)
    elif neutral_changes:
        log.info("config changes that do not change the result, recorded in %s: %s",
                 workdir / workdir_lib.SESSIONS_FILE, workdir_lib.describe_changes(neutral_changes))
    workdir_lib.record_session(workdir, start, neutral_changes or {})
    for name, obj in (("tokenizer", tokenizer), ("student", hf.config_to_hf(student_cfg))):
        if neutral_changes is None or not (workdir / name).exists():  # a resume has them already
            with fsio.atomic_folder(workdir / name) as tmp:
                obj.save_pretrained(tmp)

    summary_path = workdir / "run_summary.json"
    if start >= total_steps and summary_path.exists():
        log.info("the run in %s is complete (step %d); nothing to do", workdir, start)
        summary = json.loads(summary_path.read_text())
        mngr.close()
        _print_table(summary)
        return {"step": start, **summary.get("final_metrics", {}), "eval": summary["evaluation"]}

    compiles = []  # start times of the step's compilations (a new logits bucket's: not training time)

    def on_compile(capacity):
        # Let the queued steps finish first, so the compilation is timed alone.
        jax.block_until_ready(state)
        compiles.append(time.time())
        if capacity is not None:
            log.info("compiling the step for batches with at most %d real tokens per device share "
                     "(train.logits_buckets=%d: the LM heads skip padding)", capacity,
                     config.train.logits_buckets)

    # Packed rows are all real tokens but for the run's last, partial batch: compiling a second
    # step for that one batch would cost more than it saves, so buckets are for padded rows.
    buckets = config.train.logits_buckets if config.dataset.layout == "pad" else 0
    step_fn = BucketedTrainStep(sc, tx, schedule, mesh, buckets=buckets, on_compile=on_compile)
    eval_student = make_eval_step(student_cfg, sc.dtype)
    eval_teacher = make_eval_step(teacher_cfg, sc.dtype)

    writer = MetricsWriter(workdir, start)
    evals_path = workdir / "evals.json"
    evals = json.loads(evals_path.read_text()) if evals_path.exists() and start else {}

    n_teacher, n_student = models.param_count(teacher_cfg), models.param_count(student_cfg)
    log.info("teacher %s (%s): %d layers, %s params; student: %d layers, %s params; %d devices (%s)",
             config.teacher.model_name_or_path, teacher_cfg.model_type, teacher_cfg.num_layers,
             f"{n_teacher:,}", student_cfg.num_layers, f"{n_student:,}", mesh.devices.size, jax.devices()[0].device_kind)
    log.info("train: %d rows of %d tokens (%s), %d real tokens, %.1f%% padding; %d steps of %d rows",
             data_stats["train"]["rows"], seq_len, config.dataset.layout,
             data_stats["train"]["real_tokens"], 100 * data_stats["train"]["padding_fraction"],
             total_steps, rows_per_step)

    def run_eval(which: str, step: int):
        for name, rows in eval_sets.items():
            rec = evals.setdefault(name, {})
            if "teacher" not in rec:  # the teacher does not change: once
                rec["teacher"] = evaluate(eval_teacher, teacher_params, rows, config.eval.batch_size, mesh)
            res = evaluate(eval_student, state.params["student"], rows, config.eval.batch_size, mesh)
            res["step"] = step
            if which:
                rec[which] = res
            rec.setdefault("history", []).append({"step": step, "ppl": res["ppl"]})
            writer.write(step, {f"eval/{name}/student_ppl": res["ppl"],
                                f"eval/{name}/teacher_ppl": rec["teacher"]["ppl"]})
            log.info("eval %s step %d: student ppl %.3f (Distily's per-document mean %.3f), "
                     "teacher ppl %.3f", name, step, res["ppl"], res["distily_ppl"], rec["teacher"]["ppl"])
        fsio.write_json(evals_path, evals)
        return evals["heldout"]

    if start == 0:
        run_eval("student_start", 0)

    def totals() -> dict:
        return {"train_tokens": progress["train_tokens"] + train_tokens,
                "train_time_s": progress["train_time_s"] + train_time,
                "wall_time_s": progress["wall_time_s"] + time.time() - t_start,
                "started_at": progress["started_at"]}

    def save(host_state, step_of_state: int, data_state: dict) -> None:
        nonlocal last_saved
        checkpoint.save(mngr, host_state, {**data_state, "teacher_fingerprint": teacher_fingerprint})
        last_saved = step_of_state

    def bad_numbers(step: int, what: str):
        where = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
                 else "(no checkpoint yet)")
        return FloatingPointError(
            f"{what} at step {step}: lower optimizer.learning_rate or use train.dtype=float32; {where}")

    # The loop. Metrics stay on the device until a log step: one host sync per log interval.
    # A checkpoint is written one step late: the state after step k is saved only once step k+1
    # has computed a finite loss and gradient norm from it, so no saved state is one that breaks
    # the next step (the NaN guard's "last good checkpoint" is good).
    pending, grad_norms = [], collections.deque(maxlen=16)
    untimed = []  # host metrics of the first step (compilation): logged, not in tokens/s
    train_tokens, train_time, last = 0.0, 0.0, {}
    to_save = None  # (host copy of the state after step k, k, the data position after it)
    bar = tqdm(total=total_steps, initial=start, desc="distill", unit="step", dynamic_ncols=True)
    t_log = time.time()
    step, last_saved = start, (start or None)
    try:
        while step < total_steps:
            n_compiles = len(compiles)
            state, metrics = step_fn(state, teacher_params, next(batches))
            step += 1
            if len(compiles) > n_compiles and step > start + 1:
                t_log += time.time() - compiles[-1]  # a new bucket's compilation is not training time
            if step == start + 1:
                untimed = [jax.device_get(metrics)]
                log.info("first step (compilation included): %.1f s", time.time() - t_log)
                t_log = time.time()
            else:
                pending.append(metrics)
            do_log = step % config.train.log_steps == 0 or step == total_steps
            do_save = config.train.save_steps > 0 and step % config.train.save_steps == 0
            do_eval = config.eval.eval_steps > 0 and step % config.eval.eval_steps == 0 and step < total_steps
            if do_log or do_save or do_eval or to_save is not None:
                timed = jax.device_get(pending)
                dt = time.time() - t_log
                tokens = float(sum(m["tokens"] for m in timed))
                host = untimed + timed
                untimed, pending = [], []
                train_tokens += float(sum(m["tokens"] for m in host))
                train_time += dt if timed else 0.0
                for i, m in enumerate(host):
                    for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
                        if not np.isfinite(m[key]):
                            raise bad_numbers(step - len(host) + 1 + i, f"{name} became {m[key]}")
                if to_save is not None:  # step k+1 ran finite on the state after step k
                    save(*to_save)
                    to_save = None
                grad_norms.extend(float(m["grad_norm"]) for m in host)
                if do_log:
                    last = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                    last["learning_rate"] = float(host[-1]["learning_rate"])
                    last["grad_norm_var"] = float(np.var(grad_norms))
                    if timed and dt > 0:
                        last["tokens_per_s"] = tokens / dt
                    writer.write(step, {k: v for k, v in last.items() if k != "tokens"})
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last.get('tokens_per_s', 0):.0f}")
            bar.update(1)
            if do_eval:
                run_eval("", step)
            if do_save and step < total_steps:
                to_save = (jax.device_get(state), step, {**batches.state(), "progress": totals()})
            if do_log or do_save or do_eval:
                t_log = time.time()  # eval and checkpoint time is not training time
        bar.close()
        # The final state has no next step to vouch for it: its held-out evaluation does.
        if start < total_steps or "student_end" not in evals.get("heldout", {}):
            heldout = run_eval("student_end", step)
            if not np.isfinite(heldout["student_end"]["ppl"]):
                raise bad_numbers(step, f"held-out perplexity became {heldout['student_end']['ppl']}")
        if last_saved != step:
            save(state, step, {**batches.state(), "progress": totals()})
    except KeyboardInterrupt:
        bar.close()
        where = (f"the last checkpoint is step {last_saved}" if last_saved is not None
                 else "no checkpoint was written yet")
        raise Interrupted(f"interrupted at step {step} of {total_steps}: {where}; run the same command "
                          "again to resume from it") from None
    finally:
        writer.close()
        mngr.close()

    run = totals()
    summary = {
        "started_at": run["started_at"],
        "teacher": {"name_or_path": config.teacher.model_name_or_path, "params": n_teacher,
                    "n_layer": teacher_cfg.num_layers, "config": hf.config_to_hf(teacher_cfg).to_dict(),
                    "fingerprint": teacher_fingerprint},
        "student": {"params": n_student, "n_layer": student_cfg.num_layers,
                    "config": hf.config_to_hf(student_cfg).to_dict()},
        "dataset": {k: config.dataset[k] for k in ("uri", "subset", "split", "column")}
        | {"layout": config.dataset.layout, "seq_len": seq_len,
           "train": data_stats["train"], "test": data_stats["test"]},
        "evaluation": {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in evals.items()},
        "resources": {
            "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "platform": jax.devices()[0].platform,
            "peak_memory_bytes": _peak_device_memory(),
            "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cpus": os.cpu_count(), "host_ram_bytes": _host_ram(),
            "wall_time_s": run["wall_time_s"],
            "tokens_per_s": run["train_tokens"] / run["train_time_s"] if run["train_time_s"] > 0 else None,
            "train_tokens": int(run["train_tokens"]),
        },
        "steps": total_steps,
        "final_metrics": last,
        "versions": package_versions(),
        "finished_at": _now(),
    }
    fsio.write_json(workdir / "run_summary.json", summary)
    _print_table(summary)
    return {"step": step, **last, "eval": summary["evaluation"]}


def _remove_new_workdir(workdir: Path) -> None:
    """Undo a workdir this call created, when the run failed before starting: nothing of it is
    kept but the demo's teacher and corpus (a run's own, reusable inputs, expensive to redo)."""
    from distil_jax import demo

    keep = {demo.teacher_path(workdir).name, demo.corpus_path(workdir).relative_to(workdir).parts[0],
            workdir_lib.LOCK_FILE}
    entries = [p for p in workdir.iterdir() if p.name not in keep]
    for p in entries:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if all(p.name == workdir_lib.LOCK_FILE for p in workdir.iterdir()):
        shutil.rmtree(workdir, ignore_errors=True)


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
    lines.append("* Distily's figure: mean of per-document perplexities (for comparison only)")
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
    """The command line; returns the exit status (0 done, 2 an error, 130 interrupted)."""
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
