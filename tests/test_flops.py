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


def test_capacity_limits_the_expert_rows_by_hand():
    # The model of test_moe_model_by_hand with min_capacity 1, so capacity factor 1.25 binds: encoder groups
    # of 7 tokens get ceil(1.25 * 7 / 4) = 3 slots per expert, 4 x 3 = 12 rows < 2 x 7 choices; decoder
    # groups of 5 get ceil(1.25 * 5 / 4) = 2, 8 rows < 10. The eval factor 2.0 gives 4 x 4 = 16 >= 14 and
    # 4 x 3 = 12 >= 10: every choice runs, as in the nominal count.
    cfg = ModelConfig(vocab_size=50, d_model=16, d_ff=24, num_heads=2, d_kv=8, num_encoder_layers=2,
                      num_decoder_layers=2, sparse_interval=2,
                      moe=MoeConfig(num_experts=4, top_k=2, min_capacity=1)).validate()
    expert_row = 1152  # one GEGLU expert on one row: 3 x 16 x 24
    router = 16 * 4
    encoder = 2 * (1024 + 224) + 1152 + router  # per token, experts left out
    decoder = 2 * (1184 + 512 + 224) + 1152 + router + 800
    cross_kv = 2 * 2 * 16 * 16 * 7
    dense_part = 3 * (7 * encoder + 5 * decoder + cross_kv)
    assert flops.forward_macs(cfg, 3, 7, 5) == dense_part + 3 * (12 + 8) * expert_row
    assert flops.forward_macs(cfg, 3, 7, 5, deterministic=True) == dense_part + 3 * (14 + 10) * expert_row
    # Expert choice (encoder only; the decoder stays tokens-choose): every expert fills its 3 slots.
    choice = cfg.replace(moe=cfg.moe.replace(router_type="experts_choose", decoder_router_type="tokens_choose"))
    assert flops.forward_macs(choice, 3, 7, 5) == dense_part + 3 * (12 + 8) * expert_row
    # Dropless: all k x T choices. A cached decoding step (groups of one token): k rows per sequence.
    dropless = cfg.replace(moe=cfg.moe.replace(dispatch="dropless"))
    assert flops.forward_macs(dropless, 3, 7, 5) == dense_part + 3 * (14 + 10) * expert_row
    step = 2 * (1024 + 2 * 4 * 16 + 512 + 224) + 1152 + router + 800
    assert flops.decode_step_macs(cfg, 3, 7, 4) == 3 * (step + 2 * expert_row)


def test_moe_train_step_equals_the_compiled_flop_count():
    """stmoe.flops against XLA's own count (cost_analysis) of a compiled train step on one CPU device:
    gather dispatch (no one-hot matmuls) and batched experts, so the HLO runs exactly the experts'
    capacity slots; top-2 at capacity factor 1.25 fills 1.25 T of the 2 T choices. XLA also counts
    elementwise work (softmaxes, norms, the optimizer), which the widths here keep under 2%."""
    import optax

    from stmoe import partitioning, steps
    from stmoe.config import LossConfig

    cfg = ModelConfig(vocab_size=256, d_model=512, d_ff=1024, num_heads=8, d_kv=64, num_encoder_layers=2,
                      num_decoder_layers=2, sparse_interval=2, dropout_rate=0.0,
                      moe=MoeConfig(num_experts=4, top_k=2, dispatch="gather", expert_execution="batched",
                                    second_expert_policy="all")).validate()
    batch, enc_len, dec_len = 8, 64, 32
    nominal = flops.train_step_flops(cfg.replace(moe=cfg.moe.replace(dispatch="dropless")), batch, enc_len, dec_len)
    counted = flops.train_step_flops(cfg, batch, enc_len, dec_len)
    assert counted < 0.9 * nominal  # the capacity binds: counting every choice would be off by far more than 2%

    mesh = partitioning.make_mesh(partitioning.MeshConfig(), jax.devices()[:1])
    model = EncoderDecoder(cfg)
    shapes = {"encoder_input_tokens": (batch, enc_len), "decoder_input_tokens": (batch, dec_len),
              "decoder_target_tokens": (batch, dec_len)}
    optimizer = optax.sgd(1e-3)
    layout = steps.state_layout(model, lambda _: optimizer, mesh, shapes, jax.random.key(0))
    step = steps.make_train_step(model, optimizer, mesh=mesh, state_shardings=layout.shardings,
                                 learning_rate_fn=lambda _: 1e-3, loss_cfg=LossConfig(), donate=False)
    data = {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in shapes.items()}
    data["decoder_loss_weights"] = jax.ShapeDtypeStruct((batch, dec_len), jnp.int32)
    with partitioning.activate(mesh):
        compiled = step.lower(layout.abstract, data).compile()
    cost = compiled.cost_analysis()
    hlo_flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    assert "while" not in compiled.as_text().split("ENTRY")[1]  # nothing counted once for several runs
    assert abs(hlo_flops / counted - 1) < 0.02, (hlo_flops, counted, nominal)
