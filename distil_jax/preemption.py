"""The signals a run answers. Ctrl-C is never lost (`ctrl_c_kept`, `check_ctrl_c`); SIGTERM
outside the training loop unwinds the command (`sigterm_unwinds`); inside it:

SIGTERM, the notice a scheduler sends before it stops a job (SLURM before a time limit or a
preemption, Kubernetes on eviction, a spot or preemptible VM): the training loop asks
`Notice.reached(step)` after every step, and once it says yes the run checkpoints and exits
instead of losing the steps since its last checkpoint to the SIGKILL that follows.

One process: a Python handler for SIGTERM, installed for the length of the loop only (before
it, nothing is worth saving and SIGTERM stops the process as usual).

Several processes (`jax.distributed`): every process must save the same step, though the
signal may reach only one of them, or each at another step. jax's preemption service (on by
default; `jax_enable_preemption_service`) catches SIGTERM on each process, shares the notice
through the coordination service and names one step that every process reaches: orbax's
`CheckpointManager.reached_preemption(step)` is True there, on every process alike (and its
`should_save(step)` too). Orbax cannot serve one process: without `jax.distributed` there is
no preemption service (its `reached_preemption` is then always False), hence the flag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

import jax

log = logging.getLogger(__name__)


def _forked_child_dies(signum: int, owner: int) -> bool:
    """In a process forked while a handler below was installed (a multiprocessing or datasets
    worker), SIGTERM does what it does by default: pools end their workers with it, and a
    worker must neither print a `Terminated` traceback nor ignore it. True if it was that."""
    if os.getpid() == owner:
        return False
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return True


class Notice:
    """A context manager for the training loop; `reached(step)` once per step, on every process.
    `mngr`: the run's orbax CheckpointManager (asked in a multi-process run)."""

    def __init__(self, mngr=None):
        self.mngr = mngr
        self.received = False
        self._previous = None
        self._service = False
        self._owner = os.getpid()

    def __enter__(self) -> "Notice":
        self._service = jax.distributed.is_initialized()
        # signal.signal works only in the main thread; a loop run elsewhere (a test harness's
        # worker thread) keeps the process's SIGTERM behaviour.
        if not self._service and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if _forked_child_dies(signum, self._owner):
            return
        # Only a flag: the step in flight finishes, and the loop saves at its next boundary.
        self.received = True

    def reached(self, step: int) -> bool:
        """True at the step whose state the run should save before it exits (the same step on
        every process)."""
        if self._service and self.mngr is not None:
            return bool(self.mngr.reached_preemption(step))
        return self.received


_interrupted = threading.Event()


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_kept() -> Iterator[None]:
    """For the length of a command: Ctrl-C raises KeyboardInterrupt as usual and is also
    remembered, so that `check_ctrl_c` raises it again at the next step when the first one was
    swallowed (Python drops an exception raised inside a gc callback, such as jax's, with an
    "Exception ignored" line, and the run would go on). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


def check_ctrl_c() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed under `ctrl_c_kept` (the loop asks after
    every step)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


class Terminated(BaseException):
    """SIGTERM outside the training loop (whose own handler checkpoints first): the command
    unwinds like Ctrl-C, releasing its workdir lock and removing half-written files."""


_command_pid = os.getpid()


def _raise_terminated(signum, frame):
    if not _forked_child_dies(signum, _command_pid):
        raise Terminated()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """For the length of a command, SIGTERM raises `Terminated` instead of killing the process
    mid-write (the training loop installs its own handler inside this one). Only in the main
    thread: signal handlers cannot be set elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _command_pid
    _command_pid = os.getpid()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

