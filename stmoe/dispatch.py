"""Token dispatch: move routed tokens into per-expert buffers and their outputs back.

The capacity-based implementations take the router's slot-major description
(routing.Routing): `slot_token: [groups, experts, capacity]` (the token filling
each slot, `tokens` for an empty one) and `slot_weight` (its combine weight),
and give the same numbers (tests/test_dispatch.py, tests/test_moe.py):

- "einsum": GShard/flaxformer one-hot dispatch and combine tensors [groups, experts,
  capacity, tokens]; simple and the natural TPU path, but its cost grows with the
  group size (an extra cf * group_size / d_ff of the useful FLOPs).
- "gather": index-based; gathers token rows into the expert buffers, and each token
  gathers its k slot outputs back (`combine_gather_tokens`; expert-choice routing, where a
  token may fill any number of slots, scatter-adds them: `combine_gather`); no
  [tokens, experts, capacity] tensor is ever built. Its cost is O(slots * d) data
  movement, independent of the group size.
- "dropless": no capacity. Every (token, choice) row is sorted by expert and the experts
  run as grouped matmuls over the sorted rows (MegaBlocks, Gale et al. 2022). Equal to the
  other two whenever their capacity drops nothing. The grouped matmul is per backend
  (moe.grouped_kernel, resolved by `resolve_model`): `jax.lax.ragged_dot` on GPU/TPU; on CPU,
  where XLA emulates ragged_dot densely over all experts, the tiled loop of grouped_matmul.py
  (rows padded per expert to a tile, one loop over tiles).
  Expert parallelism: the capacity-based buffers [experts, groups, capacity, d] move by
  all-to-all from the sharding constraints in moe.py; dropless rows have data-dependent
  sizes and would need `ragged_all_to_all` (not implemented on XLA:CPU), so under a mesh
  dropless relies on GSPMD's default (expert weights gathered), not all-to-all.

"auto" resolves per backend (`resolve_dispatch`):
- cpu: "gather". On XLA:CPU it is the fastest of the three and the closest to the FLOP-matched
  dense FFN in time and activation memory (experts run one after another on CPU,
  moe.expert_mlps); einsum pays for its one-hot tensors (figures, dropless's tiled loop included:
  docs/performance.md, scripts/benchmark_moe.py). On one device with tokens-choose routing its
  experts run "grouped" (`resolve_model`): the routing keeps the same choices, and only the
  kept rows go through the tiled grouped matmul, so empty slots cost nothing.
- gpu: "gather". Capacity-based, so shapes are static and expert parallelism uses plain
  all-to-all; gathers/scatters of d-wide rows are bandwidth-bound and cheap on GPU,
  while the one-hot einsum adds cf * group_size / d_ff of the useful FLOPs. Not
  measured in this repository (no GPU was available); benchmark_moe.py on a GPU will
  tell whether "dropless" (grouped GEMM, no padding) wins there.
- tpu: "einsum". On TPU dynamic gathers and scatters of rows lower to slow,
  serialized memory operations while the one-hot matmuls run on the MXU at full rate;
  with ST-MoE's group sizes (a few hundred to 2k tokens) and d_ff >= 2048 the einsum
  overhead is cf * group_size / d_ff ~ 1x at worst, and it is what t5x/flaxformer run
  at scale. Lower the group size (moe.group_size) to shrink that overhead.

Everything that depends on the backend, the environment or the mesh is decided here once, when
the model is built (`resolve_model`: dispatch and expert execution), and the MoE layer only reads
the resolved config; `combine_for` names the combine a (dispatch, router) pair uses.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from stmoe.config import ModelConfig

Array = jax.Array

DISPATCH_CHOICES = ("einsum", "gather", "dropless", "auto")
AUTO_DISPATCH = {"cpu": "gather", "gpu": "gather", "cuda": "gather", "rocm": "gather", "tpu": "einsum"}
# How "dropless" (and a group of one token) runs its grouped matmuls per backend: "ragged_dot"
# (jax.lax.ragged_dot, a real grouped GEMM on GPU/TPU) or "tiled" (grouped_matmul.py: XLA:CPU
# emulates ragged_dot densely over all experts).
GROUPED_KERNEL = {"cpu": "tiled"}
# Backends on which the experts run one after another when nothing splits them over devices
# (moe.expert_mlps, sequential=True): there each expert's intermediates stay in cache.
SEQUENTIAL_EXPERT_BACKENDS = ("cpu",)
# Backends on which capacity-based (gather) dispatch runs only the kept (token, choice) rows through
# the grouped kernel (moe.expert_execution "grouped"): routing and results as "gather", without the
# empty slots' compute. On XLA:CPU a slot costs as much as a token, and capacity usually exceeds
# what a group fills.
GROUPED_EXPERT_BACKENDS = ("cpu",)


def resolve_model(cfg: ModelConfig, *, backend: str | None = None, expert_split: int = 1,
                  mesh_devices: int = 1) -> ModelConfig:
    """`cfg` with moe.dispatch, moe.expert_execution and moe.grouped_kernel chosen for `backend`
    (default: jax.default_backend()) and a mesh of `mesh_devices` devices that splits the experts
    `expert_split` ways (partitioning.expert_split); called once where the model is built.

    dispatch: `resolve_dispatch`. expert_execution "auto": on one device, "grouped" on
    GROUPED_EXPERT_BACKENDS for tokens-choose routing with gather dispatch (only the kept rows
    are computed: with Switch's capacity 96 per 256-token group and 8 experts, 256 rows instead of
    768 slots; docs/performance.md; its sort spans all groups, which a data-parallel mesh would
    gather), else, when the experts are not split, "sequential" on SEQUENTIAL_EXPERT_BACKENDS;
    "batched" otherwise (the batched matmul is what the SPMD partitioner splits over an
    expert-sharded mesh). grouped_kernel "auto": GROUPED_KERNEL's entry for the backend, else "ragged_dot".
    Explicit values are kept.
    """
    backend = backend or jax.default_backend()
    moe = cfg.moe
    dispatch = resolve_dispatch(moe.dispatch, backend)
    execution = moe.expert_execution
    if execution == "auto":
        if mesh_devices == 1 and backend in GROUPED_EXPERT_BACKENDS and dispatch == "gather" \
                and moe.router_type == "tokens_choose":
            execution = "grouped"
        elif expert_split == 1 and backend in SEQUENTIAL_EXPERT_BACKENDS:
            execution = "sequential"
        else:
            execution = "batched"
    kernel = moe.grouped_kernel
    if kernel == "auto":
        kernel = GROUPED_KERNEL.get(backend, "ragged_dot")
    return cfg.replace(moe=moe.replace(dispatch=dispatch, expert_execution=execution,
                                       grouped_kernel=kernel))


def combine_for(dispatch: str, router_type: str) -> str:
    """How expert outputs return to their tokens: "einsum" (one-hot combine tensor), "gather_tokens"
    (gather with tokens-choose: each token reads its k slots, `combine_gather_tokens`) or "scatter"
    (gather with expert choice, which bounds no token's slot count: `combine_gather`)."""
    if dispatch == "einsum":
        return "einsum"
    return "gather_tokens" if router_type == "tokens_choose" else "scatter"


def resolve_dispatch(name: str, backend: str | None = None) -> str:
    """The implementation `moe.dispatch` means on `backend` (default: jax.default_backend()).

    "auto" picks per backend (module docstring); the others mean themselves.
    """
    if name not in DISPATCH_CHOICES:
        raise ValueError(f"moe.dispatch: must be one of {DISPATCH_CHOICES}, got {name!r}")
    backend = backend or jax.default_backend()
    if name == "auto":
        return AUTO_DISPATCH.get(backend, "gather")
    return name


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
    """Gathers token rows; an empty slot points at an appended zero row.

    x: [groups, tokens, d], slot_token: [groups, experts, capacity] -> [experts, groups, capacity, d].
    The gather is batched over groups (each group only reads its own tokens), so under a
    mesh it stays local to the devices holding the group.
    """
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))  # [g, t + 1, d]
    gathered = jax.vmap(lambda rows, idx: rows[idx])(padded, slot_token)  # [g, e, c, d]
    return gathered.transpose(1, 0, 2, 3)


def combine_gather(expert_out: Array, slot_token: Array, slot_weight: Array, tokens: int) -> Array:
    """Scatter-adds weighted slot outputs back to their tokens; empty slots land on a dropped row.

    expert_out: [experts, groups, capacity, d] -> [groups, tokens, d].
    """
    weighted = expert_out.transpose(1, 0, 2, 3) * slot_weight[..., None].astype(expert_out.dtype)  # [g, e, c, d]
    groups, _, _, d = weighted.shape
    out = jnp.zeros((groups, tokens + 1, d), expert_out.dtype)
    out = jax.vmap(lambda base, idx, rows: base.at[idx.reshape(-1)].add(rows.reshape(-1, d)))(
        out, slot_token, weighted)
    return out[:, :tokens]


def combine_gather_tokens(group_out: Array, choice_slot: Array, choice_weight: Array) -> Array:
    """Token-major combine: every token gathers its k slot outputs and sums them, weighted; no scatter.

    group_out: [groups, experts, capacity, d] (the expert outputs, group-major: moe.py transposes
    them and constrains the result to the tokens' sharding, which is the all-to-all back);
    choice_slot: [groups, tokens, k] (expert * capacity + position, experts * capacity for a
    choice without a slot); choice_weight: [groups, tokens, k] (0 without a slot) ->
    [groups, tokens, d]. Same numbers as combine_gather, which scatter-adds every slot (empty
    ones too) into a zeroed [groups, tokens + 1, d] and slices it: several times slower on
    XLA:CPU at large groups (docs/performance.md). Batched over groups: each group reads only its
    own slots.
    """
    groups, experts, capacity, d = group_out.shape
    rows = group_out.reshape(groups, experts * capacity, d)  # [g, e*c, d]
    weight = choice_weight.astype(group_out.dtype)
    # A choice without a slot points one past the end and reads zeros (never another token's row).
    take = jax.vmap(lambda r, idx: r.at[idx].get(mode="fill", fill_value=0))  # ([g, e*c, d], [g, t]) -> [g, t, d]
    # One term per rank rather than a reduce over a k axis: XLA:CPU fuses gathers, products and
    # sums into one loop, while a [g, t, k, d] reduce is a separate pass (~3x slower here).
    out = take(rows, choice_slot[..., 0]) * weight[..., :1]
    for rank in range(1, choice_slot.shape[-1]):
        out = out + take(rows, choice_slot[..., rank]) * weight[..., rank:rank + 1]
    return out  # [g, t, d]


DISPATCH = {"einsum": dispatch_einsum, "gather": dispatch_gather}
COMBINE = {"einsum": combine_einsum, "scatter": combine_gather}  # "gather_tokens": token-major (moe.py step 5)


def ragged_mlp(rows: Array, group_sizes: Array, wi: list[Array], wo: Array, activation: Callable[[Array], Array],
               dropout: Callable[[Array], Array], dtype) -> Array:
    """The T5 FFN over rows sorted by expert: grouped matmuls with stacked weights.

    rows: [n, d] (expert 0's rows first, then expert 1's, ...; rows past sum(group_sizes) are
    ignored); group_sizes: [experts] int32; wi: one ([gated] two) [experts, d, d_ff]; wo:
    [experts, d_ff, d] -> [n, d].
    """
    dot = lambda a, w: jax.lax.ragged_dot(a, w.astype(dtype), group_sizes)
    hidden = activation(dot(rows, wi[0]))  # [n, d_ff]
    if len(wi) == 2:  # gated (GEGLU)
        hidden = hidden * dot(rows, wi[1])
    return dot(dropout(hidden), wo)  # [n, d]


def dropless_moe(x: Array, expert_index: Array, weight: Array, kept: Array, num_experts: int,
                 experts: Callable[[Array, Array], Array]) -> Array:
    """Dropless MoE on token groups: sort (token, choice) rows by expert, grouped MLP, weighted unsort.

    x: [groups, tokens, d]; expert_index, weight, kept: [groups, tokens, k] (a choice that is not
    kept, e.g. padding, is sorted past the last expert and computes nothing);
    experts(rows [n, d], group_sizes [experts]) -> [n, d]. Returns [groups, tokens, d].
    Capacity and groups play no role: every kept choice is computed.
    """
    groups, tokens, d = x.shape
    k = expert_index.shape[-1]
    flat_expert = jnp.where(kept, expert_index, num_experts).reshape(-1)  # [g*t*k]
    order = jnp.argsort(flat_expert, stable=True)  # rows grouped by expert, token order inside
    source = order // k  # [g*t*k] index into the flattened tokens
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)  # [experts]
    rows = jnp.take(x.reshape(groups * tokens, d), source, axis=0)  # [g*t*k, d]
    out = experts(rows, group_sizes)  # [g*t*k, d]
    row_weight = jnp.where(kept, weight, 0.0).reshape(-1)[order].astype(out.dtype)  # [g*t*k]
    valid = (flat_expert[order] < num_experts)[:, None]
    out = jnp.where(valid, out * row_weight[:, None], 0.0)
    combined = jnp.zeros((groups * tokens, d), out.dtype).at[source].add(out)
    return combined.reshape(groups, tokens, d)
