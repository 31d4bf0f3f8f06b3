"""The train and eval steps, and the one factory that jits them with their shardings.

`make_train_step` / `make_eval_step` are what `trainer.train_and_evaluate` runs, what the
sharding tests compile (tests/sharded_step.py: the all-to-all / no-all-gather HLO checks and
the 8-devices-equal-1-device comparisons) and what scripts/benchmark_train.py times, so the
HLO checks and the throughput figures are about the step a run executes.

Metrics: steps return SUMS (cross-entropy, output z-loss, correct tokens) and the token count;
the host adds them over the logging window and divides once, so padding, packing and
microbatches weigh every target token equally (`reduce_metrics`).

Determinism: the dropout / routing rng of step s is fold_in(key(seed), s) (and the microbatch
index), so a resumed run redoes the same steps bitwise.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from stmoe import losses, metrics as moe_metrics, optim, partitioning
from stmoe.config import LossConfig

Array = jax.Array

SUM_KEYS = ("cross_entropy", "output_z_loss", "correct", "weight")
LATEST_KEYS = ("nonfinite_skips", "consecutive_nonfinite")


@flax.struct.dataclass
class TrainState:
    step: Array  # [] int32, optimizer steps taken (skipped non-finite steps count too)
    params: Any
    opt_state: Any


def _model_kwargs(batch: Mapping[str, Array]) -> dict[str, Array]:
    keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")
    return {k: batch[k] for k in keys if k in batch}


OBJECTIVE_WEIGHTS = "objective_weights"  # batch key: losses.loss_weights_and_normalizer's per-token weights


def forward(params, batch, rng, *, model, output_z_coef, enable_dropout, label_smoothing=0.0):
    """-> (cross-entropy sums (output z-loss weighted by `output_z_coef`; with batch[OBJECTIVE_WEIGHTS]
    also the objective's sum), the unweighted MoE loss terms {aux_loss, router_z_loss} averaged over
    layers, flat per-layer metrics)."""
    rngs = {"dropout": rng} if rng is not None else {}
    logits, variables = model.apply({"params": params}, **_model_kwargs(batch), enable_dropout=enable_dropout,
                                    rngs=rngs, mutable=["moe"])
    ce = losses.cross_entropy_sums(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
                                   z_loss_coef=output_z_coef, label_smoothing=label_smoothing,
                                   objective_weights=batch.get(OBJECTIVE_WEIGHTS))
    moe_collection = variables.get("moe", {})
    return ce, losses.moe_losses(moe_collection), moe_metrics.summarize(moe_metrics.collect_layers(moe_collection))


def _split_microbatches(batch: Mapping[str, Array], num: int) -> dict[str, Array]:
    """[batch, ...] -> [num, batch / num, ...]; microbatch i takes rows i, i + num, ... so each one
    stays spread over the data-parallel devices (no resharding)."""
    def split(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, P(None, partitioning.BATCH_AXES))
    return {k: split(v) for k, v in batch.items()}


def train_step(state: TrainState, batch: Mapping[str, Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
               loss_cfg: LossConfig, balance_coef_fn: optax.Schedule, microbatches: int, seed: int,
               return_grads: bool = False):
    """One optimizer step on `batch` [batch, length] (gradients accumulated over microbatches).

    The objective (losses.py, `loss_cfg`) is the full batch's cross-entropy (+ output z-loss) sum
    divided by its normalizer (loss.loss_normalizing_factor; default the real target tokens) plus
    c_B(step) * L_B + c_z * L_z averaged over microbatches: each microbatch's cross-entropy SUM is
    divided by the whole batch's normalizer, so accumulating equals one big batch exactly. The
    logged cross-entropy is per real target token, label-smoothed as the objective is. `balance_coef_fn` = losses.balance_coef_schedule(loss_cfg).
    Returns (new state, metrics), and the gradients third with `return_grads`.
    """
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    balance_coef = balance_coef_fn(state.step)
    # The whole batch's weights and normalizer (loss.loss_normalizing_factor), so that each
    # microbatch's weighted sum divided by it adds up to the big batch's objective.
    objective_weights, normalizer = losses.loss_weights_and_normalizer(batch, loss_cfg.loss_normalizing_factor)
    batch = {**batch, OBJECTIVE_WEIGHTS: objective_weights}

    def loss_fn(params, micro, micro_rng):
        ce, moe, layer_metrics = forward(params, micro, micro_rng, model=model, output_z_coef=loss_cfg.output_z_coef,
                                         enable_dropout=True, label_smoothing=loss_cfg.label_smoothing)
        loss = losses.total_loss(ce, moe, balance_coef / microbatches, loss_cfg.router_z_coef / microbatches,
                                 normalizer=normalizer)
        ce = {k: v for k, v in ce.items() if k != "objective"}
        return loss, (ce, moe, layer_metrics)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (loss, (ce, moe, layer_metrics)), grads = grad_fn(state.params, batch, rng)
    else:
        def accumulate(carry, xs):
            index, micro = xs
            (loss, aux), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
            carry = jax.tree.map(jnp.add, carry, (loss, grads))
            return carry, aux

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), (ce, moe, layer_metrics) = jax.lax.scan(
            accumulate, zeros, (jnp.arange(microbatches), _split_microbatches(batch, microbatches)))
        ce = jax.tree.map(lambda x: jnp.sum(x, axis=0), ce)
        moe, layer_metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), (moe, layer_metrics))

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    skips = optax.tree.get(opt_state, "total_notfinite", default=jnp.zeros((), jnp.int32))
    consecutive = optim.consecutive_nonfinite_skips(opt_state)
    if consecutive is None:  # skipping is off: this step's update was applied, finite or not
        finite = optim.all_finite(grads) & optim.all_finite(params) & optim.all_finite(opt_state)
        consecutive = 1 - finite.astype(jnp.int32)
    step_metrics = {
        **ce, **moe, **layer_metrics,
        "loss": loss,
        "learning_rate": learning_rate_fn(state.step),
        "aux_loss_coef": balance_coef,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
        "nonfinite_skips": skips.astype(jnp.float32),
        "consecutive_nonfinite": consecutive.astype(jnp.float32),
    }
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return (new_state, step_metrics, grads) if return_grads else (new_state, step_metrics)


def eval_step(params: Any, batch: Mapping[str, Array], *, model: nn.Module) -> dict[str, Array]:
    """Held-out sums on one batch; no dropout, the eval capacity factor (deterministic routing)."""
    ce, moe, layer_metrics = forward(params, batch, None, model=model, output_z_coef=0.0, enable_dropout=False)
    return {**ce, **moe, **layer_metrics}


# --------------------------------------------------------------------------- state and factory


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where a run's TrainState lives: its optimizer, abstract values and shardings, and its init.

    `init(rng)` builds the state with every array allocated on its own shards only.
    """

    optimizer: optax.GradientTransformation
    abstract: TrainState  # ShapeDtypeStructs carrying their shardings (what a restore reads into)
    shardings: TrainState
    init: Callable[[Array], TrainState]
    num_params: int


def state_layout(model: nn.Module, optimizer_for: Callable[[Any], optax.GradientTransformation], mesh: Mesh,
                 shapes: Mapping[str, tuple[int, ...]], rng: Array) -> StateLayout:
    """Abstract params -> logical axes -> NamedShardings; the optimizer is built on the abstract
    params in their nn.Partitioned boxes (`optimizer_for(boxed_params)`: its labels follow
    parameter paths, t5x-style Adafactor's factoring their logical axis names) and its state
    sharded like the params it tracks. `shapes`: model input name -> shape (any batch size)."""
    boxed_params, param_shardings = partitioning.abstract_params_and_shardings(model, mesh, shapes, rng, boxed=True)
    abstract_params = nn.unbox(boxed_params)
    optimizer = optimizer_for(boxed_params)  # boxed: t5x-style Adafactor factors by the logical axis names
    opt_shardings = partitioning.opt_state_shardings(optimizer, abstract_params, param_shardings, mesh)
    shardings = TrainState(step=partitioning.replicated(mesh), params=param_shardings, opt_state=opt_shardings)

    def init_state(rng):
        zeros = {k: jnp.zeros(v, jnp.int32) for k, v in shapes.items()}
        params = nn.unbox(model.init(rng, **zeros, enable_dropout=False)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    with partitioning.activate(mesh):
        abstract = partitioning.with_shardings(jax.eval_shape(init_state, rng), shardings)
    jitted_init = jax.jit(init_state, out_shardings=shardings)

    def init(rng):
        with partitioning.activate(mesh):
            return jitted_init(rng)

    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
    return StateLayout(optimizer=optimizer, abstract=abstract, shardings=shardings, init=init,
                       num_params=num_params)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, *, mesh: Mesh,
                    state_shardings: TrainState, learning_rate_fn: optax.Schedule, loss_cfg: LossConfig,
                    microbatches: int = 1, seed: int = 0, donate: bool = True, return_grads: bool = False,
                    on_trace: Callable[[], None] | None = None):
    """`train_step` bound to its settings and jitted: (state, batch) -> (state, metrics[, grads]).

    The batch is split over the data-parallel axes, the metrics replicated, the state keeps its
    shardings and (`donate`) its buffers are reused. `on_trace` runs each time jit traces the step
    (the trainer counts retraces). Call it under `partitioning.activate(mesh)`.
    """
    bound = functools.partial(
        train_step, model=model, optimizer=optimizer, learning_rate_fn=learning_rate_fn, loss_cfg=loss_cfg,
        balance_coef_fn=losses.balance_coef_schedule(loss_cfg), microbatches=microbatches, seed=seed,
        return_grads=return_grads)

    def step(state, batch):
        if on_trace is not None:
            on_trace()  # runs at trace time only
        return bound(state, batch)

    replicated = partitioning.replicated(mesh)
    out_shardings = (state_shardings, replicated) + ((state_shardings.params,) if return_grads else ())
    return jax.jit(step, in_shardings=(state_shardings, partitioning.batch_sharding(mesh)),
                   out_shardings=out_shardings, donate_argnums=(0,) if donate else ())


def make_eval_step(model: nn.Module, *, mesh: Mesh, param_shardings: Any):
    """`eval_step` jitted: (params, batch) -> replicated metric sums. Call it under the mesh."""
    return jax.jit(functools.partial(eval_step, model=model),
                   in_shardings=(param_shardings, partitioning.batch_sharding(mesh)),
                   out_shardings=partitioning.replicated(mesh))


def reduce_metrics(steps: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-step device metrics -> one scalar each: SUM_KEYS summed and divided by the token count,
    everything else averaged over steps (LATEST_KEYS: the latest value)."""
    host = jax.device_get(list(steps))
    sums = {k: float(sum(np.sum(m[k]) for m in host)) for k in SUM_KEYS if k in host[0]}
    weight = max(sums.get("weight", 0.0), 1.0)
    out = {"cross_entropy": sums["cross_entropy"] / weight, "accuracy": sums["correct"] / weight,
           "output_z_loss": sums["output_z_loss"] / weight, "target_tokens": sums["weight"]}
    for key in host[0]:
        if key in SUM_KEYS:
            continue
        out[key] = float(np.asarray(host[-1][key])) if key in LATEST_KEYS else \
            float(np.mean([np.asarray(m[key]) for m in host]))
    return out
