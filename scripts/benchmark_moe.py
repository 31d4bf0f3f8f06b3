"""MoE layer vs the FLOP-matched dense FFN: forward and forward+backward time, peak memory.

For T tokens in groups of 2048, d_model 512, expert d_ff 2048 (GEGLU), top-2 (deterministic
second expert), capacity ceil(1.25 * k * group / E) per expert and group, it times the whole
`stmoe.moe.MoeLayer` (router + routing + dispatch + experts + combine + metrics and losses)
for each dispatch, and the dense T5 FFN with the same useful FLOPs: the faster of 2T tokens
through d_ff and T tokens through 2 * d_ff. All in one process: compile and warm up every
function, then interleaved rounds (each round times every function once), median over rounds.

The backward pass is timed with `value_and_grad` of mean(out ** 2) (+ the MoE aux losses),
which needs the output values: a loss linear in the output lets XLA drop a dense matmul.

Peak memory: device memory stats where the backend has them (GPU/TPU: peak_bytes_in_use
around one call); otherwise (CPU) XLA's compiled memory analysis, temp + argument + output
bytes of the jitted forward+backward. `act_bytes` leaves out the parameters (arguments) and
their gradients (outputs), i.e. activations and workspace only.

One decoding step (`--decode B ...`): B sequences of one new token each, i.e. B routing groups of one
token, the MoE layer as cached decoding runs it (eval mode: the grouped path, k experts per token,
no capacity slots), against the dense FFN of the same active width (k * d_ff) on the same B tokens.
Forward only; per generated token the two cost what one call costs / B.

    python scripts/benchmark_moe.py --out /tmp/benchmark_moe.json            # full table (~10 min, 2 cores)
    python scripts/benchmark_moe.py --tokens 2048 --experts 8 --rounds 3     # quick look
    python scripts/benchmark_moe.py --decode 1 8 64 --experts 8 32 --out /tmp/benchmark_moe_decode.json
"""
from __future__ import annotations

import argparse
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stmoe import cli
from stmoe.config import ModelConfig, MoeConfig
from stmoe.dispatch import resolve_model
from stmoe.layers import Mlp
from stmoe.metrics import collect_layers
from stmoe.moe import MoeLayer

GROUP, D_MODEL, D_FF, TOP_K, CF = 2048, 512, 2048, 2, 1.25


def moe_config(num_experts: int, impl: str, dtype: str = "float32") -> ModelConfig:
    capacity = math.ceil(CF * TOP_K * GROUP / num_experts)
    moe = MoeConfig(num_experts=num_experts, top_k=TOP_K, second_expert_policy="all", expert_capacity=capacity,
                    dispatch=impl)
    # Resolved as a run's model is (per backend, one device).
    return resolve_model(ModelConfig(d_model=D_MODEL, d_ff=D_FF, num_decoder_layers=0, dtype=dtype, moe=moe).validate())


def make_moe(tokens: int, num_experts: int, impl: str, key, dtype: str = "float32"):
    layer = MoeLayer(moe_config(num_experts, impl, dtype))
    x = jax.random.normal(key, (tokens // GROUP, GROUP, D_MODEL), jnp.float32)
    mask = jnp.ones(x.shape[:2], jnp.float32)
    params = nn.meta.unbox(layer.init({"params": jax.random.key(0)}, x, mask)["params"])

    def forward(params, x):
        out, state = layer.apply({"params": params}, x, mask, mutable=["moe"])
        stats = collect_layers(state["moe"])[""]
        return out, stats.aux_loss + stats.router_z_loss

    def loss(params, x):
        out, aux = forward(params, x)
        return jnp.mean(jnp.square(out)) + 1e-2 * aux

    return forward, loss, params, x


def make_dense(tokens: int, d_ff: int, key, dtype: str = "float32"):
    mlp = Mlp(d_ff, dtype=jnp.dtype(dtype))
    x = jax.random.normal(key, (tokens // GROUP, GROUP, D_MODEL), jnp.float32)
    params = nn.meta.unbox(mlp.init({"params": jax.random.key(0)}, x)["params"])
    forward = lambda params, x: mlp.apply({"params": params}, x)
    loss = lambda params, x: jnp.mean(jnp.square(forward(params, x)))
    return forward, loss, params, x


class Timed:
    """A jitted forward and forward+backward, compiled once, with their peak memory."""

    def __init__(self, name, forward, loss, params, x):
        self.name, self.args = name, (params, x)
        self.fwd = jax.jit(forward)
        self.fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        self.times = {"fwd": [], "fwd_bwd": []}
        compiled = self.fwd_bwd.lower(*self.args).compile()
        mem = compiled.memory_analysis()
        param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree_util.tree_leaves(params))
        self.peak_source = "compiled memory_analysis (temp + argument + output bytes of fwd+bwd)"
        self.peak_bytes = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
        self.act_bytes = self.peak_bytes - 2 * param_bytes
        self.param_bytes = param_bytes
        for fn in (self.fwd, self.fwd_bwd):  # warm-up
            jax.block_until_ready(fn(*self.args))
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:  # GPU/TPU: the allocator's high-water mark (after both calls)
            self.peak_source = "device memory_stats peak_bytes_in_use (process high-water mark)"
            self.peak_bytes = int(stats["peak_bytes_in_use"])

    def round(self):
        for kind, fn in (("fwd", self.fwd), ("fwd_bwd", self.fwd_bwd)):
            start = time.perf_counter()
            jax.block_until_ready(fn(*self.args))
            self.times[kind].append(time.perf_counter() - start)

    def median(self, kind):
        return float(np.median(self.times[kind]))


def run_shape(tokens, num_experts, impls, rounds, dense_cache, dtype="float32"):
    key = jax.random.key(tokens)
    timed = [Timed(impl, *make_moe(tokens, num_experts, impl, key, dtype)) for impl in impls]
    if tokens not in dense_cache:  # the FLOP-matched dense FFN does not depend on E
        dense_cache[tokens] = [Timed("dense_2T", *make_dense(2 * tokens, D_FF, key, dtype)),
                               Timed("dense_2dff", *make_dense(tokens, 2 * D_FF, key, dtype))]
    dense = dense_cache[tokens]
    for _ in range(rounds):
        for t in timed + dense:
            t.round()
    fastest = {kind: min(dense, key=lambda d: d.median(kind)) for kind in ("fwd", "fwd_bwd")}
    rows = [dict(impl="dense", T=tokens, E=num_experts, fwd_s=fastest["fwd"].median("fwd"),
                 fwd_bwd_s=fastest["fwd_bwd"].median("fwd_bwd"), fwd_ratio_vs_dense=1.0,
                 fwd_bwd_ratio_vs_dense=1.0, peak_bytes=min(d.peak_bytes for d in dense),
                 act_bytes=min(d.act_bytes for d in dense),
                 dense_variant={k: v.name for k, v in fastest.items()},
                 dense_all={d.name: dict(fwd_s=d.median("fwd"), fwd_bwd_s=d.median("fwd_bwd"),
                                         peak_bytes=d.peak_bytes) for d in dense})]
    for t in timed:
        rows.append(dict(impl=t.name, T=tokens, E=num_experts, fwd_s=t.median("fwd"),
                         fwd_bwd_s=t.median("fwd_bwd"),
                         fwd_ratio_vs_dense=t.median("fwd") / rows[0]["fwd_s"],
                         fwd_bwd_ratio_vs_dense=t.median("fwd_bwd") / rows[0]["fwd_bwd_s"],
                         peak_bytes=t.peak_bytes, act_bytes=t.act_bytes,
                         peak_ratio_vs_dense=t.peak_bytes / rows[0]["peak_bytes"],
                         act_ratio_vs_dense=t.act_bytes / rows[0]["act_bytes"],
                         capacity=math.ceil(CF * TOP_K * GROUP / num_experts)))
    for t in timed + dense:
        t.times = {"fwd": [], "fwd_bwd": []}
    return rows, timed[0].peak_source if timed else dense[0].peak_source


def time_decode(batch: int, num_experts: int, rounds: int, dtype: str = "float32") -> dict:
    """One cached-decoding step's MoE layer (B groups of one token) vs the dense FFN of width k * d_ff."""
    key = jax.random.key(batch)
    x = jax.random.normal(key, (batch, 1, D_MODEL), jnp.float32)
    mask = jnp.ones(x.shape[:2], jnp.float32)
    layer = MoeLayer(resolve_model(ModelConfig(d_model=D_MODEL, d_ff=D_FF, num_decoder_layers=0, dtype=dtype, moe=MoeConfig(
        num_experts=num_experts, top_k=TOP_K, second_expert_policy="all")).validate()))
    moe_params = nn.meta.unbox(layer.init({"params": jax.random.key(0)}, x, mask)["params"])
    mlp = Mlp(TOP_K * D_FF, dtype=jnp.dtype(dtype))
    mlp_params = nn.meta.unbox(mlp.init({"params": jax.random.key(0)}, x)["params"])
    moe_step = jax.jit(lambda p, x: layer.apply({"params": p}, x, mask, mutable=["moe"])[0])
    dense_step = jax.jit(lambda p, x: mlp.apply({"params": p}, x))
    calls = {"moe": (moe_step, moe_params), "dense": (dense_step, mlp_params)}
    times = {name: [] for name in calls}
    for fn, params in calls.values():
        jax.block_until_ready(fn(params, x))
    for _ in range(rounds):
        for name, (fn, params) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            times[name].append(time.perf_counter() - start)
    moe_s, dense_s = float(np.median(times["moe"])), float(np.median(times["dense"]))
    return dict(batch=batch, E=num_experts, top_k=TOP_K, moe_ms=moe_s * 1e3, dense_ms=dense_s * 1e3,
                moe_vs_dense=moe_s / dense_s, moe_us_per_token=moe_s * 1e6 / batch,
                distinct_experts_at_most=min(num_experts, TOP_K * batch))


def format_decode(rows):
    lines = ["| B (tokens) | E | MoE ms | dense (k x d_ff) ms | MoE / dense | MoE us per token |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['E']} | {r['moe_ms']:.2f} | {r['dense_ms']:.2f} | {r['moe_vs_dense']:.2f} | "
              f"{r['moe_us_per_token']:.0f} |" for r in rows]
    return "\n".join(lines)


def format_table(rows):
    header = ("impl", "T", "E", "fwd ms", "x dense", "fwd+bwd ms", "x dense", "peak MiB", "act MiB")
    lines = [header]
    for r in rows:
        lines.append((r["impl"], str(r["T"]), str(r["E"]), f"{r['fwd_s'] * 1e3:.1f}", f"{r['fwd_ratio_vs_dense']:.2f}",
                      f"{r['fwd_bwd_s'] * 1e3:.1f}", f"{r['fwd_bwd_ratio_vs_dense']:.2f}",
                      f"{r['peak_bytes'] / 2**20:.0f}", f"{r['act_bytes'] / 2**20:.0f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--impls", nargs="+", default=["einsum", "gather", "dropless"],
                        help="dispatch implementations (dropless: tiled grouped MLP on CPU, ragged_dot elsewhere)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="activations and experts (bfloat16 on GPU/TPU); parameters and router stay float32")
    parser.add_argument("--decode", type=int, nargs="+", default=None, metavar="B",
                        help="time one decoding step of B sequences instead (forward only; see the docstring)")
    parser.add_argument("--out", default=None, help="write JSON here")
    args = parser.parse_args()
    for name in ("tokens", "experts", "decode"):
        if any(v < 1 for v in getattr(args, name) or ()):
            parser.error(f"--{name} values must be >= 1")
    backend = jax.default_backend()
    if args.decode:
        load_before = os.getloadavg()
        rows = [time_decode(b, e, args.rounds, args.dtype) for b in args.decode for e in args.experts]
        print(format_decode(rows))
        print(f"load average (1, 5, 15 min): before {load_before}, after {os.getloadavg()}")
        cli.write_result(args.out, {"decode_rows": rows, "jax": jax.__version__, "backend": backend,
                                    "setup": dict(d_model=D_MODEL, d_ff=D_FF, top_k=TOP_K, mlp="GEGLU",
                                                  dtype=args.dtype, rounds=args.rounds, cpu_count=os.cpu_count()),
                                    "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()}})
        return
    impls = args.impls
    rows, dense_cache, source = [], {}, None
    load_before = os.getloadavg()
    for tokens in args.tokens:
        for num_experts in args.experts:
            shape_rows, source = run_shape(tokens, num_experts, impls, args.rounds, dense_cache, args.dtype)
            rows += shape_rows
            print(format_table(shape_rows), flush=True)
    print()
    print(format_table(rows))
    print(f"load average (1, 5, 15 min): before {load_before}, after {os.getloadavg()}")
    result = {"rows": rows, "jax": jax.__version__, "backend": backend, "device": str(jax.devices()[0].device_kind),
              "peak_memory_source": source, "rounds": args.rounds,
              "grouped_kernel": resolve_model(ModelConfig()).moe.grouped_kernel,
              "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
              "setup": dict(group=GROUP, d_model=D_MODEL, d_ff=D_FF, top_k=TOP_K, capacity_factor=CF,
                            capacity="ceil(cf * k * group / E)", mlp="GEGLU", dtype=args.dtype,
                            loss="value_and_grad(mean(out**2) [+ 1e-2 * (aux + z)]) wrt params and inputs",
                            cpu_count=os.cpu_count())}
    cli.write_result(args.out, result)


if __name__ == "__main__":
    main()
