"""Where a training run starts: `restore_or_init` returns the state and its origin.

Sources, in order of precedence:

  Origin.OWN_CHECKPOINT    the workdir's own newest readable checkpoint (full state + data position);
                           a rerun of a stopped command lands here
  Origin.RESUME_FROM       config.resume_from: another run's checkpoint, full state + data position
  Origin.INIT_CHECKPOINT   config.init_checkpoint: a pretrained run's params (fine-tuning), a fresh
                           optimizer state unless reset_optimizer_state=False
  Origin.SCRATCH           a fresh init from config.seed

A checkpoint of another architecture, or a data position of another input stream, stops the run
with one line (IncompatibleCheckpointError / ConfigError) before any step. Damaged newer steps are
skipped and set aside as '<step>.damaged'; a step whose save never completed is deleted by orbax.
Each such event is one line in `Start.notes`.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from stmoe import checkpoints
from stmoe.config import ConfigError, RunConfig


class Origin(enum.Enum):
    OWN_CHECKPOINT = "its own checkpoint"
    RESUME_FROM = "resume_from"
    INIT_CHECKPOINT = "init_checkpoint"
    SCRATCH = "scratch"


@dataclasses.dataclass
class Start:
    state: Any  # the train state (stmoe.steps.TrainState), sharded as the layout asks
    origin: Origin
    step: int  # the optimizer step the run continues from
    source: str  # the directory it came from ("" from scratch)
    notes: list[str]  # one line per skipped / damaged / continued item, for the log

    def describe(self) -> str:
        if self.origin is Origin.OWN_CHECKPOINT:
            return f"its own checkpoint at step {self.step}"
        if self.origin is Origin.RESUME_FROM:
            return f"{self.source} at step {self.step}"
        if self.origin is Origin.INIT_CHECKPOINT:
            return f"params of {self.source}"
        return "scratch"


def restore_or_init(run: RunConfig, ckpt: checkpoints.Checkpointer, abstract_state: Any,
                    init: Callable[[], Any], train_iter: Any) -> tuple[Start, checkpoints.Checkpointer]:
    """The run's starting state, and the checkpointer to save with (a new one when damaged steps were
    set aside). `abstract_state` carries the shardings to restore into; `init()` makes a fresh state;
    `train_iter` is moved to the checkpoint's data position when the full state is restored."""
    model_fields = run.model.to_dict()
    notes: list[str] = []
    unfinished = ckpt.unfinished_steps()
    start = None
    if ckpt.latest_step() is not None:
        _check_own_checkpoints(ckpt, abstract_state.params, model_fields)
        try:
            state, data_state, step = ckpt.restore(abstract_state)  # warns and falls back past damaged steps
        except checkpoints.CheckpointRestoreError as e:
            raise checkpoints.CheckpointRestoreError(
                f"{e}; move {ckpt.directory} aside (or use another --workdir) to start from scratch, or put "
                "back an intact copy to resume") from None
        except checkpoints.IncompatibleCheckpointError as e:
            raise checkpoints.IncompatibleCheckpointError(f"{e}; {_RESET_OPTIMIZER}") from None
        notes.append(_restore_data_position(train_iter, data_state))
        skipped = list(ckpt.skipped)
        if skipped:  # newer steps were damaged: set them aside, keep their files
            directory, keep = ckpt.directory, ckpt.max_to_keep
            ckpt.close()
            _set_aside_steps(directory, [s for s, _ in skipped])
            ckpt = checkpoints.Checkpointer(directory, max_to_keep=keep)
            notes += [f"skipped checkpoint step {s}: damaged ({reason}); moved to {directory}/{s}.damaged"
                      for s, reason in skipped]
        unfinished = [s for s in unfinished if s > step]
        start = Start(state, Origin.OWN_CHECKPOINT, step, ckpt.directory, notes)
    elif run.resume_from:
        with checkpoints.Checkpointer(run.resume_from, async_save=False) as other:
            _check_own_checkpoints(other, abstract_state.params, model_fields)
            state, data_state, step = other.restore(abstract_state)
        notes.append(_restore_data_position(train_iter, data_state))
        start = Start(state, Origin.RESUME_FROM, step, run.resume_from, notes)
    notes += [f"skipped checkpoint step {s}: its save never completed (cut off by a kill or a crash); "
              f"its partial files are deleted" for s in unfinished]
    if start is None:
        state = init()
        if run.init_checkpoint:
            state = _from_init_checkpoint(run, state, abstract_state, model_fields)
            start = Start(state, Origin.INIT_CHECKPOINT, 0, run.init_checkpoint, notes)
        else:
            start = Start(state, Origin.SCRATCH, 0, "", notes)
    start.notes = [note for note in notes if note]
    return start, ckpt


_RESET_OPTIMIZER = ("resume with the optim settings that wrote them, or keep their params with a fresh optimizer "
                    "state: --config.init_checkpoint=WORKDIR --workdir NEW_WORKDIR")


def check_own_config(run: RunConfig, workdir: str) -> None:
    """Before anything is written to `workdir`: a run that resumes its own checkpoints with another
    optimizer would fail to restore them (its state has other slots). Compares the optimizer of the
    workdir's config.json with the config's and raises ConfigError naming both and how to reset it.
    Does nothing without checkpoints or a readable config.json (the restore then decides)."""
    import json

    from etils import epath

    if "://" not in workdir:
        directory = os.path.join(workdir, "checkpoints")
        if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
            return
    try:
        saved = json.loads(epath.Path(workdir, "config.json").read_text())
        saved_optimizer = saved["optim"]["optimizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if saved_optimizer != run.optim.optimizer:
        raise ConfigError(
            f"optim.optimizer: {run.optim.optimizer!r}, but the checkpoints in {workdir} were written with "
            f"{saved_optimizer!r}, whose state cannot be resumed by another optimizer; "
            + _RESET_OPTIMIZER.replace("WORKDIR", workdir))


def _from_init_checkpoint(run: RunConfig, state: Any, abstract_state: Any, model_fields: Mapping[str, Any]) -> Any:
    """Fine-tuning: the pretrained params (a scanned / unscanned layout is converted), with a fresh
    optimizer state, or (reset_optimizer_state=False) its full state at step 0."""
    if run.reset_optimizer_state:
        params = checkpoints.restore_params(run.init_checkpoint, abstract_state.params, model_config=model_fields)
        return state.replace(params=params)
    try:
        directory = checkpoints.check_compatible(run.init_checkpoint, abstract_state.params,
                                                 model_config=model_fields, convert_layout=False)
    except checkpoints.IncompatibleCheckpointError as e:
        raise checkpoints.IncompatibleCheckpointError(
            f"init_checkpoint: {e}" + ("; set reset_optimizer_state=True to read its params only"
                                       if "optimizer state" in str(e) else "")) from None
    step_dir = os.path.dirname(directory)  # .../checkpoints/<step>/state
    with checkpoints.Checkpointer(os.path.dirname(step_dir), async_save=False) as other:
        restored, _, _ = other.restore(abstract_state, step=int(os.path.basename(step_dir)))
    return restored.replace(step=jnp.zeros((), jnp.int32))


def _set_aside_steps(directory: str, steps: Sequence[int]) -> None:
    """Renames damaged step directories to '<step>.damaged' so that new saves can use the step."""
    from etils import epath
    if jax.process_index() == 0:
        for step in steps:
            path = epath.Path(directory) / str(step)
            target = epath.Path(directory) / f"{step}.damaged"
            if target.exists():
                target.rmtree()
            path.rename(target)
            logging.warning("stmoe: damaged checkpoint step %d moved to %s", step, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("stmoe_set_aside_damaged_steps")


def _check_own_checkpoints(ckpt: checkpoints.Checkpointer, abstract_params: Any,
                           model_fields: Mapping[str, Any]) -> None:
    """Before a full-state restore: the newest step whose metadata reads must have the config's
    parameter names and shapes, else one line (IncompatibleCheckpointError) instead of every step
    failing to restore. Unreadable steps are left to Checkpointer.restore (it skips them)."""
    for step in reversed(ckpt.all_steps()):
        step_dir = os.path.join(ckpt.directory, str(step))
        try:
            checkpoints.check_compatible(step_dir, abstract_params, model_config=model_fields,
                                         convert_layout=False)
        except checkpoints.IncompatibleCheckpointError as e:
            raise checkpoints.IncompatibleCheckpointError(
                f"{e}; resume with the config that wrote it, or use another --workdir "
                f"(to fine-tune from it: init_checkpoint)") from None
        except Exception:  # noqa: BLE001 - damaged metadata: try the next older step
            continue
        return


def _restore_data_position(train_iter: Any, data_state: Mapping[str, Any]) -> str:
    """Moves the train iterator to a checkpoint's data position; -> a note ("" if nothing to say).
    Another input stream (task, lengths, seed, packing) is a ConfigError; another batch size or host
    count is continued (stmoe.data.pipeline) and the note says how."""
    from stmoe.data import pipeline
    if not data_state or not ("sequences" in data_state or "step" in data_state):
        return "the checkpoint holds no data position: the input stream starts from its beginning"
    try:
        return train_iter.set_state(data_state)
    except pipeline.StreamMismatchError as e:
        raise ConfigError(f"data: {e}; restore those data settings to resume, or use another --workdir") from None
