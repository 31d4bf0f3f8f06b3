"""Dispatch implementations (stmoe/dispatch.py) agree where their semantics coincide.

einsum and gather share the capacity semantics and must agree always (also when tokens are
dropped); dropless has no capacity, so it is compared with them at a capacity large enough that
nothing drops. Outputs and gradients are compared with GEGLU (smooth), to 1e-5.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe import dispatch, metrics, moe
from stmoe.config import ConfigError, ModelConfig, MoeConfig
from stmoe.moe import MoeLayer

D_MODEL, BATCH, LENGTH = 16, 2, 16


def layer_config(**moe_fields) -> ModelConfig:
    moe = MoeConfig(**{"num_experts": 4, "top_k": 2, "second_expert_policy": "all", **moe_fields})
    return ModelConfig(d_model=D_MODEL, d_ff=24, num_decoder_layers=0, moe=moe).validate()


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
    mask = np.ones((BATCH, LENGTH), np.float32)
    mask[1, 11:] = 0  # padding is never routed by any implementation
    return x, jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=(0,))
def loss_and_grads(cfg, params, x, mask):
    def loss(params, x):
        out, state = MoeLayer(cfg).apply({"params": params}, x, mask, mutable=["moe"])
        stats = metrics.collect_layers(state["moe"])[""].as_dict()
        return jnp.mean(jnp.square(out)) + stats["aux_loss"] + stats["router_z_loss"], (out, stats)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)


def run(impl, x, mask, **fields):
    cfg = layer_config(dispatch=impl, **fields)
    params = nn.meta.unbox(MoeLayer(layer_config(**fields)).init({"params": jax.random.key(0)}, x, mask)["params"])
    params["router"]["kernel"] = params["router"]["kernel"] * 50.0  # uneven loads
    (loss, (out, stats)), grads = loss_and_grads(cfg, params, x, mask)
    return out, stats, grads


def assert_close(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-5)


def test_einsum_and_gather_agree_with_drops():  # top-1 and more cases: tests/test_moe.py
    x, mask = inputs()
    fields = dict(eval_capacity_factor=0.5, min_capacity=1, group_size=8)
    out_e, stats, grads_e = run("einsum", x, mask, **fields)
    out_g, _, grads_g = run("gather", x, mask, **fields)
    assert float(stats["dropped_tokens"]) > 0
    np.testing.assert_allclose(out_g, out_e, atol=1e-5, rtol=1e-5)
    assert_close(grads_g, grads_e)


def test_combine_gather_tokens_matches_numpy_loop():
    # 2 groups, 3 experts x capacity 2, 4 tokens, k = 2; slot 6 = experts * capacity means "no slot".
    rng = np.random.default_rng(0)
    expert_out = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)  # [e, g, c, d]
    choice_slot = np.array([[[0, 3], [1, 6], [6, 6], [4, 2]],
                            [[5, 0], [6, 1], [2, 6], [3, 4]]], np.int32)  # [g, t, k]
    choice_weight = np.where(choice_slot < 6, rng.uniform(size=choice_slot.shape), 0.0).astype(np.float32)
    want = np.zeros((2, 4, 5), np.float32)
    for g in range(2):
        for t in range(4):
            for r in range(2):
                slot = choice_slot[g, t, r]
                if slot < 6:
                    want[g, t] += choice_weight[g, t, r] * expert_out[slot // 2, g, slot % 2]
    got = dispatch.combine_gather_tokens(jnp.asarray(expert_out.transpose(1, 0, 2, 3)), jnp.asarray(choice_slot),
                                         jnp.asarray(choice_weight))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # A choice without a slot reads zeros, not the last slot's row, even when that row is not finite.
    expert_out[-1, :, -1] = np.nan
    got = dispatch.combine_gather_tokens(jnp.asarray(expert_out.transpose(1, 0, 2, 3)), jnp.asarray(choice_slot),
                                         jnp.asarray(choice_weight))
    # Group 0 uses no NaN slot (expert 2, position 1 = slot 5): its rows are exact, token 2 (no slot) is zero.
    np.testing.assert_allclose(np.asarray(got)[0], want[0], rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(got)[0, 2] == 0.0)


def numpy_geglu_experts(x, wi0, wi1, wo):
    """Each expert's GEGLU MLP with an explicit loop; gelu in its tanh form (flax's nn.gelu default)."""
    gelu = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return np.stack([(gelu(x[e] @ wi0[e]) * (x[e] @ wi1[e])) @ wo[e] for e in range(x.shape[0])])


def test_expert_mlps_sequential_and_batched_match_numpy_and_each_other():
    rng = np.random.default_rng(0)
    x, wi0, wi1 = (rng.normal(size=s).astype(np.float32) for s in ((3, 5, 4), (3, 4, 6), (3, 4, 6)))
    wo = rng.normal(size=(3, 6, 4)).astype(np.float32)
    want = numpy_geglu_experts(x.astype(np.float64), wi0, wi1, wo)
    args = (jnp.asarray(x), [jnp.asarray(wi0), jnp.asarray(wi1)], jnp.asarray(wo))
    outs, grads = {}, {}
    for sequential in (False, True):
        run_mlps = lambda x, wi, wo, key: moe.expert_mlps(x, wi, wo, "gelu", jnp.float32, sequential=sequential,
                                                            dropout_rate=0.5, dropout_rng=key)
        np.testing.assert_allclose(run_mlps(*args, None), want, rtol=1e-4, atol=1e-4)
        loss = lambda x, wi, wo: jnp.sum(jnp.square(run_mlps(x, wi, wo, jax.random.key(1))))
        outs[sequential] = run_mlps(*args, jax.random.key(1))
        grads[sequential] = jax.grad(loss, argnums=(0, 1, 2))(*args)
    # Dropout: the same units of the same experts are dropped in both modes, and some are.
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[True], want, atol=1e-3)
    # The weight gradients reach ~3e3 and some entries are sums of such terms that cancel to ~1e-2:
    # float32 sums in another order (the two modes, or XLA's optimization level) move those by
    # ~1e-6 of the leaf's scale, so the tolerance is relative to it. A wrong mask or expert moves
    # entries by the whole scale.
    for u, v in zip(jax.tree_util.tree_leaves(grads[True]), jax.tree_util.tree_leaves(grads[False])):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5 * np.max(np.abs(v)))


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_equals_capacity_dispatch_when_nothing_drops(top_k):
    x, mask = inputs(1)
    fields = dict(top_k=top_k, expert_capacity=LENGTH)  # ample: nothing can drop
    out_g, stats_g, grads_g = run("gather", x, mask, **fields)
    out_e, _, grads_e = run("einsum", x, mask, **fields)
    out_d, stats_d, grads_d = run("dropless", x, mask, **fields)
    assert float(stats_g["dropped_tokens"]) == 0.0 and float(stats_d["dropped_tokens"]) == 0.0
    np.testing.assert_allclose(out_d, out_g, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out_d, out_e, atol=1e-5, rtol=1e-5)
    assert_close(grads_d, grads_g)
    np.testing.assert_allclose(stats_d["expert_counts"], stats_g["expert_counts"])
    np.testing.assert_allclose(stats_d["aux_loss"], stats_g["aux_loss"], rtol=1e-6)


def test_dropless_never_drops():
    x, mask = inputs(2)
    _, stats, _ = run("dropless", x, mask, eval_capacity_factor=0.25, min_capacity=1)
    assert float(stats["dropped_tokens"]) == 0.0
    assert float(stats["dropped_fraction_rank2"]) == 0.0


def test_dropless_runs_on_every_backend_with_its_grouped_kernel():
    assert dispatch.resolve_dispatch("dropless", backend="cpu") == "dropless"
    assert dispatch.resolve_dispatch("dropless", backend="gpu") == "dropless"


def test_auto_resolves_per_backend():
    assert dispatch.resolve_dispatch("auto", backend="cpu") == "gather"
    assert dispatch.resolve_dispatch("auto", backend="gpu") == "gather"
    assert dispatch.resolve_dispatch("auto", backend="tpu") == "einsum"
    assert dispatch.resolve_dispatch("auto") == dispatch.AUTO_DISPATCH[jax.default_backend()]
    for impl in ("einsum", "gather"):
        assert dispatch.resolve_dispatch(impl, backend="tpu") == impl
    x, mask = inputs(3)
    params = MoeLayer(layer_config()).init({"params": jax.random.key(0)}, x, mask)
    out_a = MoeLayer(dispatch.resolve_model(layer_config(dispatch="auto"))).apply(params, x, mask)
    out_g = MoeLayer(layer_config(dispatch=dispatch.AUTO_DISPATCH[jax.default_backend()])).apply(params, x, mask)
    np.testing.assert_array_equal(out_a, out_g)


def test_dispatch_field_is_validated():
    with pytest.raises(ConfigError, match="moe.dispatch"):
        layer_config(dispatch="sorted")
    with pytest.raises(ValueError, match="moe.dispatch"):
        dispatch.resolve_dispatch("sorted")


def test_dropless_refuses_expert_choice():
    with pytest.raises(ValueError, match="tokens_choose"):  # validated with the config, once
        layer_config(dispatch="dropless", router_type="experts_choose")
    with pytest.raises(ConfigError, match="moe.expert_execution"):
        layer_config(expert_execution="grouped", router_type="experts_choose")


def test_expert_execution_is_resolved_from_backend_and_mesh():
    """Chosen once where the model is built: on one CPU device, tokens-choose gather dispatch runs only
    its kept rows through the grouped kernel; one expert after another on CPU when the mesh has more
    devices but does not split the experts (or with einsum / expert choice), else the batched matmul
    (what the partitioner splits); an explicit choice is kept."""
    cfg = layer_config()
    assert cfg.moe.expert_execution == "auto" and cfg.moe.dispatch == "gather"
    resolve = lambda c, **kw: dispatch.resolve_model(c, **kw).moe.expert_execution
    assert resolve(cfg, backend="cpu") == "grouped"
    assert resolve(cfg, backend="cpu", mesh_devices=8) == "sequential"
    assert resolve(layer_config(dispatch="einsum"), backend="cpu") == "sequential"
    assert resolve(layer_config(router_type="experts_choose"), backend="cpu") == "sequential"
    assert resolve(layer_config(dispatch="auto"), backend="cpu") == "grouped"
    assert resolve(cfg, backend="gpu") == "batched"
    assert resolve(cfg, backend="cpu", expert_split=8, mesh_devices=8) == "batched"
    assert resolve(cfg, backend="gpu") == "batched" and resolve(cfg, backend="tpu") == "batched"
    assert resolve(layer_config(expert_execution="batched"), backend="cpu") == "batched"
    assert resolve(layer_config(expert_execution="sequential"), backend="tpu", expert_split=4) == "sequential"
    assert dispatch.resolve_model(layer_config(dispatch="auto"), backend="tpu").moe.dispatch == "einsum"
    kernel = lambda c, **kw: dispatch.resolve_model(c, **kw).moe.grouped_kernel
    assert kernel(cfg, backend="cpu") == "tiled" and kernel(cfg, backend="gpu") == "ragged_dot"
    assert kernel(cfg, backend="tpu") == "ragged_dot"
    assert kernel(layer_config(grouped_kernel="tiled"), backend="gpu") == "tiled"
