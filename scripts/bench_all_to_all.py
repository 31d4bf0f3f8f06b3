"""Expert parallelism: all-to-all from sharding constraints (GSPMD) vs shard_map + lax.all_to_all.

One MoE layer (gather dispatch, GEGLU experts, combine), forward + backward, on a
('data', 'expert', 'model') mesh. Prints and writes JSON: step time (median of
--iters) and the collectives in each compiled HLO, and checks both give the same
output and gradients. The numbers quoted in stmoe/partitioning.py come from:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python scripts/bench_all_to_all.py --out /tmp/all_to_all.json
"""
from __future__ import annotations

import argparse
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from stmoe import cli, partitioning, routing
from stmoe.layers import constrain, mlp_apply
from stmoe.dispatch import combine_gather, dispatch_gather

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


def experts(buf, wi0, wi1, wo):
    return mlp_apply(buf, [wi0, wi1], wo, "gelu", lambda h: h, buf.dtype, prefix="e")


def layer_constraints(x, slot_token, slot_weight, wi0, wi1, wo):
    """stmoe.moe.MoeLayer's route: constrain tokens and expert buffers, XLA inserts the all-to-all."""
    tokens = x.shape[1]
    x = constrain(x, ("batch", None, "embed"))
    buf = constrain(dispatch_gather(x, slot_token), ("expert", "expert_group", None, "embed"))
    out = constrain(experts(buf, wi0, wi1, wo), ("expert", "expert_group", None, "embed"))
    return constrain(combine_gather(out, slot_token, slot_weight, tokens), ("batch", None, "embed"))


def make_layer_shard_map(mesh):
    batch = P(partitioning.BATCH_AXES)

    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(batch, batch, batch, P("expert", None, "model"), P("expert", None, "model"),
                                 P("expert", "model", None)),
                       out_specs=batch)
    def layer(x, slot_token, slot_weight, wi0, wi1, wo):
        tokens = x.shape[1]
        buf = dispatch_gather(x, slot_token)  # [experts, local groups, capacity, d]
        # Send expert e's slots to the device holding e; receive every peer's groups.
        buf = jax.lax.all_to_all(buf, "expert", split_axis=0, concat_axis=1, tiled=True)
        out = jax.lax.psum(experts(buf, wi0, wi1, wo), "model")  # d_ff split over model
        out = jax.lax.all_to_all(out, "expert", split_axis=1, concat_axis=0, tiled=True)
        return combine_gather(out, slot_token, slot_weight, tokens)

    return layer


def count_collectives(hlo: str) -> dict[str, int]:
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in COLLECTIVES}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=int, default=1)
    parser.add_argument("--expert", type=int, default=8)
    parser.add_argument("--model", type=int, default=1)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--group_size", type=int, default=256)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--d_ff", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    mesh = partitioning.make_mesh(partitioning.MeshConfig(args.data, args.expert, args.model))
    e, g, t, d, f = args.experts, args.groups, args.group_size, args.d_model, args.d_ff
    capacity = routing.expert_capacity(t, e, 1.25)
    keys = jax.random.split(jax.random.key(0), 6)
    probs = jax.nn.softmax(jax.random.normal(keys[0], (g, t, e)), axis=-1)
    route = routing.tokens_choose_routing(probs, jnp.ones((g, t)), top_k=2, capacity=capacity)
    batch_sharding = partitioning.batch_sharding(mesh)
    shard = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
    x = jax.device_put(jax.random.normal(keys[1], (g, t, d)), batch_sharding)
    slot_token = jax.device_put(route.slot_token, batch_sharding)
    slot_weight = jax.device_put(route.slot_weight, batch_sharding)
    wi0 = shard(jax.random.normal(keys[2], (e, d, f)) * d ** -0.5, P("expert", None, "model"))
    wi1 = shard(jax.random.normal(keys[3], (e, d, f)) * d ** -0.5, P("expert", None, "model"))
    wo = shard(jax.random.normal(keys[4], (e, f, d)) * f ** -0.5, P("expert", "model", None))
    inputs = (x, slot_token, slot_weight, wi0, wi1, wo)

    def step_of(layer):
        def loss(x, st, sw, wi0, wi1, wo):
            return jnp.sum(jnp.square(layer(x, st, sw, wi0, wi1, wo)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 5)))

    results, values = {}, {}
    with partitioning.activate(mesh):
        for name, layer in (("constraints", layer_constraints), ("shard_map", make_layer_shard_map(mesh))):
            compiled = step_of(layer).lower(*inputs).compile()
            out = jax.block_until_ready(compiled(*inputs))
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*inputs))
                times.append(time.perf_counter() - start)
            values[name] = out
            results[name] = {"step_ms": 1e3 * float(np.median(times)),
                             "collectives": count_collectives(compiled.as_text())}
            print(f"{name:12s} {results[name]['step_ms']:8.2f} ms  {results[name]['collectives']}")
    a, b = values["constraints"], values["shard_map"]
    max_diff = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    print(f"max |constraints - shard_map| over loss and grads: {max_diff:.3g}")
    report = {"args": vars(args), "device": str(jax.devices()[0].platform), "devices": jax.device_count(),
              "results": results, "max_abs_diff": max_diff}
    cli.write_result(args.out, report)


if __name__ == "__main__":
    main()
