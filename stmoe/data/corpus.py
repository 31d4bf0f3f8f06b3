"""An offline, procedurally generated multi-domain corpus (no download).

Every document is a pure function of (stream, split, index): it is generated
on the fly from `random.Random("<stream>/<split>/<index>")`, so the 'train'
and 'validation' splits are disjoint by seed, any shard can generate only its
own indices, and a run is reproducible on any machine.

Four domains, one per document, chosen uniformly, with clearly different
characters, vocabulary and structure (so routing by domain is visible in
token traces) and with structure a small model can learn beyond unigram
statistics:

- arithmetic: lines "a op b = c" with a correct result c.
    "17 + 25 = 42\n9 * 8 = 72\n60 - 13 = 47"
- records: key=value fields, then lookups that repeat values seen before.
    "record 4821: name=mira; city=oslo; color=teal.\nlookup city -> oslo"
- prose: templated English sentences from small word lists.
    "the quiet otter sleeps beside the old bridge. every winter, ..."
- code: small Python-like functions whose lines use earlier variables.
    "def f12(x, y):\n    a = x + 3\n    b = a * y\n    return b"

The supervised task derived from it (`qa_example`) asks for one field of a
record: "question: what is the city of record 4821? record 4821: name=mira;
city=oslo; color=teal." -> "oslo". The asked key is uniform over 6 keys and each
key has 8 values, so every one of the 48 answers has probability 1/48 and the
majority-class baseline is about 2.1% exact match (`majority_baseline` gives
the exact figure on a split).
"""
from __future__ import annotations

import collections
import math
import random
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

DOMAINS = ("arithmetic", "records", "prose", "code")

# Documents per split. The train split is far larger than any quick-start run
# reads; the validation split is small enough to evaluate in full.
SPLIT_SIZES = {"train": 1_000_000, "validation": 2_000}
QA_SPLIT_SIZES = {"train": 100_000, "validation": 1_000}

# Record fields: 6 keys x 8 disjoint values.
RECORD_VALUES = {
    "name": ("mira", "tomas", "ana", "kofi", "lena", "ravi", "yuki", "omar"),
    "city": ("oslo", "lima", "cairo", "quito", "perth", "delhi", "hanoi", "turin"),
    "color": ("teal", "amber", "crimson", "ivory", "olive", "navy", "coral", "slate"),
    "animal": ("otter", "heron", "lynx", "bison", "gecko", "raven", "moose", "panda"),
    "fruit": ("mango", "plum", "lemon", "guava", "apricot", "cherry", "melon", "fig"),
    "tool": ("hammer", "chisel", "wrench", "ladder", "trowel", "shovel", "pliers", "saw"),
}

_ADJECTIVES = ("quiet", "bright", "old", "small", "gentle", "tall", "green", "cold", "busy", "lazy", "brave", "soft")
_NOUNS = ("otter", "farmer", "river", "child", "sailor", "garden", "teacher", "fox", "village", "baker", "poet", "horse")
_VERBS = ("sleeps", "waits", "sings", "walks", "rests", "dreams", "plays", "works")
_PLACES = ("bridge", "market", "harbor", "forest", "library", "mill", "valley", "station")
_SEASONS = ("spring", "summer", "autumn", "winter")


def _rng(stream: str, split: str, index: int) -> random.Random:
  # String seeds are hashed with sha512 by `random`: stable across runs and
  # machines (unlike hash()), and distinct streams/splits never share a seed.
  return random.Random(f"{stream}/{split}/{index}")


# ------------------------------------------------------------------ domains
def _arithmetic(rng: random.Random) -> str:
  lines = []
  for _ in range(rng.randint(3, 8)):
    op = rng.choice("+-*")
    a, b = rng.randint(0, 99), rng.randint(0, 99 if op != "*" else 12)
    if op == "-" and b > a:
      a, b = b, a
    c = a + b if op == "+" else a - b if op == "-" else a * b
    lines.append(f"{a} {op} {b} = {c}")
  return "\n".join(lines)


def _record_fields(rng: random.Random, min_fields: int = 3) -> list[tuple[str, str]]:
  keys = rng.sample(sorted(RECORD_VALUES), rng.randint(min_fields, len(RECORD_VALUES)))
  return [(k, rng.choice(RECORD_VALUES[k])) for k in keys]


def _record_text(record_id: int, fields: Sequence[tuple[str, str]]) -> str:
  return f"record {record_id}: " + "; ".join(f"{k}={v}" for k, v in fields) + "."


def _records(rng: random.Random) -> str:
  record_id = rng.randint(1000, 9999)
  fields = _record_fields(rng)
  lookups = rng.sample(fields, rng.randint(1, min(3, len(fields))))
  return "\n".join(
      [_record_text(record_id, fields)] + [f"lookup {k} -> {v}" for k, v in lookups]
  )


def _prose(rng: random.Random) -> str:
  def sentence():
    kind = rng.randrange(3)
    if kind == 0:
      return f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} beside the {rng.choice(_ADJECTIVES)} {rng.choice(_PLACES)}."
    if kind == 1:
      return f"every {rng.choice(_SEASONS)}, the {rng.choice(_NOUNS)} {rng.choice(_VERBS)} near the {rng.choice(_PLACES)}."
    return f"one {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} is never {rng.choice(_ADJECTIVES)}."

  return " ".join(sentence() for _ in range(rng.randint(3, 6)))


def _code(rng: random.Random) -> str:
  args = list("xyz"[: rng.randint(1, 3)])
  defined = list(args)
  lines = [f"def f{rng.randint(0, 99)}({', '.join(args)}):"]
  for name in "abcde"[: rng.randint(2, 5)]:
    left = rng.choice(defined)
    right = rng.choice(defined) if rng.random() < 0.5 else str(rng.randint(1, 9))
    lines.append(f"    {name} = {left} {rng.choice('+-*')} {right}")
    defined.append(name)
  lines.append(f"    return {defined[-1]}")
  return "\n".join(lines)


_GENERATORS: Mapping[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic, "records": _records, "prose": _prose, "code": _code,
}


def document(split: str, index: int) -> tuple[str, str]:
  """(domain, text) of pretraining document `index` of `split`."""
  rng = _rng("doc", split, index)
  domain = rng.choice(DOMAINS)
  return domain, _GENERATORS[domain](rng)


def qa_example(split: str, index: int) -> dict[str, str]:
  """Supervised example `index` of `split`: {'inputs': question + record, 'targets': value}."""
  rng = _rng("qa", split, index)
  record_id = rng.randint(1000, 9999)
  fields = _record_fields(rng, min_fields=2)
  key, value = rng.choice(fields)
  question = f"question: what is the {key} of record {record_id}?"
  return {"inputs": f"{question} {_record_text(record_id, fields)}", "targets": value}


# ------------------------------------------------------------------ statistics
def unigram_entropy(
    vocab: seqio.Vocabulary | None = None, num_docs: int = 2000, split: str = "train"
) -> float:
  """Entropy (nats per token) of the empirical unigram distribution of the corpus.

  Over the tokens of the first `num_docs` documents of `split` under `vocab`
  (default: the byte vocabulary; EOS and sentinels excluded). A model that
  ignored all context and predicted token frequencies would pay this much per
  corpus token; the span-corruption loss of a model that learned the
  structure goes well below it.
  """
  counts = collections.Counter()
  for i in range(num_docs):
    text = document(split, i)[1]
    counts.update(text.encode("utf-8") if vocab is None else vocab.encode(text))
  freq = np.array(list(counts.values()), dtype=np.float64)
  p = freq / freq.sum()
  return float(-(p * np.log(p)).sum())


def majority_baseline(split: str = "validation", num_examples: int | None = None) -> tuple[str, float]:
  """(most frequent answer, its exact-match accuracy) of the QA task on `split`.

  What a model that always emits the most common answer scores; expect about
  1/48 = 2.1% (48 equiprobable answers) plus sampling noise.
  """
  n = QA_SPLIT_SIZES[split] if num_examples is None else num_examples
  counts = collections.Counter(qa_example(split, i)["targets"] for i in range(n))
  answer, count = counts.most_common(1)[0]
  return answer, count / n


def domain_counts(split: str, num_docs: int) -> dict[str, int]:
  """How many of the first `num_docs` documents of `split` fall in each domain."""
  return dict(collections.Counter(document(split, i)[0] for i in range(num_docs)))


# ------------------------------------------------------------------ seqio source
class GeneratedSource(seqio.DataSource):
  """seqio DataSource over an indexed generator: example i of a split = make_example(split, i).

  Sharding is by index (shard k of n generates indices k, k+n, ...), so a
  shard never generates the others' examples. Examples are i.i.d. by
  construction, so the source itself does not shuffle; the Task's shuffle
  buffer still does when asked.
  """

  def __init__(
      self,
      make_example: Callable[[str, int], Mapping[str, str]],
      keys: Sequence[str],
      split_sizes: Mapping[str, int],
  ):
    super().__init__(
        splits=tuple(split_sizes), num_input_examples=dict(split_sizes), caching_permitted=False
    )
    self._make_example = make_example
    self._keys = tuple(keys)
    self._sizes = dict(split_sizes)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def get_dataset(
      self,
      split: str = "train",
      shuffle: bool = True,
      seed: int | None = None,
      shard_info: seqio.ShardInfo | None = None,
      *,
      sequence_length: Mapping[str, int] | None = None,  # unused
      use_cached: bool = False,  # unused
      num_epochs: int | None = 1,  # unused
  ) -> tf.data.Dataset:
    del shuffle, seed, sequence_length, use_cached, num_epochs
    if split not in self._sizes:
      raise ValueError(f"split {split!r} not in {sorted(self._sizes)}")
    start, step = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)

    def generate(index):
      example = self._make_example(split, int(index))
      return [example[k] for k in self._keys]

    @tf.autograph.experimental.do_not_convert
    def to_features(index):
      values = tf.py_function(generate, [index], [tf.string] * len(self._keys))
      return {k: tf.ensure_shape(v, []) for k, v in zip(self._keys, values)}

    ds = tf.data.Dataset.range(start, self._sizes[split], step)
    return ds.map(to_features, num_parallel_calls=tf.data.AUTOTUNE)


def pretraining_source() -> GeneratedSource:
  """Source of {'text': document} for span corruption."""
  return GeneratedSource(lambda s, i: {"text": document(s, i)[1]}, ["text"], SPLIT_SIZES)


def qa_source() -> GeneratedSource:
  """Source of {'inputs': question, 'targets': answer} for fine-tuning."""
  return GeneratedSource(qa_example, ["inputs", "targets"], QA_SPLIT_SIZES)


def iter_documents(split: str, start: int = 0, count: int = 1) -> Iterator[tuple[str, str]]:
  """(domain, text) of documents start..start+count-1, e.g. for domain-labelled token traces."""
  for i in range(start, start + count):
    yield document(split, i)
