"""stmoe.flops against a hand calculation and against the matmuls of the traced model.

The traced count walks the jaxpr of a forward pass and adds up every dot_general's multiply-adds
(output size x contracted size): an independent count of what the model computes. It equals the
useful work exactly for a dense model (no capacity slots or dispatch einsums to leave out).
"""
import math

import jax
import jax.numpy as jnp
import pytest

from stmoe import flops
from stmoe.config import ModelConfig, MoeConfig
from stmoe.models import EncoderDecoder


def traced_macs(fn, *args) -> int:
    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        assert eqn.primitive.name not in ("while", "scan"), "loops: trip counts not counted"
                        total += walk(inner)
        return total
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def forward_of(cfg: ModelConfig, batch: int, enc_len: int, dec_len: int):
    model = EncoderDecoder(cfg)
    enc = jnp.ones((batch, enc_len), jnp.int32)
    dec = jnp.ones((batch, dec_len), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), enc, dec, dec, enable_dropout=False))["params"]
    return lambda p: model.apply({"params": p}, enc, dec, dec, enable_dropout=False), params


@pytest.mark.parametrize("fields", [dict(), dict(mlp_gated=False, num_heads=3, d_kv=5),
                                    # A dense block at every sparse position, d_ff 40 there, 24 elsewhere.
                                    dict(sparse_positions_dense_d_ff=40, moe=MoeConfig(num_experts=4))],
                         ids=["gated", "relu", "sparse_positions_dense_d_ff"])
def test_dense_model_equals_its_traced_matmuls(fields):
    base = dict(vocab_size=50, d_model=16, d_ff=24, num_heads=2, d_kv=8, num_encoder_layers=2, num_decoder_layers=2,
                sparse_interval=2, sparse_layers=None if "sparse_positions_dense_d_ff" in fields else ())
    cfg = ModelConfig(**{**base, **fields}).validate()
    batch, enc_len, dec_len = 3, 7, 5
    assert traced_macs(*forward_of(cfg, batch, enc_len, dec_len)) == flops.forward_macs(cfg, batch, enc_len, dec_len)


def test_moe_model_by_hand():
    # d 16, d_ff 24 GEGLU (3 matrices: 1152 MACs a token), 2 heads x 8 (inner 16), vocab 50; blocks 1 of
    # each stack sparse: 4 experts, top-2 -> 2 x 1152 + router 16 x 4 = 2368 per token there.
    cfg = ModelConfig(vocab_size=50, d_model=16, d_ff=24, num_heads=2, d_kv=8, num_encoder_layers=2,
                      num_decoder_layers=2, sparse_interval=2, moe=MoeConfig(num_experts=4, top_k=2)).validate()
    assert [flops.ffn_macs(cfg, i) for i in range(2)] == [1152, 2368]
    # Encoder token (enc_len 7): per block q, k, v, out 4 x 16 x 16 = 1024, scores + values 2 x 7 x 16 = 224.
    encoder = 2 * (1024 + 224) + 1152 + 2368
    # Decoder token (dec_len 5): self-attention 1024 + 2 x 5 x 16 = 1184; cross-attention query and out
    # 2 x 16 x 16 = 512 plus scores + values over 7 encoder tokens 224; logits 16 x 50 = 800.
    decoder = 2 * (1184 + 512 + 224) + 1152 + 2368 + 800
    cross_kv = 2 * 2 * 16 * 16 * 7  # per sequence: 2 decoder blocks x keys and values of 7 encoder tokens
    assert flops.forward_macs(cfg, 3, 7, 5) == 3 * (7 * encoder + 5 * decoder + cross_kv)
    assert flops.train_step_flops(cfg, 3, 7, 5) == 6 * flops.forward_macs(cfg, 3, 7, 5)
    # Cached decoding of 2 steps: step t attends to t + 1 keys (1, then 2).
    step = lambda keys: 2 * (1024 + 2 * keys * 16 + 512 + 224) + 1152 + 2368 + 800
    assert flops.generation_macs(cfg, 3, 7, 2) == 3 * (7 * encoder + cross_kv + step(1) + step(2))
