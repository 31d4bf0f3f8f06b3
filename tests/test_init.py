"""Initialization of every parameter kind against T5's formulas, written out by hand.

The expected standard deviations are those of T5.1.1 as t5x / flaxformer initialize it
(truncated normal or normal with variance scale / fan_in, fan_in of ONE dense layer):

  parameter                      expected std                      distribution
  expert_wi_0/1, mlp wi_0/1      1 / sqrt(d_model)                 truncated normal
  expert_wo, mlp wo              1 / sqrt(d_ff)                    truncated normal
  attention query                1 / sqrt(d_model * d_kv)          normal (folded 1/sqrt(d_kv))
  attention key, value           1 / sqrt(d_model)                 normal
  attention out                  1 / sqrt(num_heads * d_kv)        normal
  router kernel                  0.02                              normal
  token embedding                1                                 normal
  relative position bias         sqrt(2 / (num_heads + buckets))   uniform (fan_avg)
  logits_dense (untied)          1 / sqrt(d_model)                 truncated normal

Sources: t5x `t5x/examples/t5/layers.py:155-157, 210-211, 398-411, 449-451` and
`t5x/examples/t5/network.py:199-201, 307`; flaxformer `moe_layers.py:565-575` (experts vmapped,
each its own dense layer) and `routing.py:36` (router N(0, 2e-2)).
"""
import collections
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe.config import ModelConfig, MoeConfig
from stmoe.models import EncoderDecoder

D_MODEL, D_FF, D_KV, BUCKETS = 64, 192, 16, 32
TRUNCATION = 2.0 / 0.87962566103423978  # flax truncates the unit normal at +-2 and rescales to unit std


def expected(kind: str, num_heads: int) -> tuple[float, str]:
    """(std, distribution) of one parameter kind, from the table in the module docstring."""
    return {
        "expert_wi": (1 / math.sqrt(D_MODEL), "truncated"),
        "expert_wo": (1 / math.sqrt(D_FF), "truncated"),
        "mlp_wi": (1 / math.sqrt(D_MODEL), "truncated"),
        "mlp_wo": (1 / math.sqrt(D_FF), "truncated"),
        "query": (1 / math.sqrt(D_MODEL * D_KV), "normal"),
        "key": (1 / math.sqrt(D_MODEL), "normal"),
        "value": (1 / math.sqrt(D_MODEL), "normal"),
        "out": (1 / math.sqrt(num_heads * D_KV), "normal"),
        "router": (0.02, "normal"),
        "embedding": (1.0, "normal"),
        "rel_embedding": (math.sqrt(2 / (num_heads + BUCKETS)), "uniform"),
        "logits_dense": (1 / math.sqrt(D_MODEL), "truncated"),
    }[kind]


def kind_of(path: tuple[str, ...]) -> str | None:
    name = path[-1]
    if name in ("expert_wi_0", "expert_wi_1"):
        return "expert_wi"
    if name == "expert_wo":
        return "expert_wo"
    if "mlp" in path[-2] and name in ("wi_0", "wi_1"):
        return "mlp_wi"
    if "mlp" in path[-2] and name == "wo":
        return "mlp_wo"
    if name in ("query", "key", "value", "out", "rel_embedding", "embedding", "logits_dense"):
        return name
    if path[-2] == "router":
        return "router"
    return None  # norm scales (ones)


@pytest.fixture(scope="module", params=[(4, 4), (16, 8)], ids=["E4-H4", "E16-H8"])
def initialized(request):
    num_experts, num_heads = request.param
    cfg = ModelConfig(vocab_size=512, d_model=D_MODEL, d_ff=D_FF, num_heads=num_heads, d_kv=D_KV,
                      num_encoder_layers=2, num_decoder_layers=2, sparse_interval=2,
                      relative_attention_num_buckets=BUCKETS,
                      moe=MoeConfig(num_experts=num_experts)).validate()
    tokens = jnp.ones((2, 8), jnp.int32)
    params = jax.jit(lambda rng: EncoderDecoder(cfg).init(rng, tokens, tokens, tokens)["params"])(
        jax.random.key(0))
    by_kind = collections.defaultdict(list)
    for path, value in flax.traverse_util.flatten_dict(nn.unbox(params)).items():
        kind = kind_of(path)
        if kind is not None:
            by_kind[kind].append(np.asarray(value, np.float64).ravel())
    return num_experts, num_heads, {k: np.concatenate(v) for k, v in by_kind.items()}


def test_every_kind_is_present(initialized):
    _, _, by_kind = initialized
    assert set(by_kind) == {"expert_wi", "expert_wo", "mlp_wi", "mlp_wo", "query", "key", "value", "out",
                            "router", "embedding", "rel_embedding", "logits_dense"}


@pytest.mark.parametrize("kind", ["expert_wi", "expert_wo", "mlp_wi", "mlp_wo", "query", "key", "value", "out",
                                  "router", "embedding", "rel_embedding", "logits_dense"])
def test_std_and_distribution(initialized, kind):
    _, num_heads, by_kind = initialized
    values = by_kind[kind]
    std, distribution = expected(kind, num_heads)
    # Sampling error of the std estimate is ~0.71 / sqrt(n) (normal; less for truncated and uniform).
    tolerance = max(0.03, 4 * 0.71 / math.sqrt(values.size))
    assert abs(values.std() / std - 1) < tolerance, (kind, values.std(), std)
    assert abs(values.mean()) < 4 * std / math.sqrt(values.size), (kind, values.mean())
    largest = np.abs(values).max() / std
    if distribution == "uniform":  # U(-a, a) with a = sqrt(3) * std
        assert largest <= math.sqrt(3) + 1e-6
        assert largest > 0.9 * math.sqrt(3)
    elif distribution == "truncated":
        assert largest <= TRUNCATION + 1e-6
    else:  # normal: with thousands of draws some lie beyond the truncated bound
        assert values.size < 1000 or largest > TRUNCATION
