"""Sharding on 8 simulated CPU devices: mesh/config validation, expert placement, the
all-to-all in the compiled step, and equality with a 1-device run for every layout.

The train step is the trainer's (stmoe.steps.make_train_step, via tests/sharded_step.py)
with optax.adam. Comparisons use GEGLU (no ReLU kinks, docs/design.md "Testing conventions"),
group_size = sequence length (the same routing groups on every layout), float32 and
matmul precision 'highest' (conftest). No gradient is rescaled: the loss is the
global mean, so the partitioned gradients equal the 1-device ones as they are.
"""
import re

import jax
import numpy as np
import optax
import pytest

import sharded_step as ss
from stmoe import partitioning
from stmoe.config import ConfigError
from stmoe.partitioning import MeshConfig

ONE_PER_DEVICE = MeshConfig(data=1, expert=8, model=1)


# ---------------------------------------------------------------- config validation (no compiles)

@pytest.mark.parametrize("mesh_cfg, field", [
    (MeshConfig(data=0), "mesh.data"),
    (MeshConfig(data=-1, expert=-1), "mesh.expert"),
    (MeshConfig(data=3, expert=1), "mesh: data * expert * model = 3 * 1 * 1 = 3 must equal"),
    (MeshConfig(data=-1, expert=3), "mesh.data"),
])
def test_mesh_config_errors_name_the_field(mesh_cfg, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        mesh_cfg.resolve(8)


def test_make_mesh_resolves_the_rest_and_uses_auto_axes():
    mesh = partitioning.make_mesh(MeshConfig(expert=2, model=2))
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "model": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert partitioning.expert_split(mesh) == 2  # the experts' weights split over the expert axis only


@pytest.mark.parametrize("mesh_cfg, num_experts, batch, field", [
    (MeshConfig(data=1, expert=8), 12, 16, "model.moe.num_experts"),
    (MeshConfig(data=2, expert=4), 8, 12, "batch_size"),
    (MeshConfig(data=2, expert=2), 8, 16, "mesh: data * expert * model = 2 * 2 * 1 = 4 must equal"),
    (MeshConfig(data=1, expert=2, model=4), 8, 16, "model.num_heads"),
])
def test_validate_layout_errors_name_the_field(mesh_cfg, num_experts, batch, field):
    cfg = ss.tiny_config(num_experts)
    with pytest.raises(ConfigError, match=re.escape(field)):
        partitioning.validate_layout(mesh_cfg, cfg, batch, 8)


def test_batch_sharding_splits_rows_over_data_and_expert():
    mesh = partitioning.make_mesh(MeshConfig(data=2, expert=2, model=2))
    arrays = partitioning.shard_batch({"x": np.arange(8 * 3).reshape(8, 3)}, mesh)
    shard_shapes = {s.data.shape for s in arrays["x"].addressable_shards}
    assert shard_shapes == {(2, 3)}  # 8 rows over data * expert = 4, replicated over model
    np.testing.assert_array_equal(np.asarray(arrays["x"]), np.arange(24).reshape(8, 3))


def test_opt_state_shardings_mirror_params_for_adam_and_factored_adafactor():
    setup_cfg = ss.tiny_config(8)
    mesh = partitioning.make_mesh(MeshConfig(data=1, expert=4, model=2))
    model = ss.EncoderDecoder(setup_cfg)
    shapes = ss.input_shapes()
    abstract, shardings = partitioning.abstract_params_and_shardings(model, mesh, shapes, jax.random.key(0))
    wi_path = ("encoder", "layers_1", "ffn", "moe", "expert_wi_0")
    get = lambda tree: tree[wi_path[0]][wi_path[1]][wi_path[2]][wi_path[3]][wi_path[4]]
    assert get(shardings).spec == jax.sharding.PartitionSpec("expert", None, "model")

    adam = partitioning.opt_state_shardings(optax.adam(1e-3), abstract, shardings, mesh)
    assert get(adam[0].mu).spec == get(shardings).spec and get(adam[0].nu).spec == get(shardings).spec
    assert adam[0].count.spec == jax.sharding.PartitionSpec()

    # Adafactor factors the two largest dims of [8, 32, 64] -> v_row [8, 32], v_col [8, 64].
    ada = partitioning.opt_state_shardings(optax.adafactor(1e-3, min_dim_size_to_factor=16), abstract,
                                           shardings, mesh)
    factored = ada[0]
    assert get(factored.v_row).spec == jax.sharding.PartitionSpec("expert", None)
    assert get(factored.v_col).spec == jax.sharding.PartitionSpec("expert", "model")


# ---------------------------------------------------------------- sharded train step (compiles)

@pytest.fixture(scope="module")
def reference():
    """The 1-device run, 8 experts."""
    return ss.get_setup(MeshConfig(1, 1, 1), 8, 1)


@pytest.fixture(scope="module")
def one_per_device():
    """8 experts on an expert axis of 8, initialized by the sharded init itself."""
    return ss.get_setup(ONE_PER_DEVICE)


def _expert_kernels(params):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if "expert_w" in jax.tree_util.keystr(path)}


def test_one_expert_per_device(one_per_device):
    kernels = _expert_kernels(one_per_device.params)
    assert len(kernels) == 6  # (wi_0, wi_1, wo) x (encoder, decoder)
    for name, kernel in kernels.items():
        assert kernel.shape[0] == 8, name
        shards = kernel.addressable_shards
        assert len(shards) == 8
        assert {s.data.shape[0] for s in shards} == {1}, name
        assert len({s.index[0].start for s in shards}) == 8, name  # every device holds a different expert
        assert all(s.data.nbytes * 8 == kernel.nbytes for s in shards), name


def test_train_step_hlo_has_all_to_all(one_per_device):
    hlo = one_per_device.compiled.as_text()
    counts = {op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
              for op in ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")}
    print("\ncollectives in the compiled train step (8 experts, expert axis 8):", counts)
    assert counts["all-to-all"] >= 4  # dispatch + combine, forward and backward
    # No device gathers the expert weights (or their gradients): no all-gather of an [8, 32, 64] kernel.
    gathered = re.findall(r"= (f32\[[0-9,]+\])[^ ]* all-gather(?:-start)?\(", hlo)
    assert not [shape for shape in gathered if shape in ("f32[8,32,64]", "f32[8,64,32]")], gathered
    # Nothing else is all-gathered either: routing.small_top_k (argmax passes, not lax.top_k) and the
    # token-major combine both stay split along groups.
    assert counts["all-gather"] == 0, gathered


LAYOUTS = {
    "one_expert_per_device": (ONE_PER_DEVICE, 8),
    "two_experts_per_device": (MeshConfig(data=1, expert=8, model=1), 16),
    "experts_replicated_over_data": (MeshConfig(data=2, expert=4, model=1), 8),
    "expert_mlp_over_model": (MeshConfig(data=1, expert=4, model=2), 8),
}


def _assert_trees_close(actual, expected, what):
    flat_actual = jax.tree_util.tree_leaves_with_path(actual)
    flat_expected = jax.tree_util.tree_leaves(expected)
    assert len(flat_actual) == len(flat_expected)
    for (path, a), e in zip(flat_actual, flat_expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_single_device(layout, reference, one_per_device):
    mesh_cfg, num_experts = LAYOUTS[layout]
    if num_experts == 8:
        ref = reference
        sharded = one_per_device if mesh_cfg == ONE_PER_DEVICE else ss.get_setup(mesh_cfg, 8, None, reference)
    else:
        ref = ss.get_setup(MeshConfig(1, 1, 1), num_experts, 1)
        sharded = ss.get_setup(mesh_cfg, num_experts, None, ref)
    assert dict(sharded.mesh.shape) == dict(zip(("data", "expert", "model"), mesh_cfg.resolve(8)))

    batch = ss.make_batch()
    # Training mode at the same step: the random second-expert policy draws the same bits.
    expected = ref.run(partitioning.shard_batch(batch, ref.mesh))
    actual = sharded.run(partitioning.shard_batch(batch, sharded.mesh))

    loss, grads, params, _ = actual
    np.testing.assert_allclose(float(loss), float(expected[0]), rtol=1e-5, atol=1e-5)
    _assert_trees_close(grads, expected[1], "grad")  # no rescaling of any gradient
    # One Adam step from zero moments moves each weight by -lr * g / (|g| + eps): about lr * sign(g)
    # whatever |g|, so a gradient within float32 summation noise of zero (|g| ~ 1e-9, equal to 1e-5
    # above) may step by any amount in [-lr, lr]. Such weights are held to the step bound; all the
    # others to 1e-5.
    for (path, a), e, g in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(expected[2]),
                               jax.tree_util.tree_leaves(expected[1])):
        a, e, g = np.asarray(a), np.asarray(e), np.asarray(g)
        noisy = np.abs(g) < 1e-6
        np.testing.assert_allclose(a[~noisy], e[~noisy], rtol=1e-5, atol=1e-5,
                                   err_msg=f"params after one adam step {jax.tree_util.keystr(path)}")
        assert np.all(np.abs(a[noisy] - e[noisy]) <= 2 * ss.LEARNING_RATE + 1e-6), jax.tree_util.keystr(path)
    # The expert weights really are split as the layout says.
    _, expert_axis, model_axis = mesh_cfg.resolve(8)
    kernel = params["encoder"]["layers_1"]["ffn"]["moe"]["expert_wi_0"]
    assert kernel.addressable_shards[0].data.shape == (num_experts // expert_axis, 32, 64 // model_axis)
