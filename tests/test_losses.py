"""t5x's cross-entropy options (label smoothing, loss_normalizing_factor) and flaxformer's decoder
padding, against numpy written from t5x/losses.py:132-353, t5x/contrib/moe/models.py:257-293 and
flaxformer's dense_attention.get_decoder_logit_mask."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stmoe import layers, losses, steps
from stmoe.config import ConfigError, LossConfig, ModelConfig, MoeConfig
from stmoe.models import EncoderDecoder


def _np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_token_loss(logits, targets, smoothing):
    """t5x: soft one-hot targets (1 - s on the target, s / (V - 1) elsewhere), minus their entropy."""
    vocab = logits.shape[-1]
    confidence, low = 1.0 - smoothing, smoothing / (vocab - 1)
    soft = np.full(logits.shape, low)
    np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
    constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    return -(soft * _np_log_softmax(logits)).sum(-1) - constant


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
def test_label_smoothing_matches_t5x(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)) * 3
    targets = rng.integers(0, 7, (2, 5))
    got, log_z = losses.token_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), smoothing)
    np.testing.assert_allclose(got, _np_token_loss(logits, targets, smoothing), rtol=1e-5, atol=1e-5)
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    sums = losses.cross_entropy_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(weights),
                                     z_loss_coef=1e-2, label_smoothing=smoothing, objective_weights=jnp.asarray(weights))
    z = 1e-2 * np.log(np.exp(logits).sum(-1)) ** 2
    np.testing.assert_allclose(sums["output_z_loss"], (z * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["objective"], ((_np_token_loss(logits, targets, smoothing) + z) * weights).sum(),
                               rtol=1e-5)


# Two packed rows: segments 1, 2 (row 0) and 1 (row 1), padding 0; one token of row 0 weighted 0.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
TARGETS = np.where(SEGMENTS > 0, np.array([[5, 6, 1, 7, 1, 0], [3, 4, 5, 1, 0, 0]]), 0)
WEIGHTS = (SEGMENTS > 0).astype(np.float32) * np.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1]], np.float32)


@pytest.mark.parametrize("factor", ["num_real_target_tokens", "num_total_target_tokens", "average_per_sequence",
                                    "none", "2.5"])
@pytest.mark.parametrize("packed", [True, False])
def test_loss_normalizing_factor_matches_t5x(factor, packed):
    token_loss = np.random.default_rng(1).random(TARGETS.shape) + 0.5
    batch = {"decoder_target_tokens": jnp.asarray(TARGETS), "decoder_loss_weights": jnp.asarray(WEIGHTS)}
    if packed:
        batch["decoder_segment_ids"] = jnp.asarray(SEGMENTS)
    weights, normalizer = losses.loss_weights_and_normalizer(batch, factor)
    got = float(np.sum(token_loss * np.asarray(weights)) / float(normalizer))
    total = np.sum(token_loss * WEIGHTS)
    if factor == "average_per_sequence":
        # Each sequence's (packed: each segment's) weighted mean, then the mean over sequences.
        sequences = [(r, s) for r in range(2) for s in sorted(set(SEGMENTS[r]) - {0})] if packed else \
            [(r, None) for r in range(2)]
        means = []
        for r, s in sequences:
            mask = WEIGHTS[r] * (SEGMENTS[r] == s if s is not None else 1.0)
            means.append(np.sum(token_loss[r] * mask) / np.sum(mask))
        want = np.mean(means)
    else:
        want = total / {"num_real_target_tokens": WEIGHTS.sum(), "num_total_target_tokens": TARGETS.size,
                        "none": 1.0, "2.5": 2.5}[factor]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("field,value", [("label_smoothing", 1.0), ("label_smoothing", -0.1),
                                         ("loss_normalizing_factor", "tokens"), ("loss_normalizing_factor", "-3"),
                                         ("loss_normalizing_factor", "nan")])
def test_loss_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"loss.{field}"):
        LossConfig(**{field: value}).validate()


# ------------------------------------------------------------------ the step's objective


MODEL = ModelConfig(vocab_size=32, d_model=16, d_ff=32, num_heads=2, d_kv=8, num_encoder_layers=1,
                    num_decoder_layers=1, sparse_interval=1,
                    moe=MoeConfig(num_experts=2, second_expert_policy="all"))


@pytest.fixture(scope="module")
def tiny_batch():
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 32, (4, 6)).astype(np.int32)
    targets[0, 4:] = 0  # padding
    targets[0, 3] = 1  # EOS
    return {"encoder_input_tokens": rng.integers(2, 32, (4, 7)).astype(np.int32), "decoder_target_tokens": targets,
            "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
            "decoder_loss_weights": (targets > 0).astype(np.float32)}


@pytest.mark.parametrize("factor", ["num_real_target_tokens", "none", "num_total_target_tokens", "3.5"])
def test_train_step_adds_moe_terms_to_the_normalized_cross_entropy(factor, tiny_batch):
    # t5x/contrib/moe/models.py:278-293: total = CE sum (+ z) / normalizer + aux_factor * aux + z_factor * router_z.
    model = EncoderDecoder(MODEL.validate())
    batch = {k: jnp.asarray(v) for k, v in tiny_batch.items()}
    kwargs = {k: batch[k] for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
    params = nn.unbox(model.init(jax.random.key(0), **kwargs, enable_dropout=False)["params"])
    loss_cfg = LossConfig(balance_coef=0.3, router_z_coef=0.2, output_z_coef=1e-2, label_smoothing=0.1,
                          loss_normalizing_factor=factor)
    tx = optax.sgd(0.0)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=tx, learning_rate_fn=lambda s: 0.0,
                                     loss_cfg=loss_cfg, balance_coef_fn=losses.balance_coef_schedule(loss_cfg),
                                     microbatches=1, seed=0))
    _, metrics = step(state, batch)

    # Training routing (train capacity factor); dropout 0 and routing to both experts: no randomness.
    logits, variables = model.apply({"params": params}, **kwargs, enable_dropout=True, mutable=["moe"],
                                    rngs={"dropout": jax.random.key(1)})
    logits = np.asarray(logits, np.float64)
    weights = tiny_batch["decoder_loss_weights"]
    token = _np_token_loss(logits, tiny_batch["decoder_target_tokens"], 0.1)
    z = 1e-2 * np.log(np.exp(logits).sum(-1)) ** 2
    normalizer = {"num_real_target_tokens": weights.sum(), "none": 1.0, "num_total_target_tokens": weights.size,
                  "3.5": 3.5}[factor]
    moe = losses.moe_losses(variables["moe"])
    want = np.sum((token + z) * weights) / normalizer + 0.3 * float(moe["aux_loss"]) + 0.2 * float(moe["router_z_loss"])
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["cross_entropy"]), np.sum(token * weights), rtol=2e-5)  # a sum


# ------------------------------------------------------------------ decoder padding


def test_decoder_input_token_mask_is_flaxformers():
    # flaxformer dense_attention.get_decoder_logit_mask's docstring example (packed), and an unpacked row
    # whose EOS input position (index 3) counts although its target is padding.
    tokens = jnp.asarray([[0, 3, 9, 0, 4, 8, 0, 0], [0, 3, 9, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(layers.decoder_input_token_mask(tokens),
                                  [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])


@pytest.mark.parametrize("source", ["targets", "decoder_input_tokens"])
def test_decoder_padding_from_picks_the_routed_positions(source, tiny_batch):
    cfg = MODEL.replace(moe=MODEL.moe.replace(decoder_padding_from=source)).validate()
    model = EncoderDecoder(cfg)
    kwargs = {k: jnp.asarray(tiny_batch[k]) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                                       "decoder_target_tokens")}
    params = model.init(jax.random.key(0), **kwargs, enable_dropout=False)["params"]
    _, variables = model.apply({"params": params}, **kwargs, enable_dropout=False, mutable=["intermediates"])
    routed = lambda stack: np.asarray(  # [batch, length]: the first choice asked for a slot
        variables["intermediates"][stack]["layers_0"]["ffn"]["moe"]["routing"][0]["wanted"])[..., 0]
    want = {"targets": tiny_batch["decoder_target_tokens"] > 0,
            "decoder_input_tokens": np.asarray(layers.decoder_input_token_mask(kwargs["decoder_input_tokens"]))}[source]
    np.testing.assert_array_equal(routed("decoder"), want)
    assert routed("decoder")[0, 4] == (source == "decoder_input_tokens")  # the position after EOS
    np.testing.assert_array_equal(routed("encoder"), tiny_batch["encoder_input_tokens"] > 0)  # encoder: unchanged
    with pytest.raises(ConfigError, match="model.moe.decoder_padding_from"):
        MODEL.replace(moe=MODEL.moe.replace(decoder_padding_from="inputs")).validate()
