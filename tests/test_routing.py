"""Routing math against an independent, loop-based numpy reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference
from stmoe import routing


def numpy_tokens_choose(probs, mask, k, capacity, normalize=True, prioritized=False):
    """Slot assignment written as the paper describes it, with explicit loops.

    Returns (assign[g, t, k] = slot index or -1, weight[g, t, k]).
    """
    groups, tokens, experts = probs.shape
    assign = -np.ones((groups, tokens, k), np.int64)
    weight = np.zeros((groups, tokens, k), np.float64)
    choice = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    for g in range(groups):
        fill = np.zeros(experts, np.int64)
        order = range(tokens)
        if prioritized:
            order = sorted(range(tokens), key=lambda t: -probs[g, t].max())
        for rank in range(k):  # every first choice before any second choice
            for t in order:
                if not mask[g, t]:
                    continue
                e = choice[g, t, rank]
                if fill[e] < capacity:
                    gates = probs[g, t, choice[g, t]]
                    gate = gates[rank] / gates.sum() if (normalize and k > 1) else gates[rank]
                    assign[g, t, rank] = e * capacity + fill[e]
                    weight[g, t, rank] = gate
                fill[e] += 1
    return assign, weight


def slots_to_token_view(route, tokens, k, capacity):
    """Turn the slot-major Routing back into [g, t, k] slot ids, ordered by rank."""
    slot_token = np.asarray(route.slot_token)
    groups, experts, _ = slot_token.shape
    expert_index = np.asarray(route.expert_index)
    assign = -np.ones((groups, tokens, k), np.int64)
    weight = np.zeros((groups, tokens, k))
    slot_weight = np.asarray(route.slot_weight)
    for g in range(groups):
        for e in range(experts):
            for c in range(capacity):
                t = slot_token[g, e, c]
                if t < tokens:
                    rank = int(np.nonzero(expert_index[g, t] == e)[0][0])
                    assign[g, t, rank] = e * capacity + c
                    weight[g, t, rank] = slot_weight[g, e, c]
    return assign, weight


def random_probs(seed, groups, tokens, experts, temperature=1.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(groups, tokens, experts)) * temperature
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


def test_capacity_formula_matches_design():
    # C = max(min_capacity, ceil(cf * T / E)), not multiplied by k.
    assert routing.expert_capacity(2048, 32, 1.25) == 80
    assert routing.expert_capacity(1024, 64, 1.25, min_capacity=4) == 20
    assert routing.expert_capacity(8, 8, 1.25, min_capacity=4) == 4
    assert routing.expert_capacity(100, 8, 2.0, min_capacity=1) == 25


def test_capacity_rounds_the_written_decimal():
    # 1.1 * 100 / 11 is exactly 10; in float64 it is 10.000000000000002, whose ceiling is 11.
    assert routing.expert_capacity(100, 11, 1.1, min_capacity=1) == 10
    assert routing.expert_capacity(300, 3, 0.3, min_capacity=1) == 30  # 0.3 * 300 / 3 = 30 (float: 30.000000000000004)
    assert routing.expert_capacity(100, 11, 1.1001, min_capacity=1) == 11  # a hair above 10 still rounds up


def test_capacity_is_clamped_to_the_group():
    # No expert can receive more than every token of its group (each token picks an expert once).
    assert routing.expert_capacity(1, 8, 2.0, min_capacity=4) == 1  # a cached decoding step: one token
    assert routing.expert_capacity(6, 2, 4.0, min_capacity=1) == 6  # ceil(4 * 6 / 2) = 12 slots for 6 tokens
    assert routing.expert_capacity(3, 64, 1.25, min_capacity=4) == 3


def test_clamped_capacity_changes_no_result():
    # Top-2 over a group of 5 tokens: capacity 5 (the clamp) and 50 route identically.
    probs = random_probs(3, 2, 5, 4)
    mask = np.ones((2, 5), np.float32)
    small = routing.tokens_choose_routing(probs, mask, top_k=2, capacity=5)
    large = routing.tokens_choose_routing(probs, mask, top_k=2, capacity=50)
    np.testing.assert_array_equal(small.kept, large.kept)
    np.testing.assert_array_equal(small.choice_weight, large.choice_weight)
    assert bool(np.all(small.kept))


def assert_route_matches(route, want_assign, want_weight, tokens, k, capacity, experts):
    """The routing's slot view and token-major view against a reference assignment [groups, tokens, k]
    (slot index or -1) and its combine weights."""
    got_assign, got_weight = slots_to_token_view(route, tokens, k, capacity)
    np.testing.assert_array_equal(got_assign, want_assign)
    np.testing.assert_allclose(got_weight, want_weight, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(route.kept), want_assign >= 0)
    # The token-major view names the same slots; a choice without one points past the end.
    np.testing.assert_array_equal(np.asarray(route.choice_slot),
                                  np.where(want_assign >= 0, want_assign, experts * capacity))


@pytest.mark.parametrize("k,capacity,prioritized", [(1, 3, False), (2, 3, False), (2, 2, True), (2, 40, False)])
def test_tokens_choose_matches_numpy(k, capacity, prioritized):
    groups, tokens, experts = 3, 24, 4
    probs = random_probs(0, groups, tokens, experts, temperature=2.0)
    mask = np.ones((groups, tokens), bool)
    mask[1, -5:] = False  # padding at the end of one group
    route = routing.tokens_choose_routing(jnp.asarray(probs), jnp.asarray(mask, jnp.float32), top_k=k,
                                          capacity=capacity, batch_prioritized=prioritized)
    want_assign, want_weight = numpy_tokens_choose(probs, mask, k, capacity, prioritized=prioritized)
    assert_route_matches(route, want_assign, want_weight, tokens, k, capacity, experts)
    np.testing.assert_allclose(np.asarray(route.choice_weight), want_weight, rtol=1e-6, atol=1e-7)
    # Padding is never routed and takes no slot.
    assert not np.asarray(route.wanted)[1, -5:].any()
    if capacity < tokens:
        assert (want_assign < 0)[mask].any(), "the case is meant to drop tokens"


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_small_top_k_matches_numpy_and_lax(k):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4, size=(3, 5, 8)).astype(np.float32)  # many ties
    values[0, 0] = 1.0  # a row of equal values
    got_values, got_index = routing.small_top_k(jnp.asarray(values), k)
    # numpy: a stable sort of the negated values puts equal values in index order.
    want_index = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(np.asarray(got_index), want_index)
    np.testing.assert_array_equal(np.asarray(got_values), np.take_along_axis(values, want_index, -1))
    assert got_index.dtype == jnp.int32
    # Gradients reach the chosen entries only, once each (as with lax.top_k).
    weights = jnp.arange(1.0, k + 1.0)
    grad = jax.grad(lambda v: jnp.sum(routing.small_top_k(v, k)[0] * weights))(jnp.asarray(values))
    want_grad = np.zeros_like(values)
    np.put_along_axis(want_grad, want_index, np.arange(1.0, k + 1.0, dtype=np.float32), -1)
    np.testing.assert_array_equal(np.asarray(grad), want_grad)


def test_first_choices_take_priority_over_second_choices():
    # Token 0's second choice and token 1's first choice are both expert 1 with capacity 1.
    probs = np.array([[[0.6, 0.4, 0.0], [0.1, 0.9, 0.0]]], np.float32)
    route = routing.tokens_choose_routing(jnp.asarray(probs), jnp.ones((1, 2)), top_k=2, capacity=1)
    assert int(route.slot_token[0, 1, 0]) == 1  # expert 1's only slot went to token 1 (a first choice)
    assert np.asarray(route.kept).tolist() == [[[True, False], [True, False]]]


def test_position_major_serves_each_token_s_choices_before_the_next_token():
    # Token 0 chooses experts (0, 1), token 1 (1, 2); one slot per expert. Rank-major: token 1's first
    # choice takes expert 1 before token 0's second choice asks for it. Position-major: token 0 is
    # served first and keeps both; token 1 loses expert 1 and keeps expert 2.
    probs = jnp.asarray([[[0.6, 0.4, 0.0], [0.1, 0.6, 0.3]]], jnp.float32)
    kept = lambda **kw: np.asarray(routing.tokens_choose_routing(probs, jnp.ones((1, 2)), top_k=2, capacity=1,
                                                                 **kw).kept).tolist()
    assert kept(priority="rank_major") == [[[True, False], [True, True]]]
    assert kept(priority="position_major") == [[[True, True], [False, True]]]
    route = routing.tokens_choose_routing(probs, jnp.ones((1, 2)), top_k=2, capacity=1, priority="position_major")
    assert np.asarray(route.slot_token).tolist() == [[[0], [0], [1]]]
    # token_position says token 1 comes first in its sequence: it is served first and keeps both.
    assert kept(priority="position_major", token_position=jnp.asarray([[1, 0]])) == [[[True, False], [True, True]]]


@pytest.mark.parametrize("k,capacity,spanning", [(1, 3, False), (2, 2, False), (2, 3, True), (3, 2, True),
                                                 (2, 40, False)])
def test_position_major_matches_numpy_reference(k, capacity, spanning):
    """tokens_choose_routing(priority="position_major") against moe_reference.assign_slots: slots,
    weights and the token-major view; `spanning`: groups of 24 tokens that hold rows of 10, so
    token_position (position in the sequence) reorders service."""
    groups, tokens, experts = 3, 24, 4
    probs = random_probs(5, groups, tokens, experts, temperature=2.0)
    mask = np.ones((groups, tokens), bool)
    mask[1, -5:] = False
    position = (np.arange(groups * tokens) % 10).reshape(groups, tokens) if spanning else None
    route = routing.tokens_choose_routing(jnp.asarray(probs), jnp.asarray(mask, jnp.float32), top_k=k,
                                          capacity=capacity, priority="position_major",
                                          token_position=None if position is None else jnp.asarray(position))
    choice, want_assign = moe_reference.assign_slots(probs, mask, top_k=k, cap=capacity, priority="position_major",
                                                     positions=position)
    gates = np.take_along_axis(probs, choice, -1).astype(np.float64)
    if k > 1:
        gates = gates / gates.sum(-1, keepdims=True)
    want_weight = np.where(want_assign >= 0, gates, 0.0)
    assert_route_matches(route, want_assign, want_weight, tokens, k, capacity, experts)
    if capacity < tokens:
        assert (want_assign < 0)[mask].any(), "the case is meant to drop tokens"
        if k > 1:  # and the two orders differ on it, so the comparison tells them apart
            _, rank_major = moe_reference.assign_slots(probs, mask, top_k=k, cap=capacity, priority="rank_major")
            assert (rank_major != want_assign).any()


def test_priority_is_validated():
    probs = jnp.full((1, 2, 3), 1 / 3)
    with pytest.raises(ValueError, match="rank_major.*position_major.*'token_major'"):
        routing.tokens_choose_routing(probs, jnp.ones((1, 2)), top_k=2, capacity=1, priority="token_major")


def test_gates_normalized_for_top2_and_raw_for_top1():
    probs = np.array([[[0.5, 0.3, 0.2]]], np.float32)
    top2 = routing.tokens_choose_routing(jnp.asarray(probs), jnp.ones((1, 1)), top_k=2, capacity=4)
    top1 = routing.tokens_choose_routing(jnp.asarray(probs), jnp.ones((1, 1)), top_k=1, capacity=4)
    np.testing.assert_allclose(top2.slot_weight[0, 0, 0], 0.5 / 0.8, rtol=1e-6)
    np.testing.assert_allclose(top2.slot_weight[0, 1, 0], 0.3 / 0.8, rtol=1e-6)
    np.testing.assert_allclose(top1.slot_weight[0, 0, 0], 0.5, rtol=1e-6)


def test_random_second_expert_policy_frequency():
    # Top-2 gates 0.7 and 0.12: the normalized second gate is 0.12 / 0.82, so the second expert is
    # asked for with probability (0.12 / 0.82) / 0.2 = 0.7317 (ST-MoE App. G).
    tokens = 20000
    probs = np.tile(np.array([0.7, 0.12, 0.09, 0.09], np.float32), (1, tokens, 1))
    route = routing.tokens_choose_routing(jnp.asarray(probs), jnp.ones((1, tokens)), top_k=2,
                                          capacity=tokens, second_expert_policy="random",
                                          second_expert_threshold=0.2, rng=jax.random.key(0))
    expected = (0.12 / 0.82) / 0.2
    frequency = float(np.mean(np.asarray(route.wanted)[0, :, 1]))
    standard_error = math.sqrt(expected * (1 - expected) / tokens)
    assert abs(frequency - expected) < 5 * standard_error
    assert np.asarray(route.wanted)[0, :, 0].all()  # the first choice is always routed
    # A large second gate (0.4 / 0.85 > 0.2) is always routed.
    probs = np.tile(np.array([0.45, 0.4, 0.1, 0.05], np.float32), (1, 1000, 1))
    route = routing.tokens_choose_routing(jnp.asarray(probs), jnp.ones((1, 1000)), top_k=2, capacity=1000,
                                          second_expert_policy="random", rng=jax.random.key(1))
    assert np.asarray(route.wanted).all()


def test_experts_choose_capacity_and_padding():
    groups, tokens, experts, capacity = 2, 12, 3, 5
    probs = random_probs(1, groups, tokens, experts)
    mask = np.ones((groups, tokens), bool)
    mask[0, :4] = False
    route = routing.experts_choose_routing(jnp.asarray(probs), jnp.asarray(mask, jnp.float32), capacity=capacity)
    slot_token = np.asarray(route.slot_token)
    for g in range(groups):
        for e in range(experts):
            scores = np.where(mask[g], probs[g, :, e], -1.0)
            top = np.argsort(-scores, kind="stable")[:capacity]
            expected = [t if mask[g, t] else tokens for t in top]
            assert sorted(slot_token[g, e].tolist()) == sorted(expected)
    assert not np.isin(np.arange(4), slot_token[0]).any()  # padding never taken


def numpy_balance_loss(probs, choices, mask):
    groups, _, experts = probs.shape
    values = []
    for g in range(groups):
        real = mask[g].astype(bool)
        if not real.any():
            continue
        f = np.zeros(experts)
        for t in np.nonzero(real)[0]:
            for e in set(choices[g, t].tolist()):
                f[e] += 1
        f /= real.sum()
        p = probs[g, real].mean(0)
        values.append(experts * np.sum(f * p))
    return np.mean(values)


def test_losses_match_numpy_and_ignore_padding():
    groups, tokens, experts = 2, 10, 4
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(groups, tokens, experts)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    mask = np.ones((groups, tokens), np.float32)
    mask[1, 6:] = 0
    top2 = np.argsort(-probs, -1, kind="stable")[..., :2]
    got_top1 = routing.load_balance_loss(jnp.asarray(probs), jnp.asarray(top2[..., :1]), jnp.asarray(mask))
    got_all = routing.load_balance_loss(jnp.asarray(probs), jnp.asarray(top2), jnp.asarray(mask))
    np.testing.assert_allclose(got_top1, numpy_balance_loss(probs, top2[..., :1], mask), rtol=1e-5)
    np.testing.assert_allclose(got_all, numpy_balance_loss(probs, top2, mask), rtol=1e-5)

    log_z = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(routing.router_z_loss(jnp.asarray(logits), jnp.asarray(mask)),
                               (log_z ** 2)[mask > 0].mean(), rtol=1e-5)

    cv = np.mean([experts * np.sum((probs[g, mask[g] > 0].mean(0) - 1 / experts) ** 2) for g in range(groups)])
    np.testing.assert_allclose(routing.cv_squared_loss(jnp.asarray(probs), jnp.asarray(mask)), cv, rtol=1e-5)

    # Changing padded tokens' logits changes none of the losses.
    logits2 = logits.copy()
    logits2[1, 6:] = 50.0
    probs2 = np.exp(logits2 - logits2.max(-1, keepdims=True))
    probs2 /= probs2.sum(-1, keepdims=True)
    np.testing.assert_allclose(routing.router_z_loss(jnp.asarray(logits2), jnp.asarray(mask)),
                               routing.router_z_loss(jnp.asarray(logits), jnp.asarray(mask)), rtol=1e-6)
    np.testing.assert_allclose(routing.cv_squared_loss(jnp.asarray(probs2), jnp.asarray(mask)), cv, rtol=1e-5)


def test_uniform_router_balance_loss_is_one():
    probs = np.full((1, 8, 4), 0.25, np.float32)
    choices = np.arange(8).reshape(1, 8, 1) % 4
    np.testing.assert_allclose(routing.load_balance_loss(jnp.asarray(probs), jnp.asarray(choices),
                                                         jnp.ones((1, 8))), 1.0, rtol=1e-6)
