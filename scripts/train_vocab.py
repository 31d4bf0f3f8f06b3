"""Trains a SentencePiece vocabulary on local text for `config.data.vocab_path`.

    python scripts/train_vocab.py --input 'corpus/*.txt' --model_prefix /tmp/my_vocab --vocab_size 8000
    python scripts/train.py --config.data.text_files='corpus/*.txt' \
        --config.data.vocab_path=/tmp/my_vocab.model --config.model.vocab_size=8192

writes /tmp/my_vocab.model (and .vocab). Runs load it as
`seqio.SentencePieceVocabulary('/tmp/my_vocab.model', extra_ids=100)`: vocab_size pieces plus 100
span-corruption sentinels, so `model.vocab_size` must be at least vocab_size + 100 (the run checks
it at start and names both numbers; round up to a multiple of 128). Each line of the input is one
sentence; SentencePiece skips lines longer than 4192 bytes (its max_sentence_length), so split long
documents into lines first.

A missing input, an unwritable output folder or a vocab_size the text cannot support: one line on
stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe import cli  # noqa: E402

PROGRAM = "train_vocab.py"


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", nargs="+", required=True, help="text files or globs")
  parser.add_argument("--model_prefix", required=True, help="output path without '.model'")
  parser.add_argument("--vocab_size", type=cli.positive_int, default=32_000, help="pieces, before the 100 sentinels")
  parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "char", "word"])
  parser.add_argument("--character_coverage", type=float, default=1.0, help="0.9995 for large-alphabet languages")
  parser.add_argument("--max_sentences", type=cli.positive_int, default=10_000_000,
                      help="sample at most this many lines")
  parser.add_argument("--no_byte_fallback", action="store_true", help="map unknown characters to <unk>")
  args = parser.parse_args(argv)

  files = sorted({f for pattern in args.input for f in glob.glob(pattern) if os.path.isfile(f)})
  if not files:
    return cli.fail(PROGRAM, "input", f"--input: no file matches {' '.join(args.input)}")
  out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
  if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
    return cli.fail(PROGRAM, "input", f"--model_prefix: folder {out_dir} does not exist or is not writable")

  cli.import_tensorflow_quietly()
  from stmoe.data.vocab import train_sentencepiece

  try:
    path = train_sentencepiece(
        files, args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
        character_coverage=args.character_coverage, max_sentences=args.max_sentences,
        byte_fallback=not args.no_byte_fallback,
    )
  except RuntimeError as e:  # SentencePiece refuses, e.g. "Vocabulary size is too high (2100). Please set ..."
    message = cli.one_line(e).rsplit("] ", 1)[-1]  # drop "INTERNAL: src/trainer_interface.cc(744) [...] "
    return cli.fail(PROGRAM, "input", f"sentencepiece: {message} (--vocab_size {args.vocab_size})")
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
