"""Data: seqio tasks (offline corpus, C4, GLUE/SuperGLUE, local text), span corruption, batches.

Importing this package registers every task family with its default
vocabulary (idempotent). Main entry points:

  get_batch_iterator(name, split, {"inputs": L_in, "targets": L_out}, batch_size, ...)
  task_name_for(base, vocab_path)       per-vocabulary task names
  get_vocabulary(vocab_path)            None -> bytes, path -> SentencePiece
  register_text_files_task(name, file_patterns, vocab_path, one_doc_per)
  register_text_files_tasks(name, file_patterns, vocab_path, ...)   training + held-out, disjoint
"""
from stmoe.data.corpus import majority_baseline, unigram_entropy
from stmoe.data.pipeline import BatchIterator, get_batch_iterator
from stmoe.data.preprocessors import corrupted_lengths, pre_corruption_length, span_corruption
from stmoe.data.tasks import (TaskNames, register_all, register_text_files_task, register_text_files_tasks,
                               resolve_tasks, task_name_for)
from stmoe.data.vocab import T5_SPM_PATH, get_vocabulary, num_ids

register_all()
