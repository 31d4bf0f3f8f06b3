"""Vocabularies: offline bytes by default, SentencePiece from a path.

Every task needs a `seqio.Vocabulary`, and the sentinel ids of span corruption
are its extra ids (the top `extra_ids` ids, used counting down from
`vocab_size - 1`). Configs hold a vocabulary *path*; this module turns it into
a vocabulary and into a short tag that names per-vocabulary task variants.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re

import seqio

# The public T5 SentencePiece model (32k pieces). Only a default for real runs
# on C4 / GLUE / SuperGLUE; nothing offline (tests, quick start) loads it.
T5_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"

# T5 reserves 100 extra ids as sentinels; a span-corrupted example of 568
# tokens has 28 noise spans, so 100 is plenty at every length we use.
NUM_EXTRA_IDS = 100
# Ids of T5_SPM_PATH with the extra ids (32000 pieces + 100), so that checking a
# config against it needs no download; the model presets pad it to 32128.
T5_SPM_NUM_IDS = 32_000 + NUM_EXTRA_IDS


@functools.lru_cache(maxsize=None)
def get_vocabulary(path: str | None) -> seqio.Vocabulary:
  """Returns the vocabulary for a config's `vocab_path`.

  None -> `seqio.ByteVocabulary` (3 special ids + 256 bytes + 100 extra ids =
  359 ids); anything else -> `seqio.SentencePieceVocabulary(path, extra_ids=100)`.
  Cached so that tasks registered twice with one path share one object (seqio
  compares the vocabularies of a mixture's tasks). SentencePiece models are
  loaded lazily by seqio, on first encode, so this never touches `path`.
  """
  if path is None:
    return seqio.ByteVocabulary(extra_ids=NUM_EXTRA_IDS)
  return seqio.SentencePieceVocabulary(path, extra_ids=NUM_EXTRA_IDS)


def num_ids(path: str | None) -> int:
  """How many token ids `get_vocabulary(path)` produces (pieces + extra ids): every id is below this.

  Loads a SentencePiece model (except the public T5 one, whose size is known); raises ValueError in
  one line for a file that does not exist or is not a SentencePiece model.
  """
  if path == T5_SPM_PATH:
    return T5_SPM_NUM_IDS
  if path is not None:
    import tensorflow as tf
    if not tf.io.gfile.exists(path):
      raise ValueError(f"no such file {path!r} (make one with scripts/train_vocab.py)")
  try:
    return int(get_vocabulary(path).vocab_size)
  except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, sentencepiece's RuntimeError
    get_vocabulary.cache_clear()  # do not keep a vocabulary that failed to load
    raise ValueError(f"{path!r} is not a SentencePiece model ({type(e).__name__}: "
                     f"{str(e).strip().splitlines()[-1] if str(e).strip() else 'unreadable'})") from None


def vocab_tag(path: str | None) -> str:
  """A short, task-name-safe tag for a vocabulary path.

  'byte' for None; otherwise 'spm_<file stem>_<8 hex of sha1(path)>', so two
  models with the same file name in different folders get different tasks.
  """
  if path is None:
    return "byte"
  stem = os.path.splitext(os.path.basename(path))[0]
  stem = re.sub(r"\W", "_", stem)[:24]
  digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:8]
  return f"spm_{stem}_{digest}"


def train_sentencepiece(
    input_files: list[str],
    model_prefix: str,
    vocab_size: int = 32_000,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentences: int = 10_000_000,
    byte_fallback: bool = True,
) -> str:
  """Trains a SentencePiece model on local text files; returns the '.model' path.

  Ids follow T5's layout, which `seqio.EncDecFeatureConverter` relies on:
  pad = 0 (also the decoder start token), eos = 1, unk = 2, no bos. The model
  loads as `get_vocabulary(path)`, i.e. with 100 extra ids appended on top as
  span-corruption sentinels. Each line of the input is one training sentence.
  """
  import sentencepiece as spm  # only needed here

  spm.SentencePieceTrainer.train(
      input=",".join(input_files),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      input_sentence_size=max_sentences,
      shuffle_input_sentence=True,
      byte_fallback=byte_fallback,
      minloglevel=2,  # the trainer's progress log would fill stderr
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
  )
  return model_prefix + ".model"
