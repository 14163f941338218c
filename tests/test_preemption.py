"""The command's SIGTERM handlers in forked workers: a pool ends its workers with SIGTERM, and a
worker forked under a handler must die of it quietly, not raise `Terminated` or keep running."""

import multiprocessing
import os
import signal
import time

from distil_jax import preemption


def _wait_for_sigterm():
    time.sleep(30)
    os._exit(0)  # reached only if SIGTERM did not end the worker


def _fork_and_terminate():
    worker = multiprocessing.get_context("fork").Process(target=_wait_for_sigterm)
    worker.start()
    time.sleep(0.2)
    worker.terminate()  # SIGTERM
    worker.join(10)
    return worker.exitcode


def test_a_forked_worker_dies_of_sigterm_under_the_command_handler(capfd):
    with preemption.sigterm_unwinds():
        assert _fork_and_terminate() == -signal.SIGTERM
    assert "Terminated" not in capfd.readouterr().err


def test_a_forked_worker_dies_of_sigterm_under_the_loops_notice():
    with preemption.Notice() as notice:
        assert _fork_and_terminate() == -signal.SIGTERM
        assert not notice.received  # the parent got no notice


def test_the_command_itself_still_unwinds():
    with preemption.sigterm_unwinds():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except preemption.Terminated:
            pass
        else:
            raise AssertionError("SIGTERM did not raise Terminated in the command's process")
