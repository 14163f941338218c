"""What a run measures: the metrics writer (metrics.jsonl + TensorBoard), the step timer, the
buffer of step metrics that stay on the device until a log or save step, and peak memory."""

from __future__ import annotations

import collections
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Mapping, Optional

import jax
import numpy as np

from distil_jax import fsio

log = logging.getLogger("distil_jax")

GRAD_NORM_WINDOW = 16  # grad norms in grad_norm_var (Distily's)


def peak_device_memory() -> Optional[int]:
    """The largest peak_bytes_in_use over this process's devices (None where not reported)."""
    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def grad_norm_variance(grad_norms) -> Optional[float]:
    """Distily's grad_norm_var: the sample variance (statistics.variance) of the last
    GRAD_NORM_WINDOW grad norms, None until that many exist."""
    if len(grad_norms) < GRAD_NORM_WINDOW:
        return None
    return statistics.variance(list(grad_norms)[-GRAD_NORM_WINDOW:])


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



class NotFinite(FloatingPointError):
    """A step's loss or gradient norm is NaN or infinite (`step`: the first such step)."""

    def __init__(self, step: int, what: str):
        super().__init__(what)
        self.step, self.what = step, what


class StepMetrics:
    """The step metrics since the last flush, kept on the device (one host sync per flush).

    `flush()` fetches them, checks that every step's loss and gradient norm are finite (else
    NotFinite), adds their tokens to the run's totals and returns what a log line reports. The
    first step of a session (its compilation) counts in the tokens, not in tokens/s."""

    def __init__(self, timer: "StepTimer", grad_norms=()):
        self.timer = timer
        self.grad_norms = collections.deque(grad_norms, maxlen=GRAD_NORM_WINDOW)
        self.pending: list[tuple[int, dict]] = []  # (step, device metrics)
        self.untimed: set[int] = set()  # steps whose time is not training time
        self.tokens = self.time_s = 0.0  # this session's totals

    def add(self, step: int, metrics, timed: bool = True) -> None:
        self.pending.append((step, metrics))
        if not timed:
            self.untimed.add(step)

    def flush(self) -> dict:
        """Fetch and check the pending steps; {} if none, else the averages of a log record."""
        if not self.pending:
            return {}
        steps, host = zip(*((s, jax.device_get(m)) for s, m in self.pending))
        dt = self.timer.elapsed()
        timed = [m for s, m in zip(steps, host) if s not in self.untimed]
        self.pending, self.untimed = [], set()
        for s, m in zip(steps, host):
            for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
                if not np.isfinite(m[key]):
                    raise NotFinite(s, f"{name} became {m[key]}")
        self.tokens += float(sum(m["tokens"] for m in host))
        self.time_s += dt if timed else 0.0
        self.grad_norms.extend(float(m["grad_norm"]) for m in host)
        record = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        # As HF logs them: the last step's clipping norm and the rate its scheduler holds after it.
        record["learning_rate"] = float(host[-1]["learning_rate"])
        record["grad_norm"] = float(host[-1]["grad_norm"])
        var = grad_norm_variance(self.grad_norms)
        if var is not None:
            record["grad_norm_var"] = var
        if timed and dt > 0:
            record["tokens_per_s"] = float(sum(m["tokens"] for m in timed)) / dt
        return record
