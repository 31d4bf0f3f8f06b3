"""Every registered task yields batches of the configured shapes, offline.

TFDS tasks read fake data: `tfds.testing.mock_data` generates examples from
each builder's feature spec (in code), and the split metadata seqio asks for
(example counts, file lists) is written to a temporary data_dir by
`_write_split_metadata`, since tfds ships none and the test may not download.
"""
import importlib.util
import os

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import stmoe.data  # noqa: F401  (registers everything)
from stmoe.data import metrics, pipeline, tasks, vocab

LENGTHS = {"inputs": 64, "targets": 16}
BATCH = 4
BYTES = seqio.ByteVocabulary(extra_ids=100)
NUM_MOCK = 8


def _write_split_metadata(data_dir, tfds_name, splits):
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict(
      [tfds.core.SplitInfo(name=s, shard_lengths=[NUM_MOCK], num_bytes=0, filename_template=None) for s in splits]
  ))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


@pytest.fixture(scope="module")
def mock_tfds(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  _write_split_metadata(data_dir, tasks.C4_TFDS, ["train", "validation"])
  for config in tasks.GLUE_TASKS:
    _write_split_metadata(data_dir, f"glue/{config}:{tasks.GLUE_VERSION}", tasks._GLUE_SPLITS[config])
  for config in tasks.SUPER_GLUE_TASKS:
    _write_split_metadata(data_dir, f"super_glue/{config}:{tasks.SUPER_GLUE_VERSION}", ["train", "validation", "test"])
  with tfds.testing.mock_data(num_examples=NUM_MOCK, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir):
    yield data_dir


def check_packed_batch(batch, lengths=LENGTHS, batch_size=BATCH):
  """Independent numpy check of EncDecFeatureConverter's packed layout."""
  for side, length in (("encoder", lengths["inputs"]), ("decoder", lengths["targets"])):
    seg, pos = batch[f"{side}_segment_ids"], batch[f"{side}_positions"]
    assert seg.shape == pos.shape == (batch_size, length)
    for row_seg, row_pos in zip(seg, pos):
      used = row_seg[row_seg > 0]
      assert np.all(np.diff(used) >= 0) and (used.size == 0 or used[0] == 1)
      assert np.all(row_seg[used.size:] == 0)  # padding only at the end
      for s in np.unique(used):
        np.testing.assert_array_equal(row_pos[row_seg == s], np.arange((row_seg == s).sum()))
  tokens = batch["encoder_input_tokens"]
  assert tokens.shape == (batch_size, lengths["inputs"])
  np.testing.assert_array_equal(tokens > 0, batch["encoder_segment_ids"] > 0)
  targets, dec_in = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
  assert targets.shape == dec_in.shape == batch["decoder_loss_weights"].shape == (batch_size, lengths["targets"])
  np.testing.assert_array_equal(batch["decoder_loss_weights"], batch["decoder_segment_ids"] > 0)
  for r in range(batch_size):  # decoder inputs: targets shifted right, restarting at 0 in each example
    seg = batch["decoder_segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      t = targets[r][seg == s]
      np.testing.assert_array_equal(dec_in[r][seg == s], np.concatenate([[0], t[:-1]]))
      assert t[-1] == 1  # each packed example ends with EOS (possibly after trimming)
  for key in pipeline.KEYS + pipeline.PACKED_KEYS:
    assert batch[key].dtype == np.int32


def first_batch(name, split="train", pack=True, lengths=LENGTHS):
  it = pipeline.get_batch_iterator(name, split, lengths, BATCH, pack=pack, seed=1)
  batch = next(it)
  it.close()
  return batch


def test_register_all_is_idempotent():
  names = tasks.register_all()
  importlib.reload(stmoe.data)
  assert tasks.register_all() == names
  expected = {"stmoe_synthetic_span_corruption", "stmoe_synthetic_qa", "c4_span_corruption", "glue_sst2",
              "glue_mnli", "super_glue_boolq", "super_glue_rte", "super_glue_cb", "super_glue_copa"}
  assert expected <= set(seqio.TaskRegistry.names())
  assert "super_glue_mix" in seqio.MixtureRegistry.names()


def test_vocabularies_and_variant_names():
  assert vocab.get_vocabulary(None).vocab_size == 3 + 256 + 100
  vocab.get_vocabulary("/nonexistent/sp.model")  # lazy: nothing is read at construction
  assert tasks.task_name_for("stmoe_synthetic_qa", None) == "stmoe_synthetic_qa"
  assert tasks.task_name_for("glue_sst2", vocab.T5_SPM_PATH) == "glue_sst2"
  assert tasks.task_name_for("glue_sst2", None) == "glue_sst2.byte"
  name = tasks.task_name_for("stmoe_synthetic_qa", "/a/b/my vocab.model")
  assert name.startswith("stmoe_synthetic_qa.spm_my_vocab_") and name in seqio.TaskRegistry.names()
  with pytest.raises(KeyError):
    tasks.task_name_for("no_such_task", None)


@pytest.mark.parametrize("name", ["stmoe_synthetic_span_corruption", "stmoe_synthetic_qa"])
def test_synthetic_tasks_packed_batches(name):
  check_packed_batch(first_batch(name))


def test_synthetic_span_corruption_uses_sentinels():
  batch = first_batch("stmoe_synthetic_span_corruption", pack=False, lengths={"inputs": 64, "targets": 20})
  targets = batch["decoder_target_tokens"]
  assert np.all(targets[:, 0] == BYTES.vocab_size - 1)  # every target starts with the first sentinel
  assert (batch["encoder_input_tokens"] >= BYTES.vocab_size - 100).any()


@pytest.mark.parametrize("base", ["c4_span_corruption", "glue_sst2", "glue_mnli", "super_glue_boolq",
                                  "super_glue_rte", "super_glue_cb", "super_glue_copa", "super_glue_mix"])
def test_tfds_tasks_on_mock_data(mock_tfds, base):
  check_packed_batch(first_batch(tasks.task_name_for(base, None)))


@pytest.mark.parametrize("base,split", [("glue_sst2", "validation"), ("glue_mnli", "validation_matched"),
                                        ("super_glue_copa", "validation"), ("super_glue_cb", "train")])
def test_text_to_text_format(mock_tfds, base, split):
  task = seqio.get_mixture_or_task(tasks.task_name_for(base, None))
  benchmark = base.split("_")[-1]
  fields, labels = {**tasks.GLUE_TASKS, **tasks.SUPER_GLUE_TASKS}[benchmark]
  # The label names must be TFDS's, in TFDS's id order (read from the builder's code, no download).
  builder = tfds.builder(task.source.tfds_dataset.name)
  assert tuple(builder.info.features["label"].names) == labels
  ds = task.get_dataset({"inputs": 512, "targets": 16}, split=split, shuffle=False)
  for ex in ds.take(3).as_numpy_iterator():
    text = ex["inputs_pretokenized"].decode()
    assert text.startswith(f"{benchmark} {fields[0]}: ")
    assert all(f" {f}: " in text for f in fields[1:])
    assert ex["targets_pretokenized"].decode() in labels


def test_text_files_task_with_trained_sentencepiece(tmp_path):
  lines = [f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i * 3}" for i in range(300)]
  (tmp_path / "a.txt").write_text("\n".join(lines[:150]) + "\n\n")
  (tmp_path / "b.txt").write_text("\n".join(lines[150:]))
  spec = importlib.util.spec_from_file_location(
      "train_vocab", os.path.join(os.path.dirname(__file__), "..", "scripts", "train_vocab.py"))
  train_vocab = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(train_vocab)
  assert train_vocab.main(["--input", str(tmp_path / "*.txt"), "--model_prefix", str(tmp_path / "sp"),
                           "--vocab_size", "80", "--no_byte_fallback"]) == 0
  model = str(tmp_path / "sp.model")
  spm = vocab.get_vocabulary(model)
  assert spm.vocab_size == 180 and spm.eos_id == 1 and spm.pad_id == 0
  assert spm.decode(spm.encode("the lazy dog 42")) == "the lazy dog 42"

  for one_doc_per in ("line", "file"):
    name = tasks.register_text_files_task(
        f"test_text_{one_doc_per}", str(tmp_path / "*.txt"), vocab_path=model, one_doc_per=one_doc_per)
    assert tasks.task_name_for(name, None) == name  # a registered non-family name is returned as is
    batch = first_batch(name)
    check_packed_batch(batch)
    assert (batch["decoder_target_tokens"] == spm.vocab_size - 1).any()  # first sentinel of the SentencePiece vocab
  # The source sees 300 lines + 1 blank one; the blank one is not a document.
  task = seqio.get_mixture_or_task("test_text_line")
  assert sum(1 for _ in task.source.get_dataset("train", shuffle=False)) == 301
  as_document, drop_blank = task.preprocessors[:2]
  docs = drop_blank(as_document(task.source.get_dataset("train", shuffle=False)))
  assert sum(1 for _ in docs) == 300


def test_metrics_by_hand():
  assert metrics.exact_match(["a", b"b", "c "], ["a", "b", "x"]) == {"exact_match": pytest.approx(200 / 3)}
  assert metrics.accuracy(["x", "y"], ["x", "x"]) == {"accuracy": 50.0}
  # targets a a b b, predictions a b c b:
  #   a: tp 1, fp 0, fn 1 -> F1 2/3;  b: tp 1, fp 1, fn 1 -> 1/2;  c: tp 0, fp 1 -> 0.
  f1 = metrics.mean_class_f1(["a", "b", "c"])(["a", "a", "b", "b"], ["a", "b", "c", "b"])
  assert f1["mean_class_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3)


def test_super_glue_mixture_rates():
  # Examples-proportional, capped at 2^16 (T5 sec. 3.5.2); all four sizes are under the cap.
  mix = seqio.get_mixture_or_task("super_glue_mix")
  assert {t.name: mix.get_rate(t) for t in mix.tasks} == {
      "super_glue_boolq": 9427.0, "super_glue_cb": 250.0, "super_glue_copa": 400.0, "super_glue_rte": 2490.0}
