"""seqio metric functions on decoded strings: fn(targets, predictions) -> {name: value}.

Values are percentages, as in the T5 and ST-MoE papers' tables.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _text(x) -> str:
  # seqio hands over str, but targets taken straight from a tf.data example are bytes.
  return (x.decode("utf-8") if isinstance(x, bytes) else str(x)).strip()


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target after stripping whitespace."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  hits = [_text(t) == _text(p) for t, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(hits)) if hits else 0.0}


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Classification accuracy (%) on label strings; a prediction outside the labels is wrong."""
  return {"accuracy": exact_match(targets, predictions)["exact_match"]}


def mean_class_f1(label_names: Sequence[str]):
  """Metric fn: unweighted mean over `label_names` of per-class F1 (%), as for CB.

  A prediction that is not a label name counts as a miss for its target class.
  """
  def fn(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    targets = [_text(t) for t in targets]
    predictions = [_text(p) for p in predictions]
    f1s = []
    for label in label_names:
      tp = sum(t == label and p == label for t, p in zip(targets, predictions))
      fp = sum(t != label and p == label for t, p in zip(targets, predictions))
      fn_ = sum(t == label and p != label for t, p in zip(targets, predictions))
      f1s.append(2 * tp / (2 * tp + fp + fn_) if tp + fp + fn_ else 0.0)
    return {"mean_class_f1": 100.0 * float(np.mean(f1s))}

  fn.__name__ = "mean_class_f1"
  return fn
