"""Checkpoints on orbax's CheckpointManager, and clean exits on preemption.

A checkpoint step holds two items:
  state: the train state (any pytree of jax.Arrays, e.g. a flax struct
         TrainState of step / params / opt_state), saved by every process
         for its own shards (orbax StandardSave, OCDBT + zarr3);
  data:  the input pipeline's position as a small JSON dict (JsonSave), so
         a restart neither repeats nor skips examples.

Orbax writes each step into a temporary directory and renames it when all
files are down, so a save that was cut off never shows up as a step. What it
cannot rule out is a finished step that was damaged later (a disk error, a
partial copy between buckets, a stray `rm`): `Checkpointer.restore` then
warns, naming the step and the error, and falls back to the next older step.

Restoring takes an abstract state whose `jax.ShapeDtypeStruct` leaves carry
the target shardings, so a run saved on one mesh resumes on another (other
device count, other axis sizes) with each process reading only its shards.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterable

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_DATA = "data"


class CheckpointRestoreError(RuntimeError):
    """No checkpoint step could be restored."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint's parameters do not fit the model config (the message lists the differences)."""


class Checkpointer:
    """Save / restore (train state, data iterator state) pairs in a directory.

    Args:
      directory: where the step directories live (local path or gs://...).
      max_to_keep: newest steps kept; older ones are deleted after a save.
      async_save: write in a background thread; `save` returns once the
        arrays are copied off the devices, so training resumes at once.
      save_interval_steps: `save` is a no-op unless `step` is a multiple of
        this (or `force=True`); 1 leaves the cadence to the caller.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 save_interval_steps: int = 1):
        if max_to_keep < 1:
            raise ValueError(f"Checkpointer.max_to_keep={max_to_keep}; must be >= 1")
        if save_interval_steps < 1:
            raise ValueError(f"Checkpointer.save_interval_steps={save_interval_steps}; must be >= 1")
        self.directory = str(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
            # Leftover tmp dirs of saves cut off by a preemption are garbage.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _DATA))

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False,
             wait: bool = False) -> bool:
        """Starts saving `state` and `data_state` as `step`; True if a save started.

        With async saving this returns after the device-to-host copy: do not
        donate or delete `state`'s buffers before that (it is safe afterwards).
        `wait=True` blocks until the step is on disk (e.g. before exiting).
        """
        data_state = {} if data_state is None else dict(data_state)
        saved = self._manager.save(
            int(step),
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardSave(state),
                _DATA: ocp.args.JsonSave(data_state),
            }),
            force=force,
        )
        if wait:
            self.wait()
        return saved

    def latest_step(self) -> int | None:
        """Newest finalized step in the directory (it may still be damaged)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: Any, *, step: int | None = None) -> tuple[Any, dict, int]:
        """Returns (state, data_state, step) restored into `abstract_state`'s shardings.

        `abstract_state` is the train state as a pytree of `jax.ShapeDtypeStruct`
        with `.sharding` set (e.g. `jax.eval_shape` of the init, with shardings
        from partitioning); restored arrays are placed directly in those shardings.

        With `step=None` the newest step is tried first, then older ones, each
        failure logged as a warning; with an explicit `step` only that one.
        Raises FileNotFoundError if there is no checkpoint at all, and
        CheckpointRestoreError if none of the candidates restores.
        """
        self.wait()  # A save still in flight must not be read half-written.
        available = self.all_steps()
        if step is not None:
            if int(step) not in available:
                raise FileNotFoundError(
                    f"Checkpointer.restore: no step {step} in {self.directory}; "
                    f"available: {available}")
            candidates = [int(step)]
        else:
            candidates = sorted(available, reverse=True)
        if not candidates:
            raise FileNotFoundError(f"Checkpointer.restore: no checkpoint in {self.directory}")

        errors = []
        for candidate in candidates:
            try:
                restored = self._manager.restore(
                    candidate,
                    args=ocp.args.Composite(**{
                        _STATE: ocp.args.StandardRestore(abstract_state),
                        _DATA: ocp.args.JsonRestore(),
                    }),
                )
            except Exception as e:  # noqa: BLE001 - any failure means "try an older step".
                # tensorstore errors embed the whole spec: keep the head.
                reason = str(e) if len(str(e)) <= 400 else str(e)[:400] + " ..."
                message = (f"Checkpointer: could not restore step {candidate} from "
                           f"{self.directory}: {type(e).__name__}: {reason}")
                errors.append(message)
                _warn(message + ("; trying an older step" if candidate != candidates[-1] else ""))
                continue
            data_state = restored[_DATA]
            return restored[_STATE], ({} if data_state is None else dict(data_state)), candidate
        raise CheckpointRestoreError(
            f"Checkpointer.restore: no step in {self.directory} could be restored:\n  "
            + "\n  ".join(errors))

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished (and is finalized)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _warn(message: str) -> None:
    # Both: logging for log files and absl handlers, stderr for a person
    # watching a run whose logging is not configured.
    logging.warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- preemption

_ACTIVE_HANDLERS: list["PreemptionHandler"] = []


class PreemptionHandler:
    """Turns SIGTERM / SIGINT into a flag the training loop polls between steps.

    The loop checks `handler.requested` (or `preemption_requested()`) after
    each step; when set, it saves a checkpoint (`wait=True`) and returns
    normally. A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at
    once. Previous handlers come back on `uninstall()` / leaving the `with`.

    On a multi-host TPU slice every host gets the signal at a slightly
    different step; agree on the step to stop at (orbax
    `CheckpointManager.reached_preemption`, or an all-reduce of the flag)
    before saving.
    """

    def __init__(self, callback: Callable[[int], None] | None = None,
                 signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
        self._callback = callback
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._requested = threading.Event()
        self.signum: int | None = None
        self._installed = False

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_preemption_handler: signal handlers can only be "
                               "installed from the main thread")
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._installed = True
        _ACTIVE_HANDLERS.append(self)
        return self

    def uninstall(self) -> None:
        if not self._installed:
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        self._installed = False
        if self in _ACTIVE_HANDLERS:
            _ACTIVE_HANDLERS.remove(self)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self.requested:
            self.uninstall()
            raise KeyboardInterrupt("second SIGINT: exiting without a checkpoint")
        self.signum = signum
        self._requested.set()
        _warn(f"received {signal.Signals(signum).name}: will checkpoint and exit after this step")
        if self._callback is not None:
            self._callback(signum)

    def __enter__(self) -> "PreemptionHandler":
        if not self._installed:
            self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.uninstall()


def install_preemption_handler(callback: Callable[[int], None] | None = None,
                               signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)
                               ) -> PreemptionHandler:
    """Installs a PreemptionHandler now; use it as a context manager to restore.

    `callback(signum)` runs in the main thread inside the signal handler:
    keep it short (set a flag, log); do the checkpointing in the loop.
    """
    return PreemptionHandler(callback, signals).install()


def preemption_requested() -> bool:
    """True once SIGTERM/SIGINT reached any installed PreemptionHandler."""
    return any(h.requested for h in _ACTIVE_HANDLERS)


# ------------------------------------------------------------------ params only (fine-tuning, inference)


def state_dir(path: str) -> str:
    """The saved train state under `path`: a run's workdir, its checkpoints dir (newest step) or one
    step's dir. Raises FileNotFoundError naming `path` when there is none."""
    path = os.path.abspath(path) if "://" not in path else path
    if os.path.basename(path) == _STATE and os.path.isdir(path):
        return path
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(os.path.join(candidate, _STATE)):
            return os.path.join(candidate, _STATE)
        if os.path.isdir(candidate):
            steps = [int(n) for n in os.listdir(candidate)
                     if n.isdigit() and os.path.isdir(os.path.join(candidate, n, _STATE))]
            if steps:
                return os.path.join(candidate, str(max(steps)), _STATE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise FileNotFoundError(f"no checkpoint in {path} (expected step directories like {path}/100/state)")


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def saved_param_shapes(directory: str) -> dict[str, tuple[int, ...]]:
    """{'encoder/layers_0/attention/query/kernel': shape} of the params saved in `directory` (a state dir),
    read from orbax's metadata only (no array is loaded)."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "Metadata file does not exist": the step-level file is optional
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(directory)
    finally:
        absl_logger.setLevel(level)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    return _flat_shapes(tree["params"])


def shape_differences(expected: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]]) -> list[str]:
    """Human-readable differences between the config's parameter shapes and a checkpoint's."""
    out = [f"{name}: checkpoint {saved[name]} vs config {shape}"
           for name, shape in expected.items() if name in saved and saved[name] != shape]
    out += [f"{name}: missing from the checkpoint (config {shape})"
            for name, shape in expected.items() if name not in saved]
    out += [f"{name}: in the checkpoint {saved[name]}, not in the config"
            for name in saved if name not in expected]
    return out


def check_compatible(path: str, abstract_params: Any) -> str:
    """The state directory of the checkpoint at `path` (see `state_dir`) after checking that its params
    have exactly `abstract_params`' names and shapes (metadata only, no array read).

    Raises FileNotFoundError if there is no checkpoint, and IncompatibleCheckpointError listing every
    parameter whose shape differs or that only one side has.
    """
    directory = state_dir(path)
    expected = _flat_shapes(abstract_params)
    differences = shape_differences(expected, saved_param_shapes(directory))
    if differences:
        shown = "; ".join(differences[:8]) + (f"; ... {len(differences) - 8} more" if len(differences) > 8 else "")
        raise IncompatibleCheckpointError(
            f"checkpoint {directory} does not match the model config: {len(differences)} of "
            f"{len(expected)} parameters differ: {shown}")
    return directory


def restore_params(path: str, abstract_params: Any) -> Any:
    """Only the params of the checkpoint at `path`, placed in `abstract_params`' shardings (a pytree of
    jax.ShapeDtypeStruct with .sharding); nothing else of the saved state is read. Checked first
    (`check_compatible`)."""
    directory = check_compatible(path, abstract_params)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                                               dtype=s.dtype), abstract_params)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"]
