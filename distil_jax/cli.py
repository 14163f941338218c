"""The command line shared by `train`, `export` and `record_teacher`: one flag style (argparse:
`--name VALUE` or `--name=VALUE`, words joined by dashes, the underscore spelling accepted
too), `--help` on each, `--config FILE[:ARG]` with `--config.FIELD=VALUE` overrides, and one
logger setup (`logging_to_stderr`).

Every mistake in a config argument is a UsageError naming the argument: an unknown field (with
the closest valid one), a missing or broken config file, a value of the wrong type.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Iterator, Optional

import ml_collections

# Libraries whose INFO lines would drown the run's own.
NOISY_LOGGERS = ("absl", "orbax", "jax._src", "datasets", "httpx", "huggingface_hub")
CONFIG_EPILOG = ("Any config field can be set with --config.FIELD=VALUE (e.g. --config.train.max_steps=100; "
                 "--config.FIELD=None sets it to None). The fields and their meaning: distil_jax/config.py.")


class UsageError(ValueError):
    """A command line that cannot be run: one line saying which argument and the fix."""


def parser(prog: str, description: str, config: bool = False) -> argparse.ArgumentParser:
    """An argparse parser for `python -m distil_jax.PROG`; with `config`, its --config flag."""
    p = argparse.ArgumentParser(prog=f"python -m distil_jax.{prog}", description=description,
                                epilog=CONFIG_EPILOG if config else None, allow_abbrev=False)
    if config:
        p.add_argument("--config", metavar="FILE[:ARG]", required=True,
                       help="a configs/*.py file (ARG: its get_config argument, e.g. configs/tiny.py:test)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, Optional[ml_collections.ConfigDict]]:
    """(arguments, config or None): `--config.FIELD=VALUE` overrides are set aside for the
    config; everything else goes to argparse (which exits 0 after --help, 2 on a usage error)."""
    overrides = [a for a in argv if a.startswith("--config.")]
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    if getattr(args, "config", None) is None:
        if overrides:
            p.error("--config.FIELD=VALUE needs --config FILE")
        return args, None
    return args, load_config(args.config, overrides)



def command(p: argparse.ArgumentParser, argv: list[str], run) -> int:
    """A command's whole life: parse `argv` (without the program name) with `p`, then
    `run(args, config)` with distil_jax's log on stderr and the signals of `preemption`
    (SIGTERM unwinds, Ctrl-C is never lost);
    returns the exit status (argparse's 0 after --help or 2 on a usage error; 2 on a bad
    --config argument; else what `run` returns)."""
    try:
        args, config = parse(p, argv)
    except SystemExit as e:  # --help (0) or a usage error (2, printed by argparse)
        return int(e.code or 0)
    except ValueError as e:  # a UsageError, or an unknown --config.FIELD
        print(f"error: {e}", file=sys.stderr)
        return 2
    from distil_jax import preemption  # imports jax: not at import time

    with logging_to_stderr(), preemption.sigterm_unwinds(), preemption.ctrl_c_kept():
        return run(args, config)

def load_config(spec: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """The config of `--config SPEC` with `--config.FIELD=VALUE` overrides applied. `=None` sets
    the field to None (validation then says whether the field may be None)."""
    from absl import flags
    from ml_collections import config_flags

    from distil_jax import config as config_lib

    # Unknown fields first, with the schema's did-you-mean: ml_collections only says "'nope'".
    nones = []
    for arg in overrides:
        field, _, value = arg[len("--config."):].partition("=")
        config_lib.check_field_path(field)
        if value == "None":
            nones.append(field)
    if not Path(spec.split(":", 1)[0]).is_file():
        raise UsageError(f"config file {spec.split(':', 1)[0]} not found; pass an existing file, e.g. "
                         "--config configs/tiny.py")
    argv = ["distil_jax", f"--config={spec}", *(a for a in overrides if not a.endswith("=None"))]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
        config = fv.config
        config.to_dict()  # a file that failed to load raises here, not while parsing
    except flags.Error as e:
        raise UsageError(str(e).strip().splitlines()[0]) from None
    except SyntaxError as e:
        raise UsageError(f"config file {e.filename or spec}: invalid Python at line {e.lineno}: {e.msg}; "
                         "fix the file") from None
    except Exception as e:  # raised by the config file's get_config, or by an override
        first = str(e).strip().splitlines()
        raise UsageError(f"cannot load --config {spec}: {type(e).__name__}: {first[0] if first else ''}; "
                         "pass a file whose get_config() returns the config") from None
    for field in nones:
        *sections, key = field.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[key] = None
    return config


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
def logging_to_stderr() -> Iterator[None]:
    """distil_jax's INFO messages on stderr for the length of a command, the libraries' quieted
    to warnings. Its own handler, not the root logger's: importing orbax already gave the root a
    WARNING-level handler, and a library must not leave handlers behind when a `main` is called
    in-process."""
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
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


def exit(code: int) -> None:  # noqa: A001 (the command's exit, as sys.exit)
    """End the process of a `python -m distil_jax.X` command with `code`. After Ctrl-C or
    SIGTERM (130, 143) the interpreter's teardown is skipped: XLA's compiler threads may still
    be running (the signal can land mid-compilation), and finalizing Python under them
    segfaults. Everything worth keeping is written by then (the command's own cleanup ran)."""
    if code in (130, 128 + signal.SIGTERM):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
