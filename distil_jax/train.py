"""The training run: `python -m distil_jax.train --config CONFIG.py --workdir DIR [--config.x=y]`.

`train(config, workdir)` does the whole Distily run: load the teacher and its tokenizer, build
the data, the student and the objective, then the loop (progress bar, TensorBoard and JSON-lines
metrics, evaluation at start / every eval_steps / end, orbax checkpoints) and a run summary for
the model card. Re-running the same command with the same workdir resumes from the latest
checkpoint, exactly: the data iterator's position and the RNG are part of the checkpoint.

Workdir layout: config.json, tokenizer/, student/config.json, checkpoints/, metrics.jsonl,
tb/ (TensorBoard events), evals.json, run_summary.json, cache/ (tokenized data),
teacher_cache/ (python -m distil_jax.record_teacher's default output; see docs/teacher_cache.md),
and for the offline demo teacher/ and data/.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from distil_jax import checkpoint, data, hf, models, student, teacher_cache
from distil_jax.config import DTYPES, validate
from distil_jax.objectives.objective import Objective
from distil_jax.train_step import (BucketedTrainStep, StepConfig, create_train_state, make_eval_step,
                                   make_mesh, make_optimizer, replicate, shard_batch)
from distil_jax.versions import package_versions

log = logging.getLogger("distil_jax")



# ----------------------------------------------------------------------------- small helpers


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


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
            # Drop records past the checkpoint we resume from: they will be logged again.
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        rec = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
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


def _prepare_demo(config, workdir: Path):
    from distil_jax import demo

    if not config.dataset.uri:
        config.dataset.uri = str(demo.ensure_corpus(workdir))
    if not config.teacher.model_name_or_path:
        config.teacher.model_name_or_path = str(
            demo.ensure_teacher(workdir, config.demo_teacher, config.dataset, seed=config.train.seed))


def _load_teacher(config, weights: bool = False):
    """(teacher config, params on the host). With a teacher cache the weights are read only when
    the student's initialization copies teacher modules (or `weights`), else params is None."""
    path = config.teacher.model_name_or_path
    if config.teacher.cache and not weights and \
            not teacher_cache.student_needs_teacher_weights(config.student.to_dict()):
        return hf.load_config(path), None
    return hf.load_pretrained(path, DTYPES[config.teacher.dtype])


def _open_teacher_cache(config, teacher_cfg, tokenizer, seq_len: int, train_rows):
    """The run's TeacherCache (checked against this run's teacher, tokenizer, rows, temperature
    and k), or None when the run computes the teacher online."""
    if not config.teacher.cache:
        return None
    pins = teacher_cache.run_pins(config, teacher_cfg, tokenizer, seq_len, train_rows,
                                  teacher_cache.teacher_fingerprint(config.teacher.model_name_or_path))
    k = teacher_cache.effective_k(config.teacher.cache_k, teacher_cfg.vocab_size)
    return teacher_cache.TeacherCache.open(config.teacher.cache, pins, train_rows, k)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run (or resume) the distillation described by `config` in `workdir`; returns the final
    metrics: {"step", "loss", ..., "eval": {evaluator: {"teacher", "student_start", "student_end"}}}."""
    t_start = time.time()
    config = validate(ml_collections.ConfigDict(config.to_dict()))
    # Refuse an attention implementation this machine cannot run before any download or work.
    models.check_attention_impl(config.train.attention, DTYPES[config.train.dtype])
    # Likewise an objective that a teacher cache cannot feed, or a missing / incomplete cache.
    teacher_cache.check_config(config)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if config.demo_teacher.enabled:
        _prepare_demo(config, workdir)
    _write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))

    # Teacher, tokenizer, sequence length.
    teacher_cfg, teacher_params = _load_teacher(config)
    tokenizer = _tokenizer(config.tokenizer_name_or_path or config.teacher.model_name_or_path)
    if not (workdir / "tokenizer").exists():
        tokenizer.save_pretrained(workdir / "tokenizer")
    tok_max = getattr(tokenizer, "model_max_length", None) or teacher_cfg.max_positions
    seq_len = int(min(config.dataset.max_seq_len, teacher_cfg.max_positions, tok_max))

    # Data.
    train_rows, test_rows, data_stats = data.build_datasets(
        config.dataset, tokenizer, seq_len, config.dataset.layout, cache_dir=workdir / "cache")
    eval_sets = {"heldout": test_rows}
    for name, spec in config.eval.evaluators.items():
        # Every sampled row of an extra evaluator is an evaluation row.
        eval_sets[name], _ = data.texts_to_rows(data.load_all_texts(spec), tokenizer, seq_len,
                                                config.dataset.layout, workdir / "cache", name)
    cache = _open_teacher_cache(config, teacher_cfg, tokenizer, seq_len, train_rows)

    # Student and objective.
    rng = jax.random.PRNGKey(config.train.seed)
    rng_student, rng_obj, rng_state = jax.random.split(rng, 3)
    student_cfg, student_params, trainable = student.build_student(
        teacher_cfg, teacher_params, config.student.to_dict(), rng_student)
    if not config.student.dropout:
        student_cfg = student_cfg.without_dropout()
    if seq_len > student_cfg.max_positions:
        raise ValueError(f"sequence length {seq_len} exceeds the student's maximum of "
                         f"{student_cfg.max_positions} positions; lower dataset.max_seq_len")
    hf.config_to_hf(student_cfg).save_pretrained(workdir / "student")
    if cache is not None:
        teacher_params = None  # read only to build the student; the step runs no teacher
    obj_cfg = config.objective.to_dict()
    if obj_cfg.get("logits_chunk_tokens", -1) < 0:
        obj_cfg["logits_chunk_tokens"] = None
    objective = Objective.from_config(obj_cfg).bind(student_cfg, teacher_cfg)
    params = {"student": student_params,
              "objective": objective.init_params(rng_obj, student_cfg, teacher_cfg, seq_len)}
    trainable = {"student": trainable,
                 "objective": jax.tree_util.tree_map(lambda _: True, params["objective"])}

    # Steps and optimizer.
    rows_per_step = config.train.batch_size * config.train.grad_accum
    if cache is not None:  # the same batches, with the teacher's cached targets attached
        batches = cache.batches(train_rows, rows_per_step, seed=config.train.seed, drop_last=False)
    else:
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
                    single_document_rows=config.dataset.layout == "pad",
                    teacher_cache_k=cache.k if cache is not None else 0)
    mesh = make_mesh()
    state = replicate(create_train_state(params, tx, rng_state), mesh)
    teacher_params = replicate(teacher_params, mesh)
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

    # Resume.
    mngr = checkpoint.manager(workdir, max_to_keep=config.train.save_total_limit or None)
    start = 0
    # Totals over every session of this run, saved with each checkpoint.
    progress = {"train_tokens": 0.0, "train_time_s": 0.0, "wall_time_s": 0.0, "started_at": _now()}
    if mngr.latest_step() is not None:
        state, data_state = checkpoint.restore(mngr, mngr.latest_step(), state)
        state = replicate(state, mesh)
        batches.restore(data_state)
        progress.update(data_state.get("progress", {}))
        start = int(jax.device_get(state.step))
        log.info("resumed from the checkpoint at step %d in %s", start, checkpoint.checkpoint_dir(workdir))
        summary_path = workdir / "run_summary.json"
        if start >= total_steps and summary_path.exists():
            log.info("the run in %s is complete (step %d); nothing to do", workdir, start)
            summary = json.loads(summary_path.read_text())
            mngr.close()
            _print_table(summary)
            return {"step": start, **summary.get("final_metrics", {}), "eval": summary["evaluation"]}
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
                rec["teacher"] = teacher_eval(rows)
            res = evaluate(eval_student, state.params["student"], rows, config.eval.batch_size, mesh)
            res["step"] = step
            if which:
                rec[which] = res
            rec.setdefault("history", []).append({"step": step, "ppl": res["ppl"]})
            writer.write(step, {f"eval/{name}/student_ppl": res["ppl"],
                                f"eval/{name}/teacher_ppl": rec["teacher"]["ppl"]})
            log.info("eval %s step %d: student ppl %.3f (Distily's per-document mean %.3f), "
                     "teacher ppl %.3f", name, step, res["ppl"], res["distily_ppl"], rec["teacher"]["ppl"])
        _write_json(evals_path, evals)

    def teacher_eval(rows) -> dict:
        """The teacher's evaluation: from the teacher cache's manifest when it has these rows,
        else computed (loading the teacher's weights once if the run has not)."""
        nonlocal teacher_params
        if cache is not None:
            recorded = cache.teacher_eval(rows)
            if recorded is not None:
                return recorded
            if teacher_params is None:
                teacher_params = replicate(_load_teacher(config, weights=True)[1], mesh)
        return evaluate(eval_teacher, teacher_params, rows, config.eval.batch_size, mesh)

    if start == 0:
        run_eval("student_start", 0)

    def totals() -> dict:
        return {"train_tokens": progress["train_tokens"] + train_tokens,
                "train_time_s": progress["train_time_s"] + train_time,
                "wall_time_s": progress["wall_time_s"] + time.time() - t_start,
                "started_at": progress["started_at"]}

    # The loop. Metrics stay on the device until a log step: one host sync per log interval.
    pending, grad_norms = [], collections.deque(maxlen=16)
    untimed = []  # host metrics of the first step (compilation): logged, not in tokens/s
    train_tokens, train_time, last = 0.0, 0.0, {}
    bar = tqdm(total=total_steps, initial=start, desc="distill", unit="step", dynamic_ncols=True)
    t_log = time.time()
    step, last_saved = start, (start or None)
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
        if do_log or do_save or do_eval:
            timed = jax.device_get(pending)
            dt = time.time() - t_log
            tokens = float(sum(m["tokens"] for m in timed))
            host = untimed + timed
            untimed, pending = [], []
            train_tokens += float(sum(m["tokens"] for m in host))
            train_time += dt if timed else 0.0
            grad_norms.extend(float(m["grad_norm"]) for m in host)
            last = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
            last["learning_rate"] = float(host[-1]["learning_rate"])
            last["grad_norm_var"] = float(np.var(grad_norms))
            if timed and dt > 0:
                last["tokens_per_s"] = tokens / dt
            if not np.isfinite(last["loss"]):
                raise FloatingPointError(
                    f"loss became {last['loss']} by step {step}: lower optimizer.learning_rate or "
                    f"use train.dtype=float32; the last good checkpoint (step {last_saved}) is kept")
            writer.write(step, {k: v for k, v in last.items() if k != "tokens"})
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last.get('tokens_per_s', 0):.0f}")
        bar.update(1)
        if do_eval:
            run_eval("", step)
        if do_save or step == total_steps:
            checkpoint.save(mngr, state, {**batches.state(), "progress": totals()})
            last_saved = step
        if do_log or do_save or do_eval:
            t_log = time.time()  # eval and checkpoint time is not training time
    bar.close()
    if cache is not None:
        batches.close()  # the prefetch thread
    if start < total_steps or "student_end" not in evals.get("heldout", {}):
        run_eval("student_end", step)
    writer.close()
    mngr.close()

    run = totals()
    summary = {
        "started_at": run["started_at"],
        "teacher": {"name_or_path": config.teacher.model_name_or_path, "params": n_teacher,
                    "n_layer": teacher_cfg.num_layers, "config": hf.config_to_hf(teacher_cfg).to_dict()}
        | ({"cache": {**cache.summary(), "host_wait_s": batches.wait_s}} if cache is not None else {}),
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
    _write_json(workdir / "run_summary.json", summary)
    _print_table(summary)
    return {"step": step, **last, "eval": summary["evaluation"]}


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


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (created; re-use it to resume).")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)
        for noisy in ("absl", "orbax", "jax._src", "datasets", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            train(flags_.config, flags_.workdir)
        except (ValueError, FileNotFoundError, FloatingPointError, ConnectionError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
