"""Loss and routing-metric formulas (stmoe/losses.py, stmoe/metrics.py, steps.reduce_metrics) on
hand-built inputs, each golden value computed by hand (math / numpy written out in the test):

- cross_entropy_sums: cross-entropy, token accuracy (argmax), output z-loss, label smoothing
  (cross-entropy against (1 - ls) one-hot + ls / V), padding and explicit weights;
- total_loss: the weighting of the terms;
- router_stats: dropped shares by rank, tokens reaching no expert, expert counts, load CV
  (std / mean), router entropy and confidence over real tokens only;
- summarize: per-layer names, averages over layers, loss terms not averaged;
- reduce_metrics: sums divided by the total token count (not a mean of per-step means).
"""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from stmoe import losses, metrics, steps
from stmoe.routing import Routing

# One sequence of 4 positions over a vocabulary of 4; position 3 is padding (target 0).
LOGITS = np.array([[[0.0, 2.0, 0.0, 0.0],    # target 1: the argmax (the argmin, 0, is not)
                    [0.0, 1.0, 3.0, -1.0],   # target 1: argmax is 2, wrong
                    [0.0, 0.0, 0.0, 4.0],    # target 3: the argmax
                    [5.0, 0.0, 0.0, 0.0]]],  # padding: "correct" (argmax 0 = target 0) but weight 0
                  np.float32)
TARGETS = np.array([[1, 1, 3, 0]], np.int32)


def _log_z(row):
    return math.log(sum(math.exp(v) for v in row))


def test_cross_entropy_accuracy_and_output_z_loss_by_hand():
    rows, targets = LOGITS[0].tolist(), TARGETS[0].tolist()
    # -log softmax(target) = log sum_v exp(logit_v) - logit_target, over the 3 real positions.
    nll = [_log_z(rows[i]) - rows[i][targets[i]] for i in range(3)]
    z = [_log_z(rows[i]) ** 2 for i in range(3)]
    sums = losses.cross_entropy_sums(jnp.asarray(LOGITS), jnp.asarray(TARGETS), z_loss_coef=1e-2)
    assert float(sums["weight"]) == 3.0  # default weights: targets > 0
    assert float(sums["correct"]) == 2.0, "positions 0 and 2 are right (argmax == target), 1 is wrong, 3 is padding"
    assert float(sums["cross_entropy"]) == pytest.approx(sum(nll), rel=1e-6)
    assert float(sums["output_z_loss"]) == pytest.approx(1e-2 * sum(z), rel=1e-6)

    weights = np.array([[0.5, 2.0, 0.0, 1.0]], np.float32)  # explicit weights override the padding mask
    nll_pad = _log_z(rows[3]) - rows[3][0]
    sums = losses.cross_entropy_sums(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(weights))
    assert float(sums["weight"]) == 3.5
    assert float(sums["correct"]) == 0.5 * 1 + 2.0 * 0 + 1.0 * 1  # positions 0 and 3 right
    assert float(sums["cross_entropy"]) == pytest.approx(0.5 * nll[0] + 2.0 * nll[1] + nll_pad, rel=1e-6)
    assert float(sums["output_z_loss"]) == 0.0  # z_loss_coef defaults to 0


def test_label_smoothing_is_cross_entropy_against_the_smoothed_targets():
    ls, vocab = 0.1, LOGITS.shape[-1]
    probs = np.exp(LOGITS[0].astype(np.float64))
    log_p = np.log(probs / probs.sum(-1, keepdims=True))
    # t5x's soft target (t5x/losses.py:161-174): 1 - ls on the target, ls / (V - 1) elsewhere, and the
    # soft target's own entropy subtracted so that predicting it exactly costs 0.
    q = np.full((4, vocab), ls / (vocab - 1))
    q[np.arange(4), TARGETS[0]] = 1 - ls
    entropy = -(q[0] * np.log(q[0])).sum()
    want = (-(q * log_p).sum(-1) - entropy)[:3].sum()
    sums = losses.cross_entropy_sums(jnp.asarray(LOGITS), jnp.asarray(TARGETS), label_smoothing=ls)
    assert float(sums["cross_entropy"]) == pytest.approx(want, rel=1e-6)
    assert float(sums["correct"]) == 2.0  # accuracy does not depend on smoothing


def test_total_loss_weights_each_term():
    ce = {"cross_entropy": jnp.float32(6.0), "output_z_loss": jnp.float32(0.3), "correct": jnp.float32(1.0),
          "weight": jnp.float32(3.0)}
    moe = {"aux_loss": jnp.float32(1.5), "router_z_loss": jnp.float32(4.0)}
    # (6 + 0.3) / 3 + 0.01 * 1.5 + 0.001 * 4 = 2.1 + 0.015 + 0.004
    assert float(losses.total_loss(ce, moe, 1e-2, 1e-3)) == pytest.approx(2.119, rel=1e-6)
    # No target token: the denominator is clamped to 1, not 0.
    empty = {**ce, "cross_entropy": jnp.float32(0.0), "output_z_loss": jnp.float32(0.0), "weight": jnp.float32(0.0)}
    assert float(losses.total_loss(empty, moe, 0.0, 0.0)) == 0.0


def _hand_routing():
    """One group of 5 tokens (token 4 is padding), 3 experts, capacity 2, top-2 (hand-built, not
    from a router): token 0 -> (0, 1) both kept; token 1 -> (0, 2) second dropped; token 2 -> (0, 1)
    both dropped (reaches no expert); token 3 -> (1, 2), its second choice not wanted (the 'random'
    policy) so not dropped; token 4 (padding) wants nothing. Slots: expert 0 holds tokens 0, 1;
    expert 1 tokens 0, 3; expert 2 is empty (index 5 = empty slot)."""
    return Routing(
        slot_token=jnp.array([[[0, 1], [0, 3], [5, 5]]], jnp.int32),
        slot_weight=jnp.zeros((1, 3, 2), jnp.float32),
        expert_index=jnp.array([[[0, 1], [0, 2], [0, 1], [1, 2], [2, 0]]], jnp.int32),
        wanted=jnp.array([[[1, 1], [1, 1], [1, 1], [1, 0], [0, 0]]], bool),
        kept=jnp.array([[[1, 1], [1, 0], [0, 0], [1, 0], [0, 0]]], bool))


def test_router_stats_by_hand():
    probs = jnp.array([[[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.75, 0.0],
                        [1 / 3, 1 / 3, 1 / 3]]])
    mask = jnp.array([[1, 1, 1, 1, 0]], jnp.float32)
    s = metrics.router_stats(_hand_routing(), probs, mask, aux_loss=jnp.float32(1.25),
                             router_z_loss=jnp.float32(7.0))
    d = s.as_dict()
    # Of 4 real tokens: rank 1 dropped for token 2; rank 2 wanted and dropped for tokens 1 and 2
    # (token 3's was not wanted); token 2 reaches no expert.
    assert float(d["dropped_fraction_rank1"]) == pytest.approx(1 / 4)
    assert float(d["dropped_fraction_rank2"]) == pytest.approx(2 / 4), "dropped = wanted and not kept"
    assert float(d["dropped_tokens"]) == pytest.approx(1 / 4)
    np.testing.assert_array_equal(np.asarray(d["expert_counts"]), [2.0, 2.0, 0.0])  # filled slots
    # counts (2, 2, 0): mean 4/3, population std sqrt((4/9 + 4/9 + 16/9) / 3) = 2 sqrt(2) / 3 -> CV 1 / sqrt(2).
    assert float(d["load_cv"]) == pytest.approx(1 / math.sqrt(2), rel=1e-6), "load_cv = std / mean of expert_counts"
    # Entropies of the real tokens: 1/2 ln 2 + 2 * 1/4 ln 4 = 3/2 ln 2; 0; ln 2;
    # 1/4 ln 4 + 3/4 ln(4/3) = 2 ln 2 - 3/4 ln 3 -> mean (9/2 ln 2 - 3/4 ln 3) / 4.
    assert float(d["router_entropy"]) == pytest.approx((4.5 * math.log(2) - 0.75 * math.log(3)) / 4, rel=1e-6)
    assert float(d["router_confidence"]) == pytest.approx((0.5 + 1.0 + 0.5 + 0.75) / 4, rel=1e-6)
    assert (float(d["aux_loss"]), float(d["router_z_loss"])) == (1.25, 7.0)  # passed through unweighted


def _stats(load_cv, entropy, counts, aux):
    zero = jnp.float32(0.0)
    return metrics.RouterStats(aux_loss=jnp.float32(aux), router_z_loss=zero, dropped_fraction=jnp.zeros((2,)),
                               dropped_tokens=zero, expert_counts=jnp.asarray(counts, jnp.float32),
                               load_cv=jnp.float32(load_cv), router_entropy=jnp.float32(entropy),
                               router_confidence=zero)


def test_summarize_names_and_averages_over_layers():
    flat = metrics.summarize({"encoder/layers_1/ffn": _stats(0.2, 1.0, [3, 1], 2.0),
                              "decoder/layers_1/ffn": _stats(0.6, 0.5, [0, 4], 4.0)})
    assert float(flat["moe/load_cv"]) == pytest.approx(0.4)  # (0.2 + 0.6) / 2
    assert float(flat["moe/router_entropy"]) == pytest.approx(0.75)
    assert float(flat["moe/decoder/layers_1/ffn/load_cv"]) == pytest.approx(0.6)
    assert [float(flat[f"moe/encoder/layers_1/ffn/expert_{e}_tokens"]) for e in range(2)] == [3.0, 1.0]
    assert float(flat["moe/encoder/layers_1/ffn/aux_loss"]) == 2.0
    assert "moe/aux_loss" not in flat and "moe/expert_counts" not in flat  # the step logs the loss averages


def test_reduce_metrics_divides_sums_by_all_tokens():
    step_1 = {"cross_entropy": 6.0, "correct": 2.0, "output_z_loss": 0.3, "weight": 3.0, "loss": 1.0,
              "nonfinite_skips": 0.0}
    step_2 = {"cross_entropy": 1.0, "correct": 1.0, "output_z_loss": 0.1, "weight": 1.0, "loss": 3.0,
              "nonfinite_skips": 1.0}
    out = steps.reduce_metrics([step_1, step_2])
    assert out["cross_entropy"] == pytest.approx(7.0 / 4.0)  # not (6/3 + 1/1) / 2 = 1.5
    assert out["accuracy"] == pytest.approx(3.0 / 4.0)
    assert out["output_z_loss"] == pytest.approx(0.4 / 4.0)
    assert out["target_tokens"] == 4.0
    assert out["loss"] == pytest.approx(2.0)  # other keys: mean over steps
    assert out["nonfinite_skips"] == 1.0  # a running count: the latest value
