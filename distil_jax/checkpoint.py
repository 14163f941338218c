"""Orbax checkpoints of a run: the train state and the data iterator's position.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. `state` is the TrainState as a plain dict
(step, params = {"student", "objective"}, opt_state, rng); `data` is the BatchIterator state
(JSON). Orbax writes each step to a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. The teacher is never checkpointed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir).resolve() / "checkpoints"


def manager(workdir: str | os.PathLike, max_to_keep: Optional[int] = None, create: bool = True,
            save_steps: int = 0, asynchronous: bool = False) -> ocp.CheckpointManager:
    """The run's CheckpointManager. `save_steps` > 0: `mngr.should_save(step)` says yes every
    that many steps, and at the step jax's preemption service names in a multi-process run
    (orbax's own policies). The interval is given as `should_save_fn`, not
    `save_interval_steps`, because the latter also adds orbax's InitialSavePolicy (a checkpoint at
    the first step of a fresh run) that nothing here needs. `asynchronous`: `save` returns once the
    arrays are copied off the devices; the files are written in the background, committed by a
    rename (a kill mid-write keeps the previous checkpoint)."""
    interval = int(save_steps)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, enable_async_checkpointing=asynchronous,
        should_save_fn=lambda step, _last: interval > 0 and step % interval == 0)
    # Explicit handlers, so metadata and restores work in a fresh process before any save.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def state_to_dict(state) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def save(mngr: ocp.CheckpointManager, state, data_state: Mapping[str, int], step: Optional[int] = None,
         wait: bool = True) -> None:
    """Save `state` (device arrays, sharded however they are: each process writes its shards) and
    the data position as checkpoint `step` (default: the state's own). `wait`: return once the
    step is committed (so a kill after this keeps it); otherwise an asynchronous manager
    finishes it in the background (`mngr.wait_until_finished()`)."""
    if step is None:
        step = int(jax.device_get(state.step))
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_to_dict(state)),
        data=ocp.args.JsonSave(dict(data_state))), force=True)
    if wait:
        mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, like_state) -> tuple[Any, dict]:
    """Restore (state, data_state) at `step` into the structure and shardings of `like_state`.

    A checkpoint whose parameter shapes differ from `like_state`'s (another config) is refused.
    """
    from distil_jax import models

    target = state_to_dict(like_state)
    meta = mngr.item_metadata(step)["state"]
    refuse_old_layouts(getattr(meta, "tree", meta)["params"], step, mngr.directory)
    # The one shape check of the model interface: the checkpoint's leaves against this config's.
    problems = models.shape_problems(target["params"], getattr(meta, "tree", meta)["params"])
    if problems:
        raise ValueError(
            f"checkpoint step {step} in {mngr.directory} was written by a run with different "
            f"shapes (checkpoint vs this config: {'; '.join(problems[:4])}); use a new --workdir for "
            "a new config, or restore the old config"
        )
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    s = out["state"]
    state = like_state.replace(step=s["step"], params=s["params"], opt_state=s["opt_state"], rng=s["rng"])
    return state, dict(out["data"])


def available_steps(workdir: str | os.PathLike) -> list[int]:
    d = checkpoint_dir(workdir)
    if not d.is_dir():
        return []
    return sorted(manager(workdir, create=False).all_steps())


def restore_params(workdir: str | os.PathLike, step: Optional[int] = None) -> tuple[int, dict]:
    """(step, {"student": ..., "objective": ...}) of the latest (or given) checkpoint, on the host.

    Needs no config: the tree is read as saved. For export and inspection.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    steps = available_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir(workdir)}: run training with --workdir {workdir} first"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                                f"available steps: {steps}")
    mngr = manager(workdir, create=False)
    # Gathered whole onto this process's first device, whatever mesh wrote it: a checkpoint
    # saved sharded over 8 devices exports from a 1-device process.
    meta = mngr.item_metadata(step)["state"]
    refuse_old_layouts(getattr(meta, "tree", meta)["params"], step, mngr.directory)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one),
        getattr(meta, "tree", meta))
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return step, jax.device_get(out["state"]["params"])


def refuse_old_layouts(params: Mapping, step: int, directory) -> None:
    """A ValueError (one line, naming the fix) for a checkpoint whose student is in a layout an
    older distil_jax wrote, which fits no model today: one subtree per block (`h/0/...`,
    `model/layers/0/...`: before the blocks' parameters were stacked on a layer axis,
    `distil_jax.models.stack`), or a leaf with another number of dimensions than its family
    stores now (GPT-2's fused c_attn [L, D, 3D] before it was stored [L, D, 3, D],
    `models.stale_layout`)."""
    from distil_jax import models

    def first_numbered(tree, path=()):
        for k, v in tree.items():
            if str(k).isdigit():
                return path + (str(k),)
            if isinstance(v, Mapping) and (found := first_numbered(v, path + (str(k),))):
                return found
        return None

    fix = "export it with the distil_jax version that wrote it, or start a new --workdir"
    student = params.get("student", {})
    found = first_numbered(student)
    if found:
        raise ValueError(
            f"checkpoint step {step} in {directory} has unrolled layers ({'/'.join(found)}/...) "
            "written by an older distil_jax (before the blocks' parameters were stacked on a "
            f"layer axis); {fix}")
    stale = models.stale_layout(student)
    if stale:
        raise ValueError(f"checkpoint step {step} in {directory} stores the student's {stale}: a "
                         f"layout written by an older distil_jax; {fix}")
