"""Why a router learns or stays uniform: per-step measurements of every router kernel during a run.

`train_with_probe` runs `trainer.train_and_evaluate` unchanged and, through its step hook, records
for every MoE layer's router kernel W [d_model, experts]:

- the update's size relative to the weights, ||W_t - W_(t-1)|| / ||W_(t-1)|| (Frobenius). With
  Adafactor's relative step (`optim.adafactor_multiply_by_parameter_scale`, T5 / ST-MoE) an update
  is at most lr x RMS(W) per element after its clipping (Shazeer & Stern 2018, sec. 8-9): the
  ratio is bounded by the learning rate times the router LR multiplier, whatever the gradient;
- ||W|| and its RMS: the router logits' spread is about RMS(W) x sqrt(d_model) x RMS(x), so a
  2e-2 init on d_model = 64 starts the logits near 0.16 and the softmax near uniform;
- on one fixed held-out batch in train mode (train capacity factor, one fixed rng), every
  `probe_every` steps:
  the gradient of each term of the objective with respect to W, separately (the cross-entropy
  part, c_B x L_B and c_z x L_z; losses.total_loss), their norms and the cosine between the
  cross-entropy and balance gradients, and each layer's router entropy and top-1 probability.

`summarize` reduces the record to the table in docs/router_learning.md; `plot` draws it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROUTER_KEY = "router"  # a router kernel's path holds this (stmoe.moe: .../router/kernel), as optim's labels do
TERMS = ("cross_entropy", "balance", "router_z")


def router_kernels(params: Any) -> dict[str, Any]:
    """{path: array} of the router kernels of `params` (boxed or not); scanned layers keep their
    leading [units] axis. Path: '/'-joined keys, e.g. 'encoder/layers_1/mlp/router/kernel'."""
    from flax.linen import meta

    from stmoe.adafactor import param_path

    paths = {param_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(meta.unbox(params))[0]}
    return {path: leaf for path, leaf in paths.items() if ROUTER_KEY in path.split("/") and path.endswith("kernel")}


def relative_change(new: np.ndarray, old: np.ndarray) -> float:
    """||new - old|| / ||old|| (Frobenius), 0 for an all-zero `old`."""
    old_norm = float(np.linalg.norm(old))
    return float(np.linalg.norm(new - old)) / old_norm if old_norm > 0 else 0.0


def objective_terms(params, batch, rng, *, model, loss_cfg, balance_coef):
    """The training objective's three parts on `batch` (train mode: the train capacity factor, and
    `rng` for dropout and the random second-expert policy, as steps.train_step passes them): [3]
    float32 = (cross-entropy + output z-loss over the normalizer, c_B x L_B, c_z x L_z), which sum to
    losses.total_loss; and the per-layer sown metrics."""
    from stmoe import losses, steps

    weights, normalizer = losses.loss_weights_and_normalizer(batch, loss_cfg.loss_normalizing_factor)
    batch = {**batch, steps.OBJECTIVE_WEIGHTS: weights}
    ce, moe, layer_metrics = steps.forward(params, batch, rng, model=model, output_z_coef=loss_cfg.output_z_coef,
                                           enable_dropout=True, label_smoothing=loss_cfg.label_smoothing)
    terms = jnp.stack([ce["objective"] / normalizer, balance_coef * moe["aux_loss"],
                       loss_cfg.router_z_coef * moe["router_z_loss"]])
    return terms, layer_metrics


def gradient_parts(params, batch, rng, *, model, loss_cfg, balance_coef) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> ({router path: [3, ...kernel shape] gradient of each of objective_terms' parts}, layer metrics).

    One forward and three backward passes, one per term (jax.vjp), so the probe costs about one
    train step's compute and the parts are exactly what the train step's single gradient adds up.
    """
    terms, pullback, layer_metrics = jax.vjp(
        lambda p: objective_terms(p, batch, rng, model=model, loss_cfg=loss_cfg, balance_coef=balance_coef),
        params, has_aux=True)
    parts = [router_kernels(pullback(jnp.eye(len(TERMS), dtype=terms.dtype)[i])[0]) for i in range(len(TERMS))]
    return {path: jnp.stack([part[path] for part in parts]) for path in parts[0]}, layer_metrics


def part_norms(parts: np.ndarray) -> dict[str, float]:
    """parts: [3, ...] (cross-entropy, balance, z) gradients of one kernel -> their norms, the norm of
    their sum, the balance term's share of the sum of norms and cos(cross-entropy, balance)."""
    flat = parts.reshape(len(TERMS), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    out = {f"grad_norm_{name}": float(n) for name, n in zip(TERMS, norms)}
    out["grad_norm_total"] = float(np.linalg.norm(flat.sum(axis=0)))
    out["balance_share"] = float(norms[1] / norms.sum()) if norms.sum() > 0 else 0.0
    out["cos_ce_balance"] = (float(flat[0] @ flat[1] / (norms[0] * norms[1])) if norms[0] * norms[1] > 0 else 0.0)
    return out


class RouterProbe:
    """The step hook (trainer.train_and_evaluate's `hooks`): call as probe(step, state).

    `records` gets one dict per step: {'step', 'learning_rate', layers: {path: {...}}}; every
    `probe_every` steps (and step 1) also the gradient parts and routing of the fixed `batch`.
    """

    def __init__(self, run, mesh, batch: Mapping[str, np.ndarray], probe_every: int = 10):
        from stmoe import losses, optim, partitioning, trainer

        built = trainer.build_steps(run, mesh)
        self.mesh, self.probe_every = mesh, probe_every
        self.batch = partitioning.shard_batch(batch, mesh)
        self.lr = optim.learning_rate_schedule(built.optim_config)
        self.router_lr_multiplier = built.optim_config.router_lr_multiplier
        self.balance_fn = losses.balance_coef_schedule(run.loss)
        # The same rng at every probe: only the parameters change between probes.
        self._parts = jax.jit(lambda params, coef: gradient_parts(params, self.batch, jax.random.key(0),
                                                                   model=built.model, loss_cfg=run.loss,
                                                                   balance_coef=coef))
        self.previous: dict[str, np.ndarray] | None = None
        self.records: list[dict[str, Any]] = []

    def __call__(self, step: int, state) -> None:
        from stmoe import partitioning

        kernels = {k: np.asarray(jax.device_get(v)) for k, v in router_kernels(state.params).items()}
        record = {"step": int(step), "learning_rate": float(self.lr(step - 1)) * self.router_lr_multiplier,
                  "layers": {}}
        for path, kernel in kernels.items():
            layer = record["layers"].setdefault(path, {})
            layer["weight_norm"] = float(np.linalg.norm(kernel))
            layer["weight_rms"] = float(np.sqrt(np.mean(np.square(kernel, dtype=np.float64))))
            if self.previous is not None:
                layer["update_ratio"] = relative_change(kernel, self.previous[path])
        self.previous = kernels
        if step == 1 or step % self.probe_every == 0:
            with partitioning.activate(self.mesh):
                parts, layer_metrics = self._parts(state.params, self.balance_fn(step))
            parts = jax.device_get(parts)
            for path, grads in parts.items():
                record["layers"][path].update(part_norms(np.asarray(grads)))
            for path, values in _layer_routing(jax.device_get(layer_metrics)).items():
                kernel_path = _kernel_for(path, record["layers"])
                if kernel_path is not None:
                    record["layers"][kernel_path].update(values)
        self.records.append(record)


def _layer_routing(layer_metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{layer: {'router_entropy', 'router_confidence'}} from the flat per-layer metrics
    ('moe/<layer>/router_entropy' keys, metrics.summarize; the 'moe/<name>' averages are skipped)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in layer_metrics.items():
        for name in ("router_entropy", "router_confidence"):
            layer = key[len("moe/"): -len(name) - 1]
            if key.startswith("moe/") and key.endswith("/" + name) and layer:
                out.setdefault(layer, {})[name] = float(np.mean(value))
    return out


def _kernel_for(layer: str, kernels: Mapping[str, Any]) -> str | None:
    """The router kernel path of `layer` (as metrics name it, e.g. 'encoder/layers_1'), or None."""
    matches = [k for k in kernels if k.startswith(layer + "/")]
    return matches[0] if len(matches) == 1 else None


def first_held_out_batch(run, tasks) -> dict[str, np.ndarray]:
    """The first of the held-out batches the trainer evaluates on (trainer._input_streams)."""
    from stmoe import trainer

    lengths = {"inputs": run.data.inputs_length, "targets": run.data.targets_length}
    train_iter, eval_batches, _ = trainer._input_streams(run, tasks, lengths)
    train_iter.close()
    if not eval_batches:
        raise ValueError("the router probe needs a held-out batch: set eval_steps >= 1")
    return eval_batches[0]


def train_with_probe(config, workdir: str, probe_every: int = 10) -> list[dict[str, Any]]:
    """Trains `config` in `workdir` exactly as scripts/train.py does, with a RouterProbe on the
    first held-out batch; returns (and writes to workdir/router_learning.jsonl) its records."""
    from stmoe import partitioning, preflight, trainer

    run, tasks = trainer.prepare(config)
    mesh = partitioning.make_mesh(run.mesh, preflight.devices(run))
    probe = RouterProbe(run, mesh, first_held_out_batch(run, tasks), probe_every=probe_every)
    trainer.train_and_evaluate(config, workdir, hooks=[probe])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "router_learning.jsonl"), "w") as f:
        for record in probe.records:
            f.write(json.dumps(record) + "\n")
    return probe.records


def load(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "router_learning.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records: Sequence[Mapping[str, Any]], num_experts: int) -> dict[str, dict[str, float]]:
    """Per layer over the run: the first and last probed entropy / ln E, the mean update ratio
    against the mean learning rate, the first / last weight RMS, the mean balance share and
    cos(cross-entropy, balance)."""
    out: dict[str, dict[str, float]] = {}
    log_e = math.log(num_experts)
    lrs = [r["learning_rate"] for r in records[1:]]
    for path in records[-1]["layers"]:
        rows = [r["layers"][path] for r in records if path in r["layers"]]
        probed = [row for row in rows if "router_entropy" in row]
        ratios = [row["update_ratio"] for row in rows if "update_ratio" in row]
        out[path] = {
            "entropy_first": probed[0]["router_entropy"] / log_e if probed else float("nan"),
            "entropy_last": probed[-1]["router_entropy"] / log_e if probed else float("nan"),
            "confidence_last": probed[-1]["router_confidence"] if probed else float("nan"),
            "update_ratio_mean": float(np.mean(ratios)) if ratios else float("nan"),
            "learning_rate_mean": float(np.mean(lrs)) if lrs else float("nan"),
            "weight_rms_first": rows[0]["weight_rms"],
            "weight_rms_last": rows[-1]["weight_rms"],
            "balance_share_mean": float(np.mean([row["balance_share"] for row in probed if "balance_share" in row])),
            "cos_ce_balance_mean": float(np.mean([row["cos_ce_balance"] for row in probed if "cos_ce_balance" in row])),
            "grad_norm_ce_mean": float(np.mean([row["grad_norm_cross_entropy"] for row in probed
                                                if "grad_norm_cross_entropy" in row])),
            "growth_vs_random_walk": growth_vs_random_walk([row["weight_norm"] for row in rows], ratios),
        }
    return out


def growth_vs_random_walk(weight_norms: Sequence[float], update_ratios: Sequence[float]) -> float:
    """(||W_T||^2 - ||W_0||^2) / sum_t ||dW_t||^2 with ||dW_t|| = update_ratios[t-1] ||W_{t-1}||.

    ||W_T||^2 = ||W_0||^2 + sum_t ||dW_t||^2 + 2 sum_t <W_{t-1}, dW_t>: about 1 when the updates are
    uncorrelated with the weights (a random walk, whose RMS grows only as sqrt(1 + sum ratio^2)),
    above 1 when they keep pushing the same way, below 1 when they shrink W.
    """
    steps_squared = sum((ratio * norm) ** 2 for ratio, norm in zip(update_ratios, weight_norms[:-1]))
    if not steps_squared:
        return float("nan")
    return float((weight_norms[-1] ** 2 - weight_norms[0] ** 2) / steps_squared)


def compare(workdirs: Mapping[str, str], num_experts: int) -> list[dict[str, Any]]:
    """One row per finished run: held-out cross-entropy at its last eval, the encoder and decoder
    routers' mean last entropy / ln E, weight RMS growth and growth_vs_random_walk, first-choice
    drops at the last eval."""
    rows = []
    for name, workdir in workdirs.items():
        summary = summarize(load(workdir), num_experts)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            evals = [r for r in map(json.loads, f) if "eval/cross_entropy" in r]
        last = evals[-1] if evals else {}
        row: dict[str, Any] = {"name": name, "workdir": workdir, "step": last.get("step"),
                               "eval_cross_entropy": last.get("eval/cross_entropy")}
        for stack in ("encoder", "decoder"):
            layers = [v for k, v in summary.items() if k.startswith(stack)]
            drops = [v for k, v in last.items() if k.startswith(f"eval/moe/{stack}/")
                     and k.endswith("dropped_fraction_rank1")]
            row[f"{stack}_entropy_last"] = float(np.mean([v["entropy_last"] for v in layers]))
            row[f"{stack}_weight_rms_growth"] = float(np.mean([v["weight_rms_last"] / v["weight_rms_first"]
                                                               for v in layers]))
            row[f"{stack}_growth_vs_random_walk"] = float(np.mean([v["growth_vs_random_walk"] for v in layers]))
            row[f"{stack}_balance_share"] = float(np.mean([v["balance_share_mean"] for v in layers]))
            row[f"{stack}_dropped_rank1"] = float(np.mean(drops)) if drops else float("nan")
        rows.append(row)
    return rows


def plot(runs: Mapping[str, Sequence[Mapping[str, Any]]], num_experts: int, path: str,
         layer: str | None = None) -> str:
    """One row of four panels per run name: entropy / ln E, update ratio against lr, weight RMS,
    gradient norms by term, for `layer` (default: the first encoder router). Writes `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    log_e = math.log(num_experts)
    for name, records in runs.items():
        layers = list(records[-1]["layers"])
        chosen = layer or next((p for p in layers if p.startswith("encoder")), layers[0])
        probed = [(r["step"], r["layers"][chosen]) for r in records if "router_entropy" in r["layers"].get(chosen, {})]
        steps_p = [s for s, _ in probed]
        line, = axes[0].plot(steps_p, [row["router_entropy"] / log_e for _, row in probed], label=name)
        every = [(r["step"], r["layers"][chosen], r["learning_rate"]) for r in records
                 if "update_ratio" in r["layers"].get(chosen, {})]
        axes[1].plot([s for s, _, _ in every], [row["update_ratio"] for _, row, _ in every], color=line.get_color(),
                     alpha=0.6)
        axes[1].plot([s for s, _, _ in every], [lr for _, _, lr in every], color=line.get_color(), linestyle=":")
        axes[2].plot([r["step"] for r in records], [r["layers"][chosen]["weight_rms"] for r in records],
                     color=line.get_color())
        for term, style in zip(TERMS, ("-", "--", ":")):
            axes[3].plot(steps_p, [row[f"grad_norm_{term}"] for _, row in probed], color=line.get_color(),
                         linestyle=style)
    axes[0].set(title=f"router entropy / ln {num_experts}", xlabel="step")
    axes[0].axhline(0.98, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=8)
    axes[1].set(title="||dW|| / ||W|| per step (dotted: lr)", xlabel="step", yscale="log")
    axes[2].set(title="RMS(W)", xlabel="step")
    axes[3].set(title="||grad W||: CE (-), c_B L_B (--), c_z L_z (:)", xlabel="step", yscale="log")
    fig.suptitle(chosen)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
