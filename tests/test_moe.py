"""MoeLayer: dispatch implementations agree, drops go through the residual, train and eval capacity."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference
from stmoe import losses, metrics
from stmoe.config import ModelConfig, MoeConfig

from stmoe.moe import MoeLayer

D_MODEL, BATCH, LENGTH = 16, 3, 12


def layer_config(**moe_fields) -> ModelConfig:
    moe = MoeConfig(num_experts=4, **moe_fields)
    return ModelConfig(d_model=D_MODEL, d_ff=24, num_decoder_layers=0, moe=moe).validate()


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
    mask = np.ones((BATCH, LENGTH), np.float32)
    mask[2, 8:] = 0  # a padded sequence
    return x, jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg, x, mask):  # jitted: eager flax init dispatches op by op, 10x slower here
    return nn.meta.unbox(MoeLayer(cfg).init({"params": jax.random.key(0)}, x, mask)["params"])


def init_params(cfg, x, mask):
    params = _init(cfg, x, mask)
    # A sharper router than the init so that experts are unevenly loaded and tokens get dropped.
    params["router"]["kernel"] = params["router"]["kernel"] * 100.0
    return params


@functools.partial(jax.jit, static_argnums=(0, 4))
def apply(cfg, params, x, mask, deterministic=True):
    out, state = MoeLayer(cfg).apply({"params": params}, x, mask, deterministic, mutable=["moe"],
                                     rngs={"dropout": jax.random.key(1)})
    return out, metrics.collect_layers(state["moe"])[""].as_dict()


CASES = [dict(top_k=1), dict(top_k=2, second_expert_policy="all"), dict(top_k=2, min_capacity=1),
         dict(router_type="experts_choose", min_capacity=1), dict(top_k=2, group_size=6, min_capacity=1)]


@pytest.mark.parametrize("fields", CASES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_einsum_and_gather_dispatch_agree(fields):
    """gather, and gather with only the kept rows through the grouped kernel (expert_execution
    "grouped", tokens-choose only), against the einsum reference: outputs, stats and gradients."""
    x, mask = inputs()
    cfg_einsum = layer_config(dispatch="einsum", eval_capacity_factor=0.5, **fields)
    variants = {"gather": cfg_einsum.replace(moe=cfg_einsum.moe.replace(dispatch="gather"))}
    if cfg_einsum.moe.router_type == "tokens_choose":
        variants["grouped"] = cfg_einsum.replace(moe=cfg_einsum.moe.replace(dispatch="gather",
                                                                            expert_execution="grouped"))
    params = init_params(cfg_einsum, x, mask)

    def loss(params, x, cfg):
        out, _ = apply(cfg, params, x, mask)
        return jnp.mean(jnp.square(out))  # needs the output values, unlike a linear loss

    out_e, stats_e = apply(cfg_einsum, params, x, mask)
    assert float(stats_e["dropped_tokens"]) > 0, "the case should drop tokens"
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grads_e = grads(params, x, cfg_einsum)
    for name, cfg in variants.items():
        out, stats = apply(cfg, params, x, mask)
        np.testing.assert_allclose(out, out_e, atol=1e-5, rtol=1e-5, err_msg=name)
        for key in ("dropped_tokens", "expert_counts", "aux_loss"):
            np.testing.assert_allclose(stats[key], stats_e[key], rtol=1e-6, err_msg=f"{name} {key}")
        for a, b in zip(jax.tree_util.tree_leaves(grads(params, x, cfg)), jax.tree_util.tree_leaves(grads_e)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


def test_dropped_tokens_and_padding_get_zero_output():
    x, mask = inputs(1)
    cfg = layer_config(top_k=1, eval_capacity_factor=0.25, min_capacity=1)
    params = init_params(cfg, x, mask)
    out, stats = apply(cfg, params, x, mask)
    probs = jax.nn.softmax(jnp.einsum("btd,de->bte", x, params["router"]["kernel"]), -1)
    expert = np.asarray(jnp.argmax(probs, -1))
    # Rebuild which tokens kept their slot: capacity 1 per expert and sequence, in token order.
    kept = np.zeros((BATCH, LENGTH), bool)
    for b in range(BATCH):
        seen = set()
        for t in range(LENGTH):
            if mask[b, t] and expert[b, t] not in seen:
                kept[b, t] = True
                seen.add(expert[b, t])
    out = np.asarray(out)
    assert np.all(out[~kept] == 0.0), "dropped or padded tokens must get exactly zero (the residual carries them)"
    # Kept tokens get router prob x their expert's GEGLU MLP (tests/moe_reference.py, float64).
    want = moe_reference.forward(jax.tree.map(np.asarray, params), x, mask, top_k=1, cap=1)
    np.testing.assert_array_equal(want["kept"][..., 0], kept)
    np.testing.assert_allclose(out, want["out"], atol=1e-6, rtol=1e-5)
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(stats["dropped_tokens"], 1 - kept[real].mean(), rtol=1e-6)


def test_train_and_eval_capacity_factors_are_separate():
    x, mask = inputs(2)
    cfg = layer_config(top_k=2, second_expert_policy="all", train_capacity_factor=0.5,
                       eval_capacity_factor=4.0, min_capacity=1)
    params = init_params(cfg, x, mask)
    _, eval_stats = apply(cfg, params, x, mask, deterministic=True)
    _, train_stats = apply(cfg, params, x, mask, deterministic=False)
    # Capacities: eval ceil(4.0 * 12 / 4) = 12 (nothing drops), train ceil(0.5 * 12 / 4) = 2.
    np_params = jax.tree.map(np.asarray, params)
    for stats, cap in ((eval_stats, 12), (train_stats, 2)):
        want = moe_reference.forward(np_params, x, mask, top_k=2, cap=cap)
        for name in ("dropped_fraction_rank1", "dropped_fraction_rank2", "dropped_tokens"):
            np.testing.assert_allclose(float(stats[name]), want[name], rtol=1e-6, err_msg=f"C={cap} {name}")
    assert want["dropped_fraction_rank1"] > 0  # the train capacity binds


# Router gradients against finite differences, and bfloat16 with a float32 router: test_moe_reference.py.


def test_expert_choice_refused_in_causal_decoder():
    x, mask = inputs()
    cfg = layer_config(router_type="experts_choose")
    with pytest.raises(ValueError, match="causal decoder"):
        MoeLayer(cfg, causal=True).init({"params": jax.random.key(0)}, x, mask)


def test_moe_losses_average_over_layers():
    def stats(aux, z):
        zero = jnp.float32(0.0)
        return (metrics.RouterStats(aux_loss=jnp.float32(aux), router_z_loss=jnp.float32(z),
                                    dropped_fraction=jnp.zeros((2,)), dropped_tokens=zero,
                                    expert_counts=jnp.zeros((4,)), load_cv=zero, router_entropy=zero,
                                    router_confidence=zero),)
    layers = {"encoder": {"a": {"moe": {"stats": stats(1.0, 4.0)}}, "b": {"moe": {"stats": stats(3.0, 2.0)}}}}
    result = losses.moe_losses(layers)
    assert float(result["aux_loss"]) == 2.0 and float(result["router_z_loss"]) == 3.0


def _dropped_share(moe_cfg: MoeConfig, x, mask) -> float:
    cfg = ModelConfig(d_model=x.shape[-1], d_ff=32, moe=moe_cfg)
    layer = MoeLayer(cfg)
    params = layer.init(jax.random.key(0), x, mask)["params"]
    _, state = layer.apply({"params": params}, x, mask, deterministic=True, mutable=["moe"])
    return float(state["moe"]["stats"][0].dropped_tokens)


def test_eval_capacity_factor_applies_over_an_integer_expert_capacity():
    # An imported HF Switch model has an integer expert_capacity; asking for an eval factor must
    # change the capacity (here from 1 slot per expert, which drops, to ample, which drops nothing).
    from stmoe import inference

    x = jax.random.normal(jax.random.key(1), (2, 16, 16))
    mask = jnp.ones((2, 16))
    hf_style = MoeConfig(num_experts=4, top_k=1, expert_capacity=1, min_capacity=1)
    assert _dropped_share(hf_style, x, mask) >= 0.5  # 4 slots for 16 tokens per group
    applied = MoeConfig.from_dict(inference.with_eval_capacity_factor(hf_style.to_dict(), 8.0)).validate()
    assert applied.expert_capacity is None and applied.eval_capacity_factor == 8.0
    assert _dropped_share(applied, x, mask) == 0.0
    assert inference.applied_eval_capacity_factor(ModelConfig(moe=applied)) == 8.0
    assert inference.applied_eval_capacity_factor(ModelConfig(moe=hf_style)) is None


def test_eval_capacity_factor_is_refused_for_dropless():
    from stmoe import inference
    from stmoe.config import ConfigError

    with pytest.raises(ConfigError, match="dropless"):
        inference.with_eval_capacity_factor(MoeConfig(dispatch="dropless").to_dict(), 2.0)
    with pytest.raises(ConfigError, match="> 0"):
        inference.with_eval_capacity_factor(MoeConfig().to_dict(), 0.0)


def _routed_padding_case():
    """One row of 4 tokens, 2 real then 2 padding, 4 experts, one slot each, top-1 with routed padding
    (Hugging Face's semantics). The router reads features 0..3 through an identity kernel:
    logits ln 3 for the token's expert and 0 elsewhere give probabilities (1/2, 1/6, 1/6, 1/6);
    the padding's ln 9 gives 9/12 = 3/4 and 1/12 elsewhere. Token 0 picks expert 0, token 1 expert 1,
    both padding tokens expert 2 (the second of them overflows it)."""
    x = np.zeros((1, 4, D_MODEL), np.float32)
    x[0, 0, 0] = x[0, 1, 1] = np.log(3.0)
    x[0, 2, 2] = x[0, 3, 2] = np.log(9.0)
    mask = jnp.asarray([[1.0, 1.0, 0.0, 0.0]])
    cfg = layer_config(top_k=1, expert_capacity=1, min_capacity=1, route_padding=True, dispatch="gather")
    params = jax.tree.map(np.asarray, _init(cfg, jnp.asarray(x), mask))
    params["router"]["kernel"] = np.eye(D_MODEL, 4, dtype=np.float32)
    return cfg, params, jnp.asarray(x), mask


def test_routed_padding_counts_in_no_routing_statistic():
    """Golden values by hand (_routed_padding_case): of the 2 real tokens none is dropped (the padding
    token that overflowed expert 2 is not a token), the experts processed real tokens [1, 1, 0, 0],
    confidence 1/2, entropy -(1/2 ln 1/2 + 3/6 ln 1/6) = (ln 2 + ln 6) / 2. Counting padding would
    give 1/4 dropped, counts [1, 1, 1, 0], confidence 5/8."""
    cfg, params, x, mask = _routed_padding_case()
    _, stats = apply(cfg, params, x, mask)
    assert float(stats["dropped_tokens"]) == 0.0
    assert float(stats["dropped_fraction_rank1"]) == 0.0
    np.testing.assert_array_equal(np.asarray(stats["expert_counts"]), [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(float(stats["load_cv"]), 1.0, rtol=1e-6)  # counts [1, 1, 0, 0]: std 1/2, mean 1/2
    np.testing.assert_allclose(float(stats["router_confidence"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(stats["router_entropy"]), (np.log(2.0) + np.log(6.0)) / 2, rtol=1e-6)
    # The loss terms still see what was routed, padding included, as Hugging Face computes them:
    # z-loss = mean over the 4 routed tokens of logsumexp^2 = (2 ln^2 6 + 2 ln^2 12) / 4.
    np.testing.assert_allclose(float(stats["router_z_loss"]), (np.log(6.0) ** 2 + np.log(12.0) ** 2) / 2, rtol=1e-5)


def test_routed_padding_changes_no_statistic_of_the_real_tokens():
    """The same tokens with padding routed (route_padding=True) and not: the padding is at the end of
    the row and top-1 serves in position order, so the real tokens route the same either way, and
    every router statistic must agree."""
    cfg, params, x, mask = _routed_padding_case()
    _, routed = apply(cfg, params, x, mask)
    _, unrouted = apply(cfg.replace(moe=cfg.moe.replace(route_padding=False)), params, x, mask)
    for name in ("dropped_tokens", "dropped_fraction_rank1", "expert_counts", "load_cv", "router_confidence",
                 "router_entropy"):
        np.testing.assert_allclose(np.asarray(routed[name]), np.asarray(unrouted[name]), rtol=1e-6, err_msg=name)


def test_inference_routing_stats_count_real_tokens_of_a_short_input_in_a_padded_batch():
    """inference.routing_stats on one short row (5 input ids, 3 targets) padded to length 16 and to
    a batch of 4 rows, with Hugging Face's semantics (top-1, integer capacity, padding routed), against
    the same row alone at its own lengths, where every token is real. Padding sits after the real
    tokens and top-1 serves in position order, so the real tokens route identically in both."""
    from stmoe import inference, partitioning
    from stmoe.models import EncoderDecoder

    moe = MoeConfig(num_experts=4, top_k=1, expert_capacity=1, min_capacity=1, route_padding=True)
    cfg = ModelConfig(vocab_size=32, d_model=16, d_ff=24, num_heads=2, d_kv=8, num_encoder_layers=2,
                      num_decoder_layers=2, sparse_interval=2, sparse_offset=1, mlp_gated=False,
                      mlp_activation="relu", moe=moe).validate()
    model = EncoderDecoder(cfg)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, expert=1, model=1), jax.devices()[:1])
    inputs = np.asarray([[7, 3, 9, 12, 1]], np.int32)
    targets = np.asarray([[5, 8, 1]], np.int32)
    with partitioning.activate(mesh):
        params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(inputs), jnp.asarray(targets),
                                          jnp.asarray(targets), enable_dropout=False)["params"])
    stats = {}
    for name, (enc_len, dec_len, batch) in {"padded": (16, 8, 4), "alone": (5, 3, 1)}.items():
        loaded = inference.LoadedModel(model=model, params=params, mesh=mesh, inputs_length=enc_len,
                                       targets_length=dec_len)
        pad = lambda a, n: np.pad(a, [(0, 0), (0, n - a.shape[1])])
        stats[name] = inference.routing_stats(loaded, pad(inputs, enc_len), pad(targets, dec_len), batch_size=batch)
    # Alone, 5 real tokens on 4 one-slot experts: at least one is dropped in the encoder.
    assert stats["alone"]["encoder/layers_1/ffn"]["dropped_tokens"] >= 0.2
    for layer, values in stats["alone"].items():
        for metric in ("dropped_tokens", "dropped_fraction_rank1", "router_confidence", "router_entropy"):
            assert stats["padded"][layer][metric] == pytest.approx(values[metric], abs=1e-6), (layer, metric)
