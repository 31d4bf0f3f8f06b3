"""Training parity with t5x's own MoE trainer: stmoe's train step, configured as t5x's, retraces
20 steps of t5x's MoeTrainer (t5x/contrib/moe/trainer.py) from the same initial parameters.

tests/data/t5x_training/ (its README gives the t5x / flaxformer commits, gin files, bindings and
the one command that regenerates it) holds, for a tiny ST-MoE (top-2, sparse-dense, untied logits,
gin Adafactor: only the expert kernels factored) and a tiny Switch (top-1, relu, tied logits,
min_dim_size_to_factor 16 so that the 2-D kernels are factored too): the step-0 parameters that
t5x initialized, 20 padded batches (one per step), every scalar metric of each step and the
parameters after steps 1, 5 and 20. Nothing there was computed by stmoe.

The step-0 parameters go through stmoe.interop.t5x.convert (flaxformer names and layouts -> stmoe,
with flaxformer's routing semantics), the run config takes t5x's optimizer and loss settings
(T5X_OVERRIDES, each traced to its t5x / gin source in the README), and stmoe's own jitted train
step (steps.make_train_step, what the trainer runs) takes the same batches. Per step the total loss
must agree within LOSS_RTOL and each of its terms too; after steps 1, 5 and 20 every parameter
within PARAM_RTOL of t5x's (max |difference| relative to the parameter's max |value|).

The batches' decoder inputs are seqio's (a short target's EOS is the input of its first padded
position) and flaxformer zeroes the padding of every sublayer input and of the encoder output
(README, "Which positions the MoE layers see as padding"): zeroing only the MoE layers' inputs
leaves that position with another hidden state, which the decoder's MoE layer routes, and the
st_moe loss then misses t5x's by 1.4e-5 at step 20 and its decoder router by 6e-3 after step 1.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe import optim, partitioning, preflight, steps
from stmoe.config import ConfigError, MeshConfig, RunConfig
from stmoe.interop import t5x
from stmoe.models import EncoderDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "t5x_training")
STEPS = 20
SNAPSHOTS = (1, 5, 20)
LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-4

# Gin values the checkpoint does not store (README, "Models"; st_moe_base.gin, switch_base.gin,
# tokens_choose_base.gin, moe.gin).
OPTIONS = {
    "st_moe": t5x.Options(num_heads=2, num_selected_experts=2, train_capacity_factor=1.25, group_size=4096,
                          aux_loss_factor=0.01, router_z_loss_factor=1e-4),
    "switch": t5x.Options(num_heads=2, num_selected_experts=1, train_capacity_factor=1.25, group_size=8192,
                          aux_loss_factor=0.01, router_z_loss_factor=0.0),
}
# t5x's train step as RunConfig fields (README, "What t5x's step computes").
T5X_OVERRIDES = {
    "optim.optimizer": "adafactor",
    "optim.adafactor_style": "t5x",
    "optim.schedule": "constant",
    "optim.learning_rate": 1e-2,
    "optim.grad_clip_norm": 0.0,  # no global-norm clip: global_norm_clip_threshold unbound
    "optim.weight_decay": 0.0,
    "optim.skip_nonfinite": False,  # skip_nan_updates=False
    "optim.router_lr_multiplier": 1.0,
    "optim.adafactor_decay_rate": 0.8,
    "optim.adafactor_step_offset": 0,
    "optim.adafactor_clipping_threshold": 1.0,
    "optim.adafactor_epsilon1": 1e-30,
    "optim.adafactor_epsilon2": 1e-3,
    "optim.adafactor_min_dim_size_to_factor": 128,
    "optim.adafactor_factored": True,
    "optim.adafactor_multiply_by_parameter_scale": True,
    "optim.adafactor_beta1": None,
    "optim.adafactor_max_parameter_scale": None,
    "optim.adafactor_weight_decay_rate": None,
    "loss.label_smoothing": 0.0,
    "loss.loss_normalizing_factor": "num_real_target_tokens",
    "loss.output_z_coef": 1e-4,
    "model.moe.decoder_padding_from": "decoder_input_tokens",
    "model.zero_padding_activations": True,  # flaxformer's logit_mask on every sublayer input
}
MODEL_OVERRIDES = {
    "st_moe": {"loss.balance_coef": 0.01, "loss.router_z_coef": 1e-4},
    "switch": {"loss.balance_coef": 0.01, "loss.router_z_coef": 0.0,
               "optim.adafactor_min_dim_size_to_factor": 16},
}


class MissingOption(Exception):
    """A RunConfig field that t5x parity needs and this stmoe does not have."""


def override(config, dotted: str, value, prefix: str = ""):
    """`config` (a config dataclass) with the field at `dotted` ('optim.adafactor_beta1') set."""
    head, _, rest = dotted.partition(".")
    if head not in {f.name for f in dataclasses.fields(config)}:
        raise MissingOption(f"{prefix}{dotted}")
    if rest:
        return dataclasses.replace(config, **{head: override(getattr(config, head), rest, value, f"{prefix}{head}.")})
    return dataclasses.replace(config, **{head: value})


def t5x_run_config(name: str, model_cfg) -> RunConfig:
    run = RunConfig(model=model_cfg, mesh=MeshConfig(data=1), num_devices=1, batch_size=8, total_steps=STEPS)
    for key, value in {**T5X_OVERRIDES, **MODEL_OVERRIDES[name]}.items():
        run = override(run, key, value)
    return preflight.preflight(run, 1)


def load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def t5x_params(name: str, step: int) -> dict[str, np.ndarray]:
    """t5x's parameters after `step` steps in stmoe's names and layouts."""
    _, mapped, _ = t5x.convert(load_npz(os.path.join(DATA, name, f"params_step{step}.npz")), OPTIONS[name])
    return mapped


@pytest.fixture(scope="module")
def batches():
    return load_npz(os.path.join(DATA, "batches.npz"))


def flat(params) -> dict[str, np.ndarray]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def train_like_t5x(name: str, batches) -> dict:
    """STEPS stmoe train steps from t5x's step-0 params: {'metrics': [per step], 'params': {step: flat}}."""
    cfg, mapped, _ = t5x.convert(load_npz(os.path.join(DATA, name, "params_step0.npz")), OPTIONS[name])
    run = t5x_run_config(name, cfg)
    mesh = partitioning.make_mesh(run.mesh, jax.devices()[:1])
    model = EncoderDecoder(partitioning.resolve_model(run.model, mesh))
    optim_cfg = run.optimizer()
    shapes = {k: batches[k].shape[1:] for k in ("encoder_input_tokens", "decoder_input_tokens",
                                                "decoder_target_tokens")}
    layout = steps.state_layout(model, lambda p: optim.make_optimizer(optim_cfg, p), mesh, shapes,
                                jax.random.key(run.seed))
    params = jax.device_put(t5x.to_params(mapped), layout.shardings.params)
    with partitioning.activate(mesh):
        opt_state = jax.device_put(layout.optimizer.init(params), layout.shardings.opt_state)
        state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
        step_fn = steps.make_train_step(model, layout.optimizer, mesh=mesh, state_shardings=layout.shardings,
                                        learning_rate_fn=optim.learning_rate_schedule(optim_cfg),
                                        loss_cfg=run.loss, seed=run.seed, donate=False)
        history, snapshots = [], {}
        for step in range(STEPS):
            state, metrics = step_fn(state, {k: v[step] for k, v in batches.items()})
            history.append({k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()
                            if np.size(v) == 1})
            if step + 1 in SNAPSHOTS:
                snapshots[step + 1] = flat(state.params)
    return {"metrics": history, "params": snapshots, "run": run}


@pytest.fixture(scope="module")
def trained(batches):
    """{model: train_like_t5x result, or the MissingOption / ConfigError message}."""
    out = {}
    for name in OPTIONS:
        try:
            out[name] = train_like_t5x(name, batches)
        except (MissingOption, ConfigError) as e:
            out[name] = f"stmoe cannot be configured as t5x's trainer: {type(e).__name__} {e}"
    return out


def require(trained, name: str) -> dict:
    result = trained[name]
    if isinstance(result, str):
        pytest.fail(result)
    return result


def t5x_metrics(name: str) -> list[dict]:
    with open(os.path.join(DATA, name, "metrics.json")) as f:
        return json.load(f)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_reference_is_not_trivial(name, batches):
    """The reference moves every kind of parameter far beyond PARAM_RTOL in 20 steps, drops tokens
    (capacity factor 1.25 matters) and its decoder inputs make flaxformer's padding mask differ from
    targets > 0, so the run checks the optimizer, the routing and moe.decoder_padding_from."""
    start, end = t5x_params(name, 0), t5x_params(name, 20)
    kinds = {"attention": "/query", "experts": "/expert_wi", "routers": "/router/kernel", "norms": "norm/scale",
             "embedding": "token_embedder"}
    for kind, fragment in kinds.items():
        moved = max(relative_error(end[p], start[p]) for p in start if fragment in p)
        assert moved > 100 * PARAM_RTOL, (kind, moved)
    history = t5x_metrics(name)
    assert max(m["experts/fraction_tokens_left_behind"] for m in history) > 0.05
    assert history[-1]["loss"] < history[0]["loss"] - 0.05  # it trains
    inputs, targets = batches["decoder_input_tokens"], batches["decoder_target_tokens"]
    shifted = np.concatenate([inputs[..., 1:], np.zeros_like(inputs[..., :1])], axis=-1)
    first = np.zeros_like(inputs, bool)
    first[..., 0] = True
    flaxformer_mask = (inputs > 0) | (shifted > 0) | first  # dense_attention.py:2360-2375
    assert np.sum(flaxformer_mask != (targets > 0)) > 20


@pytest.mark.parametrize("name", list(OPTIONS))
def test_loss_per_step_matches_t5x(trained, name):
    got = [m["loss"] for m in require(trained, name)["metrics"]]
    want = [m["loss"] for m in t5x_metrics(name)]
    assert len(got) == len(want) == STEPS
    errors = [abs(g - w) / abs(w) for g, w in zip(got, want)]
    assert max(errors) < LOSS_RTOL, [f"step {i + 1}: {g:.7f} vs t5x {w:.7f}" for i, (g, w) in
                                     enumerate(zip(got, want)) if abs(g - w) / abs(w) >= LOSS_RTOL]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_loss_terms_match_t5x(trained, name):
    """Each term of t5x's loss (t5x/contrib/moe/models.py:258-298): cross_ent_loss and z_loss are
    sums over real target tokens / their count, experts/auxiliary_loss and experts/router_z_loss
    the gin factor times the mean over MoE layers."""
    result = require(trained, name)
    run = result["run"]
    for step, (got, want) in enumerate(zip(result["metrics"], t5x_metrics(name)), start=1):
        pairs = {
            "cross_ent_loss": got["cross_entropy"] / got["weight"],
            "z_loss": got["output_z_loss"] / got["weight"],
            "experts/auxiliary_loss": run.loss.balance_coef * got["aux_loss"],
            "experts/router_z_loss": run.loss.router_z_coef * got["router_z_loss"],
        }
        for key, value in pairs.items():
            np.testing.assert_allclose(value, want[key], rtol=LOSS_RTOL, atol=1e-9, err_msg=f"step {step} {key}")


@pytest.mark.parametrize("step", SNAPSHOTS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_params_match_t5x(trained, name, step):
    got = require(trained, name)["params"][step]
    want = t5x_params(name, step)
    assert sorted(got) == sorted(want)
    errors = {path: relative_error(got[path], want[path]) for path in want}
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] < PARAM_RTOL, worst
