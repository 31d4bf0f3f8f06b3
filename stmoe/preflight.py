"""Preflight: a validated run checked against the machine and the files it will run on.

`RunConfig.validate` (stmoe/config.py) checks the config alone and imports nothing. What needs the
environment is checked here, once, at start, raising the same ConfigError naming the field:

- devices: `num_devices` against the devices there are (jax.device_count(), or a TPU topology's
  count when stmoe.aot plans a run for it);
- the mesh layout (partitioning.validate_layout): experts, batch and groups divisible over the
  mesh, the batch over the hosts, and each microbatch over the data-parallel size;
- span corruption: the inputs long enough and targets_length at least what
  stmoe.data.pre_corruption_length needs;
- files: `data.text_files` / `data.eval_text_files` match something (tf.io.gfile: gs:// too);
- decoding evaluation inside training only in a single-process job.

`trainer.prepare` runs it before stmoe.data.resolve_tasks (which registers the run's seqio tasks).
"""
from __future__ import annotations

import jax

from stmoe import partitioning
from stmoe.config import RunConfig, check


def preflight(run: RunConfig, device_count: int | None = None, *, available_devices: int | None = None,
              process_count: int | None = None) -> RunConfig:
    """`run`, validated (RunConfig.validate) and checked for this machine; raises ConfigError.

    `device_count` is the mesh's size (default: the devices the run uses, `num_devices` of
    `available_devices`); `available_devices` / `process_count` describe a machine other than this
    one (default jax.device_count() / jax.process_count()): stmoe.aot plans a run for a TPU topology."""
    run.validate()
    available = jax.device_count() if available_devices is None else available_devices
    used = run.resolve_devices(available)
    device_count = used if device_count is None else device_count
    process_count = jax.process_count() if process_count is None else process_count
    _check_layout(run, device_count, process_count)
    _check_span_lengths(run)
    _check_files(run)
    check(not run.infer_eval.task or process_count == 1, "infer_eval.task",
          "decoding evaluation inside training runs in single-process jobs only; use scripts/evaluate.py")
    return run


def devices(run: RunConfig) -> list:
    """The devices of this machine the run uses: the first `num_devices` (all for -1)."""
    return jax.devices()[:run.resolve_devices(jax.device_count())]


def _check_layout(run: RunConfig, device_count: int, process_count: int) -> None:
    lengths = (run.data.inputs_length, run.data.targets_length)
    partitioning.validate_layout(run.mesh, run.model, run.batch_size, device_count, lengths,
                                 process_count=process_count)
    data, expert, _ = run.mesh.resolve(device_count)
    micro = run.batch_size // run.microbatches
    check(micro % (data * expert) == 0, "microbatches",
          f"a microbatch of batch_size / microbatches = {micro} sequences is not divisible by the "
          f"data-parallel size mesh.data * mesh.expert = {data * expert}")


def _check_span_lengths(run: RunConfig) -> None:
    data = run.data
    if not (data.text_files or "span_corruption" in data.task):
        return
    from stmoe.data import preprocessors

    tokens, needed = preprocessors.pre_corruption_length(max(data.inputs_length, 2))
    long_enough = data.inputs_length >= 3 and preprocessors.corrupted_lengths(tokens)[0] <= data.inputs_length
    check(long_enough, "data.inputs_length",
          f"{data.inputs_length} is too short for span corruption: must be >= 3 (T5/ST-MoE use 512)")
    check(data.targets_length >= needed, "data.targets_length",
          f"span corruption of inputs_length={data.inputs_length} needs targets_length >= {needed} "
          f"(stmoe.data.pre_corruption_length), got {data.targets_length}")


def _check_files(run: RunConfig) -> None:
    if not run.data.text_files:
        return
    import tensorflow as tf

    for name in ("text_files", "eval_text_files"):
        pattern = getattr(run.data, name)
        check(not pattern or tf.io.gfile.glob(pattern), f"data.{name}", f"no file matches {pattern!r}")
