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
  routed tokens over training (1 / num_experts everywhere is perfect balance).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Iterator, Mapping

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


def routing_report(path: str, prefix: str = "train") -> tuple[str, dict[str, dict[str, float]]]:
    """(table, per-layer stats) of the last `prefix` record in the JSON-lines file at `path`."""
    last = None
    for record in read_records(path, prefix):
        last = record
    if last is None:
        return f"(no '{prefix}' metrics in {path})", {}
    layers = layer_stats(last, prefix)
    if not layers:
        return "(no MoE layers)", {}
    return moe_metrics.format_table(layers), layers


def expert_load_history(path: str, prefix: str = "train") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps [n], {layer: shares [n, experts]}): each expert's share of the layer's routed tokens."""
    steps, rows = [], []
    for record in read_records(path, prefix):
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


def plot_expert_load(path: str, png_path: str, prefix: str = "train") -> str | None:
    """Writes one panel per MoE layer: expert shares over steps, the 1/E line dashed. Returns png_path
    (None when there is nothing to plot)."""
    steps, history = expert_load_history(path, prefix)
    if not history:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(history)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
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
    plt.close(fig)
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
