"""The end of a run: run_summary.json (what the model card reports) and the table printed last."""

from __future__ import annotations

import datetime
import os
import resource
from typing import Mapping, Optional

import jax

from distil_jax import hf, models
from distil_jax.training.metrics import peak_device_memory
from distil_jax.versions import package_versions


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def summary(run, evaluations: Mapping, totals: Mapping, last: dict) -> dict:
    """run_summary.json: models, data, evaluations, resources (`totals`: over every session),
    the last logged metrics."""
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
           # What the loss was computed on: every token, or the assistant turns / completion.
           "row_shape": run.data_stats["row_shape"], "loss_on": run.data_stats["loss_on"],
           "train": run.data_stats["train"], "test": run.data_stats["test"]},
        "evaluation": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                       for k, v in evaluations.items()},
        "resources": _resources(totals),
        "steps": run.total_steps,
        "final_metrics": last,
        "versions": package_versions(),
        "finished_at": now(),
    }


def _resources(totals: Mapping) -> dict:
    return {
        "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "peak_memory_bytes": peak_device_memory(),
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cpus": os.cpu_count(), "host_ram_bytes": _host_ram(),
        "wall_time_s": totals["wall_time_s"],
        "tokens_per_s": (totals["train_tokens"] / totals["train_time_s"]
                         if totals["train_time_s"] > 0 else None),
        "train_tokens": int(totals["train_tokens"]),
    }


def _host_ram() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        return None


def print_table(summary: Mapping) -> None:
    """Teacher, student at start and at end: held-out perplexities, sizes, eval speed."""
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
