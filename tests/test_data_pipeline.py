"""The batch iterator: determinism, exact resume, sharding, finite streams."""
import json

import numpy as np
import pytest

import stmoe.data  # noqa: F401
from stmoe.data import corpus, pipeline

TASK = "stmoe_synthetic_span_corruption"
LENGTHS = {"inputs": 64, "targets": 16}
BATCH = 4


def _take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference():
  """Five batches of an uninterrupted, shuffled, packed run, and its saved state after three."""
  it = pipeline.get_batch_iterator(TASK, "train", LENGTHS, BATCH, seed=3)
  batches = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
  batches += [next(it) for _ in range(2)]
  it.close()
  return batches, state


def test_same_seed_same_batches(reference):
  batches, _ = reference
  again = _take(pipeline.get_batch_iterator(TASK, "train", LENGTHS, BATCH, seed=3), 2)
  assert all(_equal(a, b) for a, b in zip(again, batches))
  other = _take(pipeline.get_batch_iterator(TASK, "train", LENGTHS, BATCH, seed=4), 1)
  assert not _equal(other[0], batches[0])


def test_resume_sees_the_uninterrupted_batches(reference):
  batches, state = reference
  assert state["step"] == 3
  # Restored at step 3, the next batch is the uninterrupted run's 4th (index 3).
  fresh = pipeline.get_batch_iterator(TASK, "train", LENGTHS, BATCH, seed=3)
  fresh.set_state(state)
  assert _equal(next(fresh), batches[3]) and fresh.step == 4
  fresh.close()
  # Constructed with start_step=4, it yields the 5th.
  started = pipeline.get_batch_iterator(TASK, "train", LENGTHS, BATCH, seed=3, start_step=4)
  assert _equal(next(started), batches[4]) and started.get_state()["step"] == 5
  started.close()


def test_state_of_another_stream_is_refused(reference):
  _, state = reference
  it = pipeline.get_batch_iterator(TASK, "train", LENGTHS, BATCH, seed=5)
  with pytest.raises(ValueError, match="seed"):
    it.set_state(state)


def _rows(shard_index, num_shards):
  it = pipeline.get_batch_iterator(
      "stmoe_synthetic_qa", "validation", {"inputs": 160, "targets": 8}, 64,
      shard_index=shard_index, num_shards=num_shards, pack=False, shuffle=False, repeat=False)
  batches = list(it)
  assert all(b["encoder_input_tokens"].shape == (64, 160) for b in batches)  # last batch padded
  tokens = np.concatenate([b["encoder_input_tokens"] for b in batches])
  return [tuple(r) for r in tokens if r.any()]


def test_two_shards_partition_the_examples():
  full, shard0, shard1 = _rows(0, 1), _rows(0, 2), _rows(1, 2)
  assert len(full) == len(set(full)) == corpus.QA_SPLIT_SIZES["validation"]
  assert not set(shard0) & set(shard1)
  assert sorted(shard0 + shard1) == sorted(full)
  assert abs(len(shard0) - len(shard1)) <= 1


def test_feature_lengths_are_validated():
  with pytest.raises(ValueError, match="inputs"):
    pipeline.get_batch_iterator(TASK, "train", {"inputs": 8}, 2)
