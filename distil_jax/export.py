"""Export a run's student as a Hugging Face model folder with its model card; optionally push it.

    python -m distil_jax.export --workdir DIR --out OUT [--step N] [--dtype float32|bfloat16]
                                [--push-to-hub REPO_ID [--private] [--revision BRANCH]]

OUT is a complete `transformers` folder: config.json (the family's class, e.g. GPT2LMHeadModel or
LlamaForCausalLM), model.safetensors,
generation_config.json, the teacher's tokenizer files, README.md (the model card, generated
from the run's records by `distil_jax.modelcard`, with the downstream results of
`distil_jax.evaluate` when the workdir has them) and distil_jax_export.json (the files this
export wrote). It is written atomically: OUT appears complete or not at all. An existing OUT is
replaced only when it is empty or an earlier export holding nothing but the files its
distil_jax_export.json lists; anything else there is refused, never deleted.

`--push-to-hub` uploads OUT after it is written (creating the repo if needed) with the token that
huggingface_hub finds itself (HF_TOKEN, or the one saved by `hf auth login`); without a token or a
network the push fails with a one-line error and OUT stays as written.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import cli, fsio, hf, models, preemption
from distil_jax.config import DTYPES
from distil_jax.evaluate import RESULTS_FILE
from distil_jax.modelcard import model_card, teacher_of
from distil_jax.versions import package_versions

log = logging.getLogger("distil_jax.export")  # not __name__: "__main__" under python -m

_MODEL_FILES = ("config.json", "model.safetensors")
# The record of what an export wrote; an OUT may be replaced only if it holds nothing else.
MARKER = "distil_jax_export.json"
_WRITTEN = (*_MODEL_FILES, "generation_config.json", "README.md", MARKER)


class PushError(RuntimeError):
    """The push to the hub failed (no token, offline, network or hub error). One line, no token."""


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        log.warning("%s not found (%s): the model card will say it was not recorded", what, path)
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s): %s; the model card will say it was not recorded", what, path, e)
        return {}
    return d if isinstance(d, dict) else {}


def _check_out(workdir: Path, out: Path, run_config: Mapping) -> None:
    """Refuse an OUT whose replacement would destroy the run, one of its inputs (its teacher,
    data, tokenizer: an export over WORKDIR/teacher would make the next resume train against the
    student) or an unrelated folder."""
    from distil_jax import workdir as workdir_lib

    w, o = workdir.resolve(), out.resolve()
    if o == w or o in w.parents:
        raise ValueError(f"--out {out} would replace the workdir {workdir} (or a folder holding it); "
                         "choose another output folder")
    for path in workdir_lib.inputs(w, run_config):
        p = path.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise ValueError(f"--out {out} would overwrite {path}, which the run in {workdir} reads "
                             "or writes; choose an output folder outside the workdir's entries and "
                             "the run's teacher, tokenizer and data")
    if o.exists() and not o.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose a new or empty folder")
    foreign = _not_written_by_export(o) if o.exists() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"--out {out} holds files an export did not write ({shown}); refusing to "
                         "replace them: choose a new or empty folder, or move them out")


def _not_written_by_export(folder: Path) -> list[str]:
    """The entries of `folder` (relative paths) that no export wrote: all of them unless its
    MARKER lists the files an earlier export wrote; [] for an empty folder."""
    try:
        listed = set(json.loads((folder / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    parents = {Path(f).parent.as_posix() for f in listed}
    entries = sorted(folder.rglob("*"))
    return [rel + ("/" if p.is_dir() else "") for p in entries
            if (rel := p.relative_to(folder).as_posix()) not in
            (parents if p.is_dir() and not p.is_symlink() else listed)]


def _check_params(config, params: Mapping, workdir: Path, step: int) -> None:
    problems = models.shape_problems(models.param_shapes(config), params)
    if problems:
        raise ValueError(
            f"the student of checkpoint step {step} in {workdir} does not match "
            f"{workdir / 'student' / 'config.json'}: " + "; ".join(problems[:6]))


def export(workdir: str | Path, out: str | Path, step: Optional[int] = None, dtype: str = "float32",
           *, model_name: Optional[str] = None) -> Path:
    """Write the student of `workdir`'s checkpoint (the latest, or `step`) to the HF folder `out`.

    Args:
      workdir: a training run's workdir (config.json, student/, tokenizer/, checkpoints/,
        run_summary.json; evals_downstream.json if `distil_jax.evaluate` ran).
      out: the output folder: created, or replaced if it is empty or holds an earlier export and
        nothing else (MARKER lists what that export wrote).
      step: the checkpoint step (default: the latest).
      dtype: "float32" (the master weights, exactly) or "bfloat16" (half the size).
      model_name: the name in the card's title and loading snippet (default: the folder name).

    Returns:
      `out` as a Path.

    Raises:
      FileNotFoundError: no workdir, no checkpoint in it (train first), no such step (the message
        lists the available ones), no student config or tokenizer.
      ValueError: an unknown dtype, an `out` that would replace the run or one of its inputs, or
        files an export did not write; a checkpoint that does not match the student's config.
    """
    import transformers

    workdir, out = Path(workdir), Path(out)
    run_config = _check_workdir(workdir, out, step, dtype)
    config = hf.load_config(workdir / "student")
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "tokenizer")
    step, params = _student_params(workdir, step, config)
    info = _facts(config, params, step, dtype)
    summary = _read_json(workdir / "run_summary.json", "the run summary")
    info["teacher_license"] = hf.teacher_license(teacher_of(summary, run_config))
    downstream = _read_json(workdir / RESULTS_FILE, "the downstream evaluation") \
        if (workdir / RESULTS_FILE).exists() else {}  # optional: only after distil_jax.evaluate
    card = model_card(summary, run_config, export=info, downstream=downstream,
                      model_name=model_name or out.resolve().name)
    files = {**_tokenizer_files(tokenizer), "README.md": card}
    files[MARKER] = json.dumps({"written_by": "distil_jax.export", "step": int(step),
                                "files": sorted({*_WRITTEN, *files})}, indent=2) + "\n"
    hf.save_pretrained(config, params, out, dtype=DTYPES[dtype], extra_files=files)
    log.info("exported the student of step %d (%s params, %s) from %s to %s", step, f"{info['params']:,}",
             dtype, workdir, out)
    return out


def _check_workdir(workdir: Path, out: Path, step: Optional[int], dtype: str) -> dict:
    """The run's config, once the workdir, the step, `dtype` and `out` are known to be usable."""
    from distil_jax import checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist (or is not a folder); pass the "
                                "--workdir of a training run")
    steps = checkpoint.available_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in workdir {workdir} (nothing in {workdir / 'checkpoints'}): run training "
            f"first, e.g. python -m distil_jax.train --config CONFIG.py --workdir {workdir}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}; available steps: "
                                f"{', '.join(map(str, steps))}")
    run_config = _read_json(workdir / "config.json", "the run's config")
    _check_out(workdir, out, run_config)
    if not (workdir / "student" / "config.json").exists():
        raise FileNotFoundError(f"no student config in {workdir / 'student'} (config.json): this "
                                "workdir was not written by distil_jax.train")
    if not (workdir / "tokenizer").is_dir():
        raise FileNotFoundError(f"no tokenizer in {workdir / 'tokenizer'}: this workdir was not "
                                "written by distil_jax.train")
    return run_config


def _student_params(workdir: Path, step: Optional[int], config) -> tuple[int, dict]:
    """(step, the student's parameters as numpy arrays) of the checkpoint, checked against `config`."""
    from distil_jax import checkpoint

    step, tree = checkpoint.restore_params(workdir, step)
    if not isinstance(tree, Mapping) or "student" not in tree:
        raise ValueError(f"checkpoint step {step} in {workdir} holds no student parameters")
    params = jax.tree_util.tree_map(np.asarray, tree["student"])
    _check_params(config, params, workdir, step)
    return step, params


def _facts(config, params: Mapping, step: int, dtype: str) -> dict:
    """This export's facts, for the card (see distil_jax.modelcard)."""
    n_params = models.param_count(config)  # HF's count: the stored vocabulary padding is cut
    return {
        "step": int(step),
        "dtype": dtype,
        "params": int(n_params),
        "weight_bytes": int(n_params * jnp.dtype(DTYPES[dtype]).itemsize),
        "student_config": hf.config_to_hf(config).to_dict(),
        "versions": package_versions(),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files `tokenizer.save_pretrained` writes, by relative path: saved once to a scratch
    folder so that the export knows (and MARKER lists) every file it writes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.relative_to(tmp).as_posix(): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}


def _one_line(e: BaseException, secret: Optional[str]) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    text = msg[0] if msg else type(e).__name__
    return text.replace(secret, "***") if secret else text


def push_to_hub(out: str | Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                token: Optional[str] = None, *, endpoint: Optional[str] = None,
                commit_message: Optional[str] = None) -> str:
    """Upload the exported folder `out` to the hub model repo `repo_id` (created if needed).

    token: default huggingface_hub's own resolution (HF_TOKEN, then the saved login). revision: a
    branch, created if needed (default: main). endpoint: default huggingface_hub's (HF_ENDPOINT).
    Returns the commit URL. Raises PushError (one line, never containing the token) when there is
    no token, the hub is offline or unreachable, or it refuses; `out` is never modified.
    """
    import huggingface_hub
    from huggingface_hub import constants

    out = Path(out)
    if not all((out / f).exists() for f in _MODEL_FILES):
        raise FileNotFoundError(f"{out} is not an exported model folder (no config.json + model.safetensors)")
    where = f"the exported folder is intact at {out}"
    if constants.is_offline_mode():
        raise PushError(f"cannot push to {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE); "
                        f"unset it to push; {where}")
    token = token or huggingface_hub.get_token()
    if not token:
        raise PushError(f"cannot push to {repo_id}: no Hugging Face token (set HF_TOKEN or run "
                        f"`hf auth login`); {where}")
    card = out / "README.md"
    if card.exists() and token in card.read_text(encoding="utf-8", errors="replace"):
        raise PushError(f"refusing to push {out}: its README.md contains the hub token")
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=url.repo_id, folder_path=out, revision=revision, repo_type="model",
            commit_message=commit_message or f"Upload distil_jax student ({out.name})")
    except Exception as e:  # network, auth, hub errors: one line, token scrubbed
        raise PushError(f"could not push {out} to {repo_id}: {_one_line(e, token)}; {where}") from None
    log.info("pushed %s to %s", out, info.commit_url)
    return info.commit_url


def main(argv: Optional[list[str]] = None) -> int:
    p = cli.parser("export", "Export a training run's student to a Hugging Face model folder "
                   "(safetensors, config, tokenizer, model card), and optionally push it to the hub.")
    p.add_argument("--workdir", required=True, help="the training run's workdir")
    p.add_argument("--out", required=True, help="the output folder (created or replaced)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights' dtype in model.safetensors (default: float32)")
    p.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", metavar="REPO_ID", default=None,
                   help="upload OUT to this hub model repo (created if needed)")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p.add_argument("--revision", metavar="BRANCH", default=None,
                   help="hub branch to push to (created if needed; default main)")
    return cli.command(p, list(sys.argv[1:] if argv is None else argv), _main)


def _main(args, _config=None) -> int:
    if (args.private or args.revision) and not args.push_to_hub:
        print("error: --private and --revision need --push-to-hub", file=sys.stderr)
        return 2
    try:
        out = export(args.workdir, args.out, step=args.step, dtype=args.dtype,
                     model_name=args.push_to_hub)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full target
        print(f"error: {fsio.describe_os_error(e, 'choose a writable --out')}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, preemption.Terminated) as e:
        what = "stopped by SIGTERM" if isinstance(e, preemption.Terminated) else "interrupted"
        print(f"\n{what}: {args.out} is unchanged (the export writes it only once complete)",
              file=sys.stderr)
        return 143 if isinstance(e, preemption.Terminated) else 130
    print(f"exported to {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision)
        except (PushError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    cli.exit(main())
