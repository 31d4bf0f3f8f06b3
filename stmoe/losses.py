"""The training objective L = L_CE + c_out * z_out + c_B * L_B + c_z * L_z (ST-MoE sec. 3.1).

The one place that weighs and schedules loss terms (config.LossConfig). Cross-entropy returns
sums and a token count so that the host can divide correctly across microbatches, devices and
packed padding. The MoE terms are reported unweighted per layer (moe.py sows a
metrics.RouterStats) and averaged over layers here.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from stmoe.config import LossConfig
from stmoe.metrics import collect_layers, expand_scanned

Array = jax.Array


def cross_entropy_sums(logits: Array, targets: Array, weights: Array | None = None,
                       z_loss_coef: float = 0.0, label_smoothing: float = 0.0) -> dict[str, Array]:
    """Token-level softmax cross-entropy, summed.

    logits: [batch, length, vocab] float32; targets: [batch, length] int32; weights: [batch, length]
    (default: targets > 0). The optional output z-loss z_loss_coef * logsumexp(logits)^2 keeps the
    softmax normalizer near 1 (Mesh TF T5 / PaLM). Returns sums of 'cross_entropy', 'output_z_loss',
    'correct' and the denominator 'weight'.
    """
    if weights is None:
        weights = (targets > 0).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [b, l]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    if label_smoothing > 0:
        mean_logit = jnp.mean(logits, axis=-1)
        nll = (1 - label_smoothing) * nll + label_smoothing * (log_z - mean_logit)
    z_loss = z_loss_coef * jnp.square(log_z)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"cross_entropy": jnp.sum(nll * weights), "output_z_loss": jnp.sum(z_loss * weights),
            "correct": jnp.sum(correct * weights), "weight": jnp.sum(weights)}


def moe_losses(moe_collection: Mapping[str, Any]) -> dict[str, Array]:
    """Averages each layer's unweighted 'aux_loss' (L_B) and 'router_z_loss' (L_z) over the MoE
    layers (0 for a dense model). These averages are what the step logs under those names."""
    layers = expand_scanned(collect_layers(moe_collection))  # scanned layers count one by one
    if not layers:
        zero = jnp.zeros((), jnp.float32)
        return {"aux_loss": zero, "router_z_loss": zero}
    aux = jnp.mean(jnp.stack([jnp.mean(s.aux_loss) for s in layers.values()]))
    z = jnp.mean(jnp.stack([jnp.mean(s.router_z_loss) for s in layers.values()]))
    return {"aux_loss": aux, "router_z_loss": z}


def balance_coef_schedule(cfg: LossConfig) -> optax.Schedule:
    """c_B as a function of the step (cfg validated: LossConfig.validate).

    'constant' returns `balance_coef`. 'linear_decay' starts at `balance_coef *
    balance_warmup_multiplier` and decays linearly to `balance_coef` over `balance_decay_steps`,
    then stays there (docs/design.md, "Losses").
    """
    if cfg.balance_schedule == "constant":
        return optax.constant_schedule(cfg.balance_coef)
    return optax.linear_schedule(cfg.balance_coef * cfg.balance_warmup_multiplier, cfg.balance_coef,
                                 cfg.balance_decay_steps)


def total_loss(ce_sums: Mapping[str, Array], moe: Mapping[str, Array], balance_coef: float | Array,
               router_z_coef: float) -> Array:
    """Mean cross-entropy (+ output z-loss, weighted in cross_entropy_sums) per target token plus the
    weighted MoE terms."""
    denominator = jnp.maximum(ce_sums["weight"], 1.0)
    task = (ce_sums["cross_entropy"] + ce_sums["output_z_loss"]) / denominator
    return task + balance_coef * moe["aux_loss"] + router_z_coef * moe["router_z_loss"]
