"""Span corruption: lengths, statistics, sentinels and exact reconstruction."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from stmoe.data import preprocessors as prep

VOCAB = seqio.ByteVocabulary(extra_ids=100)  # 359 ids; sentinels 358, 357, ...
FIRST_SENTINEL = VOCAB.vocab_size - 1
INPUTS_LENGTH = 128


def test_pre_corruption_length_512_by_hand():
  # Hand derivation at density 0.15, mean span 3, EOS on both sides:
  #   568 tokens: noise = round(85.2) = 85, spans = round(85 / 3 = 28.33) = 28,
  #     inputs = (568 - 85) + 28 + 1 = 512, targets = 85 + 28 + 1 = 114.
  #   569 tokens: noise = round(85.35) = 85, spans = 28, inputs = 484 + 28 + 1 = 513 > 512.
  assert 568 - 85 + 28 + 1 == 512 and 85 + 28 + 1 == 114 and 569 - 85 + 28 + 1 == 513
  assert prep.pre_corruption_length(512, 0.15, 3.0) == (568, 114)
  assert prep.corrupted_lengths(568) == (512, 114)


@pytest.mark.parametrize("inputs_length", [16, 64, 128, 512, 1024])
def test_pre_corruption_length_matches_brute_force(inputs_length):
  # Independent: scan all lengths with numpy's (half-to-even) rounding and
  # keep the largest whose corrupted inputs fit.
  def inputs_of(n):
    noise = int(np.clip(np.round(n * 0.15), 1, n - 1))
    spans = max(int(np.round(noise / 3.0)), 1)
    return n - noise + spans + 1, noise + spans + 1

  fits = [n for n in range(2, 3 * inputs_length) if inputs_of(n)[0] <= inputs_length]
  assert prep.pre_corruption_length(inputs_length) == (max(fits), inputs_of(max(fits))[1])


def _documents(num_docs, seed=0):
  rng = np.random.default_rng(seed)
  # Byte-range ids 3..258 never collide with sentinels (>= 259).
  return [rng.integers(3, 259, size=rng.integers(20, 400)).astype(np.int32) for _ in range(num_docs)]


def _corrupt(docs, seed, docs_per_concat=16):
  ds = tf.data.Dataset.from_generator(
      lambda: ({"targets": d} for d in docs),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)},
  )
  features = {"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)}
  with seqio.utils.map_seed_manager(seed):
    out = prep.span_corruption(
        ds, {"inputs": INPUTS_LENGTH, "targets": 64}, features, docs_per_concat=docs_per_concat
    )
  return [(ex["inputs"], ex["targets"]) for ex in out.as_numpy_iterator()]


def _expected_chunks(docs, docs_per_concat=16):
  # Independent numpy version of concat-and-split: groups of docs, fixed-size pieces, drop < 2.
  chunk = prep.pre_corruption_length(INPUTS_LENGTH)[0]
  out = []
  for g in range(0, len(docs), docs_per_concat):
    flat = np.concatenate(docs[g : g + docs_per_concat])
    out += [flat[i : i + chunk] for i in range(0, len(flat), chunk) if len(flat[i : i + chunk]) >= 2]
  return out


def _split_at_sentinels(seq):
  """[(sentinel, following non-sentinel tokens), ...] plus the tokens before the first sentinel."""
  head, pieces = [], []
  for t in seq:
    if t >= VOCAB.vocab_size - 100:
      pieces.append((int(t), []))
    elif pieces:
      pieces[-1][1].append(int(t))
    else:
      head.append(int(t))
  return head, pieces


@pytest.fixture(scope="module")
def corrupted():
  docs = _documents(160)
  return docs, _corrupt(docs, seed=7)


def test_span_corruption_statistics_and_reconstruction(corrupted):
  docs, examples = corrupted
  chunks = _expected_chunks(docs)
  assert len(examples) == len(chunks) > 100
  noise_tokens = num_spans = total = 0
  for (inputs, targets), original in zip(examples, chunks):
    in_head, in_pieces = _split_at_sentinels(inputs)
    tg_head, tg_pieces = _split_at_sentinels(targets)
    # Targets start with a sentinel; the same sentinels, in the same order, on both sides.
    assert tg_head == []
    assert [s for s, _ in in_pieces] == [s for s, _ in tg_pieces]
    # Sentinels count down from the last vocabulary id.
    assert [s for s, _ in in_pieces] == list(range(FIRST_SENTINEL, FIRST_SENTINEL - len(in_pieces), -1))
    # Interleave: input text, then each sentinel's hidden span, then the input text after it.
    rebuilt = list(in_head)
    for (_, after), (_, hidden) in zip(in_pieces, tg_pieces):
      assert hidden, "every noise span is non-empty"
      rebuilt += hidden + after
    np.testing.assert_array_equal(rebuilt, original)
    assert len(inputs) + 1 <= INPUTS_LENGTH  # + EOS still fits
    if len(original) == prep.pre_corruption_length(INPUTS_LENGTH)[0]:  # full chunks only
      noise_tokens += sum(len(h) for _, h in tg_pieces)
      num_spans += len(tg_pieces)
      total += len(original)
  assert abs(noise_tokens / total - 0.15) <= 0.01
  assert abs(noise_tokens / num_spans - 3.0) <= 0.3


def test_span_corruption_masks_vary_and_are_seeded(corrupted):
  docs, examples = corrupted
  again = _corrupt(docs, seed=7)
  other = _corrupt(docs, seed=8)
  assert all(np.array_equal(a[0], b[0]) for a, b in zip(examples, again))
  assert not all(np.array_equal(a[0], b[0]) for a, b in zip(examples, other))
  # Span layouts differ between examples (positions of the first sentinel).
  firsts = {int(np.argmax(inp >= VOCAB.vocab_size - 100)) for inp, _ in examples}
  assert len(firsts) > 10
