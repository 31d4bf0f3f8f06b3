"""Optimizers, learning-rate schedules and parameter groups (optax).

The ST-MoE recipe (Zoph et al. 2022, arXiv 2202.08906; see docs/design.md,
"Optimization") trains with Adafactor (factored second moments, decay 0.8,
update clipping 1.0, whose stability role is discussed in sec. 3.3) on T5's
inverse-square-root schedule; AdamW is offered for comparison and
fine-tuning. Everything is built from optax's own transformations:

    masked(set_to_zero, frozen)         # frozen grads leave the norm and the NaN check
    -> apply_if_finite(                 # skip steps with Inf/NaN grads, count them; never apply one
         clip_by_global_norm            # one global norm over trainable params
         -> multi_transform({           # parameter groups
              'frozen':  set_to_zero,   # no optimizer state at all
              'default': adamw | adafactor,
              'router':  adamw | adafactor -> scale(router_lr_multiplier)}))

Parameter paths are the '/'-joined dict keys of the params tree (flax
`nn.Partitioned` boxes are treated as one leaf, so 'encoder/mlp/wi/kernel'
reads the same boxed or unboxed). The label and mask functions are applied
by optax to whatever tree it is given, so the same optimizer works on boxed
params, unboxed params, and their gradients.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

FROZEN = "frozen"
ROUTER = "router"
DEFAULT = "default"

_OPTIMIZERS = ("adamw", "adafactor")
_SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "rsqrt")
NEVER_APPLY_NONFINITE = 2**31 - 1  # optax's consecutive-skip counter is int32


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings; build once from the experiment config and validate()."""

    optimizer: str = "adafactor"  # 'adamw' | 'adafactor' (the paper's).
    learning_rate: float = 1e-2  # Peak learning rate.
    # 'constant' | 'warmup_cosine' | 'warmup_linear' | 'rsqrt' (T5; see
    # learning_rate_schedule for the exact formulas).
    schedule: str = "rsqrt"
    warmup_steps: int = 10_000  # Linear warmup length; rsqrt: the plateau length.
    total_steps: int = 100_000  # End of the cosine / linear decay.
    end_learning_rate_fraction: float = 0.0  # Final LR = fraction * peak (decays).
    b1: float = 0.9  # AdamW first-moment decay.
    b2: float = 0.999  # AdamW second-moment decay (0.95 for large models).
    eps: float = 1e-8  # AdamW epsilon.
    # Decoupled weight decay, multiplied by the scheduled LR (AdamW convention,
    # used for Adafactor too); never applied to norm scales or biases.
    weight_decay: float = 0.0
    adafactor_decay_rate: float = 0.8  # Second-moment decay exponent (paper).
    adafactor_clipping_threshold: float = 1.0  # Update clipping (paper); 0 disables.
    grad_clip_norm: float = 1.0  # Global-norm clipping of gradients; 0 disables.
    router_lr_multiplier: float = 1.0  # Scales updates of params with 'router' in the path.
    # Regexes searched in '/'-joined param paths; matching params are frozen.
    freeze_patterns: tuple[str, ...] = ()
    skip_nonfinite: bool = True  # Skip updates whose gradients contain Inf/NaN (never applied).
    # The trainer stops the run (TrainingDiverged) after this many skipped steps in a row;
    # 0 stops at the first. A skipped update is never applied, however many there are.
    max_consecutive_nonfinite: int = 10

    def replace(self, **changes) -> "OptimConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "OptimConfig":
        """Raises ValueError naming the first bad field; returns self."""
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"OptimConfig.optimizer={self.optimizer!r}; allowed: {_OPTIMIZERS}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(
                f"OptimConfig.schedule={self.schedule!r}; allowed: {_SCHEDULES}")
        if not self.learning_rate > 0:
            raise ValueError(
                f"OptimConfig.learning_rate={self.learning_rate}; must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(
                f"OptimConfig.warmup_steps={self.warmup_steps}; must be >= 0")
        if self.schedule == "rsqrt" and self.warmup_steps < 1:
            raise ValueError(
                f'OptimConfig.warmup_steps={self.warmup_steps}; schedule "rsqrt" '
                "needs warmup_steps >= 1 (lr ~ 1/sqrt(max(step, warmup_steps)))")
        decays = self.schedule in ("warmup_cosine", "warmup_linear")
        if decays and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimConfig.total_steps={self.total_steps}; must be > "
                f"warmup_steps={self.warmup_steps} for schedule {self.schedule!r}")
        if not 0.0 <= self.end_learning_rate_fraction <= 1.0:
            raise ValueError(
                "OptimConfig.end_learning_rate_fraction="
                f"{self.end_learning_rate_fraction}; must be in [0, 1]")
        for name in ("b1", "b2", "adafactor_decay_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"OptimConfig.{name}={value}; must be in [0, 1)")
        for name in ("eps", "weight_decay", "grad_clip_norm", "router_lr_multiplier"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"OptimConfig.{name}={value}; must be >= 0")
        # Any threshold > 0 works (optax.clip_by_block_rms divides by max(1, RMS / threshold)); ST-MoE
        # sec. 3.1 lowers it from 1.0 to 0.1 for stability.
        if self.adafactor_clipping_threshold < 0:
            raise ValueError(
                "OptimConfig.adafactor_clipping_threshold="
                f"{self.adafactor_clipping_threshold}; must be 0 (off) or > 0")
        if not isinstance(self.freeze_patterns, tuple):
            raise ValueError(
                f"OptimConfig.freeze_patterns={self.freeze_patterns!r}; must be a "
                "tuple of regex strings")
        for pattern in self.freeze_patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(
                    f"OptimConfig.freeze_patterns: bad regex {pattern!r}: {e}") from e
        if self.max_consecutive_nonfinite < 0:
            raise ValueError(
                "OptimConfig.max_consecutive_nonfinite="
                f"{self.max_consecutive_nonfinite}; must be >= 0")
        return self


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


def _is_box(x: Any) -> bool:
    # A flax `nn.Partitioned` (any AxisMetadata) box is one parameter.
    return isinstance(x, nn.meta.AxisMetadata)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_path(path: tuple[Any, ...]) -> str:
    """'/'-joined names of a jax key path, e.g. 'decoder/layers_3/mlp/wi/kernel'."""
    return "/".join(_key_name(k) for k in path)


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


def _base_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    decay = None
    if cfg.weight_decay > 0:
        decay = lambda step: cfg.weight_decay * schedule(step)  # noqa: E731
    if cfg.optimizer == "adamw":
        # optax.adamw multiplies weight_decay by the LR itself (Loshchilov &
        # Hutter 2019): update = -lr * (adam + wd * param).
        return optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    # optax.adafactor adds `weight_decay_rate * param` AFTER the LR scaling,
    # so pass `wd * lr(step)` to keep the AdamW meaning of `weight_decay`.
    return optax.adafactor(
        learning_rate=schedule,
        decay_rate=cfg.adafactor_decay_rate,
        clipping_threshold=cfg.adafactor_clipping_threshold or None,
        multiply_by_parameter_scale=True,  # Relative step size, as in T5's Adafactor.
        momentum=None,  # No first moment (T5 / t5x default; saves memory).
        weight_decay_rate=decay,
        weight_decay_mask=weight_decay_mask)


def make_optimizer(cfg: OptimConfig, params: Any) -> optax.GradientTransformation:
    """Builds the full optimizer (see the module docstring for the chain).

    `params` is used only for its paths: arrays, `jax.ShapeDtypeStruct`s or
    `nn.Partitioned` boxes of either. It fails fast when a freeze pattern
    matches no parameter, or everything is frozen.

    Notes:
    - Frozen params get no optimizer state and an exactly-zero update.
    - When a step is skipped for non-finite gradients the inner optimizer
        state, including its step count (and so the LR schedule), stays put.
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
    router_tx = _base_optimizer(cfg, schedule)
    if cfg.router_lr_multiplier != 1.0:
        # Scaling the final update == scaling the LR (incl. the LR-coupled decay).
        router_tx = optax.chain(router_tx, optax.scale(cfg.router_lr_multiplier))
    groups = optax.multi_transform(
        {
            FROZEN: optax.set_to_zero(),
            DEFAULT: _base_optimizer(cfg, schedule),
            ROUTER: router_tx,
        },
        lambda tree: param_labels(tree, cfg))

    inner = [groups]
    if cfg.grad_clip_norm > 0:
        inner.insert(0, optax.clip_by_global_norm(cfg.grad_clip_norm))
    tx = optax.chain(*inner)
    if cfg.skip_nonfinite:
        # optax applies a non-finite update once `max_consecutive_errors` skips in a row are
        # exceeded, which poisons the parameters and the moments for good. Never: the trainer
        # stops the run instead (max_consecutive_nonfinite, stmoe.trainer).
        tx = optax.apply_if_finite(tx, max_consecutive_errors=NEVER_APPLY_NONFINITE)
    if cfg.freeze_patterns:
        # Zero frozen grads first (stateless): they must not count towards the
        # global norm, nor make a step be skipped.
        tx = optax.chain(
            optax.masked(optax.set_to_zero(), lambda tree: _frozen_mask(tree, cfg)), tx)
    return tx


def consecutive_nonfinite_skips(opt_state: Any) -> Any:
    """Skipped steps in a row up to now ([] int32 array; optax's `notfinite_count`), or None
    when skipping is off."""
    return optax.tree.get(opt_state, "notfinite_count", default=None)


def count_nonfinite_skips(opt_state: Any) -> int:
    """Total steps skipped for non-finite gradients since init (0 if disabled).

    Reads `total_notfinite` of optax.apply_if_finite's state; it is never reset
    and is saved with the optimizer state, so it survives restarts.
    """
    total = optax.tree.get(opt_state, "total_notfinite", default=None)
    return 0 if total is None else int(total)
