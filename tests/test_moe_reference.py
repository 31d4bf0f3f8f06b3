"""MoeLayer and its router against the independent numpy reference in tests/moe_reference.py.

The reference never imports stmoe.routing or stmoe.dispatch: capacity (exact rationals), top-k,
priority and the combine are float64 loops written from ST-MoE (arXiv 2202.08906, sec. 2, App. G)
and Switch (arXiv 2101.03961, sec. 2). Only the parameters come from a flax-initialized layer.
Matmuls run at float32 "highest" precision (conftest.py), so outputs match to ~1e-6.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref
from test_moe import apply  # the jitted MoeLayer call (outputs, sown stats) the dispatch tests use
from stmoe import metrics, routing
from stmoe import moe as moe_lib
from stmoe.config import ModelConfig, MoeConfig
from stmoe.moe import MoeLayer

D_MODEL, D_FF = 8, 12
STAT_NAMES = ("aux_loss", "router_z_loss", "router_entropy", "router_confidence", "dropped_tokens")


def layer_config(dtype="float32", **moe_fields) -> ModelConfig:
    moe = MoeConfig(**{"num_experts": 4, **moe_fields})
    return ModelConfig(d_model=D_MODEL, d_ff=D_FF, num_decoder_layers=0, dtype=dtype, moe=moe).validate()


def init_params(cfg, x, mask, router_scale=50.0, seed=0):
    """Parameters in the layer's own tree and shapes (jax.eval_shape of MoeLayer.init, no compile).

    The values are drawn here, in numpy, with the layer's init scales (router N(0, 2e-2^2), experts
    1/sqrt(fan_in)): the forward is what is under test, not the initializers.
    """
    shapes = nn.meta.unbox(jax.eval_shape(lambda: MoeLayer(cfg).init({"params": jax.random.key(0)}, x, mask))["params"])
    rng = np.random.default_rng(seed)
    draw = lambda shape, std: jnp.asarray(rng.normal(size=shape) * std, jnp.float32)
    params = {name: draw(leaf.shape, 1 / math.sqrt(leaf.shape[-2])) for name, leaf in shapes.items() if name != "router"}
    # A sharper router than the init (std 2e-2) so that loads are uneven and capacity binds.
    params["router"] = {"kernel": draw(shapes["router"]["kernel"].shape, 2e-2 * router_scale)}
    return params


def np_params(params):
    return jax.tree.map(np.asarray, params)


def check_against_reference(out, stats, want, out_atol=1e-6, stat_rtol=1e-6):
    np.testing.assert_allclose(np.asarray(out, np.float64), want["out"], atol=out_atol, rtol=1e-5)
    for name in STAT_NAMES + tuple(k for k in want if k.startswith("dropped_fraction_rank")):
        np.testing.assert_allclose(float(stats[name]), want[name], rtol=stat_rtol, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(np.asarray(stats["expert_counts"]), want["expert_counts"])


def sample_inputs(seed, batch, length, padded=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, D_MODEL)).astype(np.float32)
    mask = np.ones((batch, length), np.float32)
    for b, start in (padded or {}).items():
        mask[b, start:] = 0
    return x, mask


# (moe fields, deterministic, batch, length, padding {row: first padded position}).
CASES = {
    "top1_eval": (dict(top_k=1, eval_capacity_factor=1.0, min_capacity=1), True, 3, 12, {1: 9}),
    "top2_eval": (dict(top_k=2, second_expert_policy="all", eval_capacity_factor=1.0, min_capacity=1),
                  True, 3, 12, {1: 9}),
    # Training uses the train factor (C = 2 here; the eval factor would give 9).
    "top2_train": (dict(top_k=2, second_expert_policy="all", train_capacity_factor=0.5, eval_capacity_factor=3.0,
                        min_capacity=1), False, 3, 12, {1: 9}),
    "top1_train": (dict(top_k=1, train_capacity_factor=0.75, eval_capacity_factor=3.0, min_capacity=1),
                   False, 3, 12, {2: 3}),
    "top1_prioritized": (dict(top_k=1, batch_prioritized=True, eval_capacity_factor=1.0, min_capacity=1),
                         True, 3, 12, {1: 9}),
    "top2_prioritized": (dict(top_k=2, second_expert_policy="all", batch_prioritized=True,
                              eval_capacity_factor=1.0, min_capacity=1), True, 3, 12, {1: 9}),
    # 24 tokens in groups of 8: group 1 = row 0 positions 8..11 + row 1 positions 0..3; group 2 is
    # all padding (row 1 positions 4..11) and must count in no loss.
    "top2_group8": (dict(top_k=2, second_expert_policy="all", group_size=8, eval_capacity_factor=1.0,
                         min_capacity=1), True, 2, 12, {1: 4}),
    "experts_choose": (dict(router_type="experts_choose", eval_capacity_factor=1.0, min_capacity=1),
                       True, 3, 12, {1: 9}),
    # C = 6 > the 4 real tokens of row 1: those experts leave slots empty.
    "experts_choose_sparse_group": (dict(router_type="experts_choose", eval_capacity_factor=2.0, min_capacity=1),
                                    True, 3, 12, {1: 4}),
}


def reference_capacity(fields, deterministic, group_size, num_experts=4):
    factor = fields["eval_capacity_factor"] if deterministic else fields["train_capacity_factor"]
    return ref.capacity(group_size, num_experts, factor, fields.get("min_capacity", 4))


def dispatch_fields(dispatch: str) -> dict:
    """"grouped": gather's capacity routing, then only the kept rows through the grouped kernel
    (moe.expert_execution="grouped", the CPU default on one device)."""
    return dict(dispatch="gather", expert_execution="grouped") if dispatch == "grouped" else dict(dispatch=dispatch)


@pytest.mark.parametrize("dispatch", ["gather", "einsum", "grouped"])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_layer_matches_numpy_reference(case, dispatch):
    fields, deterministic, batch, length, padded = CASES[case]
    if dispatch == "grouped" and fields.get("router_type") == "experts_choose":
        pytest.skip("grouped execution is for tokens-choose routing (config validation refuses it)")
    x, mask = sample_inputs(list(CASES).index(case), batch, length, padded)
    cfg = layer_config(**dispatch_fields(dispatch), **fields)
    params = init_params(cfg, x, mask)
    out, stats = apply(cfg, params, jnp.asarray(x), jnp.asarray(mask), deterministic)
    group_size = fields.get("group_size") or length
    want = ref.forward(np_params(params), x, mask, group_size=group_size, top_k=fields.get("top_k", 2),
                       cap=reference_capacity(fields, deterministic, group_size),
                       router_type=fields.get("router_type", "tokens_choose"),
                       batch_prioritized=fields.get("batch_prioritized", False))
    # The cases are meant to bind: some real token loses a choice to capacity.
    wanted_not_kept = want["wanted"] & ~want["kept"]
    assert wanted_not_kept.any() or case == "experts_choose_sparse_group"
    check_against_reference(out, stats, want)
    assert np.all(np.asarray(out)[mask == 0] == 0.0), "padding gets exactly zero"


@functools.partial(jax.jit, static_argnums=(0, 4))
def decoder_apply(cfg, params, x, mask, deterministic):
    """A causal (decoder) MoeLayer: (outputs, sown stats)."""
    out, state = MoeLayer(cfg, causal=True).apply({"params": params}, x, mask, deterministic, mutable=["moe"])
    return out, metrics.collect_layers(state["moe"])[""].as_dict()


TOP2_ALL = dict(top_k=2, second_expert_policy="all", min_capacity=1)
# Decoder layers: (moe fields, deterministic, batch, length, padding); the priority is the case's own.
DECODER_CASES = {
    "position_major_eval": (dict(TOP2_ALL, decoder_priority="position_major", eval_capacity_factor=1.0),
                            True, 3, 12, {1: 9}),
    "position_major_train": (dict(TOP2_ALL, decoder_priority="position_major", train_capacity_factor=0.5,
                                  eval_capacity_factor=3.0), False, 3, 12, {2: 5}),
    # Groups of 8 over rows of 12 (group 1 = row 0 positions 8..11 + row 1 positions 0..3): served by
    # position in the sequence, so row 1's positions 0..3 come first.
    "position_major_group8": (dict(TOP2_ALL, decoder_priority="position_major", group_size=8,
                                   eval_capacity_factor=1.0), True, 2, 12, {}),
    "rank_major_eval": (dict(TOP2_ALL, decoder_priority="rank_major", eval_capacity_factor=1.0), True, 3, 12, {1: 9}),
}


@pytest.mark.parametrize("dispatch", ["gather", "einsum", "grouped"])
@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_layer_matches_numpy_reference(case, dispatch):
    fields, deterministic, batch, length, padded = DECODER_CASES[case]
    priority = fields["decoder_priority"]
    x, mask = sample_inputs(20 + list(DECODER_CASES).index(case), batch, length, padded)
    cfg = layer_config(**dispatch_fields(dispatch), **fields)
    params = init_params(cfg, x, mask)
    out, stats = decoder_apply(cfg, params, jnp.asarray(x), jnp.asarray(mask), deterministic)
    group_size = fields.get("group_size") or length
    cap = reference_capacity(fields, deterministic, group_size)
    want = ref.forward(np_params(params), x, mask, group_size=group_size, top_k=2, cap=cap, priority=priority)
    other = ref.forward(np_params(params), x, mask, group_size=group_size, top_k=2, cap=cap,
                        priority="rank_major" if priority == "position_major" else "position_major")
    assert not np.allclose(want["out"], other["out"], atol=1e-3), "the two orders must differ on this case"
    check_against_reference(out, stats, want)
    # The encoder keeps ST-MoE's rank-major order whatever decoder_priority says.
    out_encoder, _ = apply(cfg, params, jnp.asarray(x), jnp.asarray(mask), deterministic)
    rank_major = want if priority == "rank_major" else other
    np.testing.assert_allclose(np.asarray(out_encoder, np.float64), rank_major["out"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["gather", "einsum", "grouped"])
def test_capacity_rounding_100_tokens_11_experts_cf_1p1(dispatch):
    # cf * T / E = 1.1 * 100 / 11 is exactly 10 slots; in floats it is 10.000000000000002, whose
    # ceiling is 11. With 15 tokens preferring expert 0, the 11th of them must be dropped.
    experts, tokens = 11, 100
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, tokens, D_MODEL)).astype(np.float32)
    favour = rng.choice(tokens, size=15, replace=False)
    x[0, :, 0] = -2.0
    x[0, favour, 0] = 4.0
    mask = np.ones((1, tokens), np.float32)
    cfg = layer_config(**dispatch_fields(dispatch), num_experts=experts, top_k=1, eval_capacity_factor=1.1,
                       min_capacity=4)
    params = init_params(cfg, x, mask)
    kernel = np.asarray(params["router"]["kernel"]).copy()
    kernel[0, :] = 0.0
    kernel[0, 0] = 3.0  # feature 0 = 4 -> logit 12 for expert 0: all 15 favoured tokens pick it
    params["router"]["kernel"] = jnp.asarray(kernel)
    cap = ref.capacity(tokens, experts, 1.1, 4)
    assert cap == 10
    want = ref.forward(np_params(params), x, mask, top_k=1, cap=cap)
    first = np.argmax(want["probs"][0], -1)
    assert np.sum(first == 0) >= 15  # expert 0 is over capacity, so C = 10 vs 11 changes the output
    out, stats = apply(cfg, params, jnp.asarray(x), jnp.asarray(mask), True)
    np.testing.assert_array_equal(np.asarray(stats["expert_counts"])[0], 10)
    check_against_reference(out, stats, want)


def test_router_gradients_match_finite_differences_of_numpy_reference():
    # d(task loss), d(aux loss), d(z loss) / d(router kernel): jax.grad (float32) against central
    # differences of the float64 numpy reference (routing decisions do not move under h = 1e-5).
    fields = dict(top_k=2, second_expert_policy="all", eval_capacity_factor=1.0, min_capacity=1)
    x, mask = sample_inputs(3, 3, 12, {1: 9})
    cfg = layer_config(**fields)
    params = init_params(cfg, x, mask, router_scale=20.0)
    p64 = np_params(params)
    kernel = np.asarray(params["router"]["kernel"], np.float64)
    cap = reference_capacity(fields, True, 12)

    def ref_losses(k):
        r = ref.forward(p64, x, mask, top_k=2, cap=cap, kernel=k)
        return np.array([np.mean(r["out"] ** 2), r["aux_loss"], r["router_z_loss"]])

    h = 1e-5
    fd = np.zeros((3,) + kernel.shape)
    for i in np.ndindex(kernel.shape):
        step = np.zeros_like(kernel)
        step[i] = h
        fd[(slice(None),) + i] = (ref_losses(kernel + step) - ref_losses(kernel - step)) / (2 * h)

    def losses(params):
        out, stats = apply(cfg, params, jnp.asarray(x), jnp.asarray(mask))
        return jnp.stack([jnp.mean(jnp.square(out)), stats["aux_loss"], stats["router_z_loss"]])

    jac = jax.jacrev(losses)(params)["router"]["kernel"]  # [3, d, e]
    for n, name in enumerate(("task", "aux", "z")):
        assert np.abs(fd[n]).max() > 1e-4, name  # each loss does depend on the router
        np.testing.assert_allclose(jac[n], fd[n], rtol=1e-4, atol=1e-6 * np.abs(fd[n]).max(), err_msg=name)


# ---- second-expert policy "random" (ST-MoE App. G) inside the layer ---------------------------------


@pytest.fixture
def train_apply(monkeypatch):
    """A jitted training apply that also returns the `wanted` mask of the Routing the layer used.

    A spy around routing.tokens_choose_routing keeps the (traced) Routing; the jitted function returns
    its `wanted` next to the outputs. Only the draws are read from the code under test: the capacity
    accounting and the combine are recomputed by the reference from them.
    """
    seen = []
    original = routing.tokens_choose_routing

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(routing, "tokens_choose_routing", spy)

    def run(cfg, params, x, mask, key):
        def f(params, x, mask):
            out, state = MoeLayer(cfg).apply({"params": params}, x, mask, False, mutable=["moe"],
                                             rngs={"dropout": key})
            return out, metrics.collect_layers(state["moe"])[""].as_dict(), seen[-1].wanted
        return jax.jit(f)(params, jnp.asarray(x), jnp.asarray(mask))

    return run


def designed_router(logits):
    """x [1, T, d] whose first E features are the wanted router logits, and the kernel [I; 0]."""
    tokens, experts = logits.shape
    x = np.random.default_rng(0).normal(size=(1, tokens, D_MODEL)).astype(np.float32)
    x[0, :, :experts] = logits
    kernel = np.zeros((D_MODEL, experts), np.float32)
    kernel[:experts, :experts] = np.eye(experts)
    return x, kernel


def test_random_policy_unwanted_second_choices_take_no_capacity(train_apply):
    # 12 tokens, experts 1..3 each get 4 first choices (= capacity 4); every second choice is
    # expert 0. Tokens 0-5 have a tiny second gate (asked for with probability ~0.04), tokens 6-11
    # a large one (0.45 > threshold: always asked for). Expert 0's 4 slots must go to the second
    # choices that are asked for; if unwanted choices used up slots, tokens 0-3 would fill them and
    # every one of tokens 6-11 would be dropped.
    logits = np.full((12, 4), -2.0, np.float32)
    for t in range(12):
        logits[t, 1 + t % 3] = 5.0 if t < 6 else 1.0
        logits[t, 0] = 0.2 if t < 6 else 0.8
    x, kernel = designed_router(logits)
    mask = np.ones((1, 12), np.float32)
    fields = dict(top_k=2, second_expert_policy="random", second_expert_threshold=0.2,
                  train_capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4)
    cfg = layer_config(**fields)
    params = init_params(cfg, x, mask, router_scale=1.0)
    params["router"]["kernel"] = jnp.asarray(kernel)
    cap = reference_capacity(fields, False, 12)
    assert cap == 4

    out, stats, wanted = train_apply(cfg, params, x, mask, jax.random.key(3))
    wanted = np.asarray(wanted)
    assert wanted[0, :, 0].all() and wanted[0, 6:, 1].all()  # first choices and large gates: always
    want = ref.forward(np_params(params), x, mask, top_k=2, cap=cap, wanted=wanted)
    wrong = ref.forward(np_params(params), x, mask, top_k=2, cap=cap, wanted=wanted, unwanted_take_capacity=True)
    assert not np.allclose(want["out"], wrong["out"], atol=1e-3), "the draw should make the case discriminate"
    check_against_reference(out, stats, want)

    # Evaluation (deterministic) routes every second choice: equal to policy "all" and its reference.
    out_eval, stats_eval = apply(cfg, params, jnp.asarray(x), jnp.asarray(mask), True)
    cfg_all = layer_config(**{**fields, "second_expert_policy": "all"})
    out_all, _ = apply(cfg_all, params, jnp.asarray(x), jnp.asarray(mask), True)
    np.testing.assert_array_equal(np.asarray(out_eval), np.asarray(out_all))
    check_against_reference(out_eval, stats_eval, ref.forward(np_params(params), x, mask, top_k=2, cap=cap))


def test_random_policy_keep_probability_is_min_1_g2_over_threshold(train_apply):
    # 1024 tokens with varied gates and ample capacity. Each real token's second choice is asked for
    # with probability p = min(1, g2 / 0.2), g2 = p2 / (p1 + p2); the count of those asked for is a
    # sum of Bernoullis: mean sum p, std sqrt(sum p (1 - p)).
    fields = dict(top_k=2, second_expert_policy="random", second_expert_threshold=0.2,
                  train_capacity_factor=4.0, min_capacity=4)
    x, mask = sample_inputs(11, 8, 128, {7: 64})
    cfg = layer_config(**fields)
    params = init_params(cfg, x, mask, router_scale=60.0)
    out, stats, wanted = train_apply(cfg, params, x, mask, jax.random.key(5))
    wanted = np.asarray(wanted)  # [groups = 8, 128, 2]
    probs = ref.forward(np_params(params), x, mask, top_k=2, cap=128)["probs"]
    top2 = -np.sort(-probs, axis=-1)[..., :2]
    keep = np.minimum(1.0, top2[..., 1] / top2.sum(-1) / 0.2)
    real = mask > 0
    assert 0.3 < np.mean(keep[real] < 1) < 0.9  # both regimes are well represented
    np.testing.assert_array_equal(wanted[..., 0], real)
    assert not wanted[~real].any()
    assert wanted[real & (keep >= 1), 1].all()
    count, expected = wanted[real, 1].sum(), keep[real].sum()
    std = math.sqrt(np.sum(keep[real] * (1 - keep[real])))
    assert abs(count - expected) < 4 * std, (count, expected, std)
    # The layer combines exactly the choices that were asked for (nothing drops at C = 128).
    want = ref.forward(np_params(params), x, mask, top_k=2, cap=128, wanted=wanted)
    check_against_reference(out, stats, want)


# ---- router jitter (Switch sec. 2.4) ----------------------------------------------------------------


def test_router_jitter_multiplies_inputs_by_uniform_noise_in_training_only():
    eps, tokens, d, experts = 0.1, 4000, 4, 3
    rng = np.random.default_rng(0)
    # One positive feature per token: logit[t, e] = x[t, j] * noise[t, j] * W[j, e], so
    # logits / (x @ W) is that token's noise on feature j, the same for every expert.
    x = np.zeros((1, tokens, d), np.float32)
    x[0, np.arange(tokens), np.arange(tokens) % d] = rng.uniform(0.5, 2.0, size=tokens)
    kernel = rng.uniform(0.5, 1.5, size=(d, experts)).astype(np.float32)
    clean = x.astype(np.float64) @ kernel
    router = routing.Router(experts, jitter_noise=eps)
    router_apply = jax.jit(router.apply, static_argnums=2)
    run = lambda det: np.asarray(router_apply({"params": {"kernel": jnp.asarray(kernel)}}, jnp.asarray(x), det,
                                              rngs={"dropout": jax.random.key(0)}), np.float64)
    np.testing.assert_allclose(run(True), clean, rtol=1e-6)
    ratio = run(False) / clean  # [1, tokens, experts]
    np.testing.assert_allclose(ratio, ratio[..., :1].repeat(experts, -1), rtol=1e-6)  # noise on inputs
    noise = ratio[0, :, 0]
    assert noise.min() >= 1 - eps - 1e-6 and noise.max() <= 1 + eps + 1e-6
    assert noise.min() < 1 - eps + 2e-3 and noise.max() > 1 + eps - 2e-3  # the whole range is used
    # Uniform on [1 - eps, 1 + eps]: mean 1, variance eps^2 / 3.
    assert abs(noise.mean() - 1) < 4 * eps / math.sqrt(3 * tokens)
    np.testing.assert_allclose(noise.var(), eps ** 2 / 3, rtol=0.1)

    # In the layer (train and eval capacity equal): evaluation is the jitter-free reference, training
    # routes noisy logits (its z-loss moves away from the clean one).
    fields = dict(top_k=2, second_expert_policy="all", train_capacity_factor=1.0, eval_capacity_factor=1.0,
                  min_capacity=1)
    x2, mask = sample_inputs(1, 2, 12)
    cfg = layer_config(jitter_noise=0.5, **fields)
    params = init_params(cfg, x2, mask)
    clean = ref.forward(np_params(params), x2, mask, top_k=2, cap=reference_capacity(fields, True, 12))
    check_against_reference(*apply(cfg, params, jnp.asarray(x2), jnp.asarray(mask), True), clean)
    _, stats_train = apply(cfg, params, jnp.asarray(x2), jnp.asarray(mask), False)
    assert abs(float(stats_train["router_z_loss"]) - clean["router_z_loss"]) > 1e-3 * clean["router_z_loss"]


# ---- expert dropout -----------------------------------------------------------------------------------


def test_expert_dropout_rate_and_scale():
    rate, shape = 0.3, (50, 2000)
    hidden = np.random.default_rng(0).uniform(0.5, 2.0, size=shape).astype(np.float32)
    got = np.asarray(jax.jit(moe_lib.expert_dropout, static_argnums=2)(jnp.asarray(hidden), jax.random.key(0), rate))
    zero = got == 0
    n = zero.size
    assert abs(zero.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(got[~zero], hidden[~zero] / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(moe_lib.expert_dropout(jnp.asarray(hidden), None, rate)), hidden)
    np.testing.assert_array_equal(np.asarray(moe_lib.expert_dropout(jnp.asarray(hidden), jax.random.key(0), 0.0)),
                                  hidden)


@pytest.mark.parametrize("sequential", [False, True])
def test_expert_mlps_dropout_on_hidden_units(sequential):
    # d_ff = d and wo = identity, non-gated: the output is dropout(gelu(x wi)) itself.
    rate, experts, rows, d = 0.4, 3, 400, 16
    rng = np.random.default_rng(1)
    x = rng.normal(size=(experts, rows, d)).astype(np.float32)
    wi = rng.normal(size=(experts, d, d)).astype(np.float32) / 4
    wo = np.broadcast_to(np.eye(d, dtype=np.float32), (experts, d, d)).copy()
    hidden = ref.gelu(np.einsum("erd,edf->erf", x.astype(np.float64), wi))
    mlps = jax.jit(lambda x, wi, wo, key: moe_lib.expert_mlps(x, [wi], wo, "gelu", jnp.float32, sequential=sequential,
                                                            dropout_rate=rate, dropout_rng=key))
    run = lambda key: np.asarray(mlps(jnp.asarray(x), jnp.asarray(wi), jnp.asarray(wo), key), np.float64)
    np.testing.assert_allclose(run(None), hidden, atol=1e-6, rtol=1e-5)
    got = run(jax.random.key(2))
    zero = got == 0
    assert abs(zero.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / zero.size)
    for e in range(experts):  # every expert drops its own units
        assert abs(zero[e].mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / zero[e].size)
    assert not np.array_equal(zero[0], zero[1])
    np.testing.assert_allclose(got[~zero], hidden[~zero] / (1 - rate), atol=1e-6, rtol=1e-5)


def test_moe_layer_expert_dropout_in_training_only():
    fields = dict(top_k=2, second_expert_policy="all", train_capacity_factor=1.0, eval_capacity_factor=1.0,
                  min_capacity=1)
    x, mask = sample_inputs(2, 2, 12)
    cfg = layer_config(expert_dropout_rate=0.5, **fields)
    params = init_params(cfg, x, mask)
    want = ref.forward(np_params(params), x, mask, top_k=2, cap=reference_capacity(fields, True, 12))
    args = (params, jnp.asarray(x), jnp.asarray(mask))
    check_against_reference(*apply(cfg, *args, True), want)  # evaluation: no dropout
    train, stats = apply(cfg, *args, False)
    check_against_reference(want["out"], stats, want)  # same routing in training ...
    assert np.abs(np.asarray(train) - want["out"]).max() > 0.1 * np.abs(want["out"]).max()  # ... other outputs


# ---- expert choice (Zhou et al. 2022) -------------------------------------------------------------------


def test_experts_choose_routing_slots_and_weights_match_numpy():
    groups, tokens, experts, capacity = 2, 12, 3, 3  # 9 slots for 12 tokens: someone is left out
    rng = np.random.default_rng(4)
    probs = ref.softmax(rng.normal(size=(groups, tokens, experts)) * 2).astype(np.float32)
    mask = np.ones((groups, tokens), np.float32)
    mask[1, 2:] = 0  # 2 real tokens < capacity: an empty slot per expert
    route = jax.jit(functools.partial(routing.experts_choose_routing, capacity=capacity))(
        jnp.asarray(probs), jnp.asarray(mask))
    slot_token, slot_weight = np.asarray(route.slot_token), np.asarray(route.slot_weight)
    for g in range(groups):
        real = [t for t in range(tokens) if mask[g, t]]
        for e in range(experts):
            best = sorted(real, key=lambda t: -probs[g, t, e])[:capacity]  # most probable first
            want_token = best + [tokens] * (capacity - len(best))
            want_weight = [probs[g, t, e] for t in best] + [0.0] * (capacity - len(best))
            np.testing.assert_array_equal(slot_token[g, e], want_token)
            np.testing.assert_array_equal(slot_weight[g, e], np.asarray(want_weight, np.float32))
    taken = np.zeros((groups, tokens), bool)
    for g, e, c in np.ndindex(slot_token.shape):
        if slot_token[g, e, c] < tokens:
            taken[g, slot_token[g, e, c]] = True
    np.testing.assert_array_equal(np.asarray(route.kept)[..., 0], taken & (mask > 0))
    assert (~taken[0]).any(), "some token is taken by no expert"


# ---- bfloat16: the router stays float32 (ST-MoE sec. 3.2, selective precision) ------------------------


@pytest.mark.parametrize("input_dtype", ["float32", "bfloat16"])
def test_bfloat16_model_keeps_float32_router(input_dtype):
    # A bfloat16 router (inputs or kernel rounded to 8 mantissa bits, ~4e-3 relative) moves the
    # logits by ~1e-2 at this router scale: the z-loss, entropy, confidence and aux loss, computed in
    # float64 from the same inputs, then disagree far beyond the 1e-5 allowed here.
    fields = dict(top_k=2, second_expert_policy="all", eval_capacity_factor=1.0, min_capacity=1)
    x, mask = sample_inputs(4, 3, 12, {1: 9})
    x = np.asarray(jnp.asarray(x, input_dtype).astype(jnp.float32))  # the values the layer sees
    cfg = layer_config(dtype="bfloat16", **fields)
    params = init_params(cfg, x, mask, router_scale=100.0)
    out, stats = apply(cfg, params, jnp.asarray(x, input_dtype), jnp.asarray(mask), True)
    assert out.dtype == jnp.bfloat16
    assert stats["router_z_loss"].dtype == jnp.float32
    want = ref.forward(np_params(params), x, mask, top_k=2, cap=reference_capacity(fields, True, 12))
    assert want["router_z_loss"] > 10  # large logits: bf16 rounding would show
    for name in STAT_NAMES + ("dropped_fraction_rank1", "dropped_fraction_rank2"):
        np.testing.assert_allclose(float(stats[name]), want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(np.asarray(stats["expert_counts"]), want["expert_counts"])
    # The experts run in bfloat16: ~1e-2 relative to the float64 reference, with the same routing.
    scale = np.abs(want["out"]).max()
    np.testing.assert_allclose(np.asarray(out, np.float64), want["out"], atol=2e-2 * scale, rtol=2e-2)
