"""The small training run of tests/test_faults.py, and workers that inject a fault into it.

tests/test_faults.py imports `OVERRIDES` / `tiny_config()` / `flags()`; as a script this module runs
one of three faults (JAX_CACHE_DIR: the test's persistent compilation cache, "" for none):

    python tests/fault_worker.py kill_in_save WORKDIR KILL_STEP MARKER JAX_CACHE_DIR
        trains the config and stops inside the asynchronous save of step KILL_STEP: the step's files
        are all written into orbax's temporary directory, and the rename that would complete the save
        blocks. It then writes MARKER and prints a SAVING line, so the parent can send SIGKILL
        while that save is in flight.
    python tests/fault_worker.py signal SIGINT|SIGTERM STEP JAX_CACHE_DIR TRAIN_PY_ARGS...
        scripts/train.py with TRAIN_PY_ARGS, the process sending itself the signal right after STEP
        (a trainer hook: deterministic, no timing); exits with train.py's status.
    python tests/fault_worker.py infinite_lr STEP JAX_CACHE_DIR TRAIN_PY_ARGS...
        scripts/train.py whose learning rate is +inf from optimizer step STEP on (0-based, so the
        update of step STEP + 1 on): the gradients stay finite, the new params would not be.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as in tests/conftest.py, before JAX is imported: same devices, same numbers
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 6  # checkpoints at 2, 4, 6
SAVING = "fault_worker: inside the save of step"  # printed when the save to be killed has written everything
INPUTS = 32
BATCH = 16

# --config.FIELD=VALUE overrides of configs/pretrain.py:tiny: d_model 32, 2+2 layers, 4 experts (one
# MoE layer per stack), 16 sequences of 32 / 12 tokens, dropout on (its rngs must be reproduced).
OVERRIDES = {
    "model.d_model": 32, "model.d_ff": 64, "model.num_heads": 2, "model.d_kv": 16,
    "model.num_encoder_layers": 2, "model.num_decoder_layers": 2, "model.moe.num_experts": 4,
    "model.dropout_rate": 0.1, "mesh.expert": 4, "data.inputs_length": INPUTS, "data.targets_length": 12,
    "batch_size": BATCH, "total_steps": STEPS, "checkpoint_every_steps": 2, "keep_checkpoints": 5,
    "eval_steps": 0, "log_every_steps": 2, "optim.warmup_steps": 100,
}


def tiny_config(**changes):
    """configs/pretrain.py:tiny with OVERRIDES and then `changes` (dotted names as '__': mesh__expert)."""
    from configs import pretrain
    from stmoe.config import set_field
    config = pretrain.get_config("tiny")
    for name, value in {**OVERRIDES, **{k.replace("__", "."): v for k, v in changes.items()}}.items():
        set_field(config, name, value)
    return config


def flags(**changes) -> list[str]:
    """The same config as scripts/train.py flags."""
    values = {**OVERRIDES, **{k.replace("__", "."): v for k, v in changes.items()}}
    return ["--config", "configs/pretrain.py:tiny"] + [f"--config.{k}={v}" for k, v in values.items()]


def _start(cache_dir: str) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    if cache_dir:  # the test's persistent compilation cache: the same program is not compiled twice
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _train_py(args: list[str]) -> int:
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train.py")
    spec = importlib.util.spec_from_file_location("train_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main(["train.py", *args])


def kill_in_save(workdir: str, kill_step: int, marker: str, cache_dir: str) -> None:
    import asyncio

    from orbax.checkpoint._src.path import atomicity

    _start(cache_dir)
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_hang(self):
        if self.get_final().name == str(kill_step):  # everything written, the rename not yet done
            with open(marker, "w") as f:
                f.write(str(self.get()))
            print(f"{SAVING} {kill_step}", flush=True)  # the parent blocks on this line
            await asyncio.Event().wait()  # never set: the rename never happens
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_hang
    from stmoe import trainer
    trainer.train_and_evaluate(tiny_config(), workdir)


def send_signal_after(signame: str, step: int, cache_dir: str, args: list[str]) -> int:
    import signal

    _start(cache_dir)
    from stmoe import trainer
    train_and_evaluate = trainer.train_and_evaluate

    def signal_at(done, state):
        del state
        if done == step:
            os.kill(os.getpid(), getattr(signal, signame))

    trainer.train_and_evaluate = lambda config, workdir, hooks=(): train_and_evaluate(
        config, workdir, hooks=[*hooks, signal_at])
    return _train_py(args)


def infinite_lr_from(step: int, cache_dir: str, args: list[str]) -> int:
    import jax.numpy as jnp

    _start(cache_dir)
    from stmoe import optim
    schedule = optim.learning_rate_schedule  # the optimizer and the step's metrics both call it

    def infinite_from_step(cfg):
        lr = schedule(cfg)
        return lambda count: jnp.where(count >= step, jnp.inf, lr(count))

    optim.learning_rate_schedule = infinite_from_step
    return _train_py(args)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "kill_in_save":
        kill_in_save(rest[0], int(rest[1]), rest[2], rest[3])
    elif mode == "signal":
        sys.exit(send_signal_after(rest[0], int(rest[1]), rest[2], rest[3:]))
    elif mode == "infinite_lr":
        sys.exit(infinite_lr_from(int(rest[0]), rest[1], rest[2:]))
    else:
        sys.exit(f"fault_worker.py: unknown mode {mode!r}")
