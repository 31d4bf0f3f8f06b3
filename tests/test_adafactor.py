"""t5x-style Adafactor (stmoe/adafactor.py) against a numpy port of t5x's update.

The reference below is written from google-research/t5x `t5x/adafactor.py:464-578` (the update of one
parameter) and the factoring t5x applies to flaxformer's parameters: every parameter is cut into the
independent matrices t5x sees (one per expert; an attention kernel as flaxformer's 2-D [d_model,
heads * d_kv]) and the textbook Adafactor step runs on each matrix on its own, in float64.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharded_step as ss

from stmoe import adafactor, optim, partitioning, steps
from stmoe.config import MeshConfig, ModelConfig, MoeConfig, OptimConfig
from stmoe.models import EncoderDecoder

E, D, F, H, K = 3, 8, 6, 2, 3  # experts, d_model, d_ff, heads, d_kv; min_dim_size_to_factor 4 factors them

AXES = {
    "moe/expert_wi_0": ("expert", "embed", "expert_mlp"),  # [E, D, F]
    "moe/expert_wo": ("expert", "expert_mlp", "embed"),  # [E, F, D]
    "attention/query": ("embed", "heads", "kv"),  # [D, H, K]
    "attention/out": ("heads", "kv", "embed"),  # [H, K, D]
    "mlp/wi_0": ("embed", "mlp"),  # [D, F]
    "moe/router/kernel": ("embed", "unmodeled"),  # [D, E]: 3 < 4, a full second moment
    "norm/scale": ("embed",),  # [D]
}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"moe/expert_wi_0": (E, D, F), "moe/expert_wo": (E, F, D), "attention/query": (D, H, K),
              "attention/out": (H, K, D), "mlp/wi_0": (D, F), "moe/router/kernel": (D, E), "norm/scale": (D,)}
    flat = {name: rng.normal(size=shape) * (1.0 + 0.5 * i) for i, (name, shape) in enumerate(shapes.items())}
    flat["moe/expert_wi_0"][1] *= 20.0  # experts of very different scale: per-expert param scale matters
    return flat


def _grads(params, seed):
    rng = np.random.default_rng(100 + seed)
    grads = {name: rng.standard_t(3, size=p.shape) for name, p in params.items()}
    # Expert 0's gradient nearly rank one, expert 2's heavy-tailed: their update RMS after factoring differ,
    # so clipping each expert on its own differs from clipping the stack.
    grads["moe/expert_wi_0"][0] = np.outer(rng.normal(size=D), rng.normal(size=F)) + 0.01 * grads["moe/expert_wi_0"][0]
    grads["moe/expert_wi_0"][2] = grads["moe/expert_wi_0"][2] ** 3
    return grads


def _nest(flat):
    out = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def _flatten(tree):
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------- numpy reference


def _matrices(name, x):
    """The independent blocks t5x updates: [blocks, rows, cols] (factorable) or [blocks, n] arrays."""
    if name.startswith("moe/expert_"):
        return x  # one [rows, cols] matrix per expert
    if name == "attention/query":
        return x.reshape(1, D, H * K)  # flaxformer's [d_model, heads * d_kv]
    if name == "attention/out":
        return x.reshape(1, H * K, D)
    if x.ndim == 2:
        return x[None]
    return x.reshape(1, -1)


def _np_matrix_step(p, g, state, step, hp):
    """One t5x Adafactor step of one matrix (or vector) p, float64 (t5x/adafactor.py:493-562)."""
    decay = 1.0 - (step - hp["step_offset"] + 1.0) ** (-hp["decay_rate"])
    scale = hp["lr"]
    if hp["multiply_by_parameter_scale"]:
        param_scale = max(np.sqrt(np.mean(p * p)), hp["epsilon2"])
        if hp["max_parameter_scale"] is not None:
            param_scale = min(param_scale, hp["max_parameter_scale"])
        scale = scale * param_scale
    g2 = g * g + hp["epsilon1"]
    if p.ndim == 2 and min(p.shape) >= hp["min_dim"] or state.get("force_factored"):
        state["row"] = decay * state.get("row", 0.0) + (1 - decay) * g2.mean(axis=1)
        state["col"] = decay * state.get("col", 0.0) + (1 - decay) * g2.mean(axis=0)
        v = np.outer(state["row"] / state["row"].mean(), state["col"])
    else:
        state["v"] = decay * state.get("v", 0.0) + (1 - decay) * g2
        v = state["v"]
    y = g / np.sqrt(v)
    if hp["clipping_threshold"] is not None:
        y = y / max(1.0, np.sqrt(np.mean(y * y)) / hp["clipping_threshold"])
    sub = scale * y
    if hp["beta1"] is not None:
        state["m"] = hp["beta1"] * state.get("m", 0.0) + (1 - hp["beta1"]) * sub
        sub = state["m"]
    wd = hp["weight_decay_rate"]
    return ((1.0 - wd) * p if wd is not None else p) - sub


def _np_t5x_adafactor(params, grads_per_step, hp):
    """t5x's Adafactor over several steps from step hp['start_step']; params/grads: name -> float64 array."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    states = {name: [{"force_factored": name.startswith("moe/expert_")} for _ in range(_matrices(name, p).shape[0])]
              for name, p in params.items()}
    for step, grads in enumerate(grads_per_step, start=hp["start_step"]):
        for name, p in params.items():
            blocks, gblocks = _matrices(name, p), _matrices(name, np.asarray(grads[name], np.float64))
            new = np.stack([_np_matrix_step(blocks[b], gblocks[b], states[name][b], step, hp)
                            for b in range(blocks.shape[0])])
            params[name] = new.reshape(p.shape)
    return params


DEFAULTS = dict(start_step=0, lr=0.1, decay_rate=0.8, step_offset=0, multiply_by_parameter_scale=True, epsilon1=1e-30,
                epsilon2=1e-3, max_parameter_scale=None, clipping_threshold=1.0, beta1=None, weight_decay_rate=None,
                min_dim=4)
# Fine-tuning from step 4 with the second moments restarted at step 2 (t5x's step_offset).
KNOBS = dict(DEFAULTS, start_step=4, lr=0.05, decay_rate=0.7, step_offset=2, epsilon2=0.05, max_parameter_scale=3.0,
             clipping_threshold=0.5, beta1=0.9, weight_decay_rate=0.01)


def _optim_cfg(hp):
    return OptimConfig(
        optimizer="adafactor", adafactor_style="t5x", schedule="constant", learning_rate=hp["lr"], grad_clip_norm=0.0,
        skip_nonfinite=False, adafactor_decay_rate=hp["decay_rate"], adafactor_step_offset=hp["step_offset"],
        adafactor_epsilon1=hp["epsilon1"], adafactor_epsilon2=hp["epsilon2"],
        adafactor_max_parameter_scale=hp["max_parameter_scale"],
        adafactor_clipping_threshold=hp["clipping_threshold"] or 0.0, adafactor_beta1=hp["beta1"],
        adafactor_weight_decay_rate=hp["weight_decay_rate"], adafactor_min_dim_size_to_factor=hp["min_dim"])


def _run_stmoe(hp, num_steps, boxed_updates):
    """stmoe's full optimizer chain (optim.make_optimizer) built from boxed params, stepped on boxed or
    plain arrays."""
    flat = _params()
    boxed = _nest({k: nn.Partitioned(jnp.asarray(v, jnp.float32), AXES[k]) for k, v in flat.items()})
    tx = optim.make_optimizer(_optim_cfg(hp), boxed)
    params = boxed if boxed_updates else nn.unbox(boxed)
    state = optax.tree.set(tx.init(params), count=jnp.asarray(hp["start_step"], jnp.int32))
    update = jax.jit(tx.update)
    grads_per_step = [_grads(flat, s) for s in range(num_steps)]
    for grads in grads_per_step:
        grads = _nest({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()})
        if boxed_updates:
            grads = jax.tree.map(lambda g, b: b.replace_boxed(g), grads, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return _flatten(nn.unbox(params)), flat, grads_per_step, state


@pytest.mark.parametrize("num_steps,hp,boxed_updates", [
    (1, DEFAULTS, False), (3, DEFAULTS, True), (3, KNOBS, False)], ids=["1-step", "3-steps-boxed", "3-steps-knobs"])
def test_matches_numpy_t5x_adafactor(num_steps, hp, boxed_updates):
    got, flat, grads, _ = _run_stmoe(hp, num_steps, boxed_updates)
    want = _np_t5x_adafactor(flat, grads, hp)
    for name in flat:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6, err_msg=name)


def test_stats_are_per_expert_and_attention_is_factored_2d():
    # The state's shapes say how each parameter is factored (reduced dims kept as size 1).
    _, _, _, state = _run_stmoe(DEFAULTS, 1, False)
    default, router = (state[0].inner_states[group].inner_state for group in (optim.DEFAULT, optim.ROUTER))
    v_row, v_col, v = (_flatten(t) for t in (default.v_row, default.v_col, default.v))
    assert v_row["moe/expert_wi_0"].shape == (E, D, 1) and v_col["moe/expert_wi_0"].shape == (E, 1, F)
    assert v_row["moe/expert_wo"].shape == (E, 1, D) and v_col["moe/expert_wo"].shape == (E, F, 1)  # row = embed
    # [D, H*K] = [8, 6]: the smaller (H*K) is the row (t5x adafactor.py:414-417).
    assert v_row["attention/query"].shape == (1, H, K) and v_col["attention/query"].shape == (D, 1, 1)
    assert v_row["attention/out"].shape == (H, K, 1) and v_col["attention/out"].shape == (1, 1, D)
    assert _flatten(router.v)["moe/router/kernel"].shape == (D, E) and v["norm/scale"].shape == (D,)


# ---------------------------------------------------------------- factoring rules


@pytest.mark.parametrize("shape,names,min_dim,want", [
    # flaxformer's [768, 768] attention kernel: equal dims, the first is the row.
    ((768, 12, 64), ("embed", "heads", "kv"), 128, ((0,), (1, 2))),
    ((768, 12, 32), ("embed", "heads", "kv"), 128, ((1, 2), (0,))),  # [768, 384]: heads*kv is smaller
    ((12, 64, 768), ("heads", "kv", "embed"), 128, ((0, 1), (2,))),
    ((64, 4, 16), ("embed", "heads", "kv"), 128, None),  # [64, 64] < 128: a full second moment
    ((8, 64, 32), ("expert", "embed", "expert_mlp"), 128, ((1,), (2,))),  # experts: factored at any size
    ((4, 8, 64, 32), ("layers", "expert", "embed", "expert_mlp"), 128, ((2,), (3,))),
    ((4, 768, 12, 64), ("layers", "embed", "heads", "kv"), 1024, ((1,), (2, 3))),  # scanned: explicit rule
    ((2048, 768), ("mlp", "embed"), 128, ((1,), (0,))),
    ((768, 8), ("embed", "unmodeled"), 128, None),
    ((12, 32), ("heads", "relpos_buckets"), 4, ((0,), (1,))),  # rank 2 without batch: t5x's heuristic
    ((4, 768), ("layers", "embed"), 128, None),  # ROW without COLUMN: unfactored, per layer
])
def test_factor_plan_follows_t5x(shape, names, min_dim, want):
    plan = adafactor.factor_plan(shape, names, min_dim_size_to_factor=min_dim)
    got = (plan.row_dims, plan.col_dims) if plan.factored else None
    assert got == want
    batch = {i for i, n in enumerate(names) if n in ("expert", "layers")}
    assert plan.averaging_dims == tuple(i for i in range(len(shape)) if i not in batch)


def test_factor_plan_without_names_and_unfactored():
    assert adafactor.factor_plan((256, 512), None).row_dims == (0,)
    with pytest.raises(ValueError, match="logical axis names"):
        adafactor.factor_plan((8, 256, 512), None)
    # factored=False: t5x drops the rule, so even the expert axis is averaged over (adafactor.py:354-356).
    plan = adafactor.factor_plan((8, 256, 512), ("expert", "embed", "expert_mlp"), factored=False)
    assert not plan.factored and plan.averaging_dims == (0, 1, 2)


def test_make_optimizer_refuses_unnamed_rank3_params():
    with pytest.raises(ValueError, match="logical axis names"):
        optim.make_optimizer(OptimConfig(optimizer="adafactor", adafactor_style="t5x"),
                             {"expert_wi": jnp.zeros((2, 4, 4))})
    optim.make_optimizer(OptimConfig(optimizer="adafactor", adafactor_style="optax"), {"expert_wi": jnp.zeros((2, 4, 4))})


@pytest.mark.parametrize("scan", [False, True])
def test_every_model_axis_name_has_a_t5x_rule(scan):
    cfg = ModelConfig(vocab_size=64, d_model=16, d_ff=32, num_heads=2, d_kv=8, num_encoder_layers=2,
                      num_decoder_layers=2, sparse_interval=2, sparse_dense=not scan, scan_layers=scan,
                      moe=MoeConfig(num_experts=2)).validate()
    tokens = jnp.ones((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda: EncoderDecoder(cfg).init(jax.random.key(0), tokens, tokens, tokens)["params"])
    names = {n for axes in adafactor.logical_axes(boxed).values() for n in axes}
    assert names and names <= set(adafactor.FACTOR_RULES), names - set(adafactor.FACTOR_RULES)
    plans = adafactor.factor_plans(boxed, min_dim_size_to_factor=4)
    expert = next(p for path, p in plans.items() if path.endswith("expert_wi_0"))
    assert expert.averaging_dims == ((2, 3) if scan else (1, 2))


# ---------------------------------------------------------------- sharding


def test_state_sharded_like_the_params():
    mesh = partitioning.make_mesh(MeshConfig(data=1, expert=4, model=2))
    model = EncoderDecoder(ss.tiny_config(8))
    cfg = OptimConfig(optimizer="adafactor", adafactor_style="t5x", adafactor_min_dim_size_to_factor=16)
    layout = steps.state_layout(model, lambda p: optim.make_optimizer(cfg, p), mesh, ss.input_shapes(),
                                jax.random.key(0))
    specs = {jax.tree_util.keystr(path): s.spec
             for path, s in jax.tree_util.tree_leaves_with_path(layout.shardings.opt_state)}
    get = lambda field, suffix: next(v for k, v in specs.items() if f".{field}[" in k and k.endswith(suffix))
    P = jax.sharding.PartitionSpec
    # Expert kernel [E, d, f] sharded (expert, None, model): per-expert row and column moments.
    assert get("v_row", "['encoder']['layers_1']['ffn']['moe']['expert_wi_0']") == P("expert", None, None)
    assert get("v_col", "['encoder']['layers_1']['ffn']['moe']['expert_wi_0']") == P("expert", None, "model")
    # Query [d, heads, d_kv] sharded (None, model, None): column moment [1, heads, d_kv] keeps 'model'.
    assert get("v_col", "['encoder']['layers_0']['attention']['query']") == P(None, "model", None)
    state = layout.init(jax.random.key(0))  # the sharded init allocates with these shardings
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(layout.shardings.opt_state)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("field,value", [
    ("adafactor_style", "mesh_tf"), ("adafactor_epsilon1", 0.0), ("adafactor_epsilon2", -1.0),
    ("adafactor_min_dim_size_to_factor", 0), ("adafactor_factored", 1), ("adafactor_multiply_by_parameter_scale", "yes"),
    ("adafactor_beta1", 1.0), ("adafactor_max_parameter_scale", 0.0), ("adafactor_step_offset", -1),
    ("adafactor_weight_decay_rate", 1.0)])
def test_validate_names_the_adafactor_field(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}"):
        OptimConfig(**{field: value}).validate()


@pytest.mark.parametrize("field,value", [("adafactor_epsilon2", 0.1), ("adafactor_max_parameter_scale", 1.0),
                                         ("adafactor_weight_decay_rate", 0.01)])
def test_t5x_only_fields_are_refused_with_optax_style(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}"):
        OptimConfig(adafactor_style="optax", **{field: value}).validate()


def test_older_run_configs_keep_optax_adafactor():
    from stmoe.config import RunConfig, upgrade_run_config
    assert upgrade_run_config({"optim": {"optimizer": "adafactor"}})["optim"]["adafactor_style"] == "optax"
    assert RunConfig.from_dict(upgrade_run_config(RunConfig().to_dict())).optim.adafactor_style == "t5x"
