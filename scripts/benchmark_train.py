"""Train-step throughput, model-FLOPs utilization and compile time.

The step is the one a training run executes (stmoe.steps.make_train_step: cross-entropy +
output z-loss + MoE balance and router z losses, gradient, update, the step's metrics), with
an optax AdamW update, jitted with its shardings on a mesh over all devices, the state donated;
the model comes from a configs/models.py preset.

- Throughput: tokens/s (encoder + decoder tokens) over --steps timed steps after warm-up,
  median step time, for `tiny` and `base_like` (st_moe_base widths: 768 / 2048 / 12x64,
  16 experts, top-2, every 4th FFN sparse; 4+4 layers, batch 16, inputs 128 / targets 32), and
  `base_like_dense`, its FLOP-matched dense model (no sparse layer, every FFN as wide as the
  MoE model's average active FFN width: 2560), in the same run: the MoE step over the dense one.
- MFU: model FLOPs per step / step time / a float32 matmul peak measured in the same
  process (best of 7 4096^3 matmuls, before and after the throughput runs). Model FLOPs =
  3 x forward matmul FLOPs of the useful work: projections, attention scores and values,
  dense FFNs, the expert rows the capacity lets run (min(top_k T, experts C) per group of T
  tokens), router and logits (stmoe/flops.py).
- Compile time: lower + compile of the train step for the tiny preset at 4, 12 and 24 layers
  per stack, with and without model.scan_layers.

    python scripts/benchmark_train.py --out /tmp/benchmark_train.json
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import models as presets
from stmoe import cli, partitioning, steps
from stmoe.config import LossConfig, ModelConfig
from stmoe.flops import train_step_flops
from stmoe.models import EncoderDecoder


def flop_matched_dense(cfg: ModelConfig) -> ModelConfig:
    """The dense model with the MoE model's active FFN FLOPs per token: no sparse layer, and every
    FFN as wide as the MoE model's FFNs are on average (a sparse layer counts top_k x d_ff, plus
    d_ff with sparse_dense); the router's d_model x experts is left out (under 1% here)."""
    layers = cfg.num_encoder_layers + cfg.num_decoder_layers
    widths = [(cfg.moe.top_k + cfg.sparse_dense) * cfg.d_ff if cfg.is_sparse(i) else cfg.d_ff
              for n in (cfg.num_encoder_layers, cfg.num_decoder_layers) for i in range(n)]
    return cfg.replace(d_ff=round(sum(widths) / layers), sparse_layers=()).validate()


def preset(name: str) -> tuple[ModelConfig, int, int, int]:
    """(config, batch, encoder length, decoder length); NAME_dense: its FLOP-matched dense model."""
    if name.endswith("_dense"):
        cfg, batch, enc_len, dec_len = preset(name[:-len("_dense")])
        return flop_matched_dense(cfg), batch, enc_len, dec_len
    if name == "tiny":
        return presets.model_config("tiny"), 8, 128, 32
    if name == "base_like":
        cfg = presets.model_config("st_moe_base").replace(num_encoder_layers=4, num_decoder_layers=4)
        return cfg.validate(), 16, 128, 32
    raise ValueError(name)


def setup(cfg: ModelConfig, batch: int, enc_len: int, dec_len: int):
    """-> (compiled-on-first-call train step, initial TrainState, sharded batch, mesh)."""
    rng = np.random.default_rng(0)
    targets = rng.integers(1, cfg.vocab_size, (batch, dec_len)).astype(np.int32)
    data = {"encoder_input_tokens": rng.integers(1, cfg.vocab_size, (batch, enc_len)).astype(np.int32),
            "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))), "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones((batch, dec_len), np.float32)}
    mesh = partitioning.make_mesh(partitioning.MeshConfig())  # data-parallel over every device
    model = EncoderDecoder(partitioning.resolve_model(cfg, mesh))  # as the trainer builds it
    shapes = {k: v.shape for k, v in data.items() if k != "decoder_loss_weights"}
    optimizer = optax.adamw(1e-3, weight_decay=0.01)
    layout = steps.state_layout(model, lambda _: optimizer, mesh, shapes, jax.random.key(0))
    step = steps.make_train_step(
        model, optimizer, mesh=mesh, state_shardings=layout.shardings, learning_rate_fn=lambda _: 1e-3,
        loss_cfg=LossConfig())  # the default objective: c_B, c_z and the output z-loss
    return step, layout.init(jax.random.key(0)), partitioning.shard_batch(data, mesh), mesh


def compile_step(step, state, data, mesh):
    with partitioning.activate(mesh):
        return step.lower(state, data).compile()


def matmul_peak(n: int = 4096, rounds: int = 7) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / float(np.min(times))  # the best rate: a conservative MFU on a shared machine


def throughput(name, num_steps, peak):
    cfg, batch, enc_len, dec_len = preset(name)
    step, state, data, mesh = setup(cfg, batch, enc_len, dec_len)
    start = time.perf_counter()
    compiled = compile_step(step, state, data, mesh)
    compile_s = time.perf_counter() - start
    for i in range(2):  # warm-up
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times = []
    for i in range(num_steps):
        start = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    loss = metrics["loss"]
    flops = train_step_flops(cfg, batch, enc_len, dec_len)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    return dict(preset=name, params=int(n_params), batch=batch, enc_len=enc_len, dec_len=dec_len,
                dispatch=cfg.moe.dispatch, step_s=step_s, tokens_per_s=batch * (enc_len + dec_len) / step_s,
                model_flops_per_step=flops, model_tflops_per_s=flops / step_s / 1e12, mfu=flops / step_s / peak,
                compile_s=compile_s, loss=float(loss))


def compile_time(layers: int, scan: bool):
    cfg, batch, enc_len, dec_len = preset("tiny")
    cfg = cfg.replace(num_encoder_layers=layers, num_decoder_layers=layers, scan_layers=scan).validate()
    step, state, data, mesh = setup(cfg, batch, enc_len, dec_len)
    start = time.perf_counter()
    compile_step(step, state, data, mesh)
    return dict(layers_per_stack=layers, scan_layers=scan, compile_s=time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base_like", "base_like_dense"],
                        help="NAME_dense: the FLOP-matched dense model of NAME (same active FLOPs per token)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="*", default=[4, 12, 24], help="none: skip compile times")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    peak = matmul_peak()
    rows = [throughput(name, args.steps, peak) for name in args.presets]
    peak = max(peak, matmul_peak())
    print(f"float32 matmul peak (4096^3, best of 7, before and after): {peak / 1e9:.1f} GFLOP/s", flush=True)
    for r in rows:
        r["mfu"] = r["model_flops_per_step"] / r["step_s"] / peak
        name = r["preset"]
        print(f"{name:10s} params {r['params'] / 1e6:7.1f}M  step {r['step_s'] * 1e3:8.1f} ms  "
              f"{r['tokens_per_s']:9.0f} tok/s  {r['model_tflops_per_s'] * 1e3:6.1f} GFLOP/s  MFU {r['mfu']:.1%}  "
              f"compile {r['compile_s']:.1f} s", flush=True)
    by_name = {r["preset"]: r for r in rows}
    for r in rows:
        dense = by_name.get(r["preset"] + "_dense")
        if dense:
            r["step_ratio_vs_flop_matched_dense"] = r["step_s"] / dense["step_s"]
            print(f"{r['preset']}: step {r['step_ratio_vs_flop_matched_dense']:.2f}x its FLOP-matched dense model's "
                  f"(d_ff {preset(dense['preset'])[0].d_ff}, no sparse layer)", flush=True)
    compiles = []
    for scan in (False, True):
        for layers in args.layers:
            compiles.append(compile_time(layers, scan))
            print(f"compile  layers/stack {layers:3d}  scan {scan!s:5s}  {compiles[-1]['compile_s']:6.1f} s",
                  flush=True)
    result = {"throughput": rows, "compile": compiles, "matmul_peak_flops": peak, "jax": jax.__version__,
              "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
              "cpu_count": os.cpu_count(), "steps": args.steps}
    cli.write_result(args.out, result)


if __name__ == "__main__":
    main()
