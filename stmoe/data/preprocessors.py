"""seqio preprocessors: T5 span corruption and the text-to-text classification format.

Span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer
Learning...", sec. 3.1.4 and 3.3): pick ~15% of the tokens as noise, grouped
into spans of mean length 3; the encoder sees the text with each noise span
replaced by one sentinel, the decoder predicts each sentinel followed by the
span it hides. Sentinels are the vocabulary's extra ids, the first span taking
`vocab_size - 1`, the next `vocab_size - 2`, and so on (counting down).

Example (tokens a..j, noise spans [c d] and [h]):
  original  a b c d e f g h i j
  inputs    a b <S0> e f g <S1> i j
  targets   <S0> c d <S1> h

Here the layout is always: non-noise span, noise span, non-noise span, ...,
noise span, so the inputs never start with a sentinel and the targets never
end with one; `pre_corruption_length` accounts for exactly this layout.
"""
from __future__ import annotations

import functools
import logging
from typing import Mapping, Sequence

import seqio
import tensorflow as tf

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


# ------------------------------------------------------------------ lengths
def noise_counts(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for `length` uncorrupted tokens.

  num_noise = round(length * density), kept in [1, length - 1] so that both
  noise and non-noise are non-empty; num_spans = max(1, round(num_noise / mean)).
  Python's round is half-to-even like `tf.round`, and both multiply in float64,
  so this and the graph version in `_noise_mask` agree on every length.
  """
  num_noise = min(max(round(length * noise_density), 1), length - 1)
  num_spans = max(round(num_noise / mean_noise_span_length), 1)
  return num_noise, num_spans


def corrupted_lengths(
    tokens_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
  """(inputs_length, targets_length) after corrupting `tokens_length` tokens, EOS included.

  inputs  = non-noise tokens + one sentinel per span + EOS
  targets = noise tokens + one sentinel per span + EOS
  """
  num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
  return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def pre_corruption_length(
    inputs_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
  """(tokens_length, targets_length): the longest chunk whose corruption fits `inputs_length`.

  The chunk of `tokens_length` raw tokens becomes exactly-or-under
  `inputs_length` encoder tokens and `targets_length` decoder tokens (both with
  EOS). For inputs 512 at density 0.15 / span 3 this is (568, 114), the
  pairing used by T5 and ST-MoE.
  """
  tokens_length = inputs_length
  while corrupted_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)[1]


# ------------------------------------------------------------------ graph ops
def _random_composition(num_items: tf.Tensor, num_parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Lengths [num_parts] of a uniformly random split of `num_items` into positive parts.

  Choose num_parts - 1 distinct cut points among the num_items - 1 gaps
  between items; each cut starts a new part.
  """
  gaps = tf.argsort(tf.random.stateless_uniform([num_items - 1], seed=seed))
  cuts = gaps[: num_parts - 1] + 1  # [num_parts - 1] positions that open a part
  is_start = tf.scatter_nd(cuts[:, None], tf.ones_like(cuts), [num_items])
  part_id = tf.cumsum(is_start)  # [num_items]
  return tf.math.unsorted_segment_sum(tf.ones_like(part_id), part_id, num_parts)


def _noise_mask(
    length: tf.Tensor, noise_density: float, mean_noise_span_length: float, seeds: tf.Tensor
) -> tf.Tensor:
  """Boolean noise mask [length]: spans alternate non-noise, noise, ..., noise."""
  # Same formula as `noise_counts`, float64 so the rounding matches Python's.
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float64) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(
      tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length), tf.int32
  )
  num_spans = tf.maximum(num_spans, 1)
  noise_lengths = _random_composition(num_noise, num_spans, seeds[0])  # [spans]
  keep_lengths = _random_composition(length - num_noise, num_spans, seeds[1])  # [spans]
  span_lengths = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1), [-1])  # [2*spans]
  span_starts = tf.cumsum(span_lengths)[:-1]  # [2*spans - 1]
  is_start = tf.scatter_nd(span_starts[:, None], tf.ones_like(span_starts), [length])
  span_index = tf.cumsum(is_start)  # [length]; odd index = noise span
  return tf.equal(span_index % 2, 1)


def _replace_spans_with_sentinels(tokens: tf.Tensor, mask: tf.Tensor, first_sentinel: int) -> tf.Tensor:
  """Each run of masked tokens [length] -> one sentinel; sentinels count down from first_sentinel."""
  previous = tf.concat([[False], mask[:-1]], axis=0)
  opens_span = mask & ~previous
  continues_span = mask & previous
  sentinel = first_sentinel + 1 - tf.cumsum(tf.cast(opens_span, tokens.dtype))
  return tf.boolean_mask(tf.where(opens_span, sentinel, tokens), ~continues_span)


def _concat_and_split(ds: tf.data.Dataset, key: str, chunk_length: int, docs_per_concat: int) -> tf.data.Dataset:
  """Concatenates `key` of `docs_per_concat` documents and cuts chunks of `chunk_length` tokens.

  The last chunk of each group may be shorter; chunks under 2 tokens are
  dropped (there is no way to have both noise and non-noise in them).
  """
  @tf.autograph.experimental.do_not_convert
  def split(tokens):  # [group tokens] -> dataset of [<= chunk_length]
    n = tf.size(tokens)
    num_chunks = (n + chunk_length - 1) // chunk_length
    row_lengths = tf.minimum(chunk_length, n - chunk_length * tf.range(num_chunks))
    chunks = tf.RaggedTensor.from_row_lengths(tokens, row_lengths)
    return tf.data.Dataset.from_tensor_slices(chunks)

  ds = ds.map(lambda ex: ex[key], num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ragged_batch(docs_per_concat).map(lambda rt: rt.flat_values)
  ds = ds.flat_map(split)
  return ds.filter(lambda chunk: tf.size(chunk) >= 2)


# Our graph code is plain TF (no Python control flow on tensors), so autograph
# only costs time: it re-parses each function on every pipeline build.
def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    docs_per_concat: int = 128,
) -> tf.data.Dataset:
  """seqio preprocessor: tokenized 'targets' documents -> span-corrupted {'inputs', 'targets'}.

  Goes after `seqio.preprocessors.tokenize` and before
  `seqio.preprocessors.append_eos_after_trim` (EOS is counted in the lengths).
  Documents are concatenated in groups and cut into chunks of
  `pre_corruption_length(sequence_length['inputs'])` tokens, so the encoder
  inputs come out (nearly) full. Randomness comes from seqio's per-example
  seeds, so a fixed `seed` in `seqio.get_dataset` fixes every mask.
  """
  tokens_length, targets_length = pre_corruption_length(
      sequence_length["inputs"], noise_density, mean_noise_span_length
  )
  if targets_length > sequence_length["targets"]:
    logging.warning(
        "span_corruption: inputs length %d needs targets length %d, got %d; targets will be truncated.",
        sequence_length["inputs"], targets_length, sequence_length["targets"],
    )
  first_sentinel = output_features["targets"].vocabulary.vocab_size - 1

  @seqio.map_over_dataset(num_seeds=2)
  @tf.autograph.experimental.do_not_convert
  def corrupt(tokens, seeds):
    mask = _noise_mask(tf.size(tokens), noise_density, mean_noise_span_length, seeds)
    return {
        "inputs": _replace_spans_with_sentinels(tokens, mask, first_sentinel),
        "targets": _replace_spans_with_sentinels(tokens, ~mask, first_sentinel),
    }

  return corrupt(_concat_and_split(dataset, "targets", tokens_length, docs_per_concat))


# ------------------------------------------------------------------ text-to-text
def text_to_text_classification(
    dataset: tf.data.Dataset,
    benchmark_name: str,
    feature_names: Sequence[str],
    label_names: Sequence[str],
) -> tf.data.Dataset:
  """seqio preprocessor: T5's text-to-text format for GLUE/SuperGLUE classification.

  inputs  = "<benchmark> <f1>: <x[f1]> <f2>: <x[f2]> ..."   (feature names in the given order)
  targets = label_names[x['label']], or "<unk>" for unlabeled (-1) test examples.
  e.g. "rte sentence1: A cat sat. sentence2: An animal sat." -> "entailment".
  """
  names = tf.constant(list(label_names) + ["<unk>"])

  @seqio.map_over_dataset
  @tf.autograph.experimental.do_not_convert
  def fmt(x):
    parts = [benchmark_name]
    for name in feature_names:
      parts += [f"{name}:", x[name]]
    label = tf.cast(x["label"], tf.int32)
    label = tf.where(label < 0, len(label_names), label)  # -1 -> "<unk>"
    return {
        "inputs": tf.strings.join(parts, separator=" "),
        "targets": tf.gather(names, label),
    }

  return fmt(dataset)


def text_to_text(benchmark_name: str, feature_names: Sequence[str], label_names: Sequence[str]):
  """`text_to_text_classification` bound to one benchmark, for a Task's preprocessor list."""
  return functools.partial(
      text_to_text_classification,
      benchmark_name=benchmark_name,
      feature_names=tuple(feature_names),
      label_names=tuple(label_names),
  )
