"""What the router did during a run: the metrics JSON-lines file, a routing table, an expert-load plot.

The trainer writes every logged step as one JSON object per line
(`JsonlWriter`, a clu `MetricWriter` next to the TensorBoard one):

    {"step": 200, "train/cross_entropy": 2.1, "train/moe/encoder/layers_1/ffn/load_cv": 0.31,
     "train/moe/encoder/layers_1/ffn/expert_0_tokens": 1021.0, ...}

Per-layer MoE metrics are named `{prefix}/moe/{layer}/{metric}` (metrics.summarize),
layer averages `{prefix}/moe/{metric}`. From that file:

- `layer_stats(record, prefix)`  -> {layer: {metric: value}}, e.g. for metrics.format_table;
- `routing_report(path, prefix)` -> the table of the last record (dropped fraction per rank,
  load CV, router entropy, confidence), one row per MoE layer;
- `plot_expert_load(path, png)`  -> one panel per MoE layer, each expert's share of the
  routed tokens over training (1 / num_experts everywhere is perfect balance);
- `health_flags(layers)` / `format_health(...)` -> the layers whose routing looks unhealthy, by the
  thresholds of `HealthThresholds` (printed with the flags), and what to try for each.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np
from clu import metric_writers

from stmoe import metrics as moe_metrics

_EXPERT_KEY = re.compile(r"^expert_(\d+)_tokens$")


class JsonlWriter(metric_writers.MetricWriter):
    """Appends `{"step": step, **scalars}` lines to `path`; everything but scalars is ignored."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step)}
        record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None):
        del step, values, metadata

    def write_images(self, step, images):
        del step, images

    def write_videos(self, step, videos):
        del step, videos

    def write_audios(self, step, audios, *, sample_rate):
        del step, audios, sample_rate

    def write_texts(self, step, texts):
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None):
        del step, arrays, num_buckets

    def write_hparams(self, hparams):
        del hparams

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_records(path: str, prefix: str | None = None) -> Iterator[dict[str, float]]:
    """The JSON-lines records in `path`, optionally only those with a key under `prefix/`."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a crash
                continue
            if prefix is None or any(k.startswith(prefix + "/") for k in record):
                yield record


def layer_stats(record: Mapping[str, float], prefix: str = "train") -> dict[str, dict[str, float]]:
    """{'encoder/layers_1/ffn': {'load_cv': .., 'expert_0_tokens': .., ...}, ...} from one record."""
    head = f"{prefix}/moe/"
    layers: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        if not key.startswith(head) or "/" not in key[len(head):]:
            continue  # not a MoE metric, or a layer average ('train/moe/load_cv')
        layer, name = key[len(head):].rsplit("/", 1)
        layers.setdefault(layer, {})[name] = value
    return dict(sorted(layers.items()))


Records = Union[str, Iterable[Mapping[str, float]]]


def _records(source: Records, prefix: str) -> Iterator[Mapping[str, float]]:
    """The `prefix` records of a JSON-lines file (a path) or of records already in memory."""
    if isinstance(source, str):
        return read_records(source, prefix)
    return (r for r in source if any(k.startswith(prefix + "/") for k in r))


def routing_report(source: Records, prefix: str = "train") -> tuple[str, dict[str, dict[str, float]]]:
    """(report, per-layer stats) of the last `prefix` record (of a metrics.jsonl path, or of records in
    memory: the trainer's); the report is the routing table followed by the health check (`format_health`)."""
    last = None
    for record in _records(source, prefix):
        last = record
    if last is None:
        return f"(no '{prefix}' metrics in {source if isinstance(source, str) else 'the records'})", {}
    layers = layer_stats(last, prefix)
    if not layers:
        return "(no MoE layers)", {}
    return moe_metrics.format_table(layers) + "\n\n" + format_health(health_flags(layers), layers), layers


def expert_load_history(source: Records, prefix: str = "train") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps [n], {layer: shares [n, experts]}): each expert's share of the layer's routed tokens, from
    a metrics.jsonl path or records in memory."""
    steps, rows = [], []
    for record in _records(source, prefix):
        layers = layer_stats(record, prefix)
        if not layers:
            continue
        steps.append(record["step"])
        rows.append(layers)
    history: dict[str, np.ndarray] = {}
    for layer in (rows[0] if rows else {}):
        experts = sorted(int(m.group(1)) for k in rows[0][layer] if (m := _EXPERT_KEY.match(k)))
        counts = np.array([[r[layer].get(f"expert_{e}_tokens", np.nan) for e in experts] for r in rows])
        history[layer] = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-9)
    return np.asarray(steps), history


def plot_expert_load(source: Records, png_path: str, prefix: str = "train") -> str | None:
    """Writes one panel per MoE layer: expert shares over steps, the 1/E line dashed (from a
    metrics.jsonl path or records in memory). Returns png_path (None when there is nothing to plot)."""
    steps, history = expert_load_history(source, prefix)
    if not history:
        return None
    # A bare Figure, not pyplot: switching pyplot's backend to Agg here would stop a notebook's inline plots.
    from matplotlib.figure import Figure

    n = len(history)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for ax, (layer, shares) in zip(axes.flat, history.items()):
        num_experts = shares.shape[1]
        for e in range(num_experts):
            ax.plot(steps, shares[:, e], linewidth=1)
        ax.axhline(1.0 / num_experts, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(layer, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("step")
        ax.set_ylabel("share of routed tokens")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Expert load over training (dashed: perfect balance 1/E)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (where tqdm.auto draws a widget that updates in place)."""
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Training progress on stderr.

    On a terminal or in a notebook: a tqdm bar (tqdm.auto) updated every step, with the last logging
    window's loss and tokens/s. Anywhere else (a log file, a teed TPU-worker log, CI), where each
    bar refresh would be one more line: one line per logging window,
    `train: step 40/300 (13%), loss 3.2140, 5,210 tokens/s, ETA 2m05s`, plus one per evaluation.
    """

    def __init__(self, total: int, initial: int, *, enabled: bool = True, stream=None, interactive=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", lambda: False)
            interactive = bool(isatty()) or _in_notebook()
        self.interactive = interactive and enabled
        self._bar = None
        if self.interactive:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train", unit="step",
                             file=self.stream)

    def update(self, step: int) -> None:
        """After each optimizer step."""
        if self._bar is not None:
            self._bar.update(1)

    def log(self, step: int, train: Mapping[str, float]) -> None:
        """At the end of a logging window: cross_entropy, tokens_per_sec, steps_per_sec of the window."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{train['cross_entropy']:.3f}", tok_s=f"{train['tokens_per_sec']:.0f}",
                                  refresh=False)
        elif self.enabled:
            eta = (self.total - step) / max(train.get("steps_per_sec", 0.0), 1e-9)
            print(f"train: step {step}/{self.total} ({100 * step / self.total:.0f}%), loss "
                  f"{train['cross_entropy']:.4f}, {train['tokens_per_sec']:,.0f} tokens/s, ETA {_duration(eta)}",
                  file=self.stream, flush=True)

    def log_eval(self, step: int, train: Mapping[str, float], held_out: Mapping[str, float]) -> None:
        """After a held-out evaluation."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{train.get('cross_entropy', float('nan')):.3f}",
                                  eval=f"{held_out['cross_entropy']:.3f}", refresh=False)
        elif self.enabled:
            print(f"eval: step {step}/{self.total}, held-out loss {held_out['cross_entropy']:.4f}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ------------------------------------------------------------------------------ routing health


@dataclasses.dataclass(frozen=True)
class HealthThresholds:
    """When a MoE layer's routing is flagged. Entropies are in units of ln E (uniform over E experts).

    - max_dropped_rank1 0.01: more than 1% of real tokens lost their FIRST choice to the capacity.
      Only rank 1 is checked: with top-2 at the train capacity factor 1.25 there are 1.25 T slots for
      2 T choices, so second choices are dropped by design (ST-MoE sec. 2; every first choice is
      served before any second). With balanced load (the aux loss's target) first choices fit the
      capacity, so 1% dropped means the load is skewed beyond what the capacity absorbs. (A
      position-major decoder, moe.decoder_priority, serves earlier tokens' second choices before
      later first choices and drops more first choices at the same load.)
    - max_load_cv 0.5: std / mean of the tokens each expert processed. At 0.5 the typical expert is
      half the mean load off it: with the capacity near the mean load (top-1 cf 1.25, top-2 cf 2.0)
      the busy half overflows while the idle half wastes its slots.
    - max_router_entropy 0.98 ln E: the mean per-token router entropy still at the uniform
      distribution: the router's probabilities have not sharpened, so the gates weigh a token's
      experts about equally and its choices rest on small logit margins. The init (std 2e-2) starts
      there: at d_model 64 the logits have std ~0.16 and the entropy ~0.99 ln E. It does not mean
      the choices ignore the token: a random router already hashes tokens to experts by content
      (the quick start's top-1 expert carries 0.1-0.25 nats about the domain from init on;
      docs/router_learning.md, "Specialization").
    - min_router_entropy 0.1 ln E: a saturated router: nearly every token gives its top expert
      probability ~1 (for E = 8, 0.1 ln E = 0.21 nats is a 0.96 / 0.04 split). Its logits have grown
      large, the regime where ST-MoE (sec. 3) sees training instabilities.
    - min_load_entropy 0.5 ln E: the entropy of the experts' shares of the processed tokens (from the
      per-expert counts). exp(entropy) is the effective number of experts in use, so 0.5 ln E means
      fewer than sqrt(E) experts effectively used: a routing collapse onto a few experts.
    """

    max_dropped_rank1: float = 0.01
    max_load_cv: float = 0.5
    max_router_entropy: float = 0.98
    min_router_entropy: float = 0.1
    min_load_entropy: float = 0.5

    def describe(self) -> str:
        return (f"thresholds: first-choice dropped > {100 * self.max_dropped_rank1:g}%, load CV > {self.max_load_cv:g}, "
                f"router entropy > {self.max_router_entropy:g} ln E (undecided) or < "
                f"{self.min_router_entropy:g} ln E (saturated), load entropy < {self.min_load_entropy:g} ln E "
                "(collapse)")


@dataclasses.dataclass(frozen=True)
class HealthFlag:
    layer: str
    check: str  # 'dropped', 'load_cv', 'router_undecided', 'router_saturated', 'collapse'
    value: float  # entropies as a fraction of ln E
    threshold: float
    message: str
    advice: str


ADVICE = {
    "dropped": "raise the capacity factor (model.moe.train_capacity_factor / eval_capacity_factor; "
               "evaluation can use a higher one without retraining) or the balance coefficient "
               "(loss.balance_coef)",
    "load_cv": "raise the balance coefficient (loss.balance_coef, or a higher early value with "
               "loss.balance_schedule) or the capacity factor",
    "router_undecided": "train longer, or raise the router's learning rate (optim.router_lr_multiplier); "
                           "if the balance loss dominates, lower loss.balance_coef",
    "router_saturated": "add or raise the router z-loss (loss.router_z_coef, ST-MoE: 1e-3) or lower "
                        "the learning rate",
    "collapse": "raise the balance coefficient (loss.balance_coef), add router jitter (model.moe.jitter_noise) "
                "or z-loss (loss.router_z_coef), "
                "or lower the learning rate",
}


def load_entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the experts' shares of the processed tokens, counts [experts]; 0 ln 0 = 0."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _expert_counts(stats: Mapping[str, float]) -> np.ndarray | None:
    experts = sorted(int(m.group(1)) for k in stats if (m := _EXPERT_KEY.match(k)))
    if not experts:
        return None
    return np.array([stats[f"expert_{e}_tokens"] for e in experts], np.float64)


def health_flags(layers: Mapping[str, Mapping[str, float]], num_experts: int | None = None,
                 thresholds: HealthThresholds = HealthThresholds()) -> list[HealthFlag]:
    """The unhealthy layers of `layers` = {layer: {metric: value}} (`layer_stats`, or
    stmoe.inference.routing_stats, whose 'all' row is skipped).

    Metrics used when present: dropped_fraction_rank1, load_cv, router_entropy and
    expert_{e}_tokens. `num_experts` defaults to the number of expert_{e}_tokens keys; without
    either the entropy checks are skipped.
    """
    t = thresholds
    flags: list[HealthFlag] = []
    for layer, stats in layers.items():
        if layer == "all":
            continue
        counts = _expert_counts(stats)
        experts = num_experts or (len(counts) if counts is not None else None)
        log_e = math.log(experts) if experts and experts > 1 else None

        def flag(check, value, threshold, message):
            flags.append(HealthFlag(layer, check, float(value), threshold, message, ADVICE[check]))

        dropped = stats.get("dropped_fraction_rank1")
        if dropped is not None and dropped > t.max_dropped_rank1:
            flag("dropped", dropped, t.max_dropped_rank1,
                 f"{100 * dropped:.2f}% of first choices dropped (> {100 * t.max_dropped_rank1:g}%)")
        cv = stats.get("load_cv")
        if cv is not None and cv > t.max_load_cv:
            flag("load_cv", cv, t.max_load_cv, f"load CV {cv:.3f} (> {t.max_load_cv:g})")
        if log_e is None:
            continue
        entropy = stats.get("router_entropy")
        if entropy is not None and entropy / log_e > t.max_router_entropy:
            flag("router_undecided", entropy / log_e, t.max_router_entropy,
                 f"router entropy {entropy:.3f} nats = {entropy / log_e:.3f} ln E (> {t.max_router_entropy:g} ln E): "
                 "router probabilities near uniform: the gates weigh the chosen experts about equally (undecided, or not yet)")
        if entropy is not None and entropy / log_e < t.min_router_entropy:
            flag("router_saturated", entropy / log_e, t.min_router_entropy,
                 f"router entropy {entropy:.3f} nats = {entropy / log_e:.3f} ln E (< {t.min_router_entropy:g} ln E): "
                 "saturated router")
        if counts is not None and counts.sum() > 0:
            h = load_entropy(counts) / log_e
            if h < t.min_load_entropy:
                flag("collapse", h, t.min_load_entropy,
                     f"load entropy {h:.3f} ln E (< {t.min_load_entropy:g} ln E): {math.exp(h * log_e):.1f} of "
                     f"{experts} experts effectively used")
    return flags


def format_health(flags: list[HealthFlag], layers: Mapping[str, object] | None = None,
                  thresholds: HealthThresholds = HealthThresholds()) -> str:
    """Text block: the thresholds, then one line per flag with what to try, or 'no layer flagged'."""
    checked = "" if layers is None else f" ({len([k for k in layers if k != 'all'])} MoE layers checked)"
    lines = [f"Routing health{checked}; {thresholds.describe()}"]
    if not flags:
        lines.append("  no layer flagged")
    lines += [f"  FLAG {f.layer}: {f.message}" for f in flags]
    checks = list(dict.fromkeys(f.check for f in flags))  # in order of first appearance
    lines += [f"  try ({check}): {ADVICE[check]}" for check in checks]
    return "\n".join(lines)
