"""Pretraining and fine-tuning: `train_and_evaluate(config, workdir)`.

One function in fixed sections (big_vision / flax examples style):

  1. config     the typed tree (stmoe.config.RunConfig), every field validated once and the seqio
                tasks registered (`prepare`), exit status 2 on a bad one;
                probe the workdir (a file written and removed): an unwritable one fails before any step;
                take its lock (stmoe.checkpoints.WorkdirLock): a second run on it stops here, naming
                the first; released at the end, however the run ends
  2. logging    clu writers: TensorBoard + metrics.jsonl (process 0); progress: a tqdm bar on a
                terminal, else one line per logging window (stmoe.reporting.Progress)
  3. mesh       (data, expert, model) over all devices or the first `num_devices`
  4. data       seqio train iterator (per-host shard), a fixed list of held-out batches
  5. model      the model, its optimizer and the state's shardings: jax.eval_shape of the init ->
                logical axes -> NamedShardings; nothing unsharded (stmoe.steps.state_layout)
  6. steps      stmoe.steps.make_train_step / make_eval_step: the pure step functions bound to their
                settings, jitted with in/out shardings, the train state donated (the same factory
                the sharding tests and scripts/benchmark_train.py use)
  7. restore    stmoe.restore.restore_or_init: own workdir > resume_from > init_checkpoint (params
                only) > scratch; the state and its Origin
  8. loop       step, hooks, metrics every log_every_steps, eval every eval_every_steps (held-out
                loss, and with `infer_eval.task` task metrics by decoding, stmoe.evaluation),
                async checkpoints every checkpoint_every_steps, SIGTERM/SIGINT -> save and return
                (TrainResult.stop_signal; the scripts exit with 128 + the signal number).
                The host runs one step ahead: step s's divergence check waits for it while step s+1
                computes, and is forced before every save, log line and the end; a save also checks
                that the state it writes is finite, so every saved step is a good one
  9. report     from the metrics kept in memory: final losses, decoded task metrics, the routing
                table (stmoe.reporting), an expert-load PNG

Determinism: the dropout / routing rng of step s is fold_in(key(seed), s) (and the microbatch
index), and the data iterator's position is saved with the state, so a run stopped at step N
and resumed ends bitwise identical to one that never stopped (tests/test_trainer.py).

Metrics: steps return SUMS (cross-entropy, output z-loss, correct tokens) and the token count;
the host adds them over the logging window and divides once, so padding, packing and
microbatches weigh every target token equally.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import typing
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from stmoe import checkpoints, evaluation, inference, optim, partitioning, preflight, reporting, restore, steps
from stmoe import config as config_lib
from stmoe.config import RunConfig
# Re-exported: scripts and tests catch trainer.TrainingDiverged / trainer.USER_ERRORS (stmoe.errors).
from stmoe.errors import USER_ERRORS, TrainingDiverged, error_kind  # noqa: F401
from stmoe.host import memory_allocator
from stmoe.models import EncoderDecoder
from stmoe.steps import TrainState

if typing.TYPE_CHECKING:
    from stmoe.data import tasks as stmoe_tasks

Array = jax.Array
Hook = Callable[[int, Any], None]

# Step metrics whose non-finite value a divergence message names.
LOSS_TERMS = ("loss", "cross_entropy", "output_z_loss", "aux_loss", "router_z_loss", "aux_loss_coef",
              "learning_rate", "grad_norm")


@dataclasses.dataclass
class TrainResult:
    """What train_and_evaluate returns (tests and notebooks read it; scripts ignore it)."""

    state: TrainState
    step: int
    train_metrics: dict[str, float]  # the last logging window
    eval_metrics: dict[str, float]  # the last held-out evaluation
    infer_eval_metrics: dict[str, dict[str, float]]  # the last decoding evaluation {task: {metric: value}}
    preempted: bool
    train_step_traces: int  # 1 unless something made jit retrace the step
    stop_signal: int | None = None  # the signal (SIGTERM / SIGINT) that stopped a preempted run


# --------------------------------------------------------------------------------- config


def prepare(config: RunConfig | ml_collections.ConfigDict,
            device_count: int | None = None) -> tuple[RunConfig, stmoe_tasks.TaskNames]:
    """The run's typed config, validated and checked for this machine (stmoe.preflight: every field,
    named on error), and the registered names of its seqio tasks (stmoe.data.resolve_tasks). Raises
    ConfigError; reads no data."""
    from stmoe import data as stmoe_data

    run = preflight.preflight(config_lib.run_config(config), device_count)
    return run, stmoe_data.resolve_tasks(run)


# ------------------------------------------------------------------------------- host helpers


def _divergence(step: int, metrics: Mapping[str, Array], optim_cfg: optim.OptimConfig) -> str | None:
    """Why the run must stop after `step`, or None. A step with non-finite gradients, or whose update,
    new params or optimizer state would be non-finite, is skipped (optim.skip_nonfinite_steps: its
    update never applied); `optim.max_consecutive_nonfinite` skips in a row (0: the first) stop the
    run. With `optim.skip_nonfinite=False` the first one stops it, before any save."""
    consecutive = int(metrics["consecutive_nonfinite"])  # waits for `step` (the loop runs one step ahead)
    if consecutive == 0 or (optim_cfg.skip_nonfinite and consecutive < optim_cfg.max_consecutive_nonfinite):
        return None
    values = jax.device_get({k: metrics[k] for k in LOSS_TERMS if k in metrics})
    bad = ", ".join(k for k, v in values.items() if not np.all(np.isfinite(v))) or \
        "the update only (finite gradients, non-finite new params or optimizer state)"
    if optim_cfg.skip_nonfinite:
        what = (f"{consecutive} steps in a row, {step - consecutive + 1} to {step}, had non-finite gradients "
                f"or updates (optim.max_consecutive_nonfinite={optim_cfg.max_consecutive_nonfinite})")
    else:
        what = f"step {step} had non-finite gradients or updates (optim.skip_nonfinite=False)"
    return f"training diverged: {what}; non-finite at step {step}: {bad}"


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


# ------------------------------------------------------------------------------ the trainer


@dataclasses.dataclass(frozen=True)
class RunSteps:
    """What `build_steps` makes of a run on a mesh."""

    model_config: config_lib.ModelConfig  # run.model resolved for the mesh (dispatch, expert execution)
    model: EncoderDecoder
    optim_config: optim.OptimConfig
    layout: steps.StateLayout
    train_step: Callable  # jitted (state, batch) -> (state, metrics), the state donated
    eval_step: Callable  # jitted (params, batch) -> metric sums


def build_steps(run: RunConfig, mesh: Any, on_trace: Callable[[], None] | None = None) -> RunSteps:
    """Sections 5 and 6 of `train_and_evaluate`: the model resolved for `mesh` (its devices' platform:
    a TPU topology's compile-only devices resolve as on TPU, stmoe.aot), the optimizer built on the
    abstract params' paths, the state's shardings (nothing unsharded, stmoe.steps.state_layout) and
    the jitted train and eval steps. Allocates nothing."""
    # 5. The MoE dispatch and expert execution are chosen here, once, for this backend and mesh.
    model_cfg = partitioning.resolve_model(run.model, mesh)
    model = EncoderDecoder(model_cfg)
    optim_cfg = run.optimizer()
    lengths = (run.data.inputs_length, run.data.targets_length)
    shapes = {"encoder_input_tokens": (2, lengths[0]), "decoder_input_tokens": (2, lengths[1]),
              "decoder_target_tokens": (2, lengths[1])}
    layout = steps.state_layout(model, lambda params: optim.make_optimizer(optim_cfg, params), mesh, shapes,
                                jax.random.key(run.seed))
    # 6. Step functions (stmoe.steps): pure, bound to their settings, jitted with shardings; the state is donated.
    train_step = steps.make_train_step(
        model, layout.optimizer, mesh=mesh, state_shardings=layout.shardings,
        learning_rate_fn=optim.learning_rate_schedule(optim_cfg), loss_cfg=run.loss, microbatches=run.microbatches,
        seed=run.seed, on_trace=on_trace)
    eval_step = steps.make_eval_step(model, mesh=mesh, param_shardings=layout.shardings.params)
    return RunSteps(model_cfg, model, optim_cfg, layout, train_step, eval_step)


def train_and_evaluate(config: RunConfig | ml_collections.ConfigDict, workdir: str, *,
                       hooks: Sequence[Hook] = ()) -> TrainResult:
    """Trains (or resumes) the run described by `config` in `workdir`; see the module docstring.

    `hooks` are called as hook(step, state) after every step, before the preemption check (tests
    use one to send SIGTERM at a chosen step).
    """
    # 1. Config: everything checked before any device work; from here on only the typed tree is read.
    partitioning.maybe_initialize_distributed()
    run, tasks = prepare(config)
    workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
    restore.check_own_config(run, workdir)  # another optimizer over its own checkpoints: before any file
    checkpoints.check_writable(workdir)  # before any step: WorkdirError
    # One run per workdir (process 0 holds the lock): two would interleave their saves and metrics.
    lock = checkpoints.WorkdirLock(workdir) if jax.process_index() == 0 else None
    note = lock.acquire() if lock is not None else None  # WorkdirInUseError names the holder
    try:
        if note:
            _say(f"stmoe: {note}")
        return _train(run, tasks, workdir, hooks)
    finally:  # also on errors, a second Ctrl-C and after SIGTERM / SIGINT (the loop returns normally)
        if lock is not None:
            lock.release()


def _train(run: RunConfig, tasks: stmoe_tasks.TaskNames, workdir: str, hooks: Sequence[Hook]) -> TrainResult:
    """train_and_evaluate's sections 2-9, with the workdir checked and locked."""
    from clu import metric_writers, periodic_actions

    checkpoints.check_writable(os.path.join(workdir, "checkpoints"))
    process = jax.process_index()

    # 2. Logging: every scalar written is also kept in `history` (the final report reads it).
    tb_dir = os.path.join(workdir, "tensorboard")
    jsonl_path = os.path.join(workdir, "metrics.jsonl")
    writers = [metric_writers.create_default_writer(tb_dir, just_logging=process > 0, asynchronous=False)]
    if process == 0:
        writers.append(reporting.JsonlWriter(jsonl_path))
    writer = metric_writers.AsyncMultiWriter(writers)
    history: list[dict[str, float]] = []

    def write(step: int, scalars: Mapping[str, float]) -> None:
        writer.write_scalars(step, scalars)
        history.append({"step": step, **scalars})

    # 3. Mesh.
    devices = preflight.devices(run)
    mesh = partitioning.make_mesh(run.mesh, devices)

    # 4. Data: this process's share of the global batch; held-out batches fetched once.
    lengths = {"inputs": run.data.inputs_length, "targets": run.data.targets_length}
    train_iter, eval_batches, num_shards = _input_streams(run, tasks, lengths)
    infer_evaluation = None
    if tasks.infer_eval:  # task metrics by decoding (seqio Evaluator); its datasets are cached once
        infer = run.infer_eval
        infer_evaluation = evaluation.Evaluation(
            tasks.infer_eval, split=infer.split, lengths=lengths,
            num_examples=None if infer.num_examples == -1 else infer.num_examples,
            log_dir=os.path.join(workdir, "infer_eval"), batch_size=infer.batch_size, decoding=infer.decoding,
            beam_size=infer.beam_size)

    # 5-6. Model, optimizer, the state's shardings and the jitted steps (`build_steps`).
    traces = {"train": 0}
    built = build_steps(run, mesh, on_trace=lambda: traces.__setitem__("train", traces["train"] + 1))
    model_cfg, model, optim_cfg, layout = built.model_config, built.model, built.optim_config, built.layout
    p_train_step, p_eval_step = built.train_step, built.eval_step
    init_rng = jax.random.key(run.seed)

    # 7. Restore (stmoe.restore): own workdir > resume_from > init_checkpoint (params only) > scratch.
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=run.keep_checkpoints)
    start, ckpt = restore.restore_or_init(run, ckpt, layout.abstract, lambda: layout.init(init_rng), train_iter)
    state = start.state
    is_finite = jax.jit(optim.all_finite, out_shardings=partitioning.replicated(mesh))
    if not bool(is_finite(state)):  # e.g. a checkpoint saved before updates were checked: nothing to train from
        train_iter.close()
        ckpt.close()
        writer.close()
        raise TrainingDiverged(
            f"training diverged: the starting state ({start.describe()}) holds non-finite values; remove "
            f"that checkpoint to start from an older one")
    if process == 0:  # only now: a refused restore leaves the previous run's config.json in place
        from etils import epath
        epath.Path(workdir, "config.json").write_text(json.dumps(run.to_dict(), indent=2))
        if start.origin is restore.Origin.OWN_CHECKPOINT and os.path.exists(jsonl_path):
            # The report's expert-load plot covers the whole run, so the steps before this restart are read once.
            history.extend(r for r in reporting.read_records(jsonl_path) if r.get("step", 0) <= start.step)
    for note in start.notes:
        _say(f"stmoe: {note}")
    _say(f"stmoe: {layout.num_params / 1e6:.2f}M params, mesh {dict(mesh.shape)} on {len(devices)} "
         f"{devices[0].platform} device(s), MoE dispatch {model_cfg.moe.dispatch!r} with experts "
         f"{model_cfg.moe.expert_execution!r}; starting at step {start.step} from {start.describe()}; "
         f"workdir {workdir}")
    if devices[0].platform == "cpu" and memory_allocator() == "glibc":
        _say("stmoe: on CPU, glibc's malloc hands XLA's per-step temporaries back to the kernel and every step "
             "faults them in again; preload tcmalloc for a faster step (docs/performance.md)")

    # 8. The loop. A step's metrics stay on the device until something needs them: its divergence check
    # runs while the next step computes, and is forced before a save, a log line or the end, so the
    # host waits for at most one step. A save writes only a state it has checked to be finite, so
    # `saved_steps` (the divergence message's "last good checkpoint") holds good steps only.
    def evaluate(params: Any) -> dict[str, float]:
        with partitioning.activate(mesh):
            results = [p_eval_step(params, partitioning.shard_batch(b, mesh)) for b in eval_batches]
        reduced = steps.reduce_metrics(results)
        reduced["loss"] = reduced["cross_entropy"]
        return reduced

    def settle() -> None:
        """Raises _Diverged if the newest step not yet checked must stop the run."""
        nonlocal unchecked
        if unchecked is not None:
            checked_step, checked_metrics = unchecked
            unchecked = None
            message = _divergence(checked_step, checked_metrics, optim_cfg)
            if message:
                raise _Diverged(message)

    def save(step: int, *, wait: bool = False) -> None:
        settle()
        if step not in saved_steps:
            if not bool(is_finite(state)):  # the step's checks should have caught it: never save it
                raise _Diverged(f"training diverged: the state after step {step} holds non-finite values")
            ckpt.save(step, state, train_iter.get_state(), force=True, wait=wait)
            saved_steps.add(step)

    saved_steps = {start.step} if start.origin is restore.Origin.OWN_CHECKPOINT else set()
    report_progress = periodic_actions.ReportProgress(num_train_steps=run.total_steps, writer=writer)
    window: list[dict[str, Array]] = []
    window_tokens, window_start = 0, time.perf_counter()
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    infer_metrics: dict[str, dict[str, float]] = {}
    unchecked: tuple[int, Mapping[str, Array]] | None = None
    preempted, stop_signal = False, None
    diverged: str | None = None
    step = start.step
    try:
        handler = checkpoints.install_preemption_handler()
    except RuntimeError:  # not the main thread (e.g. a notebook worker): no signal handling
        handler = None
    progress = reporting.Progress(run.total_steps, start.step, enabled=process == 0)  # tqdm on a TTY only
    try:
        while step < run.total_steps:
            batch = next(train_iter)
            window_tokens += int(np.sum(batch["encoder_input_tokens"] > 0) + np.sum(batch["decoder_target_tokens"] > 0))
            with partitioning.activate(mesh):
                state, step_metrics = p_train_step(state, partitioning.shard_batch(batch, mesh))
            settle()  # the previous step's, while this one runs
            step += 1
            unchecked = (step, step_metrics)
            window.append(step_metrics)
            progress.update(step)
            for hook in hooks:
                hook(step, state)
            report_progress(step)

            last = step == run.total_steps
            if step % run.log_every_steps == 0 or last:
                settle()
                train_metrics = steps.reduce_metrics(window)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                train_metrics["tokens_per_sec"] = window_tokens * num_shards / elapsed
                train_metrics["steps_per_sec"] = len(window) / elapsed
                write(step, {f"train/{k}": v for k, v in train_metrics.items()})
                progress.log(step, train_metrics)
                window, window_tokens, window_start = [], 0, time.perf_counter()
            if step % run.eval_every_steps == 0 or last:
                if eval_batches:
                    settle()
                    eval_metrics = evaluate(state.params)
                    write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                    progress.log_eval(step, train_metrics, eval_metrics)
                if infer_evaluation:
                    settle()
                    infer_metrics = infer_evaluation.run(model, state.params, mesh, step=step)
                    write(step, evaluation.flat_scalars(infer_metrics))
            if step % run.checkpoint_every_steps == 0:
                save(step)
            if handler is not None and handler.requested:
                preempted, stop_signal = True, handler.signum
                break
        save(step, wait=True)
    except _Diverged as stop:  # the step it names was skipped (or, skipping off, is never saved)
        diverged = str(stop)
    finally:
        progress.close()
        if handler is not None:
            handler.uninstall()
        writer.flush()
        writer.close()
        train_iter.close()
        ckpt.close()  # raises CheckpointSaveError if the last save failed

    # 9. Report, from the metrics kept in memory.
    if diverged:
        last_saved = max(saved_steps) if saved_steps else None
        where = (f"last good checkpoint: step {last_saved} in {os.path.join(workdir, 'checkpoints')} (rerunning "
                 "resumes there)" if last_saved is not None else "no checkpoint was saved")
        # Skipping on, a non-finite step's update is dropped (optim.skip_nonfinite_steps); off, it stays
        # in memory only. Either way `saved_steps` holds checked-finite saves only (`save`).
        applied = ("no non-finite update was applied or saved" if optim_cfg.skip_nonfinite
                   else "the non-finite update was not saved")
        raise TrainingDiverged(f"{diverged}; {applied}; {where}. Try a lower "
                               "learning rate, the router z-loss, or a float32 router / activations")
    if preempted:
        name = signal.Signals(stop_signal).name if stop_signal else "a signal"
        _say(f"stmoe: stopped by {name} at step {step}; checkpoint saved, rerun the same command to resume")
    elif process == 0:
        _report(workdir, history, step, train_metrics, eval_metrics, infer_metrics, run, tasks)
    return TrainResult(state=state, step=step, train_metrics=train_metrics, eval_metrics=eval_metrics,
                       infer_eval_metrics=infer_metrics, preempted=preempted, train_step_traces=traces["train"],
                       stop_signal=stop_signal)


def _input_streams(run: RunConfig, tasks: stmoe_tasks.TaskNames,
                   lengths: Mapping[str, int]) -> tuple[Any, list[dict[str, np.ndarray]], int]:
    """(this process's train iterator, the held-out batches, the number of data shards)."""
    from stmoe import data as stmoe_data

    shard_index, num_shards = partitioning.data_shard_info()
    train_iter = stmoe_data.get_batch_iterator(
        tasks.train, "train", lengths, run.batch_size // num_shards, shard_index=shard_index,
        num_shards=num_shards, seed=run.data.seed, pack=run.data.pack)
    eval_batches = []
    if run.eval_steps:
        eval_iter = stmoe_data.get_batch_iterator(
            tasks.eval, run.data.eval_split, lengths, run.batch_size // run.microbatches // num_shards,
            shard_index=shard_index, num_shards=num_shards, seed=run.data.seed, pack=run.data.pack,
            shuffle=False, repeat=False)
        eval_batches = [batch for _, batch in zip(range(run.eval_steps), eval_iter)]
        eval_iter.close()
    return train_iter, eval_batches, num_shards


class _Diverged(Exception):
    """Internal: a checked step says the run must stop (the message says why)."""


def _report(workdir: str, history: Sequence[Mapping[str, float]], step: int, train_metrics: Mapping[str, float],
            eval_metrics: Mapping[str, float], infer_metrics: Mapping[str, Mapping[str, float]],
            run: RunConfig, tasks: stmoe_tasks.TaskNames) -> None:
    lines = [f"\nFinished at step {step}."]
    if train_metrics:
        lines.append(f"  train    cross-entropy {train_metrics['cross_entropy']:.4f} nats/token, "
                     f"accuracy {train_metrics['accuracy']:.3f} (last logging window)")
    if eval_metrics:
        lines.append(f"  held-out cross-entropy {eval_metrics['cross_entropy']:.4f} nats/token, "
                     f"accuracy {eval_metrics['accuracy']:.3f} ({tasks.eval}, "
                     f"{inference.capacity_description(run.model)})")
    for task, values in infer_metrics.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
        lines.append(f"  decoded  {task}: {shown} (greedy; infer_eval/{task}-metrics.jsonl)")
    prefix = "eval" if eval_metrics else "train"
    table, layers = reporting.routing_report(history, prefix)
    if layers:
        lines.append(f"\nRouting report ({'held-out' if prefix == 'eval' else 'training'} batches, step {step}):")
        lines.append(table)
    png = reporting.plot_expert_load(history, os.path.join(workdir, "expert_load.png"))
    tb_dir = os.path.join(workdir, "tensorboard")
    lines.append("")
    lines.append(f"  TensorBoard logs: {tb_dir}   (tensorboard --logdir {tb_dir})")
    lines.append(f"  metrics (JSON lines): {os.path.join(workdir, 'metrics.jsonl')}")
    lines.append(f"  checkpoints: {os.path.join(workdir, 'checkpoints')}")
    if png:
        lines.append(f"  expert load over training: {png}")
    print("\n".join(lines), flush=True)
