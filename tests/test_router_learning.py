"""stmoe.experiments.router_learning: the router probe's numbers against hand values and against
the train step's own gradients; Adafactor's relative-step bound on the recorded update ratios."""
import math

import jax
import numpy as np
import pytest

from configs import pretrain
from stmoe import losses, optim, partitioning, steps, trainer
from stmoe.data import preprocessors
from stmoe.experiments import router_learning

INPUTS = 32


def _config(steps_: int = 3):
    c = pretrain.get_config("tiny")
    c.model.d_model, c.model.d_ff, c.model.num_heads, c.model.d_kv = 32, 64, 2, 16
    c.model.num_encoder_layers = c.model.num_decoder_layers = 2
    c.data.inputs_length = INPUTS
    c.data.targets_length = preprocessors.pre_corruption_length(INPUTS)[1]
    c.batch_size = 8
    c.total_steps = c.eval_every_steps = c.checkpoint_every_steps = steps_
    c.eval_steps = 1
    c.log_every_steps = 1
    c.loss.router_z_coef = 0.01  # larger than the paper's 1e-3 so that its gradient is far from round-off
    return c


def test_part_norms_by_hand():
    parts = np.array([[3.0, 4.0], [0.0, 5.0], [0.0, 0.0]])  # cross-entropy, balance, z gradients of one kernel
    out = router_learning.part_norms(parts)
    assert out["grad_norm_cross_entropy"] == pytest.approx(5.0) and out["grad_norm_balance"] == pytest.approx(5.0)
    assert out["grad_norm_router_z"] == 0.0 and out["grad_norm_total"] == pytest.approx(math.sqrt(9 + 81))
    assert out["balance_share"] == pytest.approx(0.5) and out["cos_ce_balance"] == pytest.approx(20 / 25)
    assert router_learning.relative_change(np.array([3.0, 4.0]), np.array([0.0, 5.0])) == pytest.approx(
        math.sqrt(9 + 1) / 5)


def test_growth_vs_random_walk_by_hand():
    # Norms 5 -> 5: steps of 0.2 x 5 = 1 each, no net growth (updates that cancel): 0 / 2.
    assert router_learning.growth_vs_random_walk([5.0, 5.0, 5.0], [0.2, 0.2]) == pytest.approx(0.0)
    # W = (3, 0) -> (3, 4): one step of norm 4 orthogonal to W, the random-walk case: (25 - 9) / 16.
    assert router_learning.growth_vs_random_walk([3.0, 5.0], [4 / 3]) == pytest.approx(1.0)
    # W = (1,) -> (2,) -> (3,): steps of 1 along W: (9 - 1) / (1 + 1) = 4, above a random walk.
    assert router_learning.growth_vs_random_walk([1.0, 2.0, 3.0], [1.0, 0.5]) == pytest.approx(4.0)
    assert math.isnan(router_learning.growth_vs_random_walk([1.0], []))


def test_gradient_parts_are_each_terms_gradient_and_add_up_to_the_train_steps():
    """Each part is the router gradient of its own term alone (a separate jax.grad), and the parts
    sum to the router gradient the train step computes from losses.total_loss (return_grads), at
    the quick start's shapes (d_model 64, 4+4 layers) and 64 input tokens."""
    config = _config()
    config.model = pretrain.get_config("tiny").model
    config.data.inputs_length = 64
    config.data.targets_length = preprocessors.pre_corruption_length(64)[1]
    run, tasks = trainer.prepare(config)
    mesh = partitioning.make_mesh(run.mesh, jax.devices()[:1])
    built = trainer.build_steps(run, mesh)
    batch = partitioning.shard_batch(router_learning.first_held_out_batch(run, tasks), mesh)
    state = built.layout.init(jax.random.key(0))
    coef = run.loss.balance_coef
    kwargs = dict(model=built.model, loss_cfg=run.loss, balance_coef=coef)
    with partitioning.activate(mesh):
        rng = jax.random.fold_in(jax.random.key(run.seed), 0)  # the train step's rng at step 0
        parts, _ = jax.jit(lambda p: router_learning.gradient_parts(p, batch, rng, **kwargs))(state.params)
        alone = [router_learning.router_kernels(jax.jit(jax.grad(
            lambda p, i=i: router_learning.objective_terms(p, batch, rng, **kwargs)[0][i]))(state.params))
            for i in range(3)]
        _, _, grads = steps.train_step(
            state, batch, model=built.model, optimizer=built.layout.optimizer,
            learning_rate_fn=optim.learning_rate_schedule(built.optim_config), loss_cfg=run.loss,
            balance_coef_fn=losses.balance_coef_schedule(run.loss), microbatches=1, seed=run.seed,
            return_grads=True)
    expected = router_learning.router_kernels(grads)
    assert sorted(parts) == sorted(expected) and len(parts) == 4  # every other FFN of 4 + 4 layers
    for path, part in parts.items():
        part = np.asarray(part)
        assert part.shape == (3,) + np.shape(expected[path])
        for i in range(3):
            np.testing.assert_allclose(part[i], np.asarray(alone[i][path]), rtol=1e-4, atol=1e-7, err_msg=path)
        np.testing.assert_allclose(part.sum(axis=0), np.asarray(expected[path]), rtol=1e-4, atol=1e-7)
        norms = np.linalg.norm(part.reshape(3, -1), axis=1)
        assert norms[1] > 1e-3 * norms[0] and norms[2] > 0


def test_probe_records_updates_within_adafactors_relative_step(tmp_path):
    """Adafactor's update with parameter scale and update clipping is at most lr x RMS(W) per element
    in RMS, so ||dW|| / ||W|| <= lr (x the router multiplier) every step, for every router."""
    config = _config(steps_=4)
    config.optim.router_lr_multiplier = 2.0
    records = router_learning.train_with_probe(config, str(tmp_path), probe_every=2)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert router_learning.load(str(tmp_path)) == records
    for record in records[1:]:
        assert record["learning_rate"] == pytest.approx(2.0 * config.optim.learning_rate)
        for layer in record["layers"].values():
            assert 0 < layer["update_ratio"] <= record["learning_rate"] * (1 + 1e-5)
    probed = [r for r in records if "router_entropy" in next(iter(r["layers"].values()))]
    assert [r["step"] for r in probed] == [1, 2, 4]
    summary = router_learning.summarize(records, num_experts=8)
    for row in summary.values():
        assert 0.9 < row["entropy_first"] <= 1.0  # the 2e-2 init: nearly uniform
        assert 0 < row["balance_share_mean"] < 1
