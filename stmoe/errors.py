"""What a user is told when a run cannot start or stops early: exit statuses, the user errors, one line.

Convention: a bad input (config field, missing or incompatible checkpoint, unknown task, empty input
file) prints ONE line on stderr, `<script>: <what> error: <message>` (`fail`), and the script exits
with status 2 (USAGE_ERROR). A run stopped by non-finite steps (TrainingDiverged) prints one such
line and exits with status 3, its checkpoints kept. A run stopped by SIGINT / SIGTERM saves a
checkpoint and exits with 128 + the signal number (130 / 143, the shell's convention), so
`train.py && next` does not go on with an unfinished run. A crash in the computation itself keeps
its traceback (status 1).

USER_ERRORS are the errors the trainer raises for a bad input (`error_kind` names which); the
checkpoint and workdir ones are defined here, beside ConfigError's (stmoe.config), so that this
module, stmoe.cli and every script's error path import neither jax nor orbax. stmoe.checkpoints
raises them and re-exports them (`checkpoints.WorkdirError`, ...), as stmoe.trainer re-exports
USER_ERRORS, error_kind and TrainingDiverged and stmoe.cli the exit statuses, UsageError and fail.
"""
from __future__ import annotations

import re
import sys

from stmoe.config import ConfigError

USAGE_ERROR = 2
TRAINING_DIVERGED = 3  # non-finite steps stopped the run (TrainingDiverged); checkpoints kept
STOPPED_BY_SIGNAL = 128  # + the signal number: 130 SIGINT, 143 SIGTERM; stopped early, checkpoint saved


class UsageError(Exception):
    """A bad input a script reports in one line with exit status 2."""


class TrainingDiverged(RuntimeError):
    """The run stopped because too many steps in a row were non-finite (gradients, update, new params
    or optimizer state; with optim.skip_nonfinite none was applied), or it started from a non-finite
    state."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint step could be restored."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint's parameters do not fit the model config (the message lists the differences)."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (the message names the step and the newest complete one)."""


class WorkdirError(OSError):
    """A run's directory cannot be created or written (the message names it and the reason)."""


# Errors the scripts report in one line with exit status 2: a bad config, a checkpoint of another
# model, a workdir that cannot be written or that another run holds, a checkpoint that could not be
# saved, a workdir whose every checkpoint is damaged.
USER_ERRORS = (ConfigError, IncompatibleCheckpointError, WorkdirError, CheckpointSaveError, CheckpointRestoreError)


def error_kind(error: BaseException) -> str:
    """'config' / 'checkpoint' / 'workdir': the word `fail` puts before 'error:'."""
    if isinstance(error, WorkdirError):
        return "workdir"
    return "config" if isinstance(error, ConfigError) else "checkpoint"


def one_line(error: BaseException) -> str:
    """The informative last line of an error whose text may embed a traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, (KeyError, AttributeError)) and lines:
        # ml_collections: KeyError("'name'\nDid you mean ...?"), repr'd once more by str(): keep the name.
        name = re.split(r"\\n|\n", str(error).strip("\"'"))[0].strip("\"'\\ ")
        return f"unknown config field {name!r}"
    return lines[-1] if lines else type(error).__name__


def fail(program: str, kind: str, error: BaseException | str, status: int = USAGE_ERROR) -> int:
    """Prints `<program>: <kind> error: <one line>` on stderr; returns the exit status (default 2)."""
    message = error if isinstance(error, str) else one_line(error)
    print(f"{program}: {kind} error: {message}", file=sys.stderr, flush=True)
    return status
