"""Downstream evaluation: lm-evaluation-harness tasks on the teacher and an exported student.

    python -m distil_jax.evaluate --workdir DIR --student OUT --tasks TASK[,TASK...]
        [--teacher PATH] [--include-path TASKS_DIR] [--limit N] [--batch-size N]
        [--num-fewshot N] [--device cpu]

OUT is a folder written by `python -m distil_jax.export` (its distil_jax_export.json names the
checkpoint step, which the model card needs to know which weights the figures belong to). Both
models run through lm-eval's own transformers backend (`lm_eval.simple_evaluate(model="hf")`), so
the figures are the harness's. The result, one row per (task, metric) with the teacher's and the
student's figure and their ratio, is written to DIR/evals_downstream.json and printed as a
markdown table; a later export puts the student's figures in its card's model-index.

Needs the `eval` extra: pip install distil_jax[eval] (lm-eval and accelerate).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from distil_jax import cli, fsio

log = logging.getLogger("distil_jax.evaluate")  # not __name__: "__main__" under python -m

RESULTS_FILE = "evals_downstream.json"
INSTALL_HINT = "lm-evaluation-harness is not installed: pip install distil_jax[eval]"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return lm_eval, TaskManager


def run_tasks(model_path: str | Path, tasks: Sequence[str], task_manager, *, limit: Optional[float] = None,
              batch_size: int = 8, num_fewshot: Optional[int] = None, device: str = "cpu",
              bootstrap_iters: int = 100_000) -> dict:
    """lm-eval's results dict for one HF model folder (or hub id): {"results": {task: {"acc,none":
    ...}}, "higher_is_better": ..., "n-shot": ..., "configs": ...}. Same seeds for every model."""
    lm_eval, _ = _lm_eval()
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_path), "device": device}, tasks=list(tasks),
        task_manager=task_manager, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot,
        log_samples=False, bootstrap_iters=bootstrap_iters)


def _metrics(task_results: dict) -> dict[str, tuple[float, Optional[float]]]:
    """{"acc": (value, stderr), "acc (flexible-extract)": ...} from lm-eval's "metric,filter" keys."""
    out = {}
    for key, value in task_results.items():
        metric, sep, filt = key.partition(",")
        if not sep or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        stderr = task_results.get(f"{metric}_stderr,{filt}")
        name = metric if filt == "none" else f"{metric} ({filt})"
        out[name] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def side_by_side(teacher: dict, student: dict) -> list[dict]:
    """One row per (task, metric) both models have: task, metric, teacher, student, ratio
    (student / teacher), their stderrs, higher_is_better, num_fewshot and the task's dataset."""
    rows = []
    for task, t_res in teacher["results"].items():
        s_metrics = _metrics(student["results"].get(task, {}))
        better = teacher.get("higher_is_better", {}).get(task, {})
        for metric, (t, t_err) in _metrics(t_res).items():
            if metric not in s_metrics:
                continue
            s, s_err = s_metrics[metric]
            rows.append(dict(
                task=task, metric=metric, teacher=t, student=s,
                ratio=s / t if t and math.isfinite(t) and math.isfinite(s) else None,
                teacher_stderr=t_err, student_stderr=s_err,
                higher_is_better=better.get(metric.split(" ")[0]),
                num_fewshot=teacher.get("n-shot", {}).get(task),
                dataset=teacher.get("configs", {}).get(task, {}).get("dataset_path")))
    return rows


def markdown(rows: list[dict]) -> str:
    """The side-by-side table as markdown (the card and the command print the same one)."""
    fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    arrow = {True: " ↑", False: " ↓", None: ""}  # higher / lower is better
    lines = ["| task | metric | teacher | student | student / teacher |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']}{arrow[r.get('higher_is_better')]} | {fmt(r['teacher'])} | "
              f"{fmt(r['student'])} | {fmt(r['ratio'])} |" for r in rows]
    return "\n".join(lines)


def _teacher(workdir: Path, student: Path, teacher: Optional[str]) -> tuple[str, Optional[int]]:
    """(the teacher to evaluate: the run's own by default, the student export's step); one-line
    errors for a missing workdir, a student that is not an export, a run that names no teacher."""
    from distil_jax.export import MARKER
    from distil_jax.modelcard import teacher_of

    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
    if not (student / MARKER).is_file():
        raise FileNotFoundError(f"--student {student} is not an export folder (no {MARKER}): export "
                                f"it first, python -m distil_jax.export --workdir {workdir} --out {student}")

    def read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    teacher = teacher or teacher_of(read(workdir / "run_summary.json"), read(workdir / "config.json"))
    if not teacher and (workdir / "teacher" / "config.json").is_file():
        teacher = str(workdir / "teacher")  # the demo's teacher (configs/tiny.py)
    if not teacher:
        raise FileNotFoundError(f"the run in {workdir} records no teacher; pass --teacher PATH_OR_HUB_ID")
    return teacher, read(student / MARKER).get("step")


def _check_tasks(tasks: Sequence[str], task_manager) -> None:
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        near = difflib.get_close_matches(unknown[0], task_manager.all_tasks, n=1)
        raise ValueError(f"unknown lm-eval task {unknown[0]!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                         + "; pass --include-path DIR for your own task YAMLs")


def evaluate(workdir: str | Path, student: str | Path, tasks: Sequence[str], *, teacher: Optional[str] = None,
             include_path: Optional[str] = None, limit: Optional[float] = None, batch_size: int = 8,
             num_fewshot: Optional[int] = None, device: str = "cpu", bootstrap_iters: int = 100_000) -> dict:
    """Run `tasks` on the teacher and the exported `student`; write and return WORKDIR/RESULTS_FILE:
    {"rows": side_by_side(...), "teacher": {"model"}, "student": {"model", "step"}, "tasks",
    "limit", "num_fewshot", "lm_eval_version"}.

    Raises: ImportError (no lm-eval), FileNotFoundError (no workdir, `student` not an export, no
    teacher), ValueError (an unknown task)."""
    lm_eval, TaskManager = _lm_eval()
    workdir, student = Path(workdir), Path(student)
    teacher, step = _teacher(workdir, student, teacher)
    manager = TaskManager(include_path=include_path)  # indexes every task YAML: seconds
    _check_tasks(tasks, manager)
    kw = dict(limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, device=device,
              bootstrap_iters=bootstrap_iters)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines drown ours
    log.info("lm-eval %s on the teacher %s", ",".join(tasks), teacher)
    t_res = run_tasks(teacher, tasks, manager, **kw)
    log.info("lm-eval %s on the student %s", ",".join(tasks), student)
    s_res = run_tasks(student, tasks, manager, **kw)
    record = dict(tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, lm_eval_version=lm_eval.__version__,
                  teacher={"model": str(teacher)}, student={"model": str(student), "step": step},
                  rows=side_by_side(t_res, s_res))
    fsio.write_json(workdir / RESULTS_FILE, record)
    return record


def main(argv: Optional[list[str]] = None) -> int:
    p = cli.parser("evaluate", "Run lm-evaluation-harness tasks on the teacher and an exported student "
                   f"and write the side-by-side table to WORKDIR/{RESULTS_FILE}.")
    p.add_argument("--workdir", required=True, help="the training run's workdir (the results go there)")
    p.add_argument("--student", required=True, metavar="OUT",
                   help="an export folder of this run (python -m distil_jax.export --out OUT)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    p.add_argument("--teacher", default=None,
                   help="the teacher folder or hub id (default: the run's own, as its records name it)")
    p.add_argument("--include-path", "--include_path", dest="include_path", metavar="DIR", default=None,
                   help="a folder of your own lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction if < 1; default: all)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8, help="default 8")
    p.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int, default=None,
                   help="few-shot examples (default: each task's own)")
    p.add_argument("--bootstrap-iters", "--bootstrap_iters", dest="bootstrap_iters", type=int, default=100_000,
                   help="lm-eval's bootstrap resamples for the stderrs it cannot compute in closed form "
                        "(default 100000; 0: none, no worker processes)")
    p.add_argument("--device", default="cpu", help="torch device for both models (default cpu; e.g. cuda)")
    return cli.command(p, list(sys.argv[1:] if argv is None else argv), _main)


def _main(args, _config=None) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        record = evaluate(args.workdir, args.student, tasks, teacher=args.teacher, include_path=args.include_path,
                          limit=limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot, device=args.device,
                          bootstrap_iters=args.bootstrap_iters)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {Path(args.workdir) / RESULTS_FILE} is unchanged", file=sys.stderr)
        return 130
    except ImportError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(record["rows"]))
    print(f"written to {Path(args.workdir) / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    cli.exit(main())
