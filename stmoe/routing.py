"""Routers and their auxiliary losses: pure array code plus one small Flax module.

Every function works on token *groups*: `[groups, tokens, ...]`. A group is
the unit over which expert capacity is counted (ST-MoE sec. 2, GShard).
`token_mask: [groups, tokens]` is 1 for real tokens and 0 for padding;
padding is never routed, takes no capacity and counts in no loss or metric.

Both routers produce the same slot-major `Routing` description: for every
expert `e` and capacity slot `c` of a group, which token fills it
(`slot_token`, = tokens when the slot is empty) and the weight its output is
combined with (`slot_weight`). moe.py dispatches from that description alone,
so the dispatch implementations never see which router ran.
"""
from __future__ import annotations

import fractions
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from stmoe.config import MoeConfig

Array = jax.Array


def expert_capacity(group_size: int, num_experts: int, capacity_factor: float, min_capacity: int = 4,
                    rounding: str = "ceil") -> int:
    """Slots per expert and group: min(group_size, max(min_capacity, ceil(cf * group_size / num_experts))).

    Not multiplied by top_k: with top-2 and cf 1.25 there are 1.25 * T slots for
    2T assignments, which is what ST-MoE's capacity factor means (sec. 2, Table 3).
    `rounding="round"` is flaxformer's int(round(...)) instead of ceil (Python's round: half
    to even; flaxformer/architectures/moe/moe_layers.py:175-178).

    The factor is taken as the decimal it was written as (`Fraction(repr(cf))`): in floating
    point 1.1 * 100 / 11 is 10.000000000000002 and its ceiling 11, where the capacity meant is 10.
    The result is clamped to `group_size`: each token picks an expert at most once, so no expert
    can receive more than `group_size` tokens of a group, and more slots only compute padding
    (e.g. a cached decoding step routes groups of one token: 1 slot, not min_capacity 4).
    """
    exact = fractions.Fraction(repr(float(capacity_factor))) * group_size / num_experts
    slots = round(exact) if rounding == "round" else math.ceil(exact)
    return min(group_size, max(min_capacity, slots))


def layer_capacity(moe: MoeConfig, group_size: int, deterministic: bool) -> int:
    """The slots per expert and group an MoE layer with config `moe` uses (moe.MoeLayer; stmoe.flops
    counts the expert work with it): the group for dropless dispatch (nothing dropped), an integer
    `expert_capacity` (at most the group), else `expert_capacity` of the eval (deterministic) or train
    capacity factor."""
    if moe.dispatch == "dropless":
        return group_size  # an expert can take every token of a group: nothing is dropped
    if moe.expert_capacity is not None:
        return min(moe.expert_capacity, group_size)  # more slots than tokens only compute padding
    factor = moe.eval_capacity_factor if deterministic else moe.train_capacity_factor
    return expert_capacity(group_size, moe.num_experts, factor, moe.min_capacity, moe.capacity_rounding)


def flaxformer_num_groups(num_tokens: int, max_group_size: int, multiple: int) -> int:
    """flaxformer's group count for a whole batch (flaxformer/architectures/moe/moe_layers.py:715-797).

    The smallest n >= max(num_tokens // max_group_size, multiple) with num_tokens % n == 0 and
    n % multiple == 0 (flaxformer: multiple = num_experts x expert replicas, so the group count and
    hence the group size num_tokens / n depend on the batch and on the device layout).
    Raises ValueError when num_tokens has no such divisor (flaxformer pads first: flaxformer_padding).
    """
    num_groups = max(num_tokens // max_group_size, multiple)
    while num_groups < num_tokens and not (num_tokens % num_groups == 0 and num_groups % multiple == 0):
        num_groups += 1
    if num_tokens % num_groups:
        raise ValueError(f"moe.max_group_size={max_group_size}, moe.num_groups_multiple={multiple}: no group count "
                         f"divides {num_tokens} tokens")
    return num_groups


def flaxformer_padding(batch: int, length: int, multiple: int) -> tuple[int, int]:
    """(extra rows, extra positions) flaxformer's MoE layer pads a [batch, length] input with so that the
    token count is a multiple of `multiple`: whichever of the two dimensions needs fewer padded tokens,
    positions on a tie (flaxformer/architectures/moe/moe_layers.py:822-901, `_maybe_pad`)."""
    if (batch * length) % multiple == 0:
        return 0, 0
    rows = next(r for r in range(1, multiple + 1) if ((batch + r) * length) % multiple == 0)
    positions = next(p for p in range(1, multiple + 1) if (batch * (length + p)) % multiple == 0)
    return (0, positions) if positions * batch <= rows * length else (rows, 0)


@flax.struct.dataclass
class Routing:
    """How one MoE layer routes each group.

    slot_token:     [groups, experts, capacity] int32; token index in the group, `tokens` = empty slot
    slot_weight:    [groups, experts, capacity] float32; combine weight, 0 for an empty slot
    expert_index:   [groups, tokens, k] int32; each token's choices by rank (experts_choose: top-1 choice)
    wanted:         [groups, tokens, k] bool; the choice asked for a slot (padding and the random
                    second-expert policy say no)
    kept:           [groups, tokens, k] bool; the choice got a slot (the rest are dropped)
    choice_weight:  [groups, tokens, k] float32; combine weight of each choice, 0 when not kept
                    (tokens-choose only; the token-major view that dropless dispatch uses)
    choice_slot:    [groups, tokens, k] int32; the slot each choice fills, expert * capacity + position,
                    experts * capacity when not kept (tokens-choose only: the gather combine reads each
                    token's k slots instead of scattering every slot; expert choice has no such bound k)
    """

    slot_token: Array
    slot_weight: Array
    expert_index: Array
    wanted: Array
    kept: Array
    choice_weight: Array | None = None
    choice_slot: Array | None = None


def small_top_k(values: Array, k: int) -> tuple[Array, Array]:
    """`jax.lax.top_k` over the last axis by k argmax passes, for the router's small k.

    values: [..., n] finite -> (values [..., k], indices [..., k] int32), largest first; equal
    values in index order, as lax.top_k. XLA:CPU lowers lax.top_k to a full sort of the last axis,
    which costs far more than k passes over the same array (docs/performance.md). The values are read back at the indices, so gradients flow to the
    chosen entries only, as with lax.top_k.
    """
    if k > 4:  # k sweeps stop paying off against one sort
        values, indices = jax.lax.top_k(values, k)
        return values, indices.astype(jnp.int32)
    iota = jnp.arange(values.shape[-1], dtype=jnp.int32)
    remaining = values
    indices = []
    for _ in range(k):
        index = jnp.argmax(remaining, axis=-1).astype(jnp.int32)  # [...]; first of equal maxima
        indices.append(index)
        remaining = jnp.where(iota == index[..., None], -jnp.inf, remaining)
    indices = jnp.stack(indices, axis=-1)  # [..., k]
    return jnp.take_along_axis(values, indices, axis=-1), indices


PRIORITIES = ("rank_major", "position_major")


def tokens_choose_routing(router_probs: Array, token_mask: Array, *, top_k: int, capacity: int,
                          second_expert_policy: str = "all", second_expert_threshold: float = 0.2,
                          normalize_gates: bool = True, batch_prioritized: bool = False,
                          priority: str = "rank_major", token_position: Array | None = None,
                          rng: Array | None = None) -> Routing:
    """Top-k tokens-choose routing (Switch k=1, ST-MoE k=2).

    router_probs: [groups, tokens, experts] float32, token_mask: [groups, tokens].

    1. Each token picks its k most probable experts; for k > 1 the gates are
       normalized to sum to one (ST-MoE App. G), for k = 1 the gate is the raw
       router probability (Switch sec. 2.1).
    2. With the "random" policy (training only, pass `rng`), the choices of rank
       >= 1 are kept with probability min(1, gate / threshold) (App. G); "all"
       keeps them deterministically.
    3. Slots are handed out in priority order. `priority="rank_major"` (ST-MoE, flaxformer):
       rank by rank, every token's first choice before any second choice; inside a rank
       in token order, or by descending top-1 probability with batch-prioritized routing
       (V-MoE; it looks at all tokens of the group, so it is for the encoder only).
       `priority="position_major"`: token by token, each token's k choices (by rank)
       before the next token's, so a token's slots depend only on the tokens served
       before it: causal for a decoder (rank-major lets a later token's first choice take
       the slot an earlier token's second choice needed; docs/design.md). Tokens are
       served in the order of `token_position` ([groups, tokens], each token's position
       in its sequence; ties in token order), or in token order when None: a group that
       spans several sequences must pass it, or a later position of one sequence would be
       served before an earlier position of the next.
    4. A choice whose position in its expert is >= capacity is dropped: the
       token gets nothing from that expert and the residual carries it.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority: must be one of {PRIORITIES}, got {priority!r}")
    groups, tokens, num_experts = router_probs.shape
    gates, expert_index = small_top_k(router_probs, top_k)  # [g, t, k]
    if top_k > 1 and normalize_gates:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)

    wanted = jnp.broadcast_to(token_mask[..., None] > 0, gates.shape)
    if second_expert_policy == "random" and rng is not None and top_k > 1:
        draw = jax.random.uniform(rng, gates.shape, dtype=jnp.float32)
        keep_rank = draw < gates / second_expert_threshold
        keep_rank = keep_rank.at[..., 0].set(True)  # the first choice is always routed
        wanted = wanted & keep_rank

    choice_onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * wanted[..., None]  # [g, t, k, e]
    # The order tokens are served in ([g, t] permutation), None = token order.
    service_order = None
    if batch_prioritized:
        service_order = jnp.argsort(-router_probs.max(axis=-1), axis=-1, stable=True)
    elif priority == "position_major" and token_position is not None:
        service_order = jnp.argsort(jnp.broadcast_to(token_position, (groups, tokens)), axis=-1, stable=True)
    if service_order is not None:
        choice_onehot = jnp.take_along_axis(choice_onehot, service_order[:, :, None, None], axis=1)
    if priority == "rank_major":  # all first choices, then all second choices: [g, k*t, e]
        ordered = choice_onehot.transpose(0, 2, 1, 3).reshape(groups, top_k * tokens, num_experts)
    else:  # token by token, each token's choices by rank: [g, t*k, e]
        ordered = choice_onehot.reshape(groups, tokens * top_k, num_experts)
    position = jnp.cumsum(ordered, axis=1) - 1
    position = jnp.sum(position * ordered, axis=-1)  # [g, k*t] or [g, t*k]
    if priority == "rank_major":
        position = position.reshape(groups, top_k, tokens).transpose(0, 2, 1)  # [g, t, k] in service order
    else:
        position = position.reshape(groups, tokens, top_k)
    if service_order is not None:  # back to token order
        position = jnp.take_along_axis(position, jnp.argsort(service_order, axis=-1)[:, :, None], axis=1)

    kept = wanted & (position < capacity)
    combine = jnp.where(kept, gates, 0.0)

    # Slot-major view: scatter each kept choice's token index into [g, e * capacity (+1 dump slot)].
    flat_slot = jnp.where(kept, expert_index * capacity + position, num_experts * capacity)  # [g, t, k]
    token_ids = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[None, :, None], flat_slot.shape)
    scatter = jax.vmap(lambda base, idx, val: base.at[idx.reshape(-1)].set(val.reshape(-1)))
    slot_token = scatter(jnp.full((groups, num_experts * capacity + 1), tokens, jnp.int32), flat_slot, token_ids)
    slot_weight = scatter(jnp.zeros((groups, num_experts * capacity + 1), jnp.float32), flat_slot, combine)
    shape = (groups, num_experts, capacity)
    return Routing(slot_token=slot_token[:, :-1].reshape(shape), slot_weight=slot_weight[:, :-1].reshape(shape),
                   expert_index=expert_index, wanted=wanted, kept=kept, choice_weight=combine,
                   choice_slot=flat_slot.astype(jnp.int32))


def experts_choose_routing(router_probs: Array, token_mask: Array, *, capacity: int) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its `capacity` most probable tokens.

    router_probs: [groups, tokens, experts] float32, token_mask: [groups, tokens].
    Perfectly balanced by construction, but an expert's choice depends on every
    token of the group, so it cannot be used in a causal decoder. A token may be
    taken by several experts or by none (then the residual carries it).
    """
    groups, tokens, num_experts = router_probs.shape
    capacity = min(capacity, tokens)
    # Padding gets a score below any probability so that it is chosen last, and then not kept.
    scores = jnp.where(token_mask[..., None] > 0, router_probs, -1.0).transpose(0, 2, 1)  # [g, e, t]
    weights, chosen = jax.lax.top_k(scores, capacity)  # [g, e, c]
    valid = weights >= 0
    slot_token = jnp.where(valid, chosen, tokens).astype(jnp.int32)
    slot_weight = jnp.where(valid, weights, 0.0)

    taken = jnp.zeros((groups, tokens + 1), jnp.int32)
    taken = jax.vmap(lambda base, idx: base.at[idx.reshape(-1)].add(1))(taken, slot_token)[:, :tokens]
    wanted = (token_mask > 0)[..., None]
    return Routing(slot_token=slot_token, slot_weight=slot_weight,
                   expert_index=jnp.argmax(router_probs, axis=-1)[..., None].astype(jnp.int32),
                   wanted=wanted, kept=wanted & (taken > 0)[..., None])


def _masked_group_mean(values: Array, token_mask: Array) -> tuple[Array, Array]:
    """values: [groups, tokens, ...] -> per-group mean over real tokens [groups, ...], and [groups] has-tokens."""
    mask = token_mask.astype(jnp.float32)
    count = jnp.sum(mask, axis=1)
    mask = mask.reshape(mask.shape + (1,) * (values.ndim - 2))
    mean = jnp.sum(values * mask, axis=1) / jnp.maximum(count, 1.0).reshape((-1,) + (1,) * (values.ndim - 2))
    return mean, (count > 0).astype(jnp.float32)


def _mean_over_groups(per_group: Array, has_tokens: Array) -> Array:
    return jnp.sum(per_group * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)


def load_balance_loss(router_probs: Array, expert_index: Array, token_mask: Array) -> Array:
    """Switch load-balancing loss N * sum_i f_i P_i, per group, averaged over groups.

    router_probs: [groups, tokens, experts] float32; expert_index: [groups, tokens, k] (pass the
    top-1 column for ST-MoE's definition, all k columns for flaxformer's); token_mask: [groups, tokens].
    f_i: fraction of tokens that chose expert i (before capacity), P_i: mean router probability.
    Equals 1 when routing is uniform.
    """
    num_experts = router_probs.shape[-1]
    chose = jnp.max(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=-2)  # [g, t, e]
    fraction, has_tokens = _masked_group_mean(chose, token_mask)  # [g, e]
    mean_prob, _ = _masked_group_mean(router_probs.astype(jnp.float32), token_mask)
    return _mean_over_groups(num_experts * jnp.sum(fraction * mean_prob, axis=-1), has_tokens)


def router_z_loss(router_logits: Array, token_mask: Array) -> Array:
    """ST-MoE router z-loss (sec. 3.1, eq. 5): mean over real tokens of logsumexp(logits)^2.

    router_logits: [groups, tokens, experts] float32.
    """
    log_z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    mask = token_mask.astype(jnp.float32)
    return jnp.sum(jnp.square(log_z) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cv_squared_loss(router_probs: Array, token_mask: Array) -> Array:
    """Squared coefficient of variation of the mean router probabilities: N * sum_i (P_i - 1/N)^2.

    router_probs: [groups, tokens, experts]; per group, averaged over groups. 0 when balanced.
    """
    num_experts = router_probs.shape[-1]
    mean_prob, has_tokens = _masked_group_mean(router_probs.astype(jnp.float32), token_mask)
    per_group = num_experts * jnp.sum(jnp.square(mean_prob - 1.0 / num_experts), axis=-1)
    return _mean_over_groups(per_group, has_tokens)


def auxiliary_loss(loss_type: str, router_probs: Array, routing: Routing, token_mask: Array) -> Array:
    """The configured balance loss: "switch_top1" (ST-MoE), "switch_all_k" (flaxformer) or "cv2"."""
    if loss_type == "switch_top1":
        return load_balance_loss(router_probs, routing.expert_index[..., :1], token_mask)
    if loss_type == "switch_all_k":
        return load_balance_loss(router_probs, routing.expert_index, token_mask)
    if loss_type == "cv2":
        return cv_squared_loss(router_probs, token_mask)
    raise ValueError(f"moe.aux_loss_type: unknown {loss_type!r}")


def router_probabilities(router_logits: Array) -> Array:
    """router_logits: [groups, tokens, experts] (router dtype) -> probabilities [groups, tokens, experts] float32.

    The softmax runs in the router's dtype too (a bfloat16 router rounds its probabilities, ST-MoE
    Table 4); the routing decisions and losses read float32 values.
    """
    return jax.nn.softmax(router_logits, axis=-1).astype(jnp.float32)


class Router(nn.Module):
    """Linear router in float32 ("selective precision", ST-MoE sec. 3.2): no bias, small init.

    inputs: [groups, tokens, d_model] -> logits [groups, tokens, experts] in `dtype`.
    Jitter multiplies the inputs by uniform noise in [1 - eps, 1 + eps] during training (Switch sec. 2.4).
    `dtype=bfloat16` computes the router in bfloat16 instead (inputs, kernel and logits rounded to it;
    the float32 master weight stays): the less stable variant of ST-MoE Table 4.
    """

    num_experts: int
    init_std: float = 2e-2
    jitter_noise: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool = True) -> Array:
        inputs = inputs.astype(self.dtype)
        if self.jitter_noise > 0 and not deterministic:
            noise = jax.random.uniform(self.make_rng("dropout"), inputs.shape, jnp.float32,
                                       1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            inputs = inputs * noise.astype(self.dtype)
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                   ("embed", "unmodeled")),
                            (inputs.shape[-1], self.num_experts), jnp.float32)
        return jnp.einsum("gtd,de->gte", inputs, kernel.astype(self.dtype), precision=jax.lax.Precision.HIGHEST)
