"""MoE health metrics: what the router is doing, per layer and averaged over layers.

`routing_metrics` is pure and runs inside the jitted step on one layer's
routing; every MoE layer sows its result into the 'moe' collection, and
`collect_layers` turns that collection into `{layer_name: metrics}` on the host
side or inside jit. Padding tokens count in none of them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from stmoe.routing import Routing

Array = jax.Array


def routing_metrics(routing: Routing, router_probs: Array, token_mask: Array) -> dict[str, Array]:
    """One layer's router health.

    router_probs: [groups, tokens, experts] float32; token_mask: [groups, tokens].
    - dropped_fraction_rank{r}: share of real tokens whose rank-r choice wanted a slot and got none
    - dropped_tokens: share of real tokens that reached no expert at all (only the residual carries them)
    - expert_counts: [experts] assignments each expert processed (summed over groups)
    - load_cv: coefficient of variation (std / mean) of expert_counts; 0 is perfect balance
    - router_entropy: mean entropy of the router distribution, nats (uniform over E is ln E)
    - router_confidence: mean probability of the top-1 expert
    """
    mask = token_mask.astype(jnp.float32)
    num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
    metrics: dict[str, Array] = {}
    dropped = routing.wanted & ~routing.kept  # [g, t, k]
    for rank in range(dropped.shape[-1]):
        metrics[f"dropped_fraction_rank{rank + 1}"] = jnp.sum(dropped[..., rank] * mask) / num_tokens
    reached_none = ~jnp.any(routing.kept, axis=-1)
    metrics["dropped_tokens"] = jnp.sum(reached_none * mask) / num_tokens

    counts = jnp.sum(routing.slot_token < token_mask.shape[1], axis=(0, 2)).astype(jnp.float32)  # [e]
    metrics["expert_counts"] = counts
    metrics["load_cv"] = jnp.std(counts) / jnp.maximum(jnp.mean(counts), 1e-9)

    probs = router_probs.astype(jnp.float32)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)  # [g, t]
    metrics["router_entropy"] = jnp.sum(entropy * mask) / num_tokens
    metrics["router_confidence"] = jnp.sum(jnp.max(probs, axis=-1) * mask) / num_tokens
    return metrics


def collect_layers(moe_collection: Mapping[str, Any]) -> dict[str, dict[str, Array]]:
    """{'encoder': {'layers_3': {'moe': {'stats': (dict,)}}}} -> {'encoder/layers_3': dict}.

    A layer scanned with nn.scan sows stacked values; they keep their leading layer axis.
    """
    layers: dict[str, dict[str, Array]] = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping) and "stats" in node:
            stats = node["stats"]
            stats = stats[0] if isinstance(stats, tuple) else stats
            name = "/".join(p for p in path if p != "moe")
            layers[name] = dict(stats)
            return
        if isinstance(node, Mapping):
            for key in sorted(node):
                visit(node[key], path + (str(key),))

    visit(moe_collection, ())
    return layers


_SCANNED = re.compile(r"^(?P<head>.*?)scan_(?P<interval>\d+)/layers_(?P<block>\d+)(?P<tail>(/.*)?)$")


def expand_scanned(layers: Mapping[str, Mapping[str, Array]]) -> dict[str, dict[str, Array]]:
    """Splits the leading layer axis of scanned layers into the unscanned per-layer names.

    models.py scans units of `interval` blocks under `{stack}/scan_{interval}/layers_{j}`; unit u's
    block j is layer u * interval + j, so 'encoder/scan_4/layers_3/ffn' with stacked values [3, ...]
    becomes 'encoder/layers_3/ffn', 'encoder/layers_7/ffn', 'encoder/layers_11/ffn'. Other names pass.
    """
    if not any(_SCANNED.match(name) for name in layers):
        return dict(layers)  # unscanned: names and order unchanged
    out: dict[str, dict[str, Array]] = {}
    for name, stats in layers.items():
        match = _SCANNED.match(name)
        if match is None:
            out[name] = dict(stats)
            continue
        interval, block = int(match["interval"]), int(match["block"])
        units = int(jnp.shape(next(iter(stats.values())))[0])
        for u in range(units):
            layer = f"{match['head']}layers_{u * interval + block}{match['tail']}"
            out[layer] = {key: value[u] for key, value in stats.items()}
    return dict(sorted(out.items(), key=lambda item: _natural_key(item[0])))


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def summarize(layers: Mapping[str, Mapping[str, Array]]) -> dict[str, Array]:
    """Flat scalar metrics: 'moe/{layer}/{name}' per layer and 'moe/{name}' averaged over layers.

    Vector metrics (expert_counts) are expanded per expert only per layer. Scanned layers
    (stacked values) are reported under their per-layer names (expand_scanned).
    """
    layers = expand_scanned(layers)
    flat: dict[str, Array] = {}
    by_name: dict[str, list[Array]] = {}
    for layer, stats in layers.items():
        for name, value in stats.items():
            value = jnp.asarray(value)
            if name == "expert_counts":
                for e in range(value.shape[-1]):
                    flat[f"moe/{layer}/expert_{e}_tokens"] = value[..., e]
                continue
            flat[f"moe/{layer}/{name}"] = value
            by_name.setdefault(name, []).append(jnp.mean(value))
    for name, values in by_name.items():
        flat[f"moe/{name}"] = jnp.mean(jnp.stack(values))
    return flat


def format_table(layers: Mapping[str, Mapping[str, Any]],
                 columns: tuple[str, ...] = ("dropped_fraction_rank1", "dropped_fraction_rank2",
                                             "load_cv", "router_entropy", "router_confidence")) -> str:
    """A plain-text routing report, one row per MoE layer."""
    layers = expand_scanned(layers)
    present = [c for c in columns if any(c in s for s in layers.values())]
    header = ["layer"] + present
    rows = [[layer] + [f"{float(np.mean(np.asarray(stats[c]))):.4f}" if c in stats else "-" for c in present]
            for layer, stats in layers.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(cell.ljust(w) for cell, w in zip(r, widths))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
