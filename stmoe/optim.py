"""Optimizers, learning-rate schedules and parameter groups (optax).

The ST-MoE recipe (Zoph et al. 2022, arXiv 2202.08906; see docs/design.md,
"Optimization") trains with Adafactor (factored second moments, decay 0.8,
update clipping 1.0, whose stability role is discussed in sec. 3.3) on T5's
inverse-square-root schedule; AdamW is offered for comparison and
fine-tuning. Adafactor is t5x's (stmoe/adafactor.py, `optim.adafactor_style="t5x"`:
factored per expert and by logical axis, as the ST-MoE release trained) or optax's
(`"optax"`). Everything else is built from optax's own transformations:

    masked(set_to_zero, frozen)         # frozen grads leave the norm and the NaN check
    -> skip_nonfinite_steps(            # skip a step whose grads, update, new params or new state
                                        # hold an Inf/NaN, count it; never apply one
         clip_by_global_norm            # one global norm over trainable params
         -> multi_transform({           # parameter groups
              'frozen':  set_to_zero,   # no optimizer state at all
              'default': adamw | adafactor (t5x | optax),
              'router':  adamw | adafactor -> scale(router_lr_multiplier)}))

Parameter paths are the '/'-joined dict keys of the params tree (flax
`nn.Partitioned` boxes are treated as one leaf, so 'encoder/mlp/wi/kernel'
reads the same boxed or unboxed). The label and mask functions are applied
by optax to whatever tree it is given, so the same optimizer works on boxed
params, unboxed params, and their gradients.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from stmoe import adafactor
from stmoe.adafactor import is_box as _is_box, param_path
from stmoe.config import OptimConfig  # noqa: F401 - the settings every builder here takes

FROZEN = "frozen"
ROUTER = "router"
DEFAULT = "default"


# ----------------------------------------------------------------- schedules


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """The learning rate as a function of the optimizer step.

    - constant: `peak` (fine-tuning; the t5x ST-MoE release uses 1e-3).
    - warmup_cosine: linear 0 -> peak over `warmup_steps`, then cosine decay
        to `peak * end_learning_rate_fraction` at `total_steps`, flat after.
    - warmup_linear: the same with a linear decay.
    - rsqrt (T5, Raffel et al. 2020 sec. 3.1.2): `peak * sqrt(warmup /
        max(step, warmup))`, i.e. a constant plateau for `warmup_steps` and
        1/sqrt(step) after. With the defaults (peak 1e-2, 10k steps) this is
        exactly T5's `1 / sqrt(max(step, 10_000))`. There is no ramp from 0:
        Adafactor's relative step size and update clipping make one unnecessary.
    """
    cfg.validate()
    peak = cfg.learning_rate
    end = peak * cfg.end_learning_rate_fraction
    if cfg.schedule == "constant":
        return optax.constant_schedule(peak)
    if cfg.schedule == "rsqrt":
        warmup = float(cfg.warmup_steps)

        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            return peak * jnp.sqrt(warmup / jnp.maximum(step, warmup))

        return rsqrt
    decay_steps = cfg.total_steps - cfg.warmup_steps
    if cfg.schedule == "warmup_cosine":
        decay = optax.cosine_decay_schedule(
            peak, decay_steps, alpha=cfg.end_learning_rate_fraction)
    else:  # warmup_linear
        decay = optax.linear_schedule(peak, end, decay_steps)
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


# ----------------------------------------------------------- parameter groups


def _map_params(fn, params):
    """Maps `fn(path_str)` over params, one call per (possibly boxed) leaf.

    optax.MaskedNode (an empty tuple node) has no leaves, so trees already
    masked by another optax wrapper pass through unchanged.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: fn(param_path(path)), params, is_leaf=_is_box)


def _last(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def param_labels(params: Any, cfg: OptimConfig) -> Any:
    """A tree like `params` (boxes as leaves) of 'frozen' | 'router' | 'default'.

    Frozen wins over router: a frozen router gets no update and no state.
    """
    patterns = [re.compile(p) for p in cfg.freeze_patterns]

    def label(path: str) -> str:
        if any(p.search(path) for p in patterns):
            return FROZEN
        if ROUTER in path:
            return ROUTER
        return DEFAULT

    return _map_params(label, params)


def weight_decay_mask(params: Any) -> Any:
    """True where decoupled weight decay applies: not norm scales, not biases."""
    return _map_params(lambda path: _last(path) not in ("scale", "bias"), params)


def _frozen_mask(params: Any, cfg: OptimConfig) -> Any:
    return jax.tree.map(lambda l: l == FROZEN, param_labels(params, cfg))


# ------------------------------------------------------------------ optimizer


def _base_optimizer(cfg: OptimConfig, schedule: optax.Schedule,
                    axis_names: dict[str, tuple[str, ...]]) -> optax.GradientTransformation:
    decay = None
    if cfg.weight_decay > 0:
        decay = lambda step: cfg.weight_decay * schedule(step)  # noqa: E731
    if cfg.optimizer == "adamw":
        # optax.adamw multiplies weight_decay by the LR itself (Loshchilov &
        # Hutter 2019): update = -lr * (adam + wd * param).
        return optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    # The settings both Adafactors share, by their optax names; the two differ in the rest.
    shared = dict(factored=cfg.adafactor_factored, decay_rate=cfg.adafactor_decay_rate,
                  multiply_by_parameter_scale=cfg.adafactor_multiply_by_parameter_scale,
                  clipping_threshold=cfg.adafactor_clipping_threshold or None,
                  min_dim_size_to_factor=cfg.adafactor_min_dim_size_to_factor)
    if cfg.adafactor_style == "t5x":
        tx = adafactor.t5x_adafactor(
            schedule, axis_names, **shared, beta1=cfg.adafactor_beta1, step_offset=cfg.adafactor_step_offset,
            weight_decay_rate=cfg.adafactor_weight_decay_rate, epsilon1=cfg.adafactor_epsilon1,
            epsilon2=cfg.adafactor_epsilon2, max_parameter_scale=cfg.adafactor_max_parameter_scale)
        if decay is None:
            return tx
        # The AdamW-convention decay on top: update -= weight_decay * lr(step) * param (masked).
        return optax.chain(tx, optax.add_decayed_weights(lambda step: -decay(step), mask=weight_decay_mask))
    # optax.adafactor adds `weight_decay_rate * param` AFTER the LR scaling,
    # so pass `wd * lr(step)` to keep the AdamW meaning of `weight_decay`.
    return optax.adafactor(
        learning_rate=schedule, **shared, decay_offset=cfg.adafactor_step_offset, momentum=cfg.adafactor_beta1,
        weight_decay_rate=decay, eps=cfg.adafactor_epsilon1, weight_decay_mask=weight_decay_mask)


def make_optimizer(cfg: OptimConfig, params: Any) -> optax.GradientTransformation:
    """Builds the full optimizer (see the module docstring for the chain).

    `params` is used only for its paths and, with t5x-style Adafactor, its logical axis
    names: arrays, `jax.ShapeDtypeStruct`s or `nn.Partitioned` boxes of either (boxes are
    needed for t5x-style Adafactor on parameters of rank > 2; steps.state_layout passes
    them). It fails fast when a freeze pattern matches no parameter, or everything is frozen.

    Notes:
    - Frozen params get no optimizer state and an exactly-zero update.
    - When a step is skipped (non-finite gradients, or finite ones whose update,
        new params or new optimizer state would not be) the inner optimizer state,
        including its step count (and so the LR schedule), stays put.
    """
    cfg.validate()
    labels = jax.tree.leaves(param_labels(params, cfg))
    if not labels:
        raise ValueError("make_optimizer: params has no leaves")
    paths = jax.tree.leaves(_map_params(lambda p: p, params))
    for pattern in cfg.freeze_patterns:
        if not any(re.search(pattern, p) for p in paths):
            raise ValueError(
                f"OptimConfig.freeze_patterns: {pattern!r} matches no parameter; "
                f"paths look like {paths[:3]}")
    if all(l == FROZEN for l in labels):
        raise ValueError("OptimConfig.freeze_patterns freeze every parameter")

    schedule = learning_rate_schedule(cfg)
    axis_names = adafactor.logical_axes(params)  # t5x-style Adafactor factors by them
    if cfg.optimizer == "adafactor" and cfg.adafactor_style == "t5x":
        # Fail here, not at the first step, on a parameter t5x could not factor (rank > 2, no names).
        for (path, leaf), label in zip(jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0], labels):
            if label != FROZEN:
                adafactor.factor_plan(adafactor.shape_of(leaf), axis_names.get(param_path(path)),
                                      factored=cfg.adafactor_factored, path=param_path(path),
                                      min_dim_size_to_factor=cfg.adafactor_min_dim_size_to_factor)
    router_tx = _base_optimizer(cfg, schedule, axis_names)
    if cfg.router_lr_multiplier != 1.0:
        # Scaling the final update == scaling the LR (incl. the LR-coupled decay).
        router_tx = optax.chain(router_tx, optax.scale(cfg.router_lr_multiplier))
    groups = optax.multi_transform(
        {
            FROZEN: optax.set_to_zero(),
            DEFAULT: _base_optimizer(cfg, schedule, axis_names),
            ROUTER: router_tx,
        },
        lambda tree: param_labels(tree, cfg))

    inner = [groups]
    if cfg.grad_clip_norm > 0:
        inner.insert(0, optax.clip_by_global_norm(cfg.grad_clip_norm))
    tx = optax.chain(*inner)
    if cfg.skip_nonfinite:
        tx = skip_nonfinite_steps(tx)
    if cfg.freeze_patterns:
        # Zero frozen grads first (stateless): they must not count towards the
        # global norm, nor make a step be skipped.
        tx = optax.chain(
            optax.masked(optax.set_to_zero(), lambda tree: _frozen_mask(tree, cfg)), tx)
    return tx


def all_finite(tree: Any) -> jax.Array:
    """[] bool: every floating-point leaf of `tree` is finite (integer leaves, e.g. step counts,
    cannot be non-finite and are ignored)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def skip_nonfinite_steps(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner`, except that a step whose gradients, update, resulting params (when `update` is
    given params) or new inner state hold an Inf or NaN is skipped: zero update, inner state kept.

    optax.apply_if_finite checks the incoming gradients only, so finite gradients can still make a
    non-finite step: Adam with eps=0 on a parameter whose gradient has always been 0 divides 0 by 0,
    an infinite learning rate turns every update into +-inf or NaN (0 * inf), and an update can
    overflow a large parameter. It also gives up and applies the update after
    `max_consecutive_errors` skips; this never does (the trainer stops the run instead,
    max_consecutive_nonfinite). The state is optax.ApplyIfFiniteState, so its counters read the same
    (`consecutive_nonfinite_skips`, `count_nonfinite_skips`) and checkpoints keep their layout.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return optax.ApplyIfFiniteState(notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
                                        total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update(grads, state, params=None, **extra_args):
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        finite = all_finite(grads) & all_finite(updates) & all_finite(inner_state)
        if params is not None:
            finite &= all_finite(optax.apply_updates(params, updates))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        skipped = 1 - finite.astype(jnp.int32)
        return updates, optax.ApplyIfFiniteState(
            notfinite_count=(state.notfinite_count + 1) * skipped, last_finite=finite,
            total_notfinite=state.total_notfinite + skipped,
            inner_state=jax.tree.map(keep, inner_state, state.inner_state))

    return optax.GradientTransformationExtraArgs(init, update)


def consecutive_nonfinite_skips(opt_state: Any) -> Any:
    """Skipped steps in a row up to now ([] int32 array; optax's `notfinite_count`), or None
    when skipping is off."""
    return optax.tree.get(opt_state, "notfinite_count", default=None)


def count_nonfinite_skips(opt_state: Any) -> int:
    """Total steps skipped as non-finite since init (0 if disabled).

    Reads `total_notfinite` of skip_nonfinite_steps' state; it is never reset
    and is saved with the optimizer state, so it survives restarts.
    """
    total = optax.tree.get(opt_state, "total_notfinite", default=None)
    return 0 if total is None else int(total)
