"""Encoder-decoder structure, presets, relative position buckets, packing."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as presets
from stmoe.config import ConfigError, ModelConfig, MoeConfig
from stmoe.layers import relative_position_bucket
from stmoe.models import EncoderDecoder


def count_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def expected_param_count(cfg: ModelConfig) -> int:
    """Parameter count from the architecture description, by hand."""
    d, f, e = cfg.d_model, cfg.d_ff, cfg.moe.num_experts
    ffn = (3 if cfg.mlp_gated else 2) * d * f
    attention = 4 * d * cfg.num_heads * cfg.d_kv
    total = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    for layers, attentions in ((cfg.num_encoder_layers, 1), (cfg.num_decoder_layers, 2)):
        total += cfg.num_heads * cfg.relative_attention_num_buckets + d  # position bias, final norm
        for i in range(layers):
            total += attentions * (attention + d) + d  # attention(s) with their norms, FFN norm
            if cfg.is_sparse(i):
                total += e * ffn + d * e  # experts and the router
                if cfg.sparse_dense:
                    total += ffn + d
            else:
                total += ffn
    return total


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_build_under_eval_shape(name):
    cfg = presets.model_config(name)
    tokens = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: EncoderDecoder(cfg).init({"params": jax.random.key(0)}, tokens, tokens, tokens,
                                                              enable_dropout=False))
    count = count_params(nn.meta.unbox(shapes["params"]))
    print(f"{name}: {count:,} parameters")
    assert count == expected_param_count(cfg)
    if name == "st_moe_l":
        assert 3.9e9 < count < 4.2e9  # paper: 4.1B
    if name == "st_moe_32b":
        assert 2.65e11 < count < 2.73e11  # paper: 269B


def test_sparse_layer_placement():
    every_fourth = ModelConfig(num_encoder_layers=8)
    assert [i for i in range(8) if every_fourth.is_sparse(i)] == [3, 7]
    switch = ModelConfig(sparse_interval=2, sparse_offset=1)
    assert [i for i in range(6) if switch.is_sparse(i)] == [1, 3, 5]
    explicit = ModelConfig(sparse_layers=(0, 2))
    assert [i for i in range(4) if explicit.is_sparse(i)] == [0, 2]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"model.moe.top_k"):
        ModelConfig(moe=MoeConfig(num_experts=2, top_k=3)).validate()
    with pytest.raises(ConfigError, match=r"model.sparse_interval"):
        ModelConfig(sparse_interval=0).validate()
    with pytest.raises(ConfigError, match=r"model.moe.train_capacity_factor"):
        ModelConfig(moe=MoeConfig(train_capacity_factor=0.0)).validate()
    with pytest.raises(ConfigError, match=r"model.moe.capacity"):
        ModelConfig.from_dict({"moe": {"capacity": 2}})
    with pytest.raises(ConfigError, match=r"model.moe.aux_loss_coef: moved to loss.balance_coef"):
        ModelConfig.from_dict({"moe": {"aux_loss_coef": 0.01}})
    with pytest.raises(ConfigError, match=r"model.moe.decoder_router_type"):
        ModelConfig(moe=MoeConfig(router_type="experts_choose")).validate()
    with pytest.raises(ConfigError, match=r"^model.moe.decoder_priority: must be one of "
                                          r"\('rank_major', 'position_major'\), got 'token_major'$"):
        ModelConfig(moe=MoeConfig(decoder_priority="token_major")).validate()


def test_decoder_priority_defaults_and_older_run_configs():
    """New runs route decoders position-major; a run's config.json written before the field existed
    was trained rank-major and is read so (config.upgrade_run_config); an explicit value is kept."""
    from stmoe.config import RunConfig, upgrade_run_config

    assert MoeConfig().decoder_priority == "position_major"
    assert (MoeConfig().priority_for(causal=True), MoeConfig().priority_for(causal=False)) == \
        ("position_major", "rank_major")
    new = RunConfig().to_dict()
    assert RunConfig.from_dict(upgrade_run_config(new)).model.moe.decoder_priority == "position_major"
    del new["model"]["moe"]["decoder_priority"]
    assert RunConfig.from_dict(upgrade_run_config(new)).model.moe.decoder_priority == "rank_major"
    assert "decoder_priority" not in new["model"]["moe"]  # the caller's dict is left alone


def numpy_bucket(relative_position: int, bidirectional: bool, num_buckets=32, max_distance=128) -> int:
    """T5's bucketing, written from the paper's description with Python floats."""
    bucket = 0
    n = -relative_position  # distance of the key behind the query
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    exact = num_buckets // 2
    if n < exact:
        return bucket + n
    large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact))
    return bucket + min(large, num_buckets - 1)


def test_relative_position_buckets_match_reference():
    offsets = np.arange(-300, 301)
    for bidirectional in (True, False):
        got = np.asarray(relative_position_bucket(jnp.asarray(offsets), bidirectional, 32, 128))
        want = [numpy_bucket(int(o), bidirectional) for o in offsets]
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def small_model():
    cfg = ModelConfig(vocab_size=50, d_model=32, d_ff=48, num_heads=2, d_kv=16, num_encoder_layers=2,
                      num_decoder_layers=2, sparse_interval=2,
                      moe=MoeConfig(num_experts=4, second_expert_policy="all", eval_capacity_factor=8.0)).validate()
    model = EncoderDecoder(cfg)
    tokens = jnp.ones((2, 8), jnp.int32)
    init = jax.jit(lambda key: model.init({"params": key}, tokens, tokens, tokens, enable_dropout=False))
    return cfg, model, nn.meta.unbox(init(jax.random.key(0))["params"])


def test_forward_sows_per_layer_moe_stats(small_model):
    cfg, model, params = small_model
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(2, 50, (2, 8)), jnp.int32)
    tgt = jnp.asarray(rng.integers(2, 50, (2, 6)), jnp.int32)
    dec = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))
    logits, state = jax.jit(lambda p: model.apply({"params": p}, enc, dec, tgt, enable_dropout=False,
                                                  mutable=["moe"]))(params)
    assert logits.shape == (2, 6, 50) and logits.dtype == jnp.float32
    from stmoe.metrics import collect_layers
    layers = collect_layers(state["moe"])
    assert sorted(layers) == ["decoder/layers_1/ffn", "encoder/layers_1/ffn"]
    assert layers["encoder/layers_1/ffn"].expert_counts.shape == (4,)
    # The sparse layer has experts, the dense one a plain MLP.
    assert "moe" in params["encoder"]["layers_1"]["ffn"] and "mlp" in params["encoder"]["layers_0"]["ffn"]
    assert "logits_dense" in params["decoder"]


def test_packing_matches_separate_examples(small_model):
    """Two examples packed in one row give the logits they give alone (segment masks work)."""
    cfg, model, params = small_model
    rng = np.random.default_rng(1)
    a_in, b_in = rng.integers(2, 50, 5), rng.integers(2, 50, 3)
    a_out, b_out = rng.integers(2, 50, 4), rng.integers(2, 50, 2)

    def shifted(t):
        return np.concatenate([[0], t[:-1]])

    def run(enc, dec, tgt, enc_seg=None, dec_seg=None):
        args = [jnp.asarray(x, jnp.int32)[None] for x in (enc, dec, tgt)]
        segs = {} if enc_seg is None else dict(encoder_segment_ids=jnp.asarray(enc_seg)[None],
                                                decoder_segment_ids=jnp.asarray(dec_seg)[None])
        apply = jax.jit(lambda p, *a, **k: model.apply({"params": p}, *a, enable_dropout=False, **k))
        return np.asarray(apply(params, *args, **segs)[0])

    alone_a = run(a_in, shifted(a_out), a_out)
    alone_b = run(b_in, shifted(b_out), b_out)
    packed = run(np.concatenate([a_in, b_in]), np.concatenate([shifted(a_out), shifted(b_out)]),
                 np.concatenate([a_out, b_out]), [1] * 5 + [2] * 3, [1] * 4 + [2] * 2)
    np.testing.assert_allclose(packed[:4], alone_a, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(packed[4:], alone_b, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_rescale_logits():
    cfg = ModelConfig(vocab_size=40, d_model=16, d_ff=16, num_heads=2, d_kv=8, num_encoder_layers=1,
                      num_decoder_layers=1, tie_embeddings=True, sparse_layers=()).validate()
    model = EncoderDecoder(cfg)
    tokens = jnp.asarray([[3, 4, 5]], jnp.int32)
    params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, tokens, tokens, tokens,
                                      enable_dropout=False)["params"])
    assert "logits_dense" not in params["decoder"]

    logits, inter = model.apply({"params": params}, tokens, tokens, tokens, enable_dropout=False,
                                capture_intermediates=lambda m, _: m.name == "final_norm", mutable=["intermediates"])
    hidden = inter["intermediates"]["decoder"]["final_norm"]["__call__"][0]
    embedding = params["token_embedder"]["embedding"]
    np.testing.assert_allclose(logits, np.einsum("bld,vd->blv", hidden * 16 ** -0.5, embedding), rtol=1e-5,
                               atol=1e-5)
