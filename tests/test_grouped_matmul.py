"""The tiled grouped MLP (stmoe/grouped_matmul.py) against independent computations.

Layout: a numpy loop. Outputs and gradients: a per-expert loop over all tokens with plain jnp
autodiff (every expert on every token, weighted by the kept choices' weights), and the
ragged_dot path of dispatch.dropless_moe. Dropout: finite differences (jax.test_util.check_grads).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from stmoe import dispatch
from stmoe import grouped_matmul as gm
from stmoe.config import ModelConfig, MoeConfig
from stmoe.moe import MoeLayer

GROUPS, TOKENS, D, D_FF, EXPERTS, K = 2, 7, 8, 12, 4, 2


def problem(seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    x = f32(rng.normal(size=(GROUPS, TOKENS, D)))
    expert_index = jnp.asarray(rng.integers(0, EXPERTS, size=(GROUPS, TOKENS, K)), jnp.int32)
    expert_index = expert_index.at[0, :, :].set(jnp.array([0, 1]))  # uneven loads: experts 0 and 1 crowded
    weight = f32(rng.uniform(size=(GROUPS, TOKENS, K)))
    kept = jnp.asarray(rng.uniform(size=(GROUPS, TOKENS, K)) > 0.2)
    wi = (f32(rng.normal(size=(EXPERTS, D, D_FF)) * 0.3), f32(rng.normal(size=(EXPERTS, D, D_FF)) * 0.3))
    wo = f32(rng.normal(size=(EXPERTS, D_FF, D)) * 0.3)
    return x, expert_index, weight, kept, wi, wo


def test_tile_layout_matches_numpy_loop():
    row_expert = np.array([2, 0, 4, 2, 2, 1, 0, 2, 4, 3], np.int32)  # 4 = not computed
    tile, experts = 2, 4
    layout = gm.tile_layout(jnp.asarray(row_expert), experts, tile)
    tiles = gm.num_tiles(len(row_expert), experts, tile)
    assert tiles == (10 + 4 * 1) // 2  # worst case: every expert's run one row short of a tile
    want_dest, want_tile_expert, cursor = np.full(len(row_expert), tiles * tile), [], 0
    for e in range(experts):
        mine = np.flatnonzero(row_expert == e)
        want_dest[mine] = cursor + np.arange(len(mine))
        n_tiles = -(-len(mine) // tile)
        want_tile_expert += [e] * n_tiles
        cursor += n_tiles * tile
    used = len(want_tile_expert)
    np.testing.assert_array_equal(layout.dest, want_dest)
    assert int(layout.used_tiles) == used == 5
    np.testing.assert_array_equal(np.asarray(layout.tile_expert)[:used], want_tile_expert)


def test_choose_tile():
    assert gm.choose_tile(16384, 32) == gm.MAX_TILE  # training: 512 rows per expert
    assert gm.choose_tile(8, 8) == 8                 # a decoding step of 8 tokens, top-1: one tile per expert
    assert gm.choose_tile(256, 8) == 32
    assert gm.choose_tile(64, 32) == gm.MIN_TILE


def reference_moe(x, expert_index, weight, kept, wi, wo):
    """Every expert on every token, weighted by the kept choices of that expert (0 elsewhere)."""
    out = jnp.zeros_like(x)
    for e in range(wo.shape[0]):
        y = (jax.nn.gelu(x @ wi[0][e]) * (x @ wi[1][e])) @ wo[e]
        out = out + jnp.sum(jnp.where((expert_index == e) & kept, weight, 0.0), -1)[..., None] * y
    return out


def tiled_moe(x, expert_index, weight, kept, wi, wo, tile=None, rate=0.0, key=None):
    hidden = gm.t5_hidden(jax.nn.gelu, rate)
    experts = lambda rows, layout, tile: gm.grouped_mlp(rows, wi, wo, layout, tile, hidden, jnp.float32, key)
    return gm.dropless_moe_tiled(x, expert_index, weight, kept, EXPERTS, experts, tile=tile)


def ragged_moe(x, expert_index, weight, kept, wi, wo):
    experts = lambda rows, sizes: dispatch.ragged_mlp(rows, sizes, list(wi), wo, jax.nn.gelu, lambda h: h,
                                                      jnp.float32)
    return dispatch.dropless_moe(x, expert_index, weight, kept, EXPERTS, experts)


@pytest.mark.parametrize("tile", [1, 4, None])
def test_tiled_moe_outputs_and_gradients_match_reference(tile):
    x, expert_index, weight, kept, wi, wo = problem()
    loss = lambda fn: (lambda x, wi, wo: jnp.sum(jnp.sin(fn(x, expert_index, weight, kept, wi, wo))))
    tiled = lambda *a: tiled_moe(*a, tile=tile)
    args = (x, expert_index, weight, kept, wi, wo)
    want = jax.jit(reference_moe)(*args)
    np.testing.assert_allclose(jax.jit(tiled)(*args), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(ragged_moe)(*args), want, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(loss(tiled), argnums=(0, 1, 2)))(x, wi, wo)
    want_grads = jax.jit(jax.grad(loss(reference_moe), argnums=(0, 1, 2)))(x, wi, wo)
    for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_tiled_moe_gradients_with_dropout_match_finite_differences():
    x, expert_index, weight, kept, wi, wo = problem(1)
    key = jax.random.key(3)
    fn = jax.jit(lambda x, wi, wo: tiled_moe(x, expert_index, weight, kept, wi, wo, tile=2, rate=0.5, key=key))
    out = fn(x, wi, wo)
    assert not np.allclose(out, reference_moe(x, expert_index, weight, kept, wi, wo), atol=1e-3)  # some units dropped
    np.testing.assert_array_equal(out, fn(x, wi, wo))  # the same key drops the same units
    check_grads(fn, (x, wi, wo), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_groups_of_one_token_equal_the_capacity_dispatch():
    """A cached decoding step routes groups of one token; they take the grouped path (k rows per
    token). The same tokens as one group with capacity for all of them (gather dispatch, nothing
    dropped) give the same outputs."""
    cfg = lambda **f: ModelConfig(d_model=D, d_ff=D_FF, num_decoder_layers=0, moe=MoeConfig(
        num_experts=EXPERTS, top_k=2, second_expert_policy="all", dispatch="gather", **f)).validate()
    x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 1, D)), jnp.float32)  # 6 sequences, 1 token each
    mask = jnp.ones((6, 1), jnp.float32).at[4, 0].set(0.0)  # padding computes nothing
    params = nn.meta.unbox(MoeLayer(cfg()).init({"params": jax.random.key(0)}, x, mask)["params"])
    params["router"]["kernel"] = params["router"]["kernel"] * 50.0  # uneven loads
    one_token_groups = jax.jit(lambda p, x: MoeLayer(cfg()).apply({"params": p}, x, mask))(params, x)
    one_group = jax.jit(lambda p, x: MoeLayer(cfg(expert_capacity=6)).apply(
        {"params": p}, x.reshape(1, 6, D), mask.reshape(1, 6)))(params, x)
    np.testing.assert_allclose(one_token_groups, one_group.reshape(6, 1, D), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(one_token_groups)[4] == 0.0) and np.all(np.abs(np.asarray(one_token_groups)[:4]) > 0)
