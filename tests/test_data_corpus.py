"""The offline corpus: determinism, domains, learnable structure, entropy and QA baseline."""
import collections
import re

import numpy as np

from stmoe.data import corpus


def test_documents_are_deterministic_and_splits_disjoint():
  assert [corpus.document("train", i) for i in range(50)] == [corpus.document("train", i) for i in range(50)]
  train_qa = {corpus.qa_example("train", i)["inputs"] for i in range(2000)}
  val_qa = [corpus.qa_example("validation", i)["inputs"] for i in range(500)]
  assert not train_qa.intersection(val_qa)
  assert corpus.document("train", 0) != corpus.document("validation", 0)


def test_domains_are_balanced_and_structured():
  counts = corpus.domain_counts("train", 2000)
  assert set(counts) == set(corpus.DOMAINS)
  assert all(400 <= c <= 600 for c in counts.values()), counts
  for i in range(400):
    domain, text = corpus.document("train", i)
    if domain == "arithmetic":
      for line in text.split("\n"):  # every result is correct
        a, op, b, _, c = line.split()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
    elif domain == "records":  # every lookup repeats a field of the record
      head, *lookups = text.split("\n")
      fields = dict(f.split("=") for f in head.split(": ", 1)[1].rstrip(".").split("; "))
      for line in lookups:
        key, value = re.fullmatch(r"lookup (\w+) -> (\w+)", line).groups()
        assert fields[key] == value
    elif domain == "code":  # each assigned name is defined before it is used
      lines = text.split("\n")
      defined = set(re.match(r"def f\d+\((.*)\):", lines[0]).group(1).split(", "))
      for line in lines[1:-1]:
        name, expr = line.strip().split(" = ")
        assert all(tok.isdigit() or tok in defined for tok in expr.split()[::2])
        defined.add(name)


def test_unigram_entropy_matches_numpy():
  # Independent: byte histogram of the same documents (ids are bytes + 3, same entropy).
  data = np.frombuffer(b"".join(corpus.document("train", i)[1].encode() for i in range(500)), np.uint8)
  p = np.bincount(data, minlength=256) / data.size
  p = p[p > 0]
  expected = -(p * np.log(p)).sum()
  assert abs(corpus.unigram_entropy(None, num_docs=500) - expected) < 1e-9
  assert 2.5 < expected < 4.0  # well below ln(256) = 5.55: structure is there to learn


def test_qa_answers_and_majority_baseline():
  examples = [corpus.qa_example("validation", i) for i in range(400)]
  for ex in examples:
    key = re.match(r"question: what is the (\w+) of record", ex["inputs"]).group(1)
    assert f"{key}={ex['targets']};" in ex["inputs"] + ";" or f"{key}={ex['targets']}." in ex["inputs"]
  counts = collections.Counter(ex["targets"] for ex in examples)
  answer, acc = corpus.majority_baseline("validation", num_examples=400)
  assert acc == max(counts.values()) / 400 and counts[answer] == max(counts.values())
  assert 1 / 48 <= acc < 0.08
