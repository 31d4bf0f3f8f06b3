"""What every MoE layer reports, and its logged names: per layer and averaged over layers.

Every MoE layer sows one typed `RouterStats` into the 'moe' collection: its raw (unweighted)
loss terms and its router health (`router_stats`, pure, inside the jitted step).
`collect_layers` turns that collection into `{layer_name: RouterStats}` on the host side or
inside jit; losses.py weighs the loss terms, `summarize` names everything for the logs, once.
Padding tokens count in none of them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from stmoe.routing import Routing

Array = jax.Array

# The loss terms among the fields: logged per layer here, and (averaged over layers, weighted) by losses.py.
LOSS_FIELDS = ("aux_loss", "router_z_loss")


@flax.struct.dataclass
class RouterStats:
    """One MoE layer's report (sown into the 'moe' collection). Scalars are [] (scanned layers: [units]).

    - aux_loss: the balance loss L_B, unweighted (routing.auxiliary_loss; 0 for expert choice)
    - router_z_loss: the router z-loss L_z, unweighted (routing.router_z_loss)
    - dropped_fraction: [k] share of real tokens whose rank-r choice wanted a slot and got none
    - dropped_tokens: share of real tokens that reached no expert at all (only the residual carries them)
    - expert_counts: [experts] real tokens' assignments each expert processed (summed over groups)
    - load_cv: coefficient of variation (std / mean) of expert_counts; 0 is perfect balance
    - router_entropy: mean entropy of the router distribution, nats (uniform over E is ln E)
    - router_confidence: mean probability of the top-1 expert
    """

    aux_loss: Array
    router_z_loss: Array
    dropped_fraction: Array
    dropped_tokens: Array
    expert_counts: Array
    load_cv: Array
    router_entropy: Array
    router_confidence: Array

    def as_dict(self) -> dict[str, Array]:
        """The logged names: dropped_fraction_rank{r} (r from 1), expert_counts, and the other fields."""
        ranks = self.dropped_fraction.shape[-1]
        out = {f"dropped_fraction_rank{r + 1}": self.dropped_fraction[..., r] for r in range(ranks)}
        out.update(dropped_tokens=self.dropped_tokens, expert_counts=self.expert_counts, load_cv=self.load_cv,
                   router_entropy=self.router_entropy, router_confidence=self.router_confidence,
                   aux_loss=self.aux_loss, router_z_loss=self.router_z_loss)
        return out


def router_stats(routing: Routing, router_probs: Array, token_mask: Array, *, aux_loss: Array,
                 router_z_loss: Array) -> RouterStats:
    """One layer's RouterStats from its routing decisions and its two loss terms.

    router_probs: [groups, tokens, experts] float32; token_mask: [groups, tokens], 1 for the real
    tokens, which alone are counted: padding that was routed (moe.route_padding) may fill slots and
    be dropped, but it is in none of the shares and counts.
    """
    mask = token_mask.astype(jnp.float32)
    num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
    dropped = routing.wanted & ~routing.kept  # [g, t, k]
    dropped_fraction = jnp.sum(dropped * mask[..., None], axis=(0, 1)) / num_tokens  # [k]
    reached_none = ~jnp.any(routing.kept, axis=-1)
    # Whether each slot holds a real token: an empty slot (index `tokens`) reads the appended 0.
    real_in_slot = jax.vmap(lambda m, idx: m[idx])(jnp.pad(mask, ((0, 0), (0, 1))), routing.slot_token)  # [g, e, c]
    counts = jnp.sum(real_in_slot, axis=(0, 2))  # [e]
    probs = router_probs.astype(jnp.float32)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)  # [g, t]
    return RouterStats(
        aux_loss=aux_loss, router_z_loss=router_z_loss, dropped_fraction=dropped_fraction,
        dropped_tokens=jnp.sum(reached_none * mask) / num_tokens, expert_counts=counts,
        load_cv=jnp.std(counts) / jnp.maximum(jnp.mean(counts), 1e-9),
        router_entropy=jnp.sum(entropy * mask) / num_tokens,
        router_confidence=jnp.sum(jnp.max(probs, axis=-1) * mask) / num_tokens)


def collect_layers(moe_collection: Mapping[str, Any]) -> dict[str, RouterStats]:
    """{'encoder': {'layers_3': {'moe': {'stats': (RouterStats,)}}}} -> {'encoder/layers_3': RouterStats}.

    A layer scanned with nn.scan sows stacked values; they keep their leading layer axis.
    """
    layers: dict[str, RouterStats] = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping) and "stats" in node:
            stats = node["stats"]
            stats = stats[0] if isinstance(stats, tuple) else stats
            name = "/".join(p for p in path if p != "moe")
            layers[name] = stats
            return
        if isinstance(node, Mapping):
            for key in sorted(node):
                visit(node[key], path + (str(key),))

    visit(moe_collection, ())
    return layers


_SCANNED = re.compile(r"^(?P<head>.*?)scan_(?P<interval>\d+)/layers_(?P<block>\d+)(?P<tail>(/.*)?)$")


def expand_scanned(layers: Mapping[str, Any]) -> dict[str, Any]:
    """Splits the leading layer axis of scanned layers into the unscanned per-layer names.

    models.py scans units of `interval` blocks under `{stack}/scan_{interval}/layers_{j}`; unit u's
    block j is layer u * interval + j, so 'encoder/scan_4/layers_3/ffn' with stacked values [3, ...]
    becomes 'encoder/layers_3/ffn', 'encoder/layers_7/ffn', 'encoder/layers_11/ffn'. Other names pass.
    """
    if not any(_SCANNED.match(name) for name in layers):
        return dict(layers)  # unscanned: names and order unchanged
    out: dict[str, RouterStats] = {}
    for name, stats in layers.items():
        match = _SCANNED.match(name)
        if match is None:
            out[name] = stats
            continue
        interval, block = int(match["interval"]), int(match["block"])
        units = int(jnp.shape(jax.tree.leaves(stats)[0])[0])
        for u in range(units):
            layer = f"{match['head']}layers_{u * interval + block}{match['tail']}"
            out[layer] = jax.tree.map(lambda value, u=u: value[u], stats)
    return dict(sorted(out.items(), key=lambda item: _natural_key(item[0])))


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def summarize(layers: Mapping[str, RouterStats]) -> dict[str, Array]:
    """Flat scalar metrics: 'moe/{layer}/{name}' per layer and 'moe/{name}' averaged over layers.

    Vector metrics (expert_counts) are expanded per expert only per layer. Scanned layers
    (stacked values) are reported under their per-layer names (expand_scanned). The loss terms'
    averages over layers are not repeated here: the step logs them as 'aux_loss' / 'router_z_loss'
    (losses.moe_losses).
    """
    layers = expand_scanned(layers)
    flat: dict[str, Array] = {}
    by_name: dict[str, list[Array]] = {}
    for layer, stats in layers.items():
        for name, value in stats.as_dict().items():
            value = jnp.asarray(value)
            if name == "expert_counts":
                for e in range(value.shape[-1]):
                    flat[f"moe/{layer}/expert_{e}_tokens"] = value[..., e]
                continue
            flat[f"moe/{layer}/{name}"] = value
            if name not in LOSS_FIELDS:
                by_name.setdefault(name, []).append(jnp.mean(value))
    for name, values in by_name.items():
        flat[f"moe/{name}"] = jnp.mean(jnp.stack(values))
    return flat


def format_table(layers: Mapping[str, RouterStats | Mapping[str, Any]],
                 columns: tuple[str, ...] = ("dropped_fraction_rank1", "dropped_fraction_rank2",
                                             "load_cv", "router_entropy", "router_confidence")) -> str:
    """A plain-text routing report, one row per MoE layer (RouterStats, or their logged names as read
    back from metrics.jsonl)."""
    layers = {name: stats.as_dict() if isinstance(stats, RouterStats) else dict(stats)
              for name, stats in expand_scanned(layers).items()}
    present = [c for c in columns if any(c in s for s in layers.values())]
    header = ["layer"] + present
    rows = [[layer] + [f"{float(np.mean(np.asarray(stats[c]))):.4f}" if c in stats else "-" for c in present]
            for layer, stats in layers.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(cell.ljust(w) for cell, w in zip(r, widths))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
