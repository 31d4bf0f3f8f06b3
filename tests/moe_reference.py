"""An independent numpy reference of stmoe.moe.MoeLayer's forward pass, written from the papers.

Nothing here imports stmoe.routing or stmoe.dispatch: capacity, top-k, priority, the second-expert
policy and expert choice are plain float64 loops over groups, ranks and tokens, in the order ST-MoE
(arXiv 2202.08906, sec. 2 and App. G) and Switch (arXiv 2101.03961, sec. 2.1-2.2) describe them.
Only the parameters come from a flax-initialized MoeLayer, so only the forward is under test.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def capacity(group_size: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """max(min_capacity, ceil(cf * group_size / num_experts)) in exact rational arithmetic.

    The factor is read as the decimal the user wrote (repr(1.1) = '1.1' -> 11/10), so
    1.1 * 100 / 11 is exactly 10, not the float 10.000000000000002 whose ceiling is 11.
    """
    factor = Fraction(repr(float(capacity_factor)))
    return max(min_capacity, math.ceil(factor * group_size / num_experts))


def gelu(h):
    """flax.linen.gelu's default (approximate=True): the tanh form."""
    return 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))


def softmax(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def logsumexp(logits):
    m = logits.max(-1)
    return m + np.log(np.exp(logits - m[..., None]).sum(-1))


def expert(params, e: int, v):
    """Expert e's T5.1.1 GEGLU MLP on rows v [..., d]: (gelu(v W0) * (v W1)) Wo, float64."""
    wi0 = np.asarray(params["expert_wi_0"][e], np.float64)
    wi1 = np.asarray(params["expert_wi_1"][e], np.float64)
    wo = np.asarray(params["expert_wo"][e], np.float64)
    return (gelu(v @ wi0) * (v @ wi1)) @ wo


def router(params, x_groups, kernel=None):
    """[groups, tokens, d] -> (logits, probs) [groups, tokens, experts], float64."""
    kernel = np.asarray(params["router"]["kernel"] if kernel is None else kernel, np.float64)
    logits = x_groups @ kernel
    return logits, softmax(logits)


def assign_slots(probs, mask, *, top_k, cap, priority="rank_major", positions=None, batch_prioritized=False,
                 wanted=None, unwanted_take_capacity=False):
    """Tokens-choose slot assignment, one choice at a time in service order.

    probs: [groups, tokens, experts], mask: [groups, tokens] (0 = padding: never routed, takes no slot).
    Service order: "rank_major" (ST-MoE, flaxformer) serves every token's first choice, then every
    second choice, ...; "position_major" serves one token's k choices by rank, then the next token's.
    Tokens come in index order, or by `positions` ([groups, tokens], position in the sequence, ties
    in index order), or by descending top-1 probability with `batch_prioritized` (V-MoE).
    wanted / unwanted_take_capacity: as in `forward`.
    Returns (choice [g, t, k] expert ids, slot [g, t, k] = expert * cap + rank in its expert, -1 = not kept).
    """
    groups, tokens, num_experts = probs.shape
    choice = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]  # [g, t, k]
    mg = np.asarray(mask) > 0
    want = np.broadcast_to(mg[..., None], choice.shape).copy()
    if wanted is not None:
        want &= np.asarray(wanted, bool)
    slot = -np.ones(choice.shape, np.int64)
    for g in range(groups):
        fill = np.zeros(num_experts, np.int64)
        order = list(range(tokens))
        if batch_prioritized:  # descending top-1 probability, ties in token order
            order = sorted(order, key=lambda t: -probs[g, t].max())
        elif positions is not None:
            order = sorted(order, key=lambda t: positions[g, t])
        if priority == "position_major":
            service = [(t, rank) for t in order for rank in range(top_k)]
        else:
            service = [(t, rank) for rank in range(top_k) for t in order]
        for t, rank in service:
            if not mg[g, t]:
                continue  # padding is never routed and takes no slot
            e = choice[g, t, rank]
            if not want[g, t, rank]:
                fill[e] += unwanted_take_capacity
                continue
            if fill[e] < cap:
                slot[g, t, rank] = e * cap + fill[e]
            fill[e] += 1
    return choice, slot


def forward(params, x, mask, *, group_size=None, top_k=2, cap=None, router_type="tokens_choose",
            batch_prioritized=False, normalize_gates=True, wanted=None, unwanted_take_capacity=False,
            kernel=None, priority="rank_major"):
    """MoeLayer's forward and sown losses.

    x: [batch, length, d] (any float dtype; used as float64), mask: [batch, length] (0 = padding).
    Groups are consecutive runs of `group_size` tokens of the row-major flattened [batch * length].
    priority: the service order of `assign_slots`; "position_major" serves a group by position in the
    sequence (a group may span rows), as a causal decoder layer does.
    wanted: optional [groups, tokens, k] bool, which choices ask for a slot (the random second-expert
    policy's draws); None = every choice of a real token. `unwanted_take_capacity` is a deliberately
    wrong variant (an unwanted choice still uses up its slot), used to show that a case discriminates.
    Returns dict(out [batch, length, d], kept [groups, tokens, k], aux_loss, router_z_loss, logits, probs,
    dropped_fraction_rank{r}, dropped_tokens, expert_counts).
    """
    batch, length, d = x.shape
    group_size = group_size or length
    xg = np.asarray(x, np.float64).reshape(-1, group_size, d)
    mg = np.asarray(mask).reshape(-1, group_size) > 0
    groups, tokens = mg.shape
    logits, probs = router(params, xg, kernel)
    num_experts = probs.shape[-1]
    out = np.zeros_like(xg)
    counts = np.zeros(num_experts)
    # Every expert on every token, [groups, tokens, experts, d]; routing only picks and weights rows.
    ys = np.stack([expert(params, e, xg) for e in range(num_experts)], axis=2)

    if router_type == "experts_choose":
        c = min(cap, tokens)
        taken = np.zeros((groups, tokens), bool)
        for g in range(groups):
            for e in range(num_experts):
                real = [t for t in range(tokens) if mg[g, t]]
                best = sorted(real, key=lambda t: -probs[g, t, e])[:c]  # stable: lower index wins ties
                for t in best:
                    out[g, t] += probs[g, t, e] * ys[g, t, e]
                    taken[g, t] = True
                    counts[e] += 1
        kept = taken[..., None]
        want = mg[..., None]
        aux_loss = 0.0
    else:
        positions = (np.arange(groups * tokens) % length).reshape(groups, tokens)  # position in the sequence
        choice, slot = assign_slots(probs, mg, top_k=top_k, cap=cap, priority=priority,
                                    positions=positions if priority == "position_major" else None,
                                    batch_prioritized=batch_prioritized, wanted=wanted,
                                    unwanted_take_capacity=unwanted_take_capacity)
        want = np.broadcast_to(mg[..., None], choice.shape).copy()
        if wanted is not None:
            want &= np.asarray(wanted, bool)
        kept = slot >= 0
        for g, t, rank in zip(*np.nonzero(kept)):
            e = choice[g, t, rank]
            gates = probs[g, t, choice[g, t]]
            gate = gates[rank] / gates.sum() if (top_k > 1 and normalize_gates) else gates[rank]
            out[g, t] += gate * ys[g, t, e]
            counts[e] += 1
        # Switch load balance N * sum_i f_i P_i over real tokens, f from the top-1 choice (ST-MoE).
        per_group = []
        for g in range(groups):
            if not mg[g].any():
                continue
            f = np.bincount(choice[g, mg[g], 0], minlength=num_experts) / mg[g].sum()
            per_group.append(num_experts * np.sum(f * probs[g, mg[g]].mean(0)))
        aux_loss = float(np.mean(per_group))

    z_loss = float(np.mean(logsumexp(logits)[mg] ** 2))
    real = mg.sum()
    result = dict(out=out.reshape(batch, length, d), kept=kept, wanted=want, aux_loss=aux_loss,
                  router_z_loss=z_loss, logits=logits, probs=probs, expert_counts=counts,
                  dropped_tokens=float(np.sum(mg & ~kept.any(-1)) / real),
                  router_entropy=float(np.sum(-(probs * np.log(probs)).sum(-1)[mg]) / real),
                  router_confidence=float(np.sum(probs.max(-1)[mg]) / real))
    for r in range(kept.shape[-1]):
        result[f"dropped_fraction_rank{r + 1}"] = float(np.sum((want & ~kept)[..., r] & mg) / real)
    return result
