"""The trainer's sharded train step (stmoe.steps.make_train_step) on a tiny model with
optax.adam, for the partitioning tests, and the 2-process worker.

The step is the one a run executes (same factory, same shardings); the tests ask it for
the gradients too. tests/test_partitioning.py imports it;
tests/test_multiprocess.py runs it as a script in two processes:

    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
        python tests/sharded_step.py OUT.json
"""
from __future__ import annotations

import functools
import json
import os
import sys

if __name__ == "__main__":  # before JAX is imported: 4 simulated CPU devices per process
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from stmoe import partitioning, steps  # noqa: E402
from stmoe.config import LossConfig, ModelConfig, MoeConfig  # noqa: E402
from stmoe.models import EncoderDecoder  # noqa: E402

BATCH, LENGTH = 16, 16
LEARNING_RATE = 1e-3
SEED = 1


def tiny_config(num_experts: int = 8) -> ModelConfig:
    """d_model 32, 2+2 layers with sparse_interval 2 (one MoE layer per stack), GEGLU, top-2 random
    policy (the training path), one routing group per sequence (group_size = length)."""
    return ModelConfig(vocab_size=128, d_model=32, d_ff=64, num_heads=2, d_kv=16, num_encoder_layers=2,
                       num_decoder_layers=2, sparse_interval=2,
                       moe=MoeConfig(num_experts=num_experts, group_size=LENGTH)).validate()


def make_batch(seed: int = 0, batch: int = BATCH, length: int = LENGTH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, 128, (batch, length)).astype(np.int32)
    targets[:, -3:] = 0  # some padding: it must not be routed nor counted, on any layout
    inputs = rng.integers(1, 128, (batch, length)).astype(np.int32)
    inputs[::3, -5:] = 0
    decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
            "decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.float32)}


def input_shapes() -> dict[str, tuple[int, ...]]:
    """The model's inputs (make_batch less the loss weights) -> shapes."""
    return {name: value.shape for name, value in make_batch().items() if name != "decoder_loss_weights"}


class Setup:
    """Mesh, sharded params and optimizer state, and the compiled step for one layout.

    `init_from`: copy another Setup's initial state into this layout's shardings instead
    of compiling a sharded init again (tests only: it saves a compile; the layout under
    test with init_from=None proves the sharded init gives the same values).
    """

    def __init__(self, mesh_cfg: partitioning.MeshConfig, num_experts: int = 8, devices=None,
                 init_from: "Setup | None" = None):
        self.cfg = tiny_config(num_experts)
        devices = jax.devices() if devices is None else devices
        partitioning.validate_layout(mesh_cfg, self.cfg, BATCH, len(devices), (LENGTH,))
        self.mesh = partitioning.make_mesh(mesh_cfg, devices)
        self.model = EncoderDecoder(partitioning.resolve_model(self.cfg, self.mesh))  # as the trainer builds it
        self.optimizer = optax.adam(LEARNING_RATE)
        shapes = input_shapes()
        layout = steps.state_layout(self.model, lambda _: self.optimizer, self.mesh, shapes, jax.random.key(0))
        self.param_shardings, self.opt_shardings = layout.shardings.params, layout.shardings.opt_state
        if init_from is None:
            self.params, _ = partitioning.init_params(self.model, self.mesh, shapes, jax.random.key(0))
            self.opt_state = partitioning.init_sharded(self.optimizer.init, self.mesh, self.opt_shardings,
                                                       self.params)
        else:
            self.params = jax.device_put(init_from.params, self.param_shardings)
            self.opt_state = jax.device_put(init_from.opt_state, self.opt_shardings)
        # The trainer's step: the default c_B and c_z, no output z-loss, dropout / routing rng
        # fold_in(key(seed), step); the state is not donated (every layout starts from self.params).
        self.step = steps.make_train_step(
            self.model, self.optimizer, mesh=self.mesh, state_shardings=layout.shardings,
            learning_rate_fn=lambda _: LEARNING_RATE, loss_cfg=LossConfig(output_z_coef=0.0), seed=SEED,
            donate=False, return_grads=True)
        self._compiled = None

    @property
    def compiled(self):
        """The step, lowered and compiled once (calling self.step would compile it again)."""
        if self._compiled is None:
            sharding = partitioning.batch_sharding(self.mesh)
            batch = {name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
                     for name, value in make_batch().items()}
            with partitioning.activate(self.mesh):
                self._compiled = self.step.lower(self.state(), batch).compile()
        return self._compiled

    def state(self, step: int = 0, params=None, opt_state=None) -> steps.TrainState:
        return steps.TrainState(step=jax.device_put(np.int32(step), partitioning.replicated(self.mesh)),
                                params=self.params if params is None else params,
                                opt_state=self.opt_state if opt_state is None else opt_state)

    def run(self, batch, step: int = 0, params=None, opt_state=None):
        """One train step from (params, opt_state) (default: the initial ones) at `step` (its rng is
        fold_in(key(SEED), step)) -> (loss, grads, new params, new opt_state)."""
        state, metrics, grads = self.compiled(self.state(step, params, opt_state), batch)
        return metrics["loss"], grads, state.params, state.opt_state


@functools.cache
def get_setup(mesh_cfg: partitioning.MeshConfig, num_experts: int = 8, num_devices: int | None = None,
              init_from: Setup | None = None) -> Setup:
    """One Setup per layout per test session (shared by test modules: one compile each)."""
    devices = jax.devices() if num_devices is None else jax.devices()[:num_devices]
    return Setup(mesh_cfg, num_experts, devices, init_from)


def run_steps(setup: Setup, steps: int, local_rows: slice | None = None) -> list[float]:
    """`steps` train steps from the setup's initial state on make_batch(seed=step); each process
    feeds `local_rows` of the global batch."""
    history = []
    params, opt_state = setup.params, setup.opt_state
    for step in range(steps):
        batch = make_batch(seed=step)
        if local_rows is not None:
            batch = {name: value[local_rows] for name, value in batch.items()}
        batch = partitioning.shard_batch(batch, setup.mesh)
        loss, _, params, opt_state = setup.run(batch, step, params, opt_state)
        history.append(float(loss))
    return history


MULTIPROCESS_MESH = partitioning.MeshConfig(data=1, expert=8, model=1)  # the expert axis spans both processes
MULTIPROCESS_STEPS = 3


def main(out_path: str) -> None:
    index, count = partitioning.maybe_initialize_distributed()
    shard, num_shards = partitioning.data_shard_info()
    rows = BATCH // num_shards
    setup = Setup(MULTIPROCESS_MESH)
    history = run_steps(setup, MULTIPROCESS_STEPS, slice(shard * rows, (shard + 1) * rows))
    with open(out_path, "w") as f:
        json.dump({"process_index": index, "process_count": count, "local_devices": jax.local_device_count(),
                   "devices": jax.device_count(), "losses": history}, f)


if __name__ == "__main__":
    main(sys.argv[1])
