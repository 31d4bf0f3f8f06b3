"""Pretraining and fine-tuning: `train_and_evaluate(config, workdir)`.

One function in fixed sections (big_vision / flax examples style):

  1. config     validate every field once (`validate_config`), exit status 2 on a bad one;
                probe the workdir (a file written and removed): an unwritable one fails before any step
  2. logging    clu writers: TensorBoard + metrics.jsonl (process 0); progress: a tqdm bar on a
                terminal, else one line per logging window (stmoe.reporting.Progress)
  3. mesh       (data, expert, model) over all devices or the first `num_devices`
  4. data       seqio train iterator (per-host shard), a fixed list of held-out batches
  5. model     the model, its optimizer and the state's shardings: jax.eval_shape of the init ->
                logical axes -> NamedShardings; nothing unsharded (stmoe.steps.state_layout)
  6. steps      stmoe.steps.make_train_step / make_eval_step: the pure step functions bound to their
                settings, jitted with in/out shardings, the train state donated (the same factory
                the sharding tests and scripts/benchmark_train.py use)
  7. restore    own workdir > config.resume_from > config.init_checkpoint (params only) > scratch
  8. loop       step, hooks, metrics every log_every_steps, eval every eval_every_steps (held-out
                loss, and with `infer_eval.task` task metrics by decoding, stmoe.evaluation),
                async checkpoints every checkpoint_every_steps, SIGTERM/SIGINT -> save and return
  9. report     final losses, decoded task metrics, the routing table (stmoe.reporting), an expert-load PNG

Determinism: the dropout / routing rng of step s is fold_in(key(seed), s) (and the microbatch
index), and the data iterator's position is saved with the state, so a run stopped at step N
and resumed ends bitwise identical to one that never stopped (tests/test_trainer.py).

Metrics: steps return SUMS (cross-entropy, output z-loss, correct tokens) and the token count;
the host adds them over the logging window and divides once, so padding, packing and
microbatches weigh every target token equally.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stmoe import checkpoints, evaluation, inference, optim, partitioning, reporting, steps
from stmoe.config import ConfigError, LossConfig, ModelConfig
from stmoe.models import EncoderDecoder
from stmoe.steps import TrainState

Array = jax.Array
Hook = Callable[[int, Any], None]

# `freeze` presets (ST-MoE sec. 4.2, "fine-tuning a subset of parameters"): regexes of parameter
# paths to FREEZE (OptimConfig.freeze_patterns). Paths look like 'encoder/layers_1/ffn/moe/expert_wi_0',
# 'decoder/layers_0/ffn/mlp/wo', 'encoder/layers_0/attention/query' (scanned: 'encoder/scan_2/...').
#   name               updated                                       paper's row
#   none               everything                                    All
#   moe                everything but the MoE layers (router+experts) Non-MoE  (the paper's best)
#   non_moe            only the MoE layers                           MoE      (much worse)
#   attention          only self- and cross-attention                Attention
#   non_moe_ffn_only   only the dense (non-MoE) FFNs                 FFN
FREEZE_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "moe": (r"/moe/",),
    "non_moe": (r"^(?!.*/moe/)",),
    "attention": (r"^(?!.*attention/)",),
    "non_moe_ffn_only": (r"^(?!.*/ffn/(mlp|extra_mlp)/)",),
}
# Step metrics whose non-finite value a divergence message names.
LOSS_TERMS = ("loss", "cross_entropy", "output_z_loss", "aux_loss", "router_z_loss", "aux_loss_coef",
              "learning_rate", "grad_norm")


class TrainingDiverged(RuntimeError):
    """The run stopped because too many steps in a row had non-finite gradients (none was applied)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The typed, validated view of the ml_collections config (built once by validate_config)."""

    model: ModelConfig
    loss: LossConfig
    mesh: partitioning.MeshConfig
    optim: optim.OptimConfig
    task: str  # registered seqio name (vocabulary resolved)
    eval_task: str
    device_count: int
    infer_eval_task: str = ""  # registered seqio name of the decoding evaluation ("" = off)


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


# --------------------------------------------------------------------------------- validation


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


def _check_known(config: Mapping[str, Any], schema: Mapping[str, Any], prefix: str,
                 nested: Sequence[str] = ()) -> None:
    allowed = sorted(schema.keys())
    for key in config.keys():
        _check(key in schema, f"{prefix}{key}", f"unknown field; allowed: {allowed}")
    for key in nested:
        if key in config:
            _check_known(config[key], schema[key], f"{prefix}{key}.")


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> RunConfig:
    """Checks every field once; raises ConfigError naming the first bad one.

    Unknown fields (at any level), impossible model combinations (ModelConfig.validate), mesh
    sizes that do not multiply to the device count, batches that the data-parallel size or the
    microbatch count does not divide, zero intervals, and lengths too short for span corruption.
    `device_count` defaults to the devices this run would use (`num_devices` or all).
    """
    from configs import pretrain  # the schema: every field and its default
    from stmoe import data as stmoe_data
    from stmoe.data import preprocessors

    schema = pretrain.base_config()
    _check_known(config, schema, "", nested=("data", "loss", "mesh", "infer_eval"))
    optim_fields = {f.name for f in dataclasses.fields(optim.OptimConfig)}
    for key in config.optim.keys():
        _check(key in optim_fields, f"optim.{key}", f"unknown field; allowed: {sorted(optim_fields)}")

    model_cfg = ModelConfig.from_dict(config.model.to_dict()).validate()
    loss_cfg = LossConfig.from_dict(config.loss.to_dict()).validate()
    mesh_cfg = partitioning.MeshConfig.from_dict(config.mesh.to_dict())

    available = jax.device_count()
    _check(config.num_devices == -1 or 1 <= config.num_devices <= available, "num_devices",
           f"must be -1 (all) or in [1, {available}], got {config.num_devices}")
    if device_count is None:
        device_count = available if config.num_devices == -1 else config.num_devices
    _check(isinstance(config.batch_size, int) and config.batch_size >= 1, "batch_size",
           f"must be a positive integer, got {config.batch_size!r}")
    _check(isinstance(config.microbatches, int) and config.microbatches >= 1, "microbatches",
           f"must be a positive integer, got {config.microbatches!r}")
    _check(config.batch_size % config.microbatches == 0, "microbatches",
           f"must divide batch_size={config.batch_size}, got {config.microbatches}")
    lengths = (config.data.inputs_length, config.data.targets_length)
    partitioning.validate_layout(mesh_cfg, model_cfg, config.batch_size, device_count, lengths)
    data, expert, _ = mesh_cfg.resolve(device_count)
    micro = config.batch_size // config.microbatches
    _check(micro % (data * expert) == 0, "microbatches",
           f"a microbatch of batch_size / microbatches = {micro} sequences is not divisible by the "
           f"data-parallel size mesh.data * mesh.expert = {data * expert}")

    for name in ("total_steps", "checkpoint_every_steps", "eval_every_steps", "log_every_steps",
                 "keep_checkpoints"):
        value = config[name]
        _check(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
    _check(isinstance(config.eval_steps, int) and config.eval_steps >= 0, "eval_steps",
           f"must be an integer >= 0 (0 = no evaluation), got {config.eval_steps!r}")
    _check(config.freeze in FREEZE_PRESETS, "freeze",
           f"must be one of {sorted(FREEZE_PRESETS)}, got {config.freeze!r}")
    _check(not (config.reset_optimizer_state is False and not config.init_checkpoint),
           "reset_optimizer_state", "False needs init_checkpoint (whose optimizer state is kept)")

    d = config.data
    for name in ("inputs_length", "targets_length"):
        _check(isinstance(d[name], int) and d[name] >= 1, f"data.{name}",
               f"must be a positive integer, got {d[name]!r}")
    if d.text_files or "span_corruption" in d.task:
        tokens, needed = preprocessors.pre_corruption_length(max(d.inputs_length, 2))
        ok = d.inputs_length >= 3 and preprocessors.corrupted_lengths(tokens)[0] <= d.inputs_length
        _check(ok, "data.inputs_length",
               f"{d.inputs_length} is too short for span corruption: must be >= 3 (T5/ST-MoE use 512)")
        _check(d.targets_length >= needed, "data.targets_length",
               f"span corruption of inputs_length={d.inputs_length} needs targets_length >= {needed} "
               f"(stmoe.data.pre_corruption_length), got {d.targets_length}")

    optim_values = config.optim.to_dict()
    optim_values["freeze_patterns"] = tuple(optim_values["freeze_patterns"]) + FREEZE_PRESETS[config.freeze]
    try:
        optim_cfg = optim.OptimConfig(**optim_values).validate()
    except ValueError as e:
        raise ConfigError(str(e).replace("OptimConfig.", "optim.", 1)) from None

    vocab_path = d.vocab_path or None
    _check(not d.eval_text_files or d.text_files, "data.eval_text_files", "needs data.text_files (the training text)")
    if d.text_files:
        import tensorflow as tf
        for name in ("text_files", "eval_text_files"):
            _check(not d[name] or tf.io.gfile.glob(d[name]), f"data.{name}", f"no file matches {d[name]!r}")
        _check(isinstance(d.held_out_percent, int) and 0 <= d.held_out_percent < 100, "data.held_out_percent",
               f"must be an integer in [0, 100), got {d.held_out_percent!r}")
        task, eval_task = stmoe_data.register_text_files_tasks(
            "stmoe_text_files", d.text_files, vocab_path, eval_file_patterns=d.eval_text_files or None,
            held_out_percent=d.held_out_percent, eval_split=d.eval_split)
    else:
        try:
            task = stmoe_data.task_name_for(d.task, vocab_path) if vocab_path else \
                stmoe_data.task_name_for(d.task, _default_vocab(d.task))
            eval_task = task if not d.eval_task else (
                stmoe_data.task_name_for(d.eval_task, vocab_path) if vocab_path else
                stmoe_data.task_name_for(d.eval_task, _default_vocab(d.eval_task)))
        except KeyError as e:
            raise ConfigError(f"data.task: {e.args[0]}") from None
    import seqio
    if config.eval_steps:
        splits = sorted(seqio.get_mixture_or_task(eval_task).splits)  # declared at registration: reads nothing
        _check(d.eval_split in splits, "data.eval_split", f"{d.eval_split!r} is not a split of {eval_task}: {splits}")
    # Every id a task's vocabulary produces needs an embedding row: a larger vocabulary than
    # model.vocab_size would index past the table (NaN losses, not an error).
    from stmoe.data.vocab import NUM_EXTRA_IDS
    vocabulary = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary  # loads nothing
    checked = getattr(vocabulary, "sentencepiece_model_file", None)  # None: bytes
    try:
        ids = stmoe_data.num_ids(checked)
    except ValueError as e:
        raise ConfigError(f"data.vocab_path: {e}") from None
    source = f"data.vocab_path={vocab_path}" if vocab_path else \
        f"the vocabulary of data.{'text_files' if d.text_files else 'task'}, {checked or 'bytes'},"
    pieces = f"{ids - NUM_EXTRA_IDS} pieces" if checked else f"{ids - NUM_EXTRA_IDS} bytes and specials"
    _check(ids <= model_cfg.vocab_size, "model.vocab_size",
           f"{model_cfg.vocab_size} is smaller than the {ids} token ids of {source} ({pieces} + {NUM_EXTRA_IDS} "
           f"sentinels); set --config.model.vocab_size={-(-ids // 128) * 128} (the next multiple of 128)")
    infer = config.infer_eval
    infer_task = ""
    if infer.task:
        try:
            infer_task = stmoe_data.task_name_for(infer.task, vocab_path or _default_vocab(infer.task))
        except KeyError as e:
            raise ConfigError(f"infer_eval.task: {e.args[0]}") from None
        splits = sorted(seqio.get_mixture_or_task(infer_task).splits)
        _check(infer.split in splits, "infer_eval.split", f"{infer.split!r} is not a split of {infer_task}: {splits}")
        _check(infer.decoding in ("greedy", "beam"), "infer_eval.decoding",
               f"must be 'greedy' or 'beam', got {infer.decoding!r}")
        for name in ("batch_size", "beam_size"):
            _check(isinstance(infer[name], int) and infer[name] >= 1, f"infer_eval.{name}",
                   f"must be an integer >= 1, got {infer[name]!r}")
        _check(isinstance(infer.num_examples, int) and (infer.num_examples >= 1 or infer.num_examples == -1),
               "infer_eval.num_examples", f"must be -1 (all) or >= 1, got {infer.num_examples!r}")
        _check(jax.process_count() == 1, "infer_eval.task",
               "decoding evaluation inside training runs in single-process jobs only; use scripts/evaluate.py")
    return RunConfig(model=model_cfg, loss=loss_cfg, mesh=mesh_cfg, optim=optim_cfg, task=task, eval_task=eval_task,
                     device_count=device_count, infer_eval_task=infer_task)


def _default_vocab(family: str) -> str | None:
    from stmoe.data import tasks
    return tasks.families().get(family)


# ------------------------------------------------------------------------------- host helpers


def _divergence(step: int, metrics: Mapping[str, Array], optim_cfg: optim.OptimConfig) -> str | None:
    """Why the run must stop after `step`, or None. A step with non-finite gradients is skipped
    (its update never applied); `optim.max_consecutive_nonfinite` skips in a row (0: the first)
    stop the run. With `optim.skip_nonfinite=False` the first one stops it, before any save."""
    consecutive = int(metrics["consecutive_nonfinite"])  # the loop waits for every step anyway
    if consecutive == 0 or (optim_cfg.skip_nonfinite and consecutive < optim_cfg.max_consecutive_nonfinite):
        return None
    values = jax.device_get({k: metrics[k] for k in LOSS_TERMS if k in metrics})
    bad = ", ".join(k for k, v in values.items() if not np.all(np.isfinite(v))) or "the gradients only"
    if optim_cfg.skip_nonfinite:
        what = (f"{consecutive} steps in a row, {step - consecutive + 1} to {step}, had non-finite gradients "
                f"(optim.max_consecutive_nonfinite={optim_cfg.max_consecutive_nonfinite})")
    else:
        what = f"step {step} had non-finite gradients (optim.skip_nonfinite=False)"
    return f"training diverged: {what}; non-finite at step {step}: {bad}"


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


# Errors the scripts report in one line with exit status 2 (stmoe.cli): a bad config, a checkpoint of
# another model, a workdir that cannot be written, a checkpoint that could not be saved.
USER_ERRORS = (ConfigError, checkpoints.IncompatibleCheckpointError, checkpoints.WorkdirError,
               checkpoints.CheckpointSaveError)


def error_kind(error: BaseException) -> str:
    """'config' / 'checkpoint' / 'workdir': the word stmoe.cli.fail puts before 'error:'."""
    if isinstance(error, checkpoints.WorkdirError):
        return "workdir"
    return "config" if isinstance(error, ConfigError) else "checkpoint"


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


# ------------------------------------------------------------------------------ the trainer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Sequence[Hook] = ()) -> TrainResult:
    """Trains (or resumes) the run described by `config` in `workdir`; see the module docstring.

    `hooks` are called as hook(step, state) after every step, before the preemption check (tests
    use one to send SIGTERM at a chosen step).
    """
    from clu import metric_writers, periodic_actions

    from stmoe import data as stmoe_data

    # 1. Config: everything checked before any device work.
    partitioning.maybe_initialize_distributed()
    run = validate_config(config)
    workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
    for directory in (workdir, os.path.join(workdir, "checkpoints")):  # before any step: WorkdirError
        checkpoints.check_writable(directory)
    process = jax.process_index()

    # 2. Logging.
    tb_dir = os.path.join(workdir, "tensorboard")
    jsonl_path = os.path.join(workdir, "metrics.jsonl")
    writers = [metric_writers.create_default_writer(tb_dir, just_logging=process > 0, asynchronous=False)]
    if process == 0:
        writers.append(reporting.JsonlWriter(jsonl_path))
    writer = metric_writers.AsyncMultiWriter(writers)

    # 3. Mesh.
    devices = jax.devices()[:run.device_count]
    mesh = partitioning.make_mesh(run.mesh, devices)

    # 4. Data: this process's share of the global batch; held-out batches fetched once.
    shard_index, num_shards = partitioning.data_shard_info()
    lengths = {"inputs": config.data.inputs_length, "targets": config.data.targets_length}
    train_iter = stmoe_data.get_batch_iterator(
        run.task, "train", lengths, config.batch_size // num_shards, shard_index=shard_index,
        num_shards=num_shards, seed=config.data.seed, pack=config.data.pack)
    eval_batches = []
    if config.eval_steps:
        eval_iter = stmoe_data.get_batch_iterator(
            run.eval_task, config.data.eval_split, lengths, config.batch_size // config.microbatches // num_shards,
            shard_index=shard_index, num_shards=num_shards, seed=config.data.seed, pack=config.data.pack,
            shuffle=False, repeat=False)
        for _, batch in zip(range(config.eval_steps), eval_iter):
            eval_batches.append(batch)
        eval_iter.close()
    infer_evaluation = None
    if run.infer_eval_task:  # task metrics by decoding (seqio Evaluator); its datasets are cached once
        import seqio
        infer = config.infer_eval
        infer_evaluation = evaluation.Evaluation(
            run.infer_eval_task, split=infer.split, lengths=lengths,
            num_examples=None if infer.num_examples == -1 else infer.num_examples,
            log_dir=os.path.join(workdir, "infer_eval"), batch_size=infer.batch_size, decoding=infer.decoding,
            beam_size=infer.beam_size)
        infer_vocabulary = seqio.get_mixture_or_task(run.infer_eval_task).output_features["targets"].vocabulary

    # 5. Model, optimizer and shardings: abstract params -> optimizer built on their paths -> state shardings.
    # The MoE dispatch and expert execution are chosen here, once, for this backend and mesh.
    model_cfg = partitioning.resolve_model(run.model, mesh)
    model = EncoderDecoder(model_cfg)
    init_rng = jax.random.key(config.seed)
    shapes = {"encoder_input_tokens": (2, lengths["inputs"]), "decoder_input_tokens": (2, lengths["targets"]),
              "decoder_target_tokens": (2, lengths["targets"])}
    layout = steps.state_layout(model, lambda params: optim.make_optimizer(run.optim, params), mesh, shapes,
                                init_rng)
    abstract_state, num_params = layout.abstract, layout.num_params

    # 6. Step functions (stmoe.steps): pure, bound to their settings, jitted with shardings; the state is donated.
    traces = {"train": 0}
    p_train_step = steps.make_train_step(
        model, layout.optimizer, mesh=mesh, state_shardings=layout.shardings,
        learning_rate_fn=optim.learning_rate_schedule(run.optim), loss_cfg=run.loss, microbatches=config.microbatches, seed=config.seed,
        on_trace=lambda: traces.__setitem__("train", traces["train"] + 1))
    p_eval_step = steps.make_eval_step(model, mesh=mesh, param_shardings=layout.shardings.params)

    # 7. Restore: own workdir > resume_from > init_checkpoint (params only) > scratch. A checkpoint of
    # another architecture, or a data position of another input stream, stops the run here with one
    # line (ConfigError / IncompatibleCheckpointError); damaged or unfinished steps are skipped, named.
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    ckpt = checkpoints.Checkpointer(checkpoint_dir, max_to_keep=config.keep_checkpoints)
    model_fields = config.model.to_dict()
    state, origin, notes = None, "scratch", []
    unfinished = ckpt.unfinished_steps()
    if ckpt.latest_step() is not None:
        _check_own_checkpoints(ckpt, abstract_state.params, model_fields)
        state, data_state, step = ckpt.restore(abstract_state)  # warns and falls back past damaged steps
        notes.append(_restore_data_position(train_iter, data_state))
        origin = f"its own checkpoint at step {step}"
        skipped = list(ckpt.skipped)
        if skipped:  # newer steps were damaged: set them aside, keep their files
            ckpt.close()
            _set_aside_steps(checkpoint_dir, [s for s, _ in skipped])
            ckpt = checkpoints.Checkpointer(checkpoint_dir, max_to_keep=config.keep_checkpoints)
            notes += [f"skipped checkpoint step {s}: damaged ({reason}); moved to {checkpoint_dir}/{s}.damaged"
                      for s, reason in skipped]
        unfinished = [s for s in unfinished if s > step]
    elif config.resume_from:
        with checkpoints.Checkpointer(config.resume_from, async_save=False) as other:
            _check_own_checkpoints(other, abstract_state.params, model_fields)
            state, data_state, step = other.restore(abstract_state)
        notes.append(_restore_data_position(train_iter, data_state))
        origin = f"{config.resume_from} at step {step}"
    notes += [f"skipped checkpoint step {s}: its save never completed (cut off by a kill or a crash); "
              f"its partial files are deleted" for s in unfinished]
    if state is None:
        state = layout.init(init_rng)
        if config.init_checkpoint:
            if config.reset_optimizer_state:  # params only; a scanned / unscanned layout is converted
                params = checkpoints.restore_params(config.init_checkpoint, abstract_state.params,
                                                    model_config=model_fields)
                state = state.replace(params=params)
            else:
                try:
                    directory = checkpoints.check_compatible(config.init_checkpoint, abstract_state.params,
                                                             model_config=model_fields, convert_layout=False)
                except checkpoints.IncompatibleCheckpointError as e:
                    raise checkpoints.IncompatibleCheckpointError(
                        f"init_checkpoint: {e}" + ("; set reset_optimizer_state=True to read its params only"
                                                   if "optimizer state" in str(e) else "")) from None
                step_dir = os.path.dirname(directory)  # .../checkpoints/<step>/state
                with checkpoints.Checkpointer(os.path.dirname(step_dir), async_save=False) as other:
                    restored, _, _ = other.restore(abstract_state, step=int(os.path.basename(step_dir)))
                state = restored.replace(step=jnp.zeros((), jnp.int32))
            origin = f"params of {config.init_checkpoint}"
    if process == 0:  # only now: a refused restore leaves the previous run's config.json in place
        from etils import epath
        epath.Path(workdir, "config.json").write_text(config.to_json_best_effort(indent=2))
    for note in filter(None, notes):
        _say(f"stmoe: {note}")
    start_step = int(jax.device_get(state.step))
    _say(f"stmoe: {num_params / 1e6:.2f}M params, mesh {dict(mesh.shape)} on {len(devices)} "
         f"{devices[0].platform} device(s), MoE dispatch {model_cfg.moe.dispatch!r} with experts "
         f"{model_cfg.moe.expert_execution!r}; starting at step {start_step} from {origin}; workdir {workdir}")

    # 8. Evals and the loop.
    def evaluate_by_decoding(step: int) -> dict[str, dict[str, float]]:
        loaded = inference.LoadedModel(model=model, params=state.params, mesh=mesh, vocabulary=infer_vocabulary,
                                       run_config=config, checkpoint="", inputs_length=lengths["inputs"],
                                       targets_length=lengths["targets"])
        results = infer_evaluation.run(loaded, step=step)
        writer.write_scalars(step, evaluation.flat_scalars(results))
        return results

    def evaluate() -> dict[str, float]:
        if not eval_batches:
            return {}
        with partitioning.activate(mesh):
            results = [p_eval_step(state.params, partitioning.shard_batch(b, mesh)) for b in eval_batches]
        reduced = steps.reduce_metrics(results)
        reduced["loss"] = reduced["cross_entropy"]
        return reduced

    def save(step: int, *, wait: bool = False) -> None:
        if step in saved_steps:
            return
        ckpt.save(step, state, train_iter.get_state(), force=True, wait=wait)
        saved_steps.add(step)

    saved_steps = {start_step} if origin.startswith("its own") else set()
    report_progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    window: list[dict[str, Array]] = []
    window_tokens, window_start = 0, time.perf_counter()
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    infer_metrics: dict[str, dict[str, float]] = {}
    preempted = False
    diverged: str | None = None
    step = start_step
    try:
        handler = checkpoints.install_preemption_handler()
    except RuntimeError:  # not the main thread (e.g. a notebook worker): no signal handling
        handler = None
    progress = reporting.Progress(config.total_steps, start_step, enabled=process == 0)  # tqdm on a TTY only
    try:
        while step < config.total_steps:
            batch = next(train_iter)
            window_tokens += int(np.sum(batch["encoder_input_tokens"] > 0) + np.sum(batch["decoder_target_tokens"] > 0))
            with partitioning.activate(mesh):
                state, step_metrics = p_train_step(state, partitioning.shard_batch(batch, mesh))
            step += 1
            diverged = _divergence(step, step_metrics, run.optim)
            if diverged:  # this step's update was skipped (or, skipping off, is never saved)
                break
            window.append(step_metrics)
            step_metrics["loss"].block_until_ready()  # an honest progress bar / ETA; XLA keeps the device busy
            progress.update(step)
            for hook in hooks:
                hook(step, state)
            report_progress(step)

            if step % config.log_every_steps == 0 or step == config.total_steps:
                train_metrics = steps.reduce_metrics(window)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                train_metrics["tokens_per_sec"] = window_tokens * num_shards / elapsed
                train_metrics["steps_per_sec"] = len(window) / elapsed
                writer.write_scalars(step, {f"train/{k}": v for k, v in train_metrics.items()})
                progress.log(step, train_metrics)
                window, window_tokens, window_start = [], 0, time.perf_counter()
            if eval_batches and (step % config.eval_every_steps == 0 or step == config.total_steps):
                eval_metrics = evaluate()
                writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                progress.log_eval(step, train_metrics, eval_metrics)
            if infer_evaluation and (step % config.eval_every_steps == 0 or step == config.total_steps):
                infer_metrics = evaluate_by_decoding(step)
            if step % config.checkpoint_every_steps == 0:
                save(step)
            if handler is not None and handler.requested:
                preempted = True
                break
        if not diverged:
            save(step, wait=True)
    finally:
        progress.close()
        if handler is not None:
            handler.uninstall()
        writer.flush()
        writer.close()
        train_iter.close()
        ckpt.close()  # raises CheckpointSaveError if the last save failed

    # 9. Report.
    if diverged:
        last = max(saved_steps) if saved_steps else None
        where = (f"last good checkpoint: step {last} in {os.path.join(workdir, 'checkpoints')} (rerunning resumes "
                 "there)" if last is not None else "no checkpoint was saved")
        raise TrainingDiverged(f"{diverged}; no non-finite update was applied or saved; {where}. Try a lower "
                               "learning rate, the router z-loss, or a float32 router / activations")
    if preempted:
        _say(f"stmoe: stopped by a signal at step {step}; checkpoint saved, rerun the same command to resume")
    elif process == 0:
        _report(workdir, jsonl_path, tb_dir, step, train_metrics, eval_metrics, infer_metrics, run)
    return TrainResult(state=state, step=step, train_metrics=train_metrics, eval_metrics=eval_metrics,
                       infer_eval_metrics=infer_metrics, preempted=preempted, train_step_traces=traces["train"])


def _report(workdir: str, jsonl_path: str, tb_dir: str, step: int, train_metrics: Mapping[str, float],
            eval_metrics: Mapping[str, float], infer_metrics: Mapping[str, Mapping[str, float]],
            run: RunConfig) -> None:
    lines = [f"\nFinished at step {step}."]
    if train_metrics:
        lines.append(f"  train    cross-entropy {train_metrics['cross_entropy']:.4f} nats/token, "
                     f"accuracy {train_metrics['accuracy']:.3f} (last logging window)")
    if eval_metrics:
        lines.append(f"  held-out cross-entropy {eval_metrics['cross_entropy']:.4f} nats/token, "
                     f"accuracy {eval_metrics['accuracy']:.3f} ({run.eval_task}, "
                     f"{inference.capacity_description(run.model)})")
    for task, values in infer_metrics.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
        lines.append(f"  decoded  {task}: {shown} (greedy; infer_eval/{task}-metrics.jsonl)")
    prefix = "eval" if eval_metrics else "train"
    table, layers = reporting.routing_report(jsonl_path, prefix)
    if layers:
        lines.append(f"\nRouting report ({'held-out' if prefix == 'eval' else 'training'} batches, step {step}):")
        lines.append(table)
    png = reporting.plot_expert_load(jsonl_path, os.path.join(workdir, "expert_load.png"))
    lines.append("")
    lines.append(f"  TensorBoard logs: {tb_dir}   (tensorboard --logdir {tb_dir})")
    lines.append(f"  metrics (JSON lines): {jsonl_path}")
    lines.append(f"  checkpoints: {os.path.join(workdir, 'checkpoints')}")
    if png:
        lines.append(f"  expert load over training: {png}")
    print("\n".join(lines), flush=True)
