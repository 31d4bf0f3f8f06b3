"""The ST-MoE Table 3/4 ablation switches: RMSNorm without scale, a bfloat16 router (numpy references)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from stmoe import routing
from stmoe.config import ConfigError, ModelConfig, MoeConfig
from stmoe.interop import hf_switch
from stmoe.layers import RMSNorm
from stmoe.models import EncoderDecoder
from stmoe.moe import MoeLayer

EPS = 1e-6


def numpy_rms_norm(x, scale=None):
    x = np.asarray(x, np.float64)
    out = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + EPS)
    return out if scale is None else out * scale


def test_rms_norm_without_scale_has_no_parameter_and_matches_numpy():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 3.0
    plain = RMSNorm(EPS, use_scale=False)
    variables = plain.init(jax.random.key(1), x)
    assert not jax.tree.leaves(variables)  # nothing to learn
    out = plain.apply(variables, x)
    np.testing.assert_allclose(out, numpy_rms_norm(x), rtol=1e-5, atol=1e-6)
    # = the scaled norm at its initial scale of ones, and not at another scale.
    scaled = RMSNorm(EPS)
    params = nn.meta.unbox(scaled.init(jax.random.key(1), x))
    np.testing.assert_array_equal(params["params"]["scale"], np.ones(8, np.float32))
    np.testing.assert_allclose(scaled.apply(params, x), out, rtol=1e-6, atol=1e-7)
    other = np.linspace(0.5, 2.0, 8).astype(np.float32)
    np.testing.assert_allclose(scaled.apply({"params": {"scale": other}}, x), numpy_rms_norm(x, other),
                               rtol=1e-5, atol=1e-6)


def _norm_scales(params):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
            if "scale" in jax.tree_util.keystr(p)]


def test_model_without_norm_scale_drops_exactly_the_norm_scales():
    cfg = ModelConfig(vocab_size=32, d_model=16, d_ff=32, num_heads=2, d_kv=8, num_encoder_layers=2,
                      num_decoder_layers=2, sparse_interval=2, moe=MoeConfig(num_experts=4)).validate()
    shapes = {k: jnp.zeros((2, 6), jnp.int32)
              for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
    init = lambda c: jax.eval_shape(lambda: EncoderDecoder(c).init(jax.random.key(0), **shapes)["params"])
    with_scale, without = init(cfg), init(cfg.replace(layer_norm_scale=False))
    count = lambda t: len(jax.tree.leaves(t))
    # Per stack: a norm before every attention and FFN plus the final norm: enc 2 x 2 + 1, dec 2 x 3 + 1.
    assert len(_norm_scales(with_scale)) == 5 + 7
    assert _norm_scales(without) == []
    assert count(with_scale) - count(without) == 12


def test_hf_export_refuses_a_model_without_norm_scale():
    cfg = ModelConfig(mlp_gated=False, moe=MoeConfig(top_k=1, route_padding=True, expert_capacity=4),
                      sparse_interval=2, sparse_offset=1, layer_norm_scale=False)
    with pytest.raises(ConfigError, match="layer_norm_scale"):
        hf_switch.config_to_hf(cfg)
    assert hf_switch.config_to_hf(cfg.replace(layer_norm_scale=True))["router_dtype"] == "float32"


def test_router_dtype_is_validated():
    with pytest.raises(ConfigError, match="moe.router_dtype"):
        MoeConfig(router_dtype="float16").validate()


def _router_case():
    x = jax.random.normal(jax.random.key(0), (2, 7, 16), jnp.float32)
    router = routing.Router(num_experts=4, init_std=0.5)
    params = nn.meta.unbox(router.init(jax.random.key(1), x))
    return x, params


def test_float32_router_is_the_plain_float32_matmul_bit_for_bit():
    x, params = _router_case()
    logits = routing.Router(num_experts=4, init_std=0.5).apply(params, x)
    kernel = jax.tree.leaves(params)[0]
    # The router before router_dtype existed: float32 inputs x float32 kernel, HIGHEST precision.
    before = jnp.einsum("gtd,de->gte", x, kernel, precision=jax.lax.Precision.HIGHEST)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, before)


def test_bfloat16_router_rounds_inputs_weights_and_logits():
    x, params = _router_case()
    kernel = np.asarray(jax.tree.leaves(params)[0], np.float32)
    logits = routing.Router(num_experts=4, init_std=0.5, dtype=jnp.bfloat16).apply(params, x)
    assert logits.dtype == jnp.bfloat16
    # numpy: operands rounded to bfloat16, products summed exactly (float64), the sum rounded to bfloat16.
    bf16 = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)
    exact = np.einsum("gtd,de->gte", bf16(x), bf16(kernel))
    expected = bf16(exact)
    got = np.asarray(logits, np.float64)
    # The accumulation order may move a sum across a rounding boundary: one bfloat16 ulp (2^-7 relative).
    np.testing.assert_allclose(got, expected, rtol=2 ** -7, atol=0)
    assert np.mean(got == expected) > 0.9
    # Every logit is a bfloat16 number, and they differ from the float32 router's.
    np.testing.assert_array_equal(got, bf16(got))
    float32_logits = np.asarray(routing.Router(num_experts=4, init_std=0.5).apply(params, x), np.float64)
    assert np.max(np.abs(got - float32_logits)) > 1e-4


def test_moe_layer_router_dtype_changes_only_the_router():
    cfg = ModelConfig(d_model=16, d_ff=24, num_decoder_layers=0,
                      moe=MoeConfig(num_experts=4, router_init_std=0.5, second_expert_policy="all")).validate()
    x = jax.random.normal(jax.random.key(2), (2, 8, 16), jnp.float32)
    mask = jnp.ones((2, 8), jnp.float32)
    params = nn.meta.unbox(MoeLayer(cfg).init({"params": jax.random.key(0)}, x, mask)["params"])
    run = lambda c: MoeLayer(c).apply({"params": params}, x, mask, True, mutable=["moe"])
    out32, stats32 = run(cfg)
    bf16_cfg = cfg.replace(moe=cfg.moe.replace(router_dtype="bfloat16"))
    out16, stats16 = run(bf16_cfg)
    assert out16.dtype == out32.dtype == jnp.float32  # activations keep model.dtype
    assert not np.allclose(out16, out32, rtol=0, atol=1e-7)
    # The bfloat16 router's z-loss is the numpy z-loss of its rounded logits.
    kernel = np.asarray(params["router"]["kernel"], np.float32)
    bf16 = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)
    logits = bf16(np.einsum("gtd,de->gte", bf16(x), bf16(kernel)))
    log_z = np.log(np.sum(np.exp(logits), axis=-1))
    z16 = float(stats16["moe"]["stats"][0].router_z_loss)
    np.testing.assert_allclose(z16, np.mean(log_z ** 2), rtol=2e-2)
