"""Held-out evaluation: perplexity of one model on one evaluator's rows (`evaluate`), and the
run's record of every evaluation (`Evaluations`: evals.json, the teacher's figure once)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

from distil_jax import data, fsio, sharding
from distil_jax.train_step import make_eval_step
from distil_jax.training.builders import load_teacher_weights

log = logging.getLogger("distil_jax")


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
        out = jax.device_get(eval_fn(params, sharding.place_batch(batch, mesh)))
        nll -= float(out["logprob_sum"])
        tokens += float(out["tokens"])
        if t0 is None:
            t0 = time.time()  # the first batch compiles: not timed
        else:
            timed_tokens += float(out["tokens"])
    dt = time.time() - t0 if t0 is not None else 0.0
    doc_nll, doc_tok = [np.zeros(0)], [np.zeros(0)]
    for batch in data.eval_batches(eval_set.distily_rows, batch_size):
        out = jax.device_get(eval_fn(params, sharding.place_batch(batch, mesh)))
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


class Evaluations:
    """The run's evaluations (WORKDIR/evals.json): for every evaluator the teacher's figure (once),
    the student's at start and end, and the history of every evaluation."""

    def __init__(self, run, workdir: Path, writer, resumed: bool):
        self.run, self.writer = run, writer
        self.path = workdir / "evals.json"
        self.records = json.loads(self.path.read_text()) if self.path.exists() and resumed else {}
        dtype = run.step_config.dtype
        self.eval_student = make_eval_step(run.student_cfg, dtype, run.mesh)
        self.eval_teacher = make_eval_step(run.teacher_cfg, dtype, run.mesh)

    def __call__(self, which: str, step: int) -> dict:
        """Student (and, once, teacher) perplexity on every evaluator; returns the held-out one.
        `which`: "student_start", "student_end", or "" (a periodic evaluation: history only)."""
        run, bs = self.run, self.run.config.eval.batch_size
        for name, rows in run.eval_sets.items():
            rec = self.records.setdefault(name, {})
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
            fsio.write_json(self.path, self.records)
        return self.records["heldout"]

    def teacher_eval(self, rows) -> dict:
        """The teacher's evaluation: from the teacher cache's manifest when it has these rows,
        else computed (loading the teacher's weights once if the run has not)."""
        run = self.run
        if run.cache is not None:
            recorded = run.cache.teacher_eval(rows)
            if recorded is not None:
                return recorded
            if run.teacher_params is None:
                run.teacher_params = run.placement.put_teacher(load_teacher_weights(run.config))
        return evaluate(self.eval_teacher, run.teacher_params, rows, run.config.eval.batch_size, run.mesh)
