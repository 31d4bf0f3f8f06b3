"""Checkpoints on orbax's CheckpointManager, and clean exits on preemption.

A checkpoint step holds two items:
  state: the train state (any pytree of jax.Arrays, e.g. a flax struct
         TrainState of step / params / opt_state), saved by every process
         for its own shards (orbax StandardSave, OCDBT + zarr3);
  data:  the input pipeline's position as a small JSON dict (JsonSave), so
         a restart neither repeats nor skips examples.

Orbax writes each step into a temporary directory (`<step>.orbax-checkpoint-tmp`)
and renames it when all files are down, so a save that was cut off (SIGKILL,
a crash, a lost VM) never shows up as a step; `Checkpointer.unfinished_steps`
lists such leftovers, which opening the directory deletes (before the constructor returns: orbax's
own clean-up runs in a background thread that nothing waits for). What the rename cannot rule
out is a finished step that was damaged later (a truncated file, a missing
directory, a partial copy between buckets): `Checkpointer.restore` then warns,
naming the step and the error, falls back to the next older step, and lists
what it skipped in `Checkpointer.skipped`.

A save that fails (a full disk, a read-only bucket) raises CheckpointSaveError
naming the step and the newest complete step, which the failed save never
touches; `check_writable` probes a directory at start so that an unwritable
workdir is reported before any training step, and `WorkdirLock` keeps a second
run off a workdir in use (two would write the same steps and metrics).

Fine-tuning and inference read params only (`restore_params`); a checkpoint in
the other layer layout (scanned `scan_{interval}/layers_{j}` with a leading
layers axis vs unscanned `layers_{i}`, stmoe.models.scan_params) is converted on
the way in, and one of another architecture is refused by
IncompatibleCheckpointError, whose one-line message lists what differs.

Restoring takes an abstract state whose `jax.ShapeDtypeStruct` leaves carry
the target shardings, so a run saved on one mesh resumes on another (other
device count, other axis sizes) with each process reading only its shards.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

# The errors a user is told about in one line: defined with the exit statuses (stmoe.errors), raised here.
from stmoe.errors import CheckpointRestoreError, CheckpointSaveError, IncompatibleCheckpointError, WorkdirError

_STATE = "state"
_DATA = "data"


class WorkdirInUseError(WorkdirError):
    """Another run holds the workdir's lock (the message names its host and pid)."""


_TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _short(error: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, cut to `limit` (tensorstore errors embed whole specs)."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(error).__name__}: {text}"


def _unfinished_saves(directory: str) -> list[int]:
    from etils import epath
    path = epath.Path(directory)
    if not path.is_dir():
        return []
    steps = {child.name.split(_TMP_SUFFIX)[0] for child in path.iterdir() if _TMP_SUFFIX in child.name}
    return sorted(int(step) for step in steps if step.isdigit())


def _delete_unfinished_saves(directory: str) -> None:
    """Deletes the '<step>.orbax-checkpoint-tmp' leftovers of saves that were cut off (process 0
    deletes, every process waits for it), so that no reader ever sees them."""
    from etils import epath
    path = epath.Path(directory)
    if jax.process_index() == 0 and path.is_dir():
        for child in path.iterdir():
            step = child.name.split(_TMP_SUFFIX)[0]
            if _TMP_SUFFIX in child.name and step.isdigit():
                try:
                    child.rmtree() if child.is_dir() else child.unlink()
                except OSError:  # e.g. another run's read-only directory (resume_from): never a step anyway
                    pass
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("stmoe_delete_unfinished_saves")


# Why a step did not restore when it is whole but holds another train state than the config builds.
STRUCTURE_DIFFERS = "its train state is structured differently from the config's"


def _damage(error: BaseException) -> str:
    """Why a step could not be read, in a few words where the error is a known kind of damage."""
    text = " ".join(str(error).split())
    other_tree = re.search(r"tree structures do not match: ([^:\s]+):", text)
    if other_tree:
        return f"{STRUCTURE_DIFFERS} at {other_tree.group(1)}"
    missing = re.search(r'Item "(\w+)" was not found in the checkpoint', text)
    if missing:
        return f"its {missing.group(1)}/ directory is missing"
    short = re.search(r'local file "([^"]+)": Requested byte range \[\d+, (\d+)\) is not valid for value of '
                      r'size (\d+)', text)
    if short:
        return f"file {short.group(1)} is truncated ({short.group(3)} bytes, at least {short.group(2)} expected)"
    return _short(error, limit=240)


def check_writable(directory: str) -> None:
    """Creates `directory` (and parents) and writes and deletes a probe file in it; raises
    WorkdirError naming the directory and the OS's reason when either fails (a file where a
    directory is expected, a read-only mount or bucket, no space left)."""
    from etils import epath
    path = epath.Path(directory)
    probe = path / f".stmoe_write_probe_{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("stmoe: write probe, safe to delete\n")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        filename = str(getattr(e, "filename", None) or "")
        where = f" ({filename})" if filename and filename not in (str(path), str(probe)) else ""
        raise WorkdirError(f"cannot write to {directory}: {reason}{where}") from None


LOCK_FILE = "stmoe.lock"


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class WorkdirLock:
    """One run per workdir: the file `<workdir>/stmoe.lock`, created exclusively (O_CREAT | O_EXCL),
    holding the holder's host, pid and start time as JSON.

    `acquire` raises WorkdirInUseError naming the holder when the file exists and its process may be
    running: a live pid on this host, or any pid on another host (which cannot be checked from here).
    A lock of a process on this host that is gone (SIGKILL, a crash, a lost terminal) is stale and is
    taken over; `acquire` then returns a note saying so. The takeover renames the stale file aside
    first, so of two runs taking over at once only one wins the exclusive create.
    On non-local paths (gs://...) no lock is taken: etils epath and tf.io.gfile have no exclusive
    create there; `acquire` returns a note saying that.
    `release` removes the file if it is still this lock's (the trainer calls it in a `finally`).
    """

    def __init__(self, workdir: str):
        self.workdir = str(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex}
        self._held = False

    def _read(self, path: str) -> dict | None:
        try:
            with open(path) as f:
                holder = json.load(f)
            valid = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and "host" in holder
            return holder if valid else None
        except (OSError, ValueError):
            return None

    def _in_use(self, holder: dict | None) -> WorkdirInUseError:
        if holder is None:
            return WorkdirInUseError(f"workdir {self.workdir} is locked by {self.path}, which cannot be read; "
                                     f"delete it if no run uses this workdir")
        where = "this host" if holder["host"] == self._holder["host"] else f"host {holder['host']}"
        return WorkdirInUseError(
            f"workdir {self.workdir} is in use by another run: pid {holder['pid']} on {where} (since "
            f"{holder.get('started', '?')}); delete {self.path} if that run is gone")

    def _is_stale(self, holder: dict) -> bool:
        return holder["host"] == self._holder["host"] and not _process_is_running(int(holder["pid"]))

    def _take_over(self, stale: dict) -> bool:
        """Moves the stale lock file aside; False if another run moved or replaced it first."""
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = self._read(aside)
        if moved != stale:  # another run had already replaced it with its own lock: put that back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        os.unlink(aside)
        return moved == stale

    def acquire(self) -> str | None:
        """Takes the lock; returns a one-line note (a stale lock taken over, or no lock possible) or
        None. Raises WorkdirInUseError naming the holder."""
        if "://" in self.workdir:
            return (f"no lock taken on {self.workdir}: etils epath and tf.io.gfile have no exclusive create "
                    f"there, so make sure no other run uses this workdir")
        note = None
        for _ in range(3):  # a takeover can lose a race with another run's; then that run holds it
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read(self.path)
                if holder is None or not self._is_stale(holder):
                    raise self._in_use(holder) from None
                if self._take_over(holder):
                    note = (f"took over the stale lock {self.path} of pid {holder['pid']} (since "
                            f"{holder.get('started', '?')}), which is no longer running")
                continue
            except OSError as e:
                raise WorkdirError(f"cannot write to {self.workdir}: {e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self._holder, f)
            self._held = True
            return note
        raise self._in_use(self._read(self.path))

    def release(self) -> None:
        """Removes the lock file if this lock holds it (and the file is still this lock's)."""
        if not self._held:
            return
        self._held = False
        holder = self._read(self.path)
        if holder is not None and holder.get("token") == self._holder["token"]:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


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
        self.directory, self.max_to_keep = str(directory), max_to_keep
        self._unfinished = _unfinished_saves(self.directory)
        _delete_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
            # Deleted above, synchronously: orbax's clean-up is a background thread that only its
            # next save waits for, so a reader could still see the leftovers after a restore.
            cleanup_tmp_directories=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _DATA))
        # A failing save makes orbax log a traceback from each of its threads (hundreds of lines on a
        # full disk); the failure reaches the caller once, as CheckpointSaveError.
        self._quiet = _QuietOrbaxErrors()
        logging.getLogger("absl").addFilter(self._quiet)
        self._pending: int | None = None  # the step of a save that may still be in flight
        self._failed = False  # a CheckpointSaveError was raised (close does not raise it twice)
        # (step, reason) of every step the last `restore` could not read, newest first.
        self.skipped: list[tuple[int, str]] = []

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False,
             wait: bool = False) -> bool:
        """Starts saving `state` and `data_state` as `step`; True if a save started.

        With async saving this returns after the device-to-host copy: do not
        donate or delete `state`'s buffers before that (it is safe afterwards).
        `wait=True` blocks until the step is on disk (e.g. before exiting).
        """
        data_state = {} if data_state is None else dict(data_state)
        try:  # a previous async save's failure surfaces here (orbax waits for it first)
            saved = self._manager.save(
                int(step),
                args=ocp.args.Composite(**{
                    _STATE: ocp.args.StandardSave(state),
                    _DATA: ocp.args.JsonSave(data_state),
                }),
                force=force,
            )
        except Exception as e:  # noqa: BLE001 - every failure to write is reported the same way
            raise self._save_error(self._pending if self._pending is not None else int(step), e) from e
        if saved:
            self._pending = int(step)
        if wait:
            self.wait()
        return saved

    def _save_error(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        self._pending, self._failed = None, True
        try:
            complete = [s for s in self.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - an unreadable directory: say nothing about older steps
            complete = []
        kept = (f"the newest complete checkpoint, step {complete[-1]}, is intact" if complete
                else "no earlier checkpoint exists")
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        text = " ".join(str(error).split())
        if getattr(error, "errno", None) == errno.ENOSPC or "os_error_code='28'" in text:
            # tensorstore reports a full disk as RESOURCE_EXHAUSTED (a ValueError) with os_error_code 28
            return CheckpointSaveError(
                f"could not save {what} to {self.directory}: {type(error).__name__}: {os.strerror(errno.ENOSPC)} "
                f"({kept}); free some space (or point --workdir elsewhere) and rerun to resume")
        return CheckpointSaveError(f"could not save {what} to {self.directory}: {_short(error)} ({kept})")

    def unfinished_steps(self) -> list[int]:
        """Steps whose save had been cut off before it completed (SIGKILL, a crash) when this
        Checkpointer was opened; their temporary directories are gone once it is open."""
        return list(self._unfinished)

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
        failure logged as a warning once one restores; with an explicit `step` only that one.
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
        self.skipped = []
        for candidate in candidates:
            try:
                restored = self._manager.restore(
                    candidate,
                    args=ocp.args.Composite(**{
                        _STATE: ocp.args.StandardRestore(abstract_state),
                        _DATA: ocp.args.JsonRestore(),
                    }),
                )
                if restored[_DATA] is None:  # the step's data/ directory is gone
                    raise FileNotFoundError(f"no '{_DATA}' item (the data iterator position) in step {candidate}")
            except Exception as e:  # noqa: BLE001 - any failure means "try an older step".
                errors.append(f"Checkpointer: could not restore step {candidate} from {self.directory}: "
                              f"{_short(e, limit=400)}; used an older step")
                self.skipped.append((candidate, _damage(e)))
                continue
            for message in errors:  # only now: when no step restores, the error below says it all in one line
                _warn(message)
            return restored[_STATE], dict(restored[_DATA]), candidate
        if all(reason.startswith(STRUCTURE_DIFFERS) for _, reason in self.skipped):
            raise IncompatibleCheckpointError(
                f"the checkpoints in {self.directory} hold another train state than this config builds "
                f"({self.skipped[0][1]}: the optimizer or its settings, optim.*, differ)")
        raise CheckpointRestoreError(
            f"no checkpoint step in {self.directory} could be restored: "
            + "; ".join(f"step {s}: {reason}" for s, reason in self.skipped))

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished (and is finalized); raises
        CheckpointSaveError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._pending, e) from e
        self._pending = None

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads; raises CheckpointSaveError
        if a pending save failed (the threads are released either way)."""
        failed_before = self._failed
        try:
            self.wait()
        except CheckpointSaveError:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - the same failure again
                pass
            finally:
                logging.getLogger("absl").removeFilter(self._quiet)
            if not failed_before:
                raise
            return
        self._manager.close()
        logging.getLogger("absl").removeFilter(self._quiet)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _QuietOrbaxErrors(logging.Filter):
    """Drops orbax's ERROR records (a failed save logs one traceback per thread); keeps the last few in
    `dropped` for debugging. Every such failure reaches the caller as an exception of this module."""

    def __init__(self, keep: int = 8):
        super().__init__()
        self.keep, self.dropped = keep, []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
            self.dropped = (self.dropped + [record.getMessage()])[-self.keep:]
            return False
        return True


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


def state_dirs(path: str) -> list[str]:
    """Every saved train state `path` may mean, newest first: its one state dir when `path` is a
    step (or state) dir, else each step of a run's workdir or checkpoints dir. Raises
    FileNotFoundError as `state_dir`."""
    newest = state_dir(path)
    step_dir = os.path.dirname(newest)
    explicit = os.path.abspath(path) in (newest, step_dir) if "://" not in path else path.rstrip("/") in (
        newest, step_dir)
    if explicit or not os.path.basename(step_dir).isdigit():
        return [newest]
    parent = os.path.dirname(step_dir)
    steps = sorted((int(n) for n in os.listdir(parent)
                    if n.isdigit() and os.path.isdir(os.path.join(parent, n, _STATE))), reverse=True)
    return [os.path.join(parent, str(step), _STATE) for step in steps]


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


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(_key_name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(leaf.shape) for name, leaf in _flat(tree).items()}


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


# The ModelConfig fields that decide parameter names and shapes (scan_layers is converted instead).
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_encoder_layers",
                       "num_decoder_layers", "mlp_gated", "layer_norm_scale", "relative_attention_num_buckets",
                       "tie_embeddings", "sparse_interval", "sparse_offset", "sparse_layers", "sparse_dense", "moe.num_experts")


def _run_model_fields(directory: str) -> dict[str, Any] | None:
    """The `model` fields of the config.json of the run that wrote the state dir `directory` (in it or
    up to three directories above: step, checkpoints, workdir), flattened as 'moe.num_experts'; None
    if there is none (e.g. an imported checkpoint)."""
    if "://" in directory:
        return None
    path = os.path.abspath(directory)
    for _ in range(4):
        candidate = os.path.join(path, "config.json")
        if os.path.isfile(candidate):
            try:
                with open(candidate) as f:
                    model = json.load(f).get("model", {})
            except (OSError, ValueError):
                return None
            return {**{k: v for k, v in model.items() if k != "moe"},
                    **{f"moe.{k}": v for k, v in model.get("moe", {}).items()}}
        path = os.path.dirname(path)
    return None


def _field_differences(directory: str, model_config: Mapping[str, Any] | None) -> list[str]:
    """'model.d_model: checkpoint's run 32 vs config 64' for every architecture field that differs."""
    saved = _run_model_fields(directory)
    if saved is None or model_config is None:
        return []
    current = {**{k: v for k, v in dict(model_config).items() if k != "moe"},
               **{f"moe.{k}": v for k, v in dict(model_config.get("moe", {})).items()}}
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON has lists
    return [f"model.{k}: checkpoint's run {saved[k]!r} vs config {current[k]!r}"
            for k in ARCHITECTURE_FIELDS if k in saved and k in current and norm(saved[k]) != norm(current[k])]


# ---------------------------------------------------------------- scanned <-> unscanned layer layouts
# stmoe.models.scan_params: '<stack>/layers_{u * interval + j}/...' <-> '<stack>/scan_{interval}/layers_{j}/...'
# with unit u on a new leading axis. Only the encoder and decoder stacks change.

_SCANNED = re.compile(r"^(encoder|decoder)/scan_(\d+)/layers_(\d+)/(.*)$")
_UNSCANNED = re.compile(r"^(encoder|decoder)/layers_(\d+)/(.*)$")


def _scan_interval(names: Iterable[str]) -> int | None:
    for name in names:
        match = _SCANNED.match(name)
        if match:
            return int(match.group(2))
    return None


def _layout_change(expected: Iterable[str], saved: Iterable[str]) -> tuple[str, int] | None:
    """None if the config and the checkpoint use the same layer layout, else ('scan' | 'unscan', interval):
    what turns the checkpoint's params into the config's."""
    expected_interval, saved_interval = _scan_interval(expected), _scan_interval(saved)
    if (expected_interval is None) == (saved_interval is None):
        return None
    return ("unscan", saved_interval) if saved_interval is not None else ("scan", expected_interval)


def _convert(params: Any, how: str, interval: int) -> Any:
    from stmoe.config import ModelConfig
    from stmoe.models import scan_params, unscan_params
    cfg = ModelConfig(sparse_interval=interval)  # the conversions read only the interval
    return (scan_params if how == "scan" else unscan_params)(params, cfg)


def _in_saved_layout(abstract_params: Any, change: tuple[str, int]) -> Any:
    """`abstract_params` (config layout, ShapeDtypeStructs with shardings) in the checkpoint's layout:
    shapes from the inverse conversion, shardings from the matching config parameter (scanned leaves
    add a replicated leading layers axis, as partitioning.LOGICAL_RULES maps 'layers' to None)."""
    how, interval = change
    inverse = "unscan" if how == "scan" else "scan"
    converted = jax.eval_shape(lambda p: _convert(p, inverse, interval), abstract_params)
    by_name = _flat(abstract_params)

    def sharding_for(name: str):
        if inverse == "scan":  # checkpoint scanned, config unscanned: unit 0 = layer j
            match = _SCANNED.match(name)
            source = by_name[f"{match.group(1)}/layers_{match.group(3)}/{match.group(4)}"] if match else by_name[name]
            sharding = getattr(source, "sharding", None)
            if match and isinstance(sharding, NamedSharding):
                sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
        else:  # checkpoint unscanned, config scanned
            match = _UNSCANNED.match(name)
            if match:
                layer = int(match.group(2))
                source = by_name[f"{match.group(1)}/scan_{interval}/layers_{layer % interval}/{match.group(3)}"]
            else:
                source = by_name[name]
            sharding = getattr(source, "sharding", None)
            if match and isinstance(sharding, NamedSharding):
                sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
        return sharding

    names = list(_flat(converted))
    leaves, treedef = jax.tree_util.tree_flatten(converted)
    return jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_for(name))
        for name, leaf in zip(names, leaves)])


class DamagedCheckpointError(CheckpointRestoreError):
    """One step's saved params cannot be read (truncated or missing files)."""


def _saved_param_shapes_or_damage(directory: str) -> dict[str, tuple[int, ...]]:
    try:
        return saved_param_shapes(directory)
    except Exception as e:  # noqa: BLE001 - unreadable metadata: the step is damaged
        raise DamagedCheckpointError(_damage(e) if not isinstance(e, TypeError) else
                                     "its metadata does not read (a truncated or missing file)") from e


def _plan(path: str, abstract_params: Any, model_config: Mapping[str, Any] | None,
          convert_layout: bool) -> tuple[str, tuple[str, int] | None]:
    """(state dir, layout change or None) for restoring the state dir `path` into `abstract_params`;
    raises FileNotFoundError / IncompatibleCheckpointError (one line listing what differs) /
    DamagedCheckpointError."""
    directory = state_dir(path)
    saved = _saved_param_shapes_or_damage(directory)
    expected = _flat_shapes(abstract_params)
    change = _layout_change(expected, saved)
    note = ""
    if change is not None:
        scanned = "scanned" if change[0] == "unscan" else "unscanned"
        if not convert_layout:
            raise IncompatibleCheckpointError(
                f"checkpoint {directory} has {scanned} layers and the config the other layout "
                f"(model.scan_layers): its params can be converted, its optimizer state cannot")
        compared = _flat_shapes(_in_saved_layout(abstract_params, change))
        note = f" (the checkpoint's layers are {scanned}; compared in its layout)"
    else:
        compared = expected
    differences = shape_differences(compared, saved)
    if differences:
        fields = _field_differences(directory, model_config)
        shown = "; ".join(differences[:6]) + (f"; ... {len(differences) - 6} more" if len(differences) > 6 else "")
        head = f"{'; '.join(fields)}; " if fields else ""
        raise IncompatibleCheckpointError(
            f"checkpoint {directory} does not match the model config: {head}{len(differences)} of "
            f"{len(compared)} parameters differ{note}: {shown}")
    return directory, change


def check_compatible(path: str, abstract_params: Any, *, model_config: Mapping[str, Any] | None = None,
                     convert_layout: bool = True) -> str:
    """The state directory of the checkpoint at `path` (see `state_dir`) after checking that its params
    have `abstract_params`' names and shapes (metadata only, no array read), up to the scanned /
    unscanned layer layout when `convert_layout` (restore_params converts it).

    Raises FileNotFoundError if there is no checkpoint, and IncompatibleCheckpointError listing, on one
    line, the architecture fields of `model_config` (a ModelConfig dict) that differ from the
    checkpoint's run config.json, if it has one, and the parameters whose shape differs or that only one
    side has.
    """
    return _newest_readable(path, lambda d: _plan(d, abstract_params, model_config, convert_layout)[0],
                            warn=False)[0]


def _newest_readable(path: str, read: Callable[[str], Any], warn: bool = True) -> tuple[Any, list[tuple[int, str]]]:
    """read(state dir) of the newest step of `path` that reads (a step dir: only it), and the
    (step, reason) of the newer ones skipped as damaged, each (with `warn`) said in one line. A
    checkpoint of another model (IncompatibleCheckpointError) is not damage: raised at once.
    Raises CheckpointRestoreError in one line when no step reads."""
    candidates, skipped = state_dirs(path), []
    for directory in candidates:
        try:
            result = read(directory)
        except IncompatibleCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated / missing files: try the next older step
            reason = str(e) if isinstance(e, DamagedCheckpointError) else _damage(e)
            step = os.path.basename(os.path.dirname(directory))
            skipped.append((int(step) if step.isdigit() else -1, reason))
            continue
        used = os.path.basename(os.path.dirname(directory))
        for step, reason in skipped if warn else ():  # only now: when none reads, the error below is the one line
            print(f"WARNING: checkpoint step {step} in {os.path.dirname(os.path.dirname(directory))} is "
                  f"damaged ({reason}); using step {used}", file=sys.stderr, flush=True)
        return result, skipped
    where = os.path.dirname(os.path.dirname(candidates[0]))
    raise CheckpointRestoreError(
        f"no checkpoint step in {where} could be read: "
        + "; ".join(f"step {s}: {reason}" for s, reason in skipped)
        + "; point at another checkpoint, or put back an intact copy")


def restore_params(path: str, abstract_params: Any, *, model_config: Mapping[str, Any] | None = None) -> Any:
    """Only the params of the checkpoint at `path`, placed in `abstract_params`' shardings (a pytree of
    jax.ShapeDtypeStruct with .sharding); nothing else of the saved state is read. Checked first
    (`check_compatible`). A checkpoint in the other layer layout (scanned vs unscanned) is read in its
    own layout, sharded alike, and converted on the devices (stmoe.models.scan_params / unscan_params).
    A run's newest step that is damaged is skipped for the next older one (one warning line)."""
    return newest_params(path, abstract_params, model_config=model_config)[0]


def newest_params(path: str, abstract_params: Any, *, model_config: Mapping[str, Any] | None = None
                  ) -> tuple[Any, str, list[tuple[int, str]]]:
    """`restore_params`, and the state dir the params came from, and the (step, reason) of the newer
    steps skipped as damaged."""
    (params, directory), skipped = _newest_readable(
        path, lambda d: (_restore_params_from(d, abstract_params, model_config), d))
    return params, directory, skipped


def _restore_params_from(path: str, abstract_params: Any, model_config: Mapping[str, Any] | None) -> Any:
    directory, change = _plan(path, abstract_params, model_config, convert_layout=True)
    target = _in_saved_layout(abstract_params, change) if change is not None else abstract_params
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                                               dtype=s.dtype), target)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    params = restored["params"]
    if change is None:
        return params
    shardings = jax.tree.map(lambda s: s.sharding, abstract_params)
    return jax.jit(lambda p: _convert(p, *change), out_shardings=shardings)(params)
