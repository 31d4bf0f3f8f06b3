"""The training objective L = L_CE + c_out * z_out + c_B * L_B + c_z * L_z (ST-MoE sec. 3.1).

The one place that weighs and schedules loss terms (config.LossConfig). Cross-entropy returns
sums and a token count so that the host can divide correctly across microbatches, devices and
packed padding; what the objective divides the sum by is t5x's loss_normalizing_factor
(loss_weights_and_normalizer), label smoothing t5x's (token_cross_entropy). The MoE terms are reported unweighted per layer (moe.py sows a
metrics.RouterStats) and averaged over layers here.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from stmoe.config import LossConfig
from stmoe.metrics import collect_layers, expand_scanned

Array = jax.Array


def token_cross_entropy(logits: Array, targets: Array, label_smoothing: float = 0.0) -> tuple[Array, Array]:
    """Per-token softmax cross-entropy and log-normalizer, as t5x computes them.

    logits: [batch, length, vocab] float32; targets: [batch, length] int32 -> (loss, log_z), both
    [batch, length] float32. With label smoothing s the target is soft: 1 - s on the target id and
    s / (vocab - 1) on every other id, and the soft target's entropy is subtracted so that a
    perfect prediction costs 0 (t5x/losses.py:161-174).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [b, l]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    if label_smoothing == 0:
        return nll, log_z
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    # -sum_j q_j log p_j with q = low everywhere but the target: (confidence - low) * nll + low * sum_j -log p_j.
    smoothed = (confidence - low) * nll + low * vocab * (log_z - jnp.mean(logits, axis=-1))
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    return smoothed - entropy, log_z


def cross_entropy_sums(logits: Array, targets: Array, weights: Array | None = None,
                       z_loss_coef: float = 0.0, label_smoothing: float = 0.0,
                       objective_weights: Array | None = None) -> dict[str, Array]:
    """Token-level softmax cross-entropy, summed.

    logits: [batch, length, vocab] float32; targets: [batch, length] int32; weights: [batch, length]
    (default: targets > 0). The optional output z-loss z_loss_coef * logsumexp(logits)^2 keeps the
    softmax normalizer near 1 (Mesh TF T5 / PaLM). Label smoothing as t5x's (token_cross_entropy).
    Returns sums of 'cross_entropy', 'output_z_loss', 'correct' and the denominator 'weight';
    with `objective_weights` [batch, length] also 'objective', the sum of (cross-entropy + z-loss)
    x objective_weights (loss_weights_and_normalizer's weights) that the train step minimizes.
    """
    if weights is None:
        weights = (targets > 0).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    nll, log_z = token_cross_entropy(logits, targets, label_smoothing)
    z_loss = z_loss_coef * jnp.square(log_z)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    sums = {"cross_entropy": jnp.sum(nll * weights), "output_z_loss": jnp.sum(z_loss * weights),
            "correct": jnp.sum(correct * weights), "weight": jnp.sum(weights)}
    if objective_weights is not None:
        sums["objective"] = jnp.sum((nll + z_loss) * objective_weights.astype(jnp.float32))
    return sums


def loss_weights_and_normalizer(batch: Mapping[str, Array], loss_normalizing_factor: str) -> tuple[Array, Array]:
    """t5x's loss_normalizing_factor (t5x/losses.py:275-353) on a whole batch.

    batch: 'decoder_loss_weights' [batch, length] (default: decoder_target_tokens > 0) and, when
    packed, 'decoder_segment_ids'. Returns (per-token weights [batch, length] float32, the scalar
    the weighted cross-entropy sum is divided by):
    - "num_real_target_tokens": the loss weights and their sum (at least 1: an all-padding
      batch gives 0, not NaN);
    - "num_total_target_tokens": the loss weights and batch x length;
    - "average_per_sequence": each token's weight divided by its sequence's (packed: its
      segment's) weight sum, and their sum (the number of sequences), i.e. the mean over
      sequences of each sequence's mean loss;
    - "none": the loss weights and 1 (the sum, t5x's default when nothing is bound);
    - a number as a string: the loss weights and that number.
    """
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    weights = (targets > 0).astype(jnp.float32) if weights is None else weights.astype(jnp.float32)
    if loss_normalizing_factor == "num_real_target_tokens":
        return weights, jnp.maximum(jnp.sum(weights), 1.0)
    if loss_normalizing_factor == "num_total_target_tokens":
        return weights, jnp.asarray(float(math.prod(targets.shape)), jnp.float32)
    if loss_normalizing_factor == "average_per_sequence":
        segments = batch.get("decoder_segment_ids")
        if segments is None:
            per_sequence = jnp.sum(weights, axis=-1, keepdims=True)  # [b, 1]
        else:  # the weight sum of each token's own segment (t5x: _sum_weights_per_segment)
            same = segments[:, :, None] == segments[:, None, :]  # [b, l, l]
            per_sequence = jnp.einsum("bqk,bk->bq", same.astype(jnp.float32), weights)
        weights = jnp.where(per_sequence > 0, weights / jnp.where(per_sequence > 0, per_sequence, 1.0), 0.0)
        return weights, jnp.sum(weights)
    if loss_normalizing_factor == "none":
        return weights, jnp.ones((), jnp.float32)
    return weights, jnp.asarray(float(loss_normalizing_factor), jnp.float32)


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
               router_z_coef: float, normalizer: Array | None = None) -> Array:
    """The cross-entropy (+ output z-loss, weighted in cross_entropy_sums) divided by `normalizer`
    plus the weighted MoE terms, which t5x also adds to the normalized cross-entropy whatever the
    normalizer (t5x/contrib/moe/models.py:278-293).

    Uses ce_sums['objective'] when present (loss_weights_and_normalizer's weights), else the
    cross-entropy and z-loss sums; `normalizer` None = max(ce_sums['weight'], 1), the mean per
    real target token.
    """
    if normalizer is None:
        normalizer = jnp.maximum(ce_sums["weight"], 1.0)
    task = ce_sums["objective"] if "objective" in ce_sums else ce_sums["cross_entropy"] + ce_sums["output_z_loss"]
    return task / normalizer + balance_coef * moe["aux_loss"] + router_z_coef * moe["router_z_loss"]
