"""Layer scan and remat: the same function as the plain Python loop over blocks.

scan_params restacks the unscanned parameters (layers_{u * interval + j} -> scan_{interval}/
layers_{j}[u]); logits, MoE losses and gradients must match the unscanned model to 1e-5, and
the per-layer MoE metrics must come out under the unscanned layer names.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from stmoe import losses, metrics
from stmoe.config import ConfigError
from stmoe.models import EncoderDecoder, scan_params, unscan_params

BASE = presets.model_config("tiny").replace(num_encoder_layers=4, num_decoder_layers=2, d_model=32, d_ff=48,
                                           num_heads=2, d_kv=8, vocab_size=64)
BASE = BASE.replace(moe=BASE.moe.replace(num_experts=4, second_expert_policy="all"))


def batch():
    rng = np.random.default_rng(0)
    enc = rng.integers(1, 64, (2, 12)).astype(np.int32)
    enc[1, 9:] = 0
    dec = rng.integers(1, 64, (2, 6)).astype(np.int32)
    dec[0, 5:] = 0
    return jnp.asarray(enc), jnp.asarray(dec)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(cfg, params, enc, dec):
    def loss(params):
        logits, state = EncoderDecoder(cfg).apply({"params": params}, enc, dec, dec, enable_dropout=False,
                                                  mutable=["moe"])
        ce = losses.cross_entropy_sums(logits, dec)
        return losses.total_loss(ce, losses.moe_losses(state["moe"]), 1e-2, 1e-3), (logits, state["moe"])
    return jax.value_and_grad(loss, has_aux=True)(params)


@functools.cache
def reference():
    enc, dec = batch()
    init = jax.jit(lambda: EncoderDecoder(BASE).init({"params": jax.random.key(0)}, enc, dec, dec,
                                                     enable_dropout=False)["params"])
    params = nn.meta.unbox(init())
    return params, enc, dec, loss_and_grads(BASE, params, enc, dec)


def assert_trees_close(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-5)


def test_scan_matches_loop_and_reports_per_layer_metrics():
    params, enc, dec, ((loss, (logits, moe)), grads) = reference()
    cfg = BASE.replace(scan_layers=True)
    scanned = scan_params(params, cfg)
    init_shapes = jax.eval_shape(lambda: nn.meta.unbox(EncoderDecoder(cfg).init(
        {"params": jax.random.key(0)}, enc, dec, dec, enable_dropout=False)["params"]))
    assert jax.tree_util.tree_map(jnp.shape, scanned) == jax.tree_util.tree_map(lambda s: s.shape, init_shapes)
    (loss_s, (logits_s, moe_s)), grads_s = loss_and_grads(cfg, scanned, enc, dec)
    np.testing.assert_allclose(logits_s, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss_s, loss, atol=1e-6, rtol=1e-6)
    assert_trees_close(unscan_params(grads_s, cfg), grads)

    per_layer = metrics.expand_scanned(metrics.collect_layers(moe))
    per_layer_s = metrics.expand_scanned(metrics.collect_layers(moe_s))
    assert list(per_layer_s) == list(per_layer) == ["decoder/layers_1/ffn", "encoder/layers_1/ffn",
                                                   "encoder/layers_3/ffn"]
    assert_trees_close(per_layer_s, per_layer)
    summary = metrics.summarize(metrics.collect_layers(moe_s))
    assert summary["moe/encoder/layers_3/ffn/load_cv"].shape == ()
    assert "encoder/layers_3/ffn" in metrics.format_table(metrics.collect_layers(moe_s))


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_matches(remat):
    params, enc, dec, ((loss, (logits, _)), grads) = reference()
    cfg = BASE.replace(remat=remat, scan_layers=remat == "full")  # one case with scan, one without
    p = scan_params(params, cfg) if cfg.scan_layers else params
    (loss_r, (logits_r, _)), grads_r = loss_and_grads(cfg, p, enc, dec)
    np.testing.assert_allclose(logits_r, logits, atol=1e-5, rtol=1e-5)
    assert_trees_close(unscan_params(grads_r, cfg) if cfg.scan_layers else grads_r, grads)


def test_scan_validation_and_decode_refused():
    with pytest.raises(ConfigError, match="model.scan_layers"):
        BASE.replace(scan_layers=True, num_encoder_layers=3).validate()
    with pytest.raises(ConfigError, match="model.remat"):
        BASE.replace(remat="some").validate()
    cfg = BASE.replace(scan_layers=True)
    enc, dec = batch()
    model = EncoderDecoder(cfg)
    with pytest.raises(ValueError, match="scan_layers.*decode"):
        jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, enc, dec[:, :1], dec[:, :1],
                                          enable_dropout=False, decode=True))
