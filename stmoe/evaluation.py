"""Task metrics with seqio's `Evaluator`: decode (or score) held-out examples, compute each task's metrics.

    evaluation = Evaluation("stmoe_synthetic_qa", split="validation", lengths={"inputs": 160, "targets": 16},
                            log_dir=workdir + "/eval")
    results = evaluation.run(model, params, mesh, step=1000)   # {task: {"exact_match": 83.2, ..., "moe/dropped_tokens": ...}}

seqio does the bookkeeping (its cached, enumerated eval datasets keep every prediction tied to its
example; postprocessors, per-task metric functions, mixtures -> their tasks); this module supplies
the model functions: `predict_fn` decodes with stmoe.inference.predict_tokens (greedy or beam, the
eval capacity factor, KV cache) and `score_fn` returns teacher-forced log-likelihoods. Each task also
gets its routing health on the same examples (stmoe.inference.routing_stats: the share of tokens
the eval capacity dropped, per rank), because a metric that moved with the capacity factor is
otherwise hard to explain.

Where results go: seqio's loggers write per-task TensorBoard scalars and `<task>-metrics.jsonl`
(plus the decoded examples) under `log_dir`; `run` also returns them and the trainer writes them
to its own metric writers (`infer_eval/<task>/<metric>`) when it evaluates inside fine-tuning.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from jax.sharding import Mesh

from stmoe import inference
from stmoe.models import EncoderDecoder


def _unwrap(value: Any) -> float | Any:
    """seqio / clu metric values -> plain floats where they are scalars."""
    value = getattr(value, "value", value)
    return float(value) if np.ndim(value) == 0 and isinstance(value, (int, float, np.number)) else value


class Evaluation:
    """A seqio Evaluator over `task` (a task or mixture name) plus stmoe's model functions.

    lengths: {"targets": max decode length, ...}; num_examples: per task
    (None = the whole split); decoding: "greedy" or "beam" (beam_size, alpha).
    """

    def __init__(self, task: str, *, split: str = "validation", lengths: Mapping[str, int],
                 num_examples: int | None = None, log_dir: str | None = None, batch_size: int = 32,
                 decoding: str = "greedy", beam_size: int = 4, alpha: float = 0.6):
        import seqio

        if decoding not in ("greedy", "beam"):
            raise ValueError(f"evaluation decoding must be 'greedy' or 'beam', got {decoding!r}")
        self.lengths = dict(lengths)
        self.batch_size, self.decoding, self.beam_size, self.alpha = batch_size, decoding, beam_size, alpha
        loggers = (seqio.TensorBoardLogger, seqio.JSONLogger) if log_dir else ()
        self.evaluator = seqio.Evaluator(
            mixture_or_task_name=task, feature_converter=seqio.EncDecFeatureConverter(pack=False),
            # sequence_length=None: seqio pads to the longest eval example (cheaper than the training
            # lengths); decoding still runs up to lengths["targets"] tokens.
            eval_split=split, sequence_length=None, num_examples=num_examples, shuffle=False,
            logger_cls=loggers, log_dir=log_dir, use_memory_cache=True, async_compute_metrics=False)
        self.task_names = [t.name for t in self.evaluator.eval_tasks]
        if not self.task_names:
            raise ValueError(f"task {task!r} has no evaluation split {split!r} with metric functions")

    @staticmethod
    def _arrays(dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An enumerated seqio eval dataset -> (indices [n], encoder inputs [n, L], targets [n, L'])."""
        indices, inputs, targets = [], [], []
        for index, features in dataset.as_numpy_iterator():
            indices.append(int(index))
            inputs.append(features["encoder_input_tokens"])
            targets.append(features["decoder_target_tokens"])
        return np.asarray(indices), np.stack(inputs).astype(np.int32), np.stack(targets).astype(np.int32)

    def run(self, model: EncoderDecoder, params: Any, mesh: Mesh, step: int | None = None) -> dict[str, dict[str, float]]:
        """Decodes / scores every eval task with `model` and `params` (sharded over `mesh`) and returns
        {task: {metric: value}} (also logged)."""
        loaded = inference.LoadedModel(model=model, params=params, mesh=mesh, inputs_length=self.lengths["inputs"],
                                       targets_length=self.lengths["targets"])
        routing: dict[str, dict[str, float]] = {}

        def predict_fn(dataset):
            indices, inputs, targets = self._arrays(dataset)
            tokens = inference.predict_tokens(loaded, inputs, mode=self.decoding, batch_size=self.batch_size,
                                              max_decode_length=self.lengths["targets"], beam_size=self.beam_size,
                                              alpha=self.alpha)
            routing[_current_task(dataset)] = inference.routing_stats(loaded, inputs, targets,
                                                                     batch_size=self.batch_size).get("all", {})
            return list(zip(indices.tolist(), tokens.tolist()))

        def score_fn(dataset):
            indices, inputs, targets = self._arrays(dataset)
            scores = inference.score_tokens(loaded, inputs, targets, batch_size=self.batch_size)
            return list(zip(indices.tolist(), scores.tolist()))

        datasets = self.evaluator._cached_model_datasets  # noqa: SLF001 - seqio names its datasets by task
        names = {id(ds): name for name, ds in datasets.items()}

        def _current_task(dataset) -> str:
            return names.get(id(dataset), "?")

        future, _ = self.evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn,
                                            score_fn=score_fn)
        results = {task: {name: _unwrap(value) for name, value in metrics.items()}
                   for task, metrics in future.result().items()}
        for task, stats in routing.items():
            if task in results:
                results[task].update({f"moe/{k}": v for k, v in stats.items()
                                      if k.startswith("dropped") or k in ("load_cv", "router_entropy")})
        return results


def flat_scalars(results: Mapping[str, Mapping[str, Any]], prefix: str = "infer_eval") -> dict[str, float]:
    """{task: {metric: value}} -> {'prefix/task/metric': value} for scalar values (metric writers)."""
    return {f"{prefix}/{task}/{name}": float(value) for task, metrics in results.items()
            for name, value in metrics.items() if isinstance(value, float)}
