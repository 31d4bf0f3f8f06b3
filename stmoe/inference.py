"""A trained model ready to predict, score and report its routing: `load(path)` and batched helpers.

    model = inference.load("./runs/finetune_qa", eval_capacity_factor=2.0)
    tokens = inference.predict_tokens(model, inference.tokenize(model, ["question: ..."]))
    inference.detokenize(model, tokens)

`load` reads the run's `config.json` (written by the trainer next to `checkpoints/`) for the
model and vocabulary, and only the parameters of the newest checkpoint (or of a given step dir),
placed on a mesh over the local devices. The model is always built unscanned (the KV-cache decoder
needs one module per layer): a run trained with `scan_layers` has its params converted on load
(stmoe.checkpoints.restore_params). `eval_capacity_factor` replaces the checkpoint's value:
the capacity is a property of the computation, not of the weights (ST-MoE sec. 4.2 / App. D,
train 1.25 and eval 2.0), so a model can be evaluated at any factor.

Batching: rows are cut into fixed-size batches (padded with empty rows, dropped again on the
way out), so one compiled function serves every batch; the batch size is rounded up to a
multiple of the data-parallel size.

Routing stats (`routing_stats`) come from one teacher-forced pass over (inputs, targets) at the
eval capacity factor: whole sequences are routed together there, which is where the capacity
can drop tokens. Cached decoding routes one token per sequence and step and never drops.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from stmoe import checkpoints, decoding, metrics as moe_metrics, partitioning
from stmoe.config import ConfigError, ModelConfig, RunConfig, upgrade_run_config
from stmoe.config import run_config as run_config_of
from stmoe.models import EncoderDecoder

DECODING_MODES = ("greedy", "beam", "sample")


@dataclasses.dataclass
class LoadedModel:
    """A model with its params on a mesh: what `load` returns, and what the trainer's decoding
    evaluation builds from its live params (no vocabulary, run config or checkpoint then)."""

    model: EncoderDecoder
    params: Any  # sharded over `mesh`
    mesh: Mesh
    inputs_length: int
    targets_length: int
    vocabulary: Any = None  # seqio.Vocabulary (tokenize / detokenize)
    run_config: RunConfig | None = None  # the training run's config.json
    checkpoint: str = ""  # the state directory the params came from

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def data_parallel(self) -> int:
        return partitioning.data_parallel_size(self.mesh)


def find_run_config(path: str) -> tuple[RunConfig, str]:
    """(config, its path) of the run that owns checkpoint `path`: config.json in `path` or up to two
    directories above it (workdir / checkpoints / step). An older run's moved fields are read in their
    new places (config.upgrade_run_config)."""
    directory = os.path.abspath(path)
    for _ in range(4):
        candidate = os.path.join(directory, "config.json")
        if os.path.isfile(candidate):
            try:
                with open(candidate, encoding="utf-8") as f:
                    values = json.load(f)
            except ValueError as e:  # truncated or hand-edited: JSONDecodeError, UnicodeDecodeError
                raise ConfigError(f"{candidate} is not valid JSON ({e}); fix it, or copy it back from a "
                                  "backup (scripts/train.py writes it when a run starts)") from None
            try:
                return RunConfig.from_dict(upgrade_run_config(values)), candidate
            except ConfigError as e:
                raise ConfigError(f"{candidate}: {e}") from None
        directory = os.path.dirname(directory)
    raise FileNotFoundError(f"no config.json in {path} or above it; pass a training run's workdir "
                            "(scripts/train.py writes WORKDIR/config.json)")


def with_eval_capacity_factor(moe_values: dict[str, Any], factor: float) -> dict[str, Any]:
    """The run's `model.moe` fields with `factor` as the capacity of every deterministic pass.

    An integer `expert_capacity` (imported Hugging Face models) would override any factor, so it is
    cleared: the factor is what the caller asked for. `dispatch='dropless'` has no capacity at all,
    so a factor cannot apply: ConfigError, rather than a figure reported for a setting that did nothing.
    """
    if not (factor > 0 and math.isfinite(factor)):
        raise ConfigError(f"eval_capacity_factor: must be a finite number > 0, got {factor}")
    if moe_values.get("dispatch") == "dropless":
        raise ConfigError("eval_capacity_factor: this model uses model.moe.dispatch='dropless', which has no "
                          "expert capacity and drops no token, so a capacity factor cannot apply")
    return {**moe_values, "eval_capacity_factor": float(factor), "expert_capacity": None}


def capacity_description(cfg: ModelConfig) -> str:
    """How the deterministic (eval / inference) passes of `cfg` size the experts, for reports."""
    if cfg.moe.dispatch == "dropless":
        return "dropless dispatch (no capacity)"
    if cfg.moe.expert_capacity is not None:
        return f"expert capacity {cfg.moe.expert_capacity} slots per group (integer, overrides the factors)"
    return f"eval capacity factor {cfg.moe.eval_capacity_factor}"


def applied_eval_capacity_factor(cfg: ModelConfig) -> float | None:
    """The eval capacity factor that sizes the experts of `cfg`, or None where none does."""
    if cfg.moe.dispatch == "dropless" or cfg.moe.expert_capacity is not None:
        return None
    return cfg.moe.eval_capacity_factor


def load(path: str, *, eval_capacity_factor: float | None = None, num_devices: int | None = None,
         config: RunConfig | ml_collections.ConfigDict | None = None) -> LoadedModel:
    """The model of the run at `path` (workdir, checkpoints dir or step dir) with its trained params,
    of the newest step that reads (a damaged newer one is skipped with one warning line).

    `config` replaces the run's config.json (e.g. a configs/*.py preset). Raises FileNotFoundError
    (no checkpoint / config), ConfigError (bad eval_capacity_factor, a config.json that does not read),
    checkpoints.IncompatibleCheckpointError (the config and the saved shapes disagree) or
    checkpoints.CheckpointRestoreError (no step reads).
    """
    from stmoe.data import tasks, vocab

    state_dir = checkpoints.state_dir(path)
    run_config = run_config_of(config) if config is not None else find_run_config(path)[0]
    model_values = run_config.model.to_dict()
    if eval_capacity_factor is not None:
        model_values["moe"] = with_eval_capacity_factor(model_values["moe"], eval_capacity_factor)
    model_values["scan_layers"] = False  # decoding runs unscanned; scanned params are converted below
    model_cfg = ModelConfig.from_dict(model_values).validate()

    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    mesh_cfg = run_config.mesh
    try:
        partitioning.validate_layout(mesh_cfg, model_cfg, len(devices), len(devices))
    except ConfigError:  # the training layout does not fit these devices: plain data parallelism
        mesh_cfg = partitioning.MeshConfig(data=-1, expert=1, model=1)
    mesh = partitioning.make_mesh(mesh_cfg, devices)

    model = EncoderDecoder(partitioning.resolve_model(model_cfg, mesh))  # `config` stays the run's, unresolved
    data = run_config.data
    lengths = (int(data.inputs_length), int(data.targets_length))
    shapes = {"encoder_input_tokens": (2, lengths[0]), "decoder_input_tokens": (2, lengths[1]),
              "decoder_target_tokens": (2, lengths[1])}
    abstract, shardings = partitioning.abstract_params_and_shardings(model, mesh, shapes, jax.random.key(0))
    params, state_dir, _ = checkpoints.newest_params(path, partitioning.with_shardings(abstract, shardings),
                                                     model_config=model_values)  # a damaged newest step is skipped
    vocab_path = data.vocab_path or tasks.families().get(data.task)
    return LoadedModel(model=model, params=params, mesh=mesh, vocabulary=vocab.get_vocabulary(vocab_path),
                       run_config=run_config, checkpoint=state_dir, inputs_length=lengths[0],
                       targets_length=lengths[1])


# ------------------------------------------------------------------------------ text <-> tokens


def tokenize(loaded: LoadedModel, texts: Sequence[str], length: int | None = None) -> np.ndarray:
    """Texts -> [len(texts), length] int32: vocabulary ids + EOS, cut to `length` (default the run's
    inputs_length; a cut row keeps its EOS), padded with 0."""
    length = length or loaded.inputs_length
    out = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
        ids = list(loaded.vocabulary.encode(text))[:length - 1] + [decoding.EOS_ID]
        out[row, :len(ids)] = ids
    return out


def detokenize(loaded: LoadedModel, tokens: np.ndarray) -> list[str]:
    """[n, length] generated ids -> texts (everything from EOS on is dropped)."""
    texts = []
    for row in np.asarray(tokens).tolist():
        if decoding.EOS_ID in row:
            row = row[:row.index(decoding.EOS_ID)]
        texts.append(loaded.vocabulary.decode([t for t in row if t > 0]))
    return texts


# ---------------------------------------------------------------------------------- batching


def _batches(loaded: LoadedModel, arrays: Sequence[np.ndarray], batch_size: int) -> Iterator[tuple[int, list]]:
    """(real rows, [array chunks padded with zero rows to a fixed batch]) over the leading axis."""
    size = math.ceil(max(batch_size, 1) / loaded.data_parallel) * loaded.data_parallel
    total = len(arrays[0])
    for start in range(0, total, size):
        chunk = [a[start:start + size] for a in arrays]
        real = len(chunk[0])
        yield real, [np.pad(c, [(0, size - real)] + [(0, 0)] * (c.ndim - 1)) for c in chunk]


def _shard(loaded: LoadedModel, *arrays: np.ndarray) -> list[jax.Array]:
    sharding = partitioning.batch_sharding(loaded.mesh)
    return [jax.device_put(jnp.asarray(a), sharding) for a in arrays]


def _teacher_forced(loaded: LoadedModel, inputs: np.ndarray, targets: np.ndarray) -> dict[str, jax.Array]:
    """Inputs [n, enc_len], targets [n, dec_len] -> the sharded model batch: decoder inputs are the
    targets shifted right (start token 0); loss weights mark real target tokens."""
    batch = {"encoder_input_tokens": inputs, "decoder_input_tokens": np.pad(targets[:, :-1], [(0, 0), (1, 0)]),
             "decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.float32)}
    return dict(zip(batch, _shard(loaded, *batch.values())))


# ---------------------------------------------------------------------------- predict / score


def predict_tokens(loaded: LoadedModel, encoder_input_tokens: np.ndarray, *, mode: str = "greedy",
                   batch_size: int = 32, max_decode_length: int | None = None, beam_size: int = 4,
                   alpha: float = 0.6, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> np.ndarray:
    """[n, enc_len] -> generated ids [n, max_decode_length] (EOS included, then 0), best beam for 'beam'."""
    if mode not in DECODING_MODES:
        raise ValueError(f"decoding mode must be one of {DECODING_MODES}, got {mode!r}")
    length = max_decode_length or loaded.targets_length
    outputs = []
    rng = jax.random.key(seed)
    with partitioning.activate(loaded.mesh):
        for index, (real, (inputs,)) in enumerate(_batches(loaded, [encoder_input_tokens], batch_size)):
            (inputs,) = _shard(loaded, inputs)
            if mode == "greedy":
                tokens = decoding.greedy_decode(loaded.model, loaded.params, inputs, max_decode_length=length)
            elif mode == "beam":
                tokens = decoding.beam_search(loaded.model, loaded.params, inputs, beam_size=beam_size,
                                              max_decode_length=length, alpha=alpha)[0][:, 0]
            else:
                tokens = decoding.sample(loaded.model, loaded.params, inputs, jax.random.fold_in(rng, index),
                                         max_decode_length=length, temperature=temperature, top_k=top_k)
            outputs.append(np.asarray(jax.device_get(tokens))[:real])
    return np.concatenate(outputs) if outputs else np.zeros((0, length), np.int32)


def score_tokens(loaded: LoadedModel, encoder_input_tokens: np.ndarray, targets: np.ndarray, *,
                 batch_size: int = 32) -> np.ndarray:
    """Log-likelihood (nats) of each row of `targets` [n, dec_len] given its inputs -> [n] float32."""
    scores = []
    with partitioning.activate(loaded.mesh):
        for real, (inputs, target) in _batches(loaded, [encoder_input_tokens, targets], batch_size):
            batch = _teacher_forced(loaded, inputs, target)
            scores.append(np.asarray(jax.device_get(decoding.score(loaded.model, loaded.params, batch)))[:real])
    return np.concatenate(scores) if scores else np.zeros((0,), np.float32)


def _routing_pass(params, batch, *, model):
    """Per-layer router stats of one deterministic teacher-forced pass (eval capacity factor)."""
    _, variables = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                               batch["decoder_target_tokens"], enable_dropout=False, mutable=["moe"])
    layers = moe_metrics.expand_scanned(moe_metrics.collect_layers(variables.get("moe", {})))
    return {layer: stats.as_dict() for layer, stats in layers.items()}


def routing_stats(loaded: LoadedModel, encoder_input_tokens: np.ndarray, targets: np.ndarray, *,
                  batch_size: int = 32) -> dict[str, dict[str, float]]:
    """{layer: {dropped_tokens, dropped_fraction_rank1, ..., load_cv, ...}} averaged over the rows'
    tokens, plus 'all' = the mean over MoE layers. Tokens are real (non-padding) inputs and targets.

    dropped_tokens: share of tokens that reached no expert (the residual alone carried them);
    dropped_fraction_rank{r}: share whose rank-r choice was dropped (stmoe.metrics).
    """
    fn = decoding.jit_static(_routing_pass, model=loaded.model)
    sums: dict[str, dict[str, float]] = {}
    weights: dict[str, float] = {}
    with partitioning.activate(loaded.mesh):
        for _, (inputs, target) in _batches(loaded, [encoder_input_tokens, targets], batch_size):
            layers = jax.device_get(fn(loaded.params, _teacher_forced(loaded, inputs, target)))
            for layer, values in layers.items():
                # Stats are per real token of the batch; weigh batches by their real tokens.
                side = inputs if layer.startswith("encoder") else target
                tokens = float(np.sum(side > 0))
                weights[layer] = weights.get(layer, 0.0) + tokens
                acc = sums.setdefault(layer, {})
                for name, value in values.items():
                    if np.ndim(value) == 0:
                        acc[name] = acc.get(name, 0.0) + float(value) * tokens
    out = {layer: {k: v / max(weights[layer], 1.0) for k, v in acc.items()} for layer, acc in sums.items()}
    if out:
        names = next(iter(out.values())).keys()
        out["all"] = {k: float(np.mean([out[layer][k] for layer in sums])) for k in names}
    return out
