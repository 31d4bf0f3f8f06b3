"""Token dispatch: move routed tokens into per-expert buffers and their outputs back.

Every implementation takes the router's slot-major description (routing.Routing):
`slot_token: [groups, experts, capacity]` (the token filling each slot, `tokens`
for an empty one) and `slot_weight` (its combine weight), and gives the same
numbers (tests/test_moe.py):

- "einsum": GShard/flaxformer one-hot dispatch and combine tensors [groups, experts,
  capacity, tokens]; simple and the natural TPU path, but its cost grows with the
  group size (an extra cf * group_size / d_ff of the useful FLOPs).
- "gather": index-based; gathers token rows into the expert buffers and scatter-adds
  the outputs back; no [tokens, experts, capacity] tensor is ever built.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dispatch_einsum(x: Array, slot_token: Array) -> Array:
    """x: [groups, tokens, d], slot_token: [groups, experts, capacity] -> [experts, groups, capacity, d]."""
    one_hot = jax.nn.one_hot(slot_token, x.shape[1], dtype=x.dtype)  # [g, e, c, t]; empty slots all zero
    return jnp.einsum("gect,gtd->egcd", one_hot, x)


def combine_einsum(expert_out: Array, slot_token: Array, slot_weight: Array, tokens: int) -> Array:
    """expert_out: [experts, groups, capacity, d] -> [groups, tokens, d]."""
    one_hot = jax.nn.one_hot(slot_token, tokens, dtype=expert_out.dtype)  # [g, e, c, t]
    combine = one_hot * slot_weight[..., None].astype(expert_out.dtype)
    return jnp.einsum("egcd,gect->gtd", expert_out, combine)


def dispatch_gather(x: Array, slot_token: Array) -> Array:
    """Gathers token rows; an empty slot points at an appended zero row."""
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))  # [g, t + 1, d]
    gathered = jax.vmap(lambda rows, idx: rows[idx])(padded, slot_token)  # [g, e, c, d]
    return gathered.transpose(1, 0, 2, 3)


def combine_gather(expert_out: Array, slot_token: Array, slot_weight: Array, tokens: int) -> Array:
    """Scatter-adds weighted slot outputs back to their tokens; empty slots land on a dropped row."""
    weighted = expert_out.transpose(1, 0, 2, 3) * slot_weight[..., None].astype(expert_out.dtype)  # [g, e, c, d]
    groups, _, _, d = weighted.shape
    out = jnp.zeros((groups, tokens + 1, d), expert_out.dtype)
    out = jax.vmap(lambda base, idx, rows: base.at[idx.reshape(-1)].add(rows.reshape(-1, d)))(
        out, slot_token, weighted)
    return out[:, :tokens]


DISPATCH = {"einsum": (dispatch_einsum, combine_einsum), "gather": (dispatch_gather, combine_gather)}
