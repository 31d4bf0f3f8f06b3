"""A minimal sharded train step for the partitioning tests, and the 2-process worker.

Not a trainer: value_and_grad of losses.total_loss + one optax.adam update, jitted
with the shardings from stmoe.partitioning. tests/test_partitioning.py imports it;
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

from stmoe import losses, partitioning  # noqa: E402
from stmoe.config import ModelConfig, MoeConfig  # noqa: E402
from stmoe.models import EncoderDecoder  # noqa: E402

BATCH, LENGTH = 16, 16
LEARNING_RATE = 1e-3


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
            "decoder_target_tokens": targets}


def train_step(params, opt_state, batch, rng, *, model, optimizer, cfg):
    """Returns (loss, grads, new params, new opt_state)."""

    def loss_fn(p):
        logits, state = model.apply({"params": p}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                    batch["decoder_target_tokens"], enable_dropout=True,
                                    rngs={"dropout": rng}, mutable=["moe"])
        ce = losses.cross_entropy_sums(logits, batch["decoder_target_tokens"])
        return losses.total_loss(ce, losses.moe_losses(state["moe"]), cfg.moe.aux_loss_coef,
                                 cfg.moe.z_loss_coef)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return loss, grads, optax.apply_updates(params, updates), opt_state


class Setup:
    """Mesh, sharded params and optimizer state, and the jitted step for one layout."""

    def __init__(self, mesh_cfg: partitioning.MeshConfig, num_experts: int = 8, devices=None):
        self.cfg = tiny_config(num_experts)
        devices = jax.devices() if devices is None else devices
        partitioning.validate_layout(mesh_cfg, self.cfg, BATCH, len(devices), (LENGTH,))
        self.mesh = partitioning.make_mesh(mesh_cfg, devices)
        self.model = EncoderDecoder(self.cfg)
        shapes = {name: value.shape for name, value in make_batch().items()}
        self.params, self.param_shardings = partitioning.init_params(self.model, self.mesh, shapes,
                                                                     jax.random.key(0))
        self.optimizer = optax.adam(LEARNING_RATE)
        self.opt_shardings = partitioning.opt_state_shardings(self.optimizer, self.params,
                                                              self.param_shardings, self.mesh)
        self.opt_state = partitioning.init_sharded(self.optimizer.init, self.mesh, self.opt_shardings,
                                                   self.params)
        replicated = partitioning.replicated(self.mesh)
        step = functools.partial(train_step, model=self.model, optimizer=self.optimizer, cfg=self.cfg)
        self.step = jax.jit(
            step,
            in_shardings=(self.param_shardings, self.opt_shardings, partitioning.batch_sharding(self.mesh),
                          replicated),
            out_shardings=(replicated, self.param_shardings, self.param_shardings, self.opt_shardings))

    def compile(self, batch):
        with partitioning.activate(self.mesh):
            return self.step.lower(self.params, self.opt_state, batch, jax.random.key(1)).compile()

    def run(self, batch, rng):
        with partitioning.activate(self.mesh):
            return self.step(self.params, self.opt_state, batch, rng)


def run_steps(setup: Setup, steps: int, local_rows: slice | None = None) -> list[float]:
    """`steps` train steps on make_batch(seed=step); each process feeds `local_rows` of it."""
    history = []
    for step in range(steps):
        batch = make_batch(seed=step)
        if local_rows is not None:
            batch = {name: value[local_rows] for name, value in batch.items()}
        batch = partitioning.shard_batch(batch, setup.mesh)
        loss, _, setup.params, setup.opt_state = setup.run(batch, jax.random.fold_in(jax.random.key(1), step))
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
