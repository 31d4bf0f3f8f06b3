"""Tests for stmoe.optim: golden numbers come from numpy / hand formulas, not optax."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stmoe import losses, optim
from stmoe.config import LossConfig


def _params():
    """A tiny tree with every kind of leaf the labels and masks care about."""
    rng = np.random.default_rng(0)
    return {
        "encoder": {
            "norm": {"scale": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
            "mlp": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
        },
        "decoder": {
            "moe": {"router": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}},
            "mlp": {
                "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
            },
        },
    }


def _grads(params, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), params)


def _cfg(**kw):
    base = dict(optimizer="adamw", schedule="constant", learning_rate=0.1, weight_decay=0.0,
                grad_clip_norm=0.0, skip_nonfinite=False)
    base.update(kw)
    return optim.OptimConfig(**base)


def _step(tx, params, grads, state):
    updates, state = jax.jit(tx.update)(grads, state, params)
    return optax.apply_updates(params, updates), state


def _path_strings(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


# ------------------------------------------------------------------ schedules


def test_rsqrt_schedule_is_t5s():
    # T5: lr = 1 / sqrt(max(step, 10_000)); with peak 1e-2 and 10k steps identical.
    sched = optim.learning_rate_schedule(optim.OptimConfig(schedule="rsqrt"))
    for step in [0, 1, 5_000, 10_000, 40_000, 1_000_000]:
        np.testing.assert_allclose(float(sched(step)), 1 / math.sqrt(max(step, 10_000)), rtol=1e-6)


@pytest.mark.parametrize("schedule", ["warmup_cosine", "warmup_linear"])
def test_warmup_decay_schedules(schedule):
    cfg = optim.OptimConfig(schedule=schedule, learning_rate=2.0, warmup_steps=10, total_steps=110,
                            end_learning_rate_fraction=0.1)
    sched = optim.learning_rate_schedule(cfg)

    def expected(step):  # hand formulas: linear warmup from 0, then decay over 100 steps
        if step < 10:
            return 2.0 * step / 10
        frac = min(step - 10, 100) / 100
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "warmup_cosine" else 1 - frac
        return 2.0 * (0.1 + 0.9 * shape)

    for step in [0, 5, 10, 35, 60, 109, 110, 500]:
        np.testing.assert_allclose(float(sched(step)), expected(step), rtol=1e-5, atol=1e-7)


def test_constant_schedule():
    sched = optim.learning_rate_schedule(optim.OptimConfig(schedule="constant", learning_rate=1e-3))
    assert [float(sched(s)) for s in (0, 10**6)] == pytest.approx([1e-3, 1e-3])


def test_balance_coef_schedule():
    sched = losses.balance_coef_schedule(LossConfig(balance_coef=0.01, balance_schedule="linear_decay",
                                                    balance_warmup_multiplier=10.0, balance_decay_steps=100))
    got = [float(sched(s)) for s in (0, 50, 100, 1000)]
    np.testing.assert_allclose(got, [0.1, 0.055, 0.01, 0.01], rtol=1e-6)
    assert float(losses.balance_coef_schedule(LossConfig(balance_coef=0.01))(123)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="schedule"):
        LossConfig(balance_coef=0.01, balance_schedule="cosine").validate()
    with pytest.raises(ValueError, match="decay_steps"):
        LossConfig(balance_coef=0.01, balance_schedule="linear_decay", balance_warmup_multiplier=10.0,
                   balance_decay_steps=0).validate()


@pytest.mark.parametrize("field,value", [
    ("optimizer", "sgd"), ("schedule", "step"), ("learning_rate", 0.0), ("warmup_steps", -1),
    ("total_steps", 5), ("end_learning_rate_fraction", 1.5), ("b2", 1.0), ("weight_decay", -0.1),
    ("grad_clip_norm", -1.0), ("adafactor_clipping_threshold", -0.5), ("freeze_patterns", ("(",)),
    ("freeze_patterns", ["encoder"]), ("max_consecutive_nonfinite", -1),
])
def test_validate_names_the_field(field, value):
    cfg = optim.OptimConfig(schedule="warmup_cosine", warmup_steps=10, total_steps=100)
    with pytest.raises(ValueError, match=field):
        cfg.replace(**{field: value}).validate()


# ------------------------------------------------------------------- labels


def test_param_labels_and_boxes():
    params = _params()
    params["encoder"]["mlp"]["kernel"] = nn.Partitioned(params["encoder"]["mlp"]["kernel"], ("embed", "mlp"))
    labels = optim.param_labels(params, _cfg(freeze_patterns=("^encoder/mlp",)))
    assert labels == {
        "encoder": {"norm": {"scale": "default"}, "mlp": {"kernel": "frozen"}},
        "decoder": {"moe": {"router": {"kernel": "router"}},
                    "mlp": {"kernel": "default", "bias": "default"}},
    }
    mask = optim.weight_decay_mask(params)
    assert mask["encoder"]["norm"]["scale"] is False and mask["decoder"]["mlp"]["bias"] is False
    assert mask["encoder"]["mlp"]["kernel"] is True


def test_freeze_pattern_must_match():
    with pytest.raises(ValueError, match="freeze_patterns"):
        optim.make_optimizer(_cfg(freeze_patterns=("^nothing",)), _params())


# ------------------------------------------------------------- golden steps


def _np_adam(p, gs, lr, b1, b2, eps, wd):
    """Hand-written AdamW (Loshchilov & Hutter, decoupled decay x lr) for a list of grads."""
    m = np.zeros_like(p, np.float64)
    v = np.zeros_like(p, np.float64)
    p = p.astype(np.float64)
    for t, g in enumerate(gs, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p)
    return p


def test_adamw_matches_numpy_and_masks_decay():
    params = _params()
    cfg = _cfg(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.3)
    tx = optim.make_optimizer(cfg, params)
    g1, g2 = _grads(params, 1), _grads(params, 2)
    state = tx.init(params)
    new, state = _step(tx, params, g1, state)
    new, state = _step(tx, new, g2, state)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = path[-1].key
        wd = 0.0 if name in ("scale", "bias") else 0.3
        grads = [np.asarray(_leaf(g, path)) for g in (g1, g2)]
        ref = _np_adam(np.asarray(leaf), grads, 0.05, 0.8, 0.95, 1e-6, wd)
        np.testing.assert_allclose(np.asarray(_leaf(new, path)), ref, rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def _leaf(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_weight_decay_skips_scales_and_biases(optimizer):
    # With zero gradients the adaptive part is exactly 0, so update = -lr * wd * p
    # on kernels and 0 on norm scales and biases.
    params = _params()
    tx = optim.make_optimizer(_cfg(optimizer=optimizer, weight_decay=0.5, learning_rate=0.1), params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        decayed = path[-1].key not in ("scale", "bias")
        expected = -0.1 * 0.5 * np.asarray(p) if decayed else np.zeros(p.shape)
        np.testing.assert_allclose(np.asarray(_leaf(updates, path)), expected, rtol=1e-6, atol=0)


def test_adafactor_first_step_by_hand():
    # Step 1 of T5 Adafactor on an unfactored (< 128) vector: the decayed second
    # moment is g^2 (+1e-30), so u = sign(g), block RMS 1 (no clipping), then
    # times lr and max(RMS(p), 1e-3): update = -lr * RMS(p) * sign(g).
    p = {"w": jnp.array([3.0, -4.0, 0.0, 1.0])}
    g = {"w": jnp.array([0.5, -2.0, 1.0, -1e-3])}
    tx = optim.make_optimizer(_cfg(optimizer="adafactor", learning_rate=0.01), p)
    updates, _ = jax.jit(tx.update)(g, tx.init(p), p)
    rms = np.sqrt(np.mean(np.square([3.0, -4.0, 0.0, 1.0])))
    np.testing.assert_allclose(updates["w"], -0.01 * rms * np.sign(g["w"]), rtol=1e-5)


def test_adafactor_update_clipping_below_one():
    # ST-MoE's update clipping 0.1 (sec. 3.1): the step-1 update sign(g) has block RMS 1, divided by
    # max(1, 1 / 0.1) = 10, so update = -lr * RMS(p) * 0.1 * sign(g) (by hand, as the test above).
    p = {"w": jnp.array([3.0, -4.0, 0.0, 1.0])}
    g = {"w": jnp.array([0.5, -2.0, 1.0, -1e-3])}
    tx = optim.make_optimizer(_cfg(optimizer="adafactor", learning_rate=0.01, adafactor_clipping_threshold=0.1), p)
    updates, _ = jax.jit(tx.update)(g, tx.init(p), p)
    rms = np.sqrt(np.mean(np.square([3.0, -4.0, 0.0, 1.0])))
    np.testing.assert_allclose(updates["w"], -0.01 * rms * 0.1 * np.sign(g["w"]), rtol=1e-5)


def test_global_norm_clipping_matches_numpy_and_ignores_frozen():
    params = _params()
    cfg = _cfg(grad_clip_norm=1.0, freeze_patterns=("encoder/norm",))
    tx = optim.make_optimizer(cfg, params)
    g1 = _grads(params, 3, scale=5.0)  # global norm >> 1: clipped
    g1["encoder"]["norm"]["scale"] = jnp.full((3,), 1e6)  # frozen: must not count
    g2 = _grads(params, 4, scale=0.01)  # norm < 1: untouched
    state = tx.init(params)
    new, state = _step(tx, params, g1, state)
    new, state = _step(tx, new, g2, state)

    trainable = [(path, np.asarray(leaf, np.float64)) for path, leaf in
                 jax.tree_util.tree_leaves_with_path(g1) if "norm" not in jax.tree_util.keystr(path)]
    norm1 = np.sqrt(sum(np.sum(x**2) for _, x in trainable))
    assert norm1 > 1.0
    for path, g in trainable:
        g2_leaf = np.asarray(_leaf(g2, path), np.float64)
        assert np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(g2))) < 1.0
        ref = _np_adam(np.asarray(_leaf(params, path)), [g / norm1, g2_leaf], 0.1, 0.9, 0.999, 1e-8, 0.0)
        np.testing.assert_allclose(np.asarray(_leaf(new, path)), ref, rtol=1e-5, atol=1e-5)  # float32 vs float64
    np.testing.assert_array_equal(new["encoder"]["norm"]["scale"], params["encoder"]["norm"]["scale"])


def test_router_lr_multiplier():
    # Adam's first step is -lr * g / (|g| + eps); the router's must be half of it.
    g = np.array([[0.3, -2.0], [1e-3, 4.0]], np.float32)
    params = {"moe": {"router": {"kernel": jnp.ones((2, 2))}}, "mlp": {"kernel": jnp.ones((2, 2))}}
    grads = {"moe": {"router": {"kernel": jnp.asarray(g)}}, "mlp": {"kernel": jnp.asarray(g)}}
    tx = optim.make_optimizer(_cfg(router_lr_multiplier=0.5, learning_rate=0.2), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    adam1 = -0.2 * g / (np.abs(g) + 1e-8)
    # float32 bias correction (1 - 0.999) costs ~1e-5 relative.
    np.testing.assert_allclose(updates["mlp"]["kernel"], adam1, rtol=2e-5)
    np.testing.assert_allclose(updates["moe"]["router"]["kernel"], 0.5 * adam1, rtol=2e-5)
    np.testing.assert_array_equal(updates["moe"]["router"]["kernel"], 0.5 * updates["mlp"]["kernel"])


# ------------------------------------------------------------------ freezing


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("boxed", [False, True])
def test_frozen_params_have_no_state_and_never_move(optimizer, boxed):
    params = _params()
    if boxed:  # flax with_partitioning boxes: one leaf per box, paths without '.value'
        params = jax.tree.map(lambda x: nn.Partitioned(x, tuple(f"a{i}" for i in range(x.ndim))), params)
    cfg = _cfg(optimizer=optimizer, weight_decay=0.1, freeze_patterns=(r"^encoder/",), grad_clip_norm=1.0,
               skip_nonfinite=True)
    tx = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    # No array in the optimizer state lives under a frozen path.
    assert not [p for p in _path_strings(state) if "encoder" in p]
    # ... while every trainable param has state (Adam: mu and nu; Adafactor: v).
    for name in ("router", "'mlp'"):
        assert any(name in p and "decoder" in p for p in _path_strings(state))

    new = params
    for seed in range(3):
        grads = _grads(params, seed)
        updates, state = jax.jit(tx.update)(grads, state, new)
        new = optax.apply_updates(new, updates)
    unbox = nn.meta.unbox
    for before, after in zip(jax.tree.leaves(unbox(params)["encoder"]), jax.tree.leaves(unbox(new)["encoder"])):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))  # bit-identical
    assert not np.allclose(unbox(new)["decoder"]["mlp"]["kernel"], unbox(params)["decoder"]["mlp"]["kernel"])
    if boxed:
        assert isinstance(new["decoder"]["mlp"]["kernel"], nn.Partitioned)


def test_optimizer_from_shapes_works_on_unboxed_arrays():
    # The trainer builds the optimizer from eval_shape'd boxed params, then steps on arrays.
    params = _params()
    abstract = jax.tree.map(lambda x: nn.Partitioned(jax.ShapeDtypeStruct(x.shape, x.dtype), ("a",) * x.ndim),
                            params)
    tx = optim.make_optimizer(_cfg(freeze_patterns=("norm",)), abstract)
    shapes = jax.eval_shape(tx.init, params)
    assert not [p for p in _path_strings(shapes) if "norm" in p]
    updates, _ = jax.jit(tx.update)(_grads(params), tx.init(params), params)
    assert float(jnp.abs(updates["encoder"]["norm"]["scale"]).max()) == 0.0


# -------------------------------------------------------------- non-finite


def test_nonfinite_step_is_skipped_and_counted():
    params = _params()
    tx = optim.make_optimizer(_cfg(skip_nonfinite=True, grad_clip_norm=1.0), params)
    state = tx.init(params)
    assert optim.count_nonfinite_skips(state) == 0
    bad = _grads(params)
    bad["decoder"]["mlp"]["kernel"] = bad["decoder"]["mlp"]["kernel"].at[0, 0].set(jnp.nan)
    new, state = _step(tx, params, bad, state)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert optim.count_nonfinite_skips(state) == 1
    # The next finite step applies as if it were the first (Adam state untouched).
    new, state = _step(tx, new, _grads(params, 7), state)
    assert optim.count_nonfinite_skips(state) == 1
    g = np.asarray(_grads(params, 7)["decoder"]["mlp"]["kernel"], np.float64)
    gnorm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(_grads(params, 7))))
    ref = _np_adam(np.asarray(params["decoder"]["mlp"]["kernel"]), [g / max(1.0, gnorm)], 0.1, 0.9, 0.999, 1e-8, 0)
    np.testing.assert_allclose(new["decoder"]["mlp"]["kernel"], ref, rtol=1e-5)


def test_nonfinite_update_is_never_applied_however_many_in_a_row():
    # optax.apply_if_finite alone applies the NaN update once max_consecutive_errors is exceeded;
    # the run must stop instead (trainer), so the optimizer never applies one.
    params = _params()
    tx = optim.make_optimizer(_cfg(skip_nonfinite=True, max_consecutive_nonfinite=2), params)
    state = tx.init(params)
    bad = jax.tree.map(lambda g: g * jnp.nan, _grads(params))
    new = params
    for expected_in_a_row in range(1, 6):
        new, state = _step(tx, new, bad, state)
        assert int(optim.consecutive_nonfinite_skips(state)) == expected_in_a_row
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    new, state = _step(tx, new, _grads(params, 7), state)  # a finite step resets the run of skips
    assert int(optim.consecutive_nonfinite_skips(state)) == 0


def test_count_is_zero_without_skipping():
    params = _params()
    tx = optim.make_optimizer(_cfg(skip_nonfinite=False), params)
    assert optim.count_nonfinite_skips(tx.init(params)) == 0


def _one_param_step(inner, param, grad):
    """One skip_nonfinite_steps(inner) step on {'w': param}: (new param, state, initial state)."""
    params = {"w": jnp.asarray(param, jnp.float32)}
    tx = optim.skip_nonfinite_steps(inner)
    new, state = _step(tx, params, {"w": jnp.asarray(grad, jnp.float32)}, tx.init(params))
    return np.asarray(new["w"]), state, tx.init(params)


@pytest.mark.parametrize("case", ["adam_eps_0_zero_grad", "infinite_lr", "param_overflow", "state_overflow"])
def test_finite_gradients_with_a_nonfinite_result_are_skipped(case):
    """Finite gradients, but the step would make a non-finite update (Adam with eps=0 where the
    gradient is 0: 0 / 0; lr=inf: inf * g and 0 * inf), overflow a parameter (3e38 + 3e38 = inf in
    float32), or overflow the optimizer state (Adam's v = (1 - b2) * (1e30)^2 = inf, update 0)."""
    param = np.array([1.0, 2.0], np.float32)
    inner, grad = {
        "adam_eps_0_zero_grad": (optax.adam(0.1, eps=0.0), [0.5, 0.0]),
        "infinite_lr": (optax.sgd(np.inf), [0.5, 0.0]),
        "param_overflow": (optax.sgd(1.0), [-3e38, 0.0]),
        "state_overflow": (optax.adam(0.1), [1e30, 0.0]),
    }[case]
    if case == "param_overflow":
        param = np.array([3e38, 1.0], np.float32)
    new, state, initial = _one_param_step(inner, param, grad)
    np.testing.assert_array_equal(new, param)  # skipped: not a bit changed
    assert int(optim.consecutive_nonfinite_skips(state)) == 1 and optim.count_nonfinite_skips(state) == 1
    for kept, before in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(initial.inner_state), strict=True):
        np.testing.assert_array_equal(kept, before)  # Adam's moments and step count as before the step


def test_finite_result_is_applied_as_the_inner_optimizer_does():
    param, grad = np.array([1.0, 2.0], np.float32), np.array([0.5, -0.25], np.float32)
    new, state, _ = _one_param_step(optax.adam(0.1), param, grad)
    ref = _np_adam(param.astype(np.float64), [grad.astype(np.float64)], 0.1, 0.9, 0.999, 1e-8, 0)
    np.testing.assert_allclose(new, ref, rtol=1e-6)
    assert int(optim.consecutive_nonfinite_skips(state)) == 0 and optim.count_nonfinite_skips(state) == 0
