"""From a task or mixture name to a deterministic, resumable iterator of numpy batches.

    it = get_batch_iterator("stmoe_synthetic_span_corruption", "train",
                            {"inputs": 512, "targets": 114}, batch_size=32)
    batch = next(it)   # dict of [32, 512] / [32, 114] int32 numpy arrays
    state = it.get_state()          # JSON, store it with the checkpoint
    ...
    it = get_batch_iterator(..., start_step=state["step"])   # or it.set_state(state)

Keys are `seqio.EncDecFeatureConverter`'s: encoder_input_tokens,
decoder_target_tokens, decoder_input_tokens, decoder_loss_weights and, when
packed, encoder_segment_ids / encoder_positions / decoder_segment_ids /
decoder_positions (segment ids count the packed examples 1, 2, ... in a row,
0 is padding; positions restart at 0 in each example).

Determinism and resuming. Everything random (shuffle buffers, span-corruption
masks, mixture sampling) is seeded from `seed`, and tf.data keeps element
order, so one (task, split, lengths, batch size, shard, seed) always gives the
same stream. Resuming at step N rebuilds that stream and skips its first N
batches: exact, at the cost of re-running the input pipeline for N batches
(seconds to minutes for long runs; no shuffle buffer has to be stored).

Multi-host: pass shard_index = jax.process_index(), num_shards =
jax.process_count() and the per-host batch size; each host then reads a
disjoint part of every split (sharded before packing).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from stmoe.data import tasks

PACKED_KEYS = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions")
KEYS = ("encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights")


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """Everything that determines the batch stream; stored in the iterator state to catch mismatches."""

  task: str
  split: str
  inputs_length: int
  targets_length: int
  batch_size: int
  shard_index: int = 0
  num_shards: int = 1
  seed: int = 0
  pack: bool = True
  shuffle: bool = True
  repeat: bool = True


def _dataset(spec: StreamSpec, start_step: int) -> tf.data.Dataset:
  """The batched stream of `spec` from batch `start_step` on."""
  ds = seqio.get_dataset(
      spec.task,
      task_feature_lengths={"inputs": spec.inputs_length, "targets": spec.targets_length},
      feature_converter=seqio.EncDecFeatureConverter(pack=spec.pack),
      dataset_split=spec.split,
      shuffle=spec.shuffle,
      num_epochs=None if spec.repeat else 1,
      # With one shard, pass none: some sources (TFDS) would otherwise list their files.
      shard_info=seqio.ShardInfo(spec.shard_index, spec.num_shards) if spec.num_shards > 1 else None,
      seed=spec.seed,
      verbose=False,
  )
  # An endless stream drops nothing; a finite one keeps its last, partial batch
  # (padded to full size in `BatchIterator`) so evaluation sees every example.
  ds = ds.batch(spec.batch_size, drop_remainder=spec.repeat)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return ds.skip(start_step).prefetch(tf.data.AUTOTUNE)


class BatchIterator:
  """Iterator of dicts of int32 numpy arrays [batch_size, length]; `step` = batches yielded so far."""

  def __init__(self, spec: StreamSpec, start_step: int = 0):
    self.spec = spec
    self._start(start_step)

  def _start(self, step: int) -> None:
    self._step = int(step)
    self._it: Iterator[Mapping[str, np.ndarray]] = _dataset(self.spec, self._step).as_numpy_iterator()

  @property
  def step(self) -> int:
    return self._step

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    out = {}
    for key, value in batch.items():
      value = np.asarray(value, dtype=np.int32)
      if value.shape[0] < self.spec.batch_size:  # last batch of a finite stream: pad with empty rows
        pad = [(0, self.spec.batch_size - value.shape[0])] + [(0, 0)] * (value.ndim - 1)
        value = np.pad(value, pad)
      out[key] = value
    self._step += 1
    return out

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable position: {'step': int, 'spec': {...}}."""
    return {"step": self._step, "spec": dataclasses.asdict(self.spec)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to `state['step']`; refuses a state saved for a different stream."""
    saved = state.get("spec")
    if saved is not None and saved != dataclasses.asdict(self.spec):
      diff = {k: (v, getattr(self.spec, k, None)) for k, v in saved.items() if v != getattr(self.spec, k, None)}
      raise ValueError(f"data iterator state is for another stream (saved, current): {diff}")
    self._start(state["step"])


def get_batch_iterator(
    task_or_mixture: str,
    split: str,
    feature_lengths: dict[str, int],
    batch_size: int,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    pack: bool = True,
    shuffle: bool = True,
    repeat: bool = True,
    start_step: int = 0,
) -> BatchIterator:
  """A deterministic iterator over `task_or_mixture`'s `split`, starting at batch `start_step`.

  `task_or_mixture` is a registered name (resolve a family and a vocabulary
  path with `tasks.task_name_for` first); `feature_lengths` has 'inputs' and
  'targets'. See the module docstring for keys, determinism and resuming.
  """
  if set(feature_lengths) != {"inputs", "targets"}:
    raise ValueError(f"feature_lengths needs exactly 'inputs' and 'targets', got {sorted(feature_lengths)}")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
  tasks.register_all()
  spec = StreamSpec(
      task=task_or_mixture,
      split=split,
      inputs_length=int(feature_lengths["inputs"]),
      targets_length=int(feature_lengths["targets"]),
      batch_size=int(batch_size),
      shard_index=int(shard_index),
      num_shards=int(num_shards),
      seed=int(seed),
      pack=bool(pack),
      shuffle=bool(shuffle),
      repeat=bool(repeat),
  )
  return BatchIterator(spec, start_step=start_step)
