"""seqio Task and Mixture registrations.

Names registered by `register_all()` (run on `import stmoe.data`):

  stmoe_synthetic_span_corruption   offline corpus, span corruption    (bytes)
  stmoe_synthetic_qa                offline record QA, exact match     (bytes)
  c4_span_corruption                c4/en via TFDS, span corruption    (T5 SentencePiece)
  glue_sst2, glue_mnli              T5 text-to-text, accuracy          (T5 SentencePiece)
  super_glue_boolq, _rte, _cb, _copa                                   (T5 SentencePiece)
  super_glue_mix                    the four above, rate = min(train size, 65536)

Vocabularies. A task's vocabulary is fixed at registration, but configs hold a
vocabulary path. Each name above is a *family* with a default vocabulary (in
parentheses); `task_name_for(base, vocab_path)` returns the name of the
variant that uses `vocab_path` (None = bytes), registering it on first use:
the default vocabulary keeps the base name, any other gets
'<base>.<vocab_tag>', e.g. 'glue_sst2.byte' or
'stmoe_synthetic_span_corruption.spm_my_vocab_1a2b3c4d'. The trainer should
always go through `task_name_for(config.task, config.vocab_path)`.

`register_text_files_task` registers a user's own local text for span
corruption under a name of their choice, with the vocabulary they pass;
`register_text_files_tasks` registers a training and a held-out task whose
documents never overlap (a stable hash of each document picks its side).

Registration never reads data or loads a SentencePiece model, so importing
this module works offline; the TFDS tasks download on first use.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from stmoe.data import corpus, metrics, vocab
from stmoe.data import preprocessors as prep

# Pinned TFDS versions, so a rerun reads the same data (those of tfds 4.9).
C4_TFDS = "c4/en:3.1.0"
GLUE_VERSION = "2.0.0"
SUPER_GLUE_VERSION = "1.0.2"

# SuperGLUE mixing (T5 paper sec. 3.5.2 "examples-proportional mixing" with
# K = 2^16): each task's rate is its train-set size capped at 65,536. Sizes of
# the official train splits, fixed here so that building the mixture needs no
# dataset metadata (offline, and identical across TFDS versions).
MIXING_CAP = 65_536
SUPER_GLUE_TRAIN_SIZES = {"boolq": 9_427, "cb": 250, "copa": 400, "rte": 2_490}

# (tfds config, input feature names in T5's order, label names by TFDS label id, metric fns).
# T5 joins the features in sorted-name order: "rte hypothesis: ... premise: ...".
GLUE_TASKS = {
    "sst2": (("sentence",), ("negative", "positive")),
    "mnli": (("hypothesis", "premise"), ("entailment", "neutral", "contradiction")),
}
SUPER_GLUE_TASKS = {
    "boolq": (("passage", "question"), ("False", "True")),
    "rte": (("hypothesis", "premise"), ("entailment", "not_entailment")),
    "cb": (("hypothesis", "premise"), ("entailment", "contradiction", "neutral")),
    "copa": (("choice1", "choice2", "premise", "question"), ("choice1", "choice2")),
}
_GLUE_SPLITS = {
    "sst2": ("train", "validation", "test"),
    "mnli": ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"),
}
_SUPER_GLUE_SPLITS = ("train", "validation", "test")


def _features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }


_TEXT_TO_TARGETS = functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"})


def _span_corruption_preprocessors(cacheable: bool) -> list:
  """rekey text -> targets, tokenize, [cache], corrupt, EOS."""
  steps = [_TEXT_TO_TARGETS, seqio.preprocessors.tokenize]
  if cacheable:
    steps.append(seqio.CacheDatasetPlaceholder())
  return steps + [prep.span_corruption, seqio.preprocessors.append_eos_after_trim]


# ------------------------------------------------------------------ families
# base name -> (builder(name, vocab_path) that registers it, default vocab path)
_FAMILIES: dict[str, tuple[Callable[[str, str | None], None], str | None]] = {}


def _family(base: str, default_vocab: str | None):
  def decorate(builder):
    _FAMILIES[base] = (builder, default_vocab)
    return builder
  return decorate


def _add_task(name: str, vocab_path: str | None, **kwargs) -> None:
  """Registers `name` with the inputs / targets features of the vocabulary at `vocab_path`."""
  seqio.TaskRegistry.add(name, output_features=_features(vocab.get_vocabulary(vocab_path)), **kwargs)


@_family("stmoe_synthetic_span_corruption", None)
def _synthetic_span_corruption(name: str, vocab_path: str | None) -> None:
  _add_task(
      name, vocab_path,
      source=corpus.pretraining_source(),
      preprocessors=_span_corruption_preprocessors(cacheable=False),
      # Documents are i.i.d. already; the buffer only has to separate the ~25
      # consecutive chunks cut from one group of 128 documents (at 512 inputs).
      # 256 does, and fills 4x faster than seqio's 1000 at every pipeline start.
      shuffle_buffer_size=256,
  )


@_family("stmoe_synthetic_qa", None)
def _synthetic_qa(name: str, vocab_path: str | None) -> None:
  _add_task(
      name, vocab_path,
      source=corpus.qa_source(),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      metric_fns=[metrics.exact_match],
  )


@_family("c4_span_corruption", vocab.T5_SPM_PATH)
def _c4_span_corruption(name: str, vocab_path: str | None) -> None:
  _add_task(
      name, vocab_path,
      source=seqio.TfdsDataSource(tfds_name=C4_TFDS, splits=("train", "validation")),
      preprocessors=_span_corruption_preprocessors(cacheable=True),
  )


def _classification_task(
    name: str, vocab_path: str | None, tfds_name: str, benchmark: str, splits: Sequence[str],
    feature_names: Sequence[str], label_names: Sequence[str],
) -> None:
  metric_fns = [metrics.accuracy]
  if len(label_names) > 2:  # CB and MNLI: also report the mean per-class F1 (CB's official metric)
    metric_fns.append(metrics.mean_class_f1(label_names))
  _add_task(
      name, vocab_path,
      source=seqio.TfdsDataSource(tfds_name=tfds_name, splits=splits),
      preprocessors=[
          prep.text_to_text(benchmark, feature_names, label_names),
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
      ],
      metric_fns=metric_fns,
  )


for _config, (_fields, _labels) in GLUE_TASKS.items():
  _family(f"glue_{_config}", vocab.T5_SPM_PATH)(
      functools.partial(
          _classification_task, tfds_name=f"glue/{_config}:{GLUE_VERSION}", benchmark=_config,
          splits=_GLUE_SPLITS[_config], feature_names=_fields, label_names=_labels,
      )
  )
for _config, (_fields, _labels) in SUPER_GLUE_TASKS.items():
  _family(f"super_glue_{_config}", vocab.T5_SPM_PATH)(
      functools.partial(
          _classification_task, tfds_name=f"super_glue/{_config}:{SUPER_GLUE_VERSION}",
          benchmark=_config, splits=_SUPER_GLUE_SPLITS, feature_names=_fields, label_names=_labels,
      )
  )


@_family("super_glue_mix", vocab.T5_SPM_PATH)
def _super_glue_mix(name: str, vocab_path: str | None) -> None:
  seqio.MixtureRegistry.add(
      name,
      [
          (task_name_for(f"super_glue_{config}", vocab_path), float(min(size, MIXING_CAP)))
          for config, size in SUPER_GLUE_TRAIN_SIZES.items()
      ],
  )


# ------------------------------------------------------------------ public API
def _registered(name: str) -> bool:
  return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


def families() -> dict[str, str | None]:
  """Base task/mixture names -> their default vocabulary path (None = bytes)."""
  return {base: default for base, (_, default) in _FAMILIES.items()}


def task_name_for(base: str, vocab_path: str | None) -> str:
  """The registered name of task family `base` with the vocabulary at `vocab_path`.

  Registers the variant on first call (idempotent). A name that is not a
  family but is already registered (e.g. a text_files task, which carries its
  own vocabulary) is returned unchanged.
  """
  if base not in _FAMILIES:
    if _registered(base):
      return base
    raise KeyError(f"unknown task or mixture {base!r}; families: {sorted(_FAMILIES)}")
  builder, default_vocab = _FAMILIES[base]
  name = base if vocab_path == default_vocab else f"{base}.{vocab.vocab_tag(vocab_path)}"
  if not _registered(name):
    builder(name, vocab_path)
  return name


def register_all() -> list[str]:
  """Registers every family with its default vocabulary; safe to call repeatedly."""
  return [task_name_for(base, default) for base, (_, default) in _FAMILIES.items()]


HELD_OUT_BUCKETS = 100  # documents are hashed into 100 buckets; the first `held_out_percent` are held out


def held_out_bucket(text: tf.Tensor) -> tf.Tensor:
  """A document's bucket in [0, 100): FarmHash Fingerprint64 of its bytes mod 100
  (`tf.strings.to_hash_bucket_fast`), the same on every machine, run and shard, and the same for
  two copies of one document, so a repeated document never lands in both splits."""
  return tf.strings.to_hash_bucket_fast(text, HELD_OUT_BUCKETS)


def register_text_files_task(
    name: str,
    file_patterns: str | Sequence[str] | Mapping[str, str | Sequence[str]],
    vocab_path: str | None = None,
    one_doc_per: str = "line",
    *,
    documents: str = "all",
    held_out_percent: int = 0,
) -> str:
  """Registers span-corruption pretraining on local text files; returns `name`.

  Args:
    name: task name to register (re-registering the same name replaces it).
    file_patterns: glob(s) for the 'train' split, or {split: glob(s)}.
    vocab_path: SentencePiece model path, or None for bytes.
    one_doc_per: 'line' (each non-empty line is a document) or 'file'
      (each file is one document).
    documents: 'all', or a deterministic split of the documents by
      `held_out_bucket`: 'held_out' keeps those in buckets < held_out_percent,
      'train' the others (`register_text_files_tasks` registers both).
  """
  if one_doc_per not in ("line", "file"):
    raise ValueError(f"one_doc_per must be 'line' or 'file', got {one_doc_per!r}")
  if documents not in ("all", "train", "held_out"):
    raise ValueError(f"documents must be 'all', 'train' or 'held_out', got {documents!r}")
  if isinstance(file_patterns, (str, bytes)) or not isinstance(file_patterns, Mapping):
    file_patterns = {"train": file_patterns}
  split_to_pattern = {s: ([p] if isinstance(p, str) else list(p)) for s, p in file_patterns.items()}

  if one_doc_per == "line":
    source = seqio.TextLineDataSource(split_to_pattern)
  else:
    source = seqio.FileDataSource(
        read_file_fn=lambda path: tf.data.Dataset.from_tensors(tf.io.read_file(path)),
        split_to_filepattern=split_to_pattern,
    )

  @seqio.map_over_dataset
  @tf.autograph.experimental.do_not_convert
  def as_document(text):
    return {"text": text}

  def drop_blank(ds):
    return ds.filter(lambda ex: tf.strings.length(tf.strings.strip(ex["text"])) > 0)

  def keep_part(ds):
    if documents == "all":
      return ds
    held_out = lambda ex: held_out_bucket(ex["text"]) < held_out_percent
    return ds.filter(held_out if documents == "held_out" else lambda ex: tf.logical_not(held_out(ex)))

  seqio.TaskRegistry.remove(name)
  _add_task(
      name, vocab_path,
      source=source,
      preprocessors=[as_document, drop_blank, keep_part] + _span_corruption_preprocessors(cacheable=True),
  )
  return name


def register_text_files_tasks(
    name: str,
    file_patterns: str | Sequence[str],
    vocab_path: str | None = None,
    *,
    eval_file_patterns: str | Sequence[str] | None = None,
    held_out_percent: int = 5,
    eval_split: str = "validation",
    one_doc_per: str = "line",
) -> tuple[str, str]:
  """Training and held-out span-corruption tasks on local text; -> (train task, eval task).

  With `eval_file_patterns`, the held-out task reads those files and training reads all of
  `file_patterns`. Without, both read `file_patterns` and the documents in `held_out_bucket` <
  `held_out_percent` are held out: the held-out task (split `eval_split`) has only those, the
  training task (split 'train') never sees them.
  """
  if eval_file_patterns:
    train = register_text_files_task(name, {"train": file_patterns}, vocab_path, one_doc_per)
    held_out = register_text_files_task(f"{name}.held_out", {eval_split: eval_file_patterns}, vocab_path,
                                        one_doc_per)
    return train, held_out
  train = register_text_files_task(name, {"train": file_patterns}, vocab_path, one_doc_per, documents="train",
                                   held_out_percent=held_out_percent)
  held_out = register_text_files_task(f"{name}.held_out", {eval_split: file_patterns}, vocab_path, one_doc_per,
                                      documents="held_out", held_out_percent=held_out_percent)
  return train, held_out


@dataclasses.dataclass(frozen=True)
class TaskNames:
  """The registered seqio names a run reads (its vocabulary's variants)."""

  train: str
  eval: str
  infer_eval: str = ""  # "" = no decoding evaluation


def resolve_tasks(run) -> TaskNames:
  """Registers the tasks of a validated `stmoe.config.RunConfig` and returns their names.

  What only the registry can answer fails here, as a ConfigError naming the field: an unknown
  task, a split the task does not declare, a vocabulary with more ids than `model.vocab_size`
  (an id past the embedding table gives NaN losses, not an error). Reads no data.
  """
  from stmoe.config import ConfigError, check

  d, infer = run.data, run.infer_eval
  vocab_path = d.vocab_path or None

  def name_for(field: str, family: str) -> str:
    try:
      return task_name_for(family, vocab_path or families().get(family))
    except KeyError as e:
      raise ConfigError(f"{field}: {e.args[0]}") from None

  def check_split(field: str, task: str, split: str) -> None:
    splits = sorted(seqio.get_mixture_or_task(task).splits)  # declared at registration: reads nothing
    check(split in splits, field, f"{split!r} is not a split of {task}: {splits}")

  if d.text_files:
    train, held_out = register_text_files_tasks(
        "stmoe_text_files", d.text_files, vocab_path, eval_file_patterns=d.eval_text_files or None,
        held_out_percent=d.held_out_percent, eval_split=d.eval_split)
  else:
    train = name_for("data.task", d.task)
    held_out = name_for("data.eval_task", d.eval_task) if d.eval_task else train
  if run.eval_steps:
    check_split("data.eval_split", held_out, d.eval_split)

  vocabulary = seqio.get_mixture_or_task(train).output_features["targets"].vocabulary  # loads nothing
  checked = getattr(vocabulary, "sentencepiece_model_file", None)  # None: bytes
  try:
    ids = vocab.num_ids(checked)
  except ValueError as e:
    raise ConfigError(f"data.vocab_path: {e}") from None
  source = (f"data.vocab_path={vocab_path}" if vocab_path else
            f"the vocabulary of data.{'text_files' if d.text_files else 'task'}, {checked or 'bytes'},")
  pieces = f"{ids - vocab.NUM_EXTRA_IDS} pieces" if checked else f"{ids - vocab.NUM_EXTRA_IDS} bytes and specials"
  check(ids <= run.model.vocab_size, "model.vocab_size",
        f"{run.model.vocab_size} is smaller than the {ids} token ids of {source} ({pieces} + "
        f"{vocab.NUM_EXTRA_IDS} sentinels); set --config.model.vocab_size={-(-ids // 128) * 128} (the next "
        "multiple of 128)")

  infer_eval = ""
  if infer.task:
    infer_eval = name_for("infer_eval.task", infer.task)
    check_split("infer_eval.split", infer_eval, infer.split)
  return TaskNames(train=train, eval=held_out, infer_eval=infer_eval)
