"""The small training run of tests/test_faults.py, and a worker that is killed in the middle of a save.

tests/test_faults.py imports `OVERRIDES` / `tiny_config()`; as a script this module trains that
config and stops inside the asynchronous save of step KILL_STEP: the step's files are all written
into orbax's temporary directory, and the rename that would complete the save blocks. It then
writes MARKER and prints a SAVING line, so the parent can send SIGKILL while that save is in flight:

    python tests/fault_worker.py WORKDIR KILL_STEP MARKER [JAX_CACHE_DIR]
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
    config = pretrain.get_config("tiny")
    for name, value in {**OVERRIDES, **{k.replace("__", "."): v for k, v in changes.items()}}.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def flags(**changes) -> list[str]:
    """The same config as scripts/train.py flags."""
    values = {**OVERRIDES, **{k.replace("__", "."): v for k, v in changes.items()}}
    return ["--config", "configs/pretrain.py:tiny"] + [f"--config.{k}={v}" for k, v in values.items()]


def main(workdir: str, kill_step: int, marker: str, cache_dir: str | None = None) -> None:
    import asyncio

    import jax
    from orbax.checkpoint._src.path import atomicity

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    if cache_dir:  # the test's persistent compilation cache: the same program is not compiled twice
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
