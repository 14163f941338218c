"""The training run: `python -m distil_jax.train --config CONFIG.py --workdir DIR [--config.x=y]`.

`train(config, workdir)` does the whole Distily run; its parts live in `distil_jax.training`
(import them from there):

1. `builders`: the run from its config (`build_run`: teacher and tokenizer, student, objective,
   data, optimizer, mesh and step), each piece by a named function the benchmark, the teacher
   cache's recorder and the tests use too;
2. `distil_jax.workdir`: the workdir's lock, a resume's config check, the run's records;
3. `loop`: the session (a step, then the hooks of `hooks`: log, evaluation, checkpoint, SIGTERM's
   stop), its `evaluation` and `metrics` (writer, step timer, peak memory);
4. `report`: run_summary.json (what the model card reports) and the table printed last.

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

import os
import signal
import sys
import traceback

from distil_jax import cli, fsio, preemption
from distil_jax import workdir as workdir_lib
from distil_jax.training.loop import Interrupted, Preempted, train

DESCRIPTION = ("Distill a teacher model into a student (or resume the run in --workdir). Exit status: "
               "0 done, 2 an error, 130 interrupted, 143 stopped by SIGTERM after a checkpoint.")


def main(argv=None) -> int:
    """The command line (`argv[0]`: the program); returns the exit status (0 done, 2 an error,
    130 interrupted, 143 stopped by SIGTERM after a checkpoint)."""
    argv = list(sys.argv if argv is None else argv)
    p = cli.parser("train", DESCRIPTION, config=True)
    p.add_argument("--workdir", required=True, help="the run's directory (created; re-use it to resume)")
    return cli.command(p, argv[1:], lambda args, config: _run(config, args.workdir))


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
    except preemption.Terminated:  # SIGTERM outside the loop (the loop's own handler checkpoints)
        print("\nstopped by SIGTERM outside the training steps (nothing was half-written); run the "
              "same command again to continue from the last checkpoint", file=sys.stderr)
        return 128 + signal.SIGTERM
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
    cli.exit(main())
