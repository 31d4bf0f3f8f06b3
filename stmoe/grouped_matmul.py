"""Grouped expert MLP with static shapes: rows sorted by expert, padded per expert to a tile, a loop over tiles.

The idea of MegaBlocks (Gale et al. 2022, block-sparse grouped GEMMs) and of the megablox TPU
kernel (jax/experimental/pallas/ops/tpu/megablox/gmm.py: rows grouped by expert, each tile of
rows multiplied by its own group's weights), written with plain XLA loops so that it runs well
where `jax.lax.ragged_dot` has no grouped kernel (XLA:CPU emulates it densely over all experts).

1. `tile_layout`: every (token, choice) row gets a row of a padded buffer: expert 0's rows
   first, then expert 1's, ..., each expert's run padded up to a multiple of `tile` rows, so
   that every tile of the buffer belongs to exactly one expert. Shapes stay static: a buffer
   of `num_tiles * tile` rows with num_tiles = floor((rows + experts * (tile - 1)) / tile), the
   worst case of padding; only the `used_tiles` tiles that hold rows are ever computed.
2. `grouped_mlp`: one loop over the used tiles; each tile runs the whole T5 MLP with its
   expert's weights (dynamic slices of the stacked [experts, ...] kernels), so its [tile, d_ff]
   intermediates stay in cache. Memory is O(rows * d_ff), not O(experts * rows * d).
3. The backward is written out (jax.custom_vjp): the same loop, each tile adding its weight
   gradient into its expert's slice of the gradient in place. Autodiff of a loop that slices
   stacked weights would instead add a full [experts, d, d_ff] zero-padded gradient per tile.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

MAX_TILE = 128  # rows per tile when every expert has many rows (training shapes)
MIN_TILE = 16   # below this a tile's matmul is bound by reading its expert's weights, not by FLOPs


def choose_tile(rows: int, num_experts: int) -> int:
    """Rows per tile (a power of two) for `rows` (token, choice) rows over `num_experts` experts.

    Large batches: MAX_TILE (padding waste about experts * tile / 2 rows, a [tile, d] x [d, d_ff]
    matmul large enough to run near the matmul peak). Few rows per expert (a decoding step):
    about rows / experts, at least MIN_TILE, so that an expert's weights are read once for all
    its rows, and never more than the rows there are.
    """
    per_expert = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(rows / num_experts)))))
    all_rows = 1 << max(0, math.ceil(math.log2(max(1, rows))))
    return min(MAX_TILE, max(MIN_TILE, per_expert), all_rows)


class TileLayout(NamedTuple):
    """Where each row goes in the padded buffer and which expert each tile belongs to.

    dest:        [rows] int32; the row's position in the padded buffer, `num_tiles * tile` for a
                 row that no expert computes (a choice that is not kept)
    tile_expert: [num_tiles] int32; the expert of each tile (the last expert for unused tiles)
    used_tiles:  [] int32; tiles 0 .. used_tiles - 1 hold rows, the rest is padding
    """
    dest: Array
    tile_expert: Array
    used_tiles: Array


def num_tiles(rows: int, num_experts: int, tile: int) -> int:
    """Static tile count: every expert's run rounded up to whole tiles, in the worst case."""
    return (rows + num_experts * (tile - 1)) // tile


def tile_layout(row_expert: Array, num_experts: int, tile: int) -> TileLayout:
    """row_expert: [rows] int32 in [0, num_experts] (num_experts = not computed) -> TileLayout.

    Rows of one expert keep their order (stable sort), so the padded buffer is the expert-sorted
    row order with each expert's run padded to a multiple of `tile`.
    """
    rows = row_expert.shape[0]
    tiles = num_tiles(rows, num_experts, tile)
    sizes = jnp.bincount(row_expert, length=num_experts).astype(jnp.int32)  # [e]; num_experts not counted
    padded = (sizes + tile - 1) // tile * tile  # [e]
    padded_end = jnp.cumsum(padded)  # [e]
    start, padded_start = jnp.cumsum(sizes) - sizes, padded_end - padded  # [e] each
    order = jnp.argsort(row_expert, stable=True)  # [rows]
    sorted_pos = jnp.zeros(rows, jnp.int32).at[order].set(jnp.arange(rows, dtype=jnp.int32))  # inverse permutation
    expert = jnp.minimum(row_expert, num_experts - 1)
    dest = padded_start[expert] + sorted_pos - start[expert]  # [rows]
    dest = jnp.where(row_expert < num_experts, dest, tiles * tile).astype(jnp.int32)
    tile_start = jnp.arange(tiles, dtype=jnp.int32) * tile
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, tile_start, side="right"), num_experts - 1)
    return TileLayout(dest, tile_expert.astype(jnp.int32), (padded_end[-1] // tile).astype(jnp.int32))


# hidden_fn(h, tile_index, key) -> [tile, d_ff]: activation, gating and dropout of the hidden
# layer from the input projections h = (x W_0[, x W_1]), each [tile, d_ff].
HiddenFn = Callable[[tuple[Array, ...], Array, Array | None], Array]


def t5_hidden(activation: Callable[[Array], Array], dropout_rate: float) -> HiddenFn:
    """The T5 FFN's hidden layer: act(x W0) [* x W1], inverted dropout with a per-tile key."""
    def hidden(h, tile_index, key):
        out = activation(h[0])
        if len(h) == 2:  # gated (GEGLU)
            out = out * h[1]
        if key is not None and dropout_rate > 0.0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, tile_index), 1.0 - dropout_rate, out.shape)
            out = jnp.where(keep, out / (1.0 - dropout_rate), jnp.zeros_like(out))
        return out
    return hidden


def _slice_tile(a: Array, t: Array, tile: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(a, t * tile, tile, axis=0)


def _expert(w: Array, e: Array, dtype) -> Array:
    return jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False).astype(dtype)


def _forward(hidden_fn, tile, dtype, x, wi, wo, tile_expert, used_tiles, key):
    padded_rows, d = x.shape
    d_ff = wo.shape[1]

    def body(t, carry):
        out, saved = carry
        e = tile_expert[t]
        rows = _slice_tile(x, t, tile)  # [tile, d]
        h = tuple(rows @ _expert(w, e, dtype) for w in wi)  # each [tile, d_ff]
        y = hidden_fn(h, t, key) @ _expert(wo, e, dtype)  # [tile, d]
        out = jax.lax.dynamic_update_slice_in_dim(out, y, t * tile, axis=0)
        saved = jax.lax.dynamic_update_slice_in_dim(saved, jnp.stack(h), t * tile, axis=1)
        return out, saved

    init = (jnp.zeros((padded_rows, d), dtype), jnp.zeros((len(wi), padded_rows, d_ff), dtype))
    return jax.lax.fori_loop(0, used_tiles, body, init)  # out [rows, d], saved [len(wi), rows, d_ff]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _grouped_mlp(hidden_fn, tile, dtype, x, wi, wo, tile_expert, used_tiles, key):
    return _forward(hidden_fn, tile, dtype, x, wi, wo, tile_expert, used_tiles, key)[0]


def _grouped_mlp_fwd(hidden_fn, tile, dtype, x, wi, wo, tile_expert, used_tiles, key):
    out, saved = _forward(hidden_fn, tile, dtype, x, wi, wo, tile_expert, used_tiles, key)
    return out, (x, wi, wo, tile_expert, used_tiles, key, saved)


def _add_at(acc: Array, e: Array, update: Array) -> Array:
    """acc[e] += update, as a dynamic-update-slice that XLA runs in place inside the loop."""
    current = jax.lax.dynamic_index_in_dim(acc, e, axis=0, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(acc, current + update.astype(acc.dtype), e, axis=0)


def _grouped_mlp_bwd(hidden_fn, tile, dtype, residuals, d_out):
    x, wi, wo, tile_expert, used_tiles, key, saved = residuals

    def body(t, carry):
        dx, dwi, dwo = carry
        e = tile_expert[t]
        rows, dy = _slice_tile(x, t, tile), _slice_tile(d_out, t, tile)  # [tile, d] each
        h = tuple(_slice_tile(s, t, tile) for s in saved)  # each [tile, d_ff]
        a, hidden_vjp = jax.vjp(lambda *h: hidden_fn(h, t, key), *h)  # a: [tile, d_ff]
        wo_e = _expert(wo, e, dtype)  # [d_ff, d]
        dwo = _add_at(dwo, e, a.T @ dy)
        dh = hidden_vjp(dy @ wo_e.T)  # each [tile, d_ff]
        wi_e = [_expert(w, e, dtype) for w in wi]
        d_rows = sum(g @ w.T for g, w in zip(dh, wi_e))  # [tile, d]
        dwi = tuple(_add_at(acc, e, rows.T @ g) for acc, g in zip(dwi, dh))
        dx = jax.lax.dynamic_update_slice_in_dim(dx, d_rows.astype(dx.dtype), t * tile, axis=0)
        return dx, dwi, dwo

    init = (jnp.zeros_like(x), tuple(jnp.zeros_like(w) for w in wi), jnp.zeros_like(wo))
    dx, dwi, dwo = jax.lax.fori_loop(0, used_tiles, body, init)
    return dx, tuple(dwi), dwo, None, None, None


_grouped_mlp.defvjp(_grouped_mlp_fwd, _grouped_mlp_bwd)


def grouped_mlp(x: Array, wi: tuple[Array, ...], wo: Array, layout: TileLayout, tile: int, hidden_fn: HiddenFn,
                dtype, dropout_key: Array | None = None) -> Array:
    """Every tile of the padded buffer through its own expert's T5 MLP.

    x: [num_tiles * tile, d] (the padded buffer; tiles past layout.used_tiles are not read);
    wi: one (gated: two) [experts, d, d_ff]; wo: [experts, d_ff, d] -> [num_tiles * tile, d]
    (zero past the used tiles). Differentiable in x, wi and wo (reverse mode). `hidden_fn` must
    be hashable and fixed per model (t5_hidden's closure is built once per layer call; a new
    closure only retraces).
    """
    return _grouped_mlp(hidden_fn, tile, jnp.dtype(dtype), x, tuple(wi), wo, layout.tile_expert,
                        layout.used_tiles, dropout_key)


def dropless_moe_tiled(x: Array, expert_index: Array, weight: Array, kept: Array, num_experts: int,
                       experts: Callable[[Array, TileLayout, int], Array], tile: int | None = None) -> Array:
    """Dropless MoE through the tiled grouped MLP: pad-sort rows, run the tiles, gather back.

    x: [groups, tokens, d]; expert_index, weight, kept: [groups, tokens, k] (a choice that is not
    kept, e.g. padding, is computed by no expert and contributes zero);
    experts(padded_rows [num_tiles * tile, d], layout, tile) -> [num_tiles * tile, d].
    Returns [groups, tokens, d]. Same numbers as dispatch.dropless_moe (ragged_dot).
    """
    groups, tokens, d = x.shape
    k = expert_index.shape[-1]
    n = groups * tokens
    tile = tile or choose_tile(n * k, num_experts)
    row_expert = jnp.where(kept, expert_index, num_experts).reshape(-1).astype(jnp.int32)  # [n*k]
    layout = tile_layout(row_expert, num_experts, tile)
    padded_rows = num_tiles(n * k, num_experts, tile) * tile
    # Which token each padded row reads (n = the appended zero row for padding).
    token_of_row = jnp.arange(n * k, dtype=jnp.int32) // k
    source = jnp.full((padded_rows,), n, jnp.int32).at[layout.dest].set(token_of_row, mode="drop")
    flat = jnp.pad(x.reshape(n, d), ((0, 1), (0, 0)))  # [n + 1, d]
    out = experts(flat[source], layout, tile)  # [padded_rows, d]
    # Token-major combine: each token gathers its k rows (a row not computed reads zeros).
    dest = layout.dest.reshape(n, k)
    row_weight = jnp.where(kept, weight, 0.0).reshape(n, k).astype(out.dtype)
    combined = out.at[dest[:, 0]].get(mode="fill", fill_value=0) * row_weight[:, :1]
    for rank in range(1, k):
        combined = combined + out.at[dest[:, rank]].get(mode="fill", fill_value=0) * row_weight[:, rank:rank + 1]
    return combined.reshape(groups, tokens, d)
