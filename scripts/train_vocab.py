"""Trains a SentencePiece vocabulary on local text for `config.vocab_path`.

    python scripts/train_vocab.py --input 'corpus/*.txt' --model_prefix /tmp/my_vocab --vocab_size 8000

writes /tmp/my_vocab.model (and .vocab); use it as
`seqio.SentencePieceVocabulary('/tmp/my_vocab.model', extra_ids=100)`, i.e.
set vocab_path='/tmp/my_vocab.model' in a config. Each line of the input is
one sentence; SentencePiece skips lines longer than 4192 bytes (its
max_sentence_length), so split long documents into lines first.
"""
import argparse
import glob

from stmoe.data.vocab import train_sentencepiece


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", nargs="+", required=True, help="text files or globs")
  parser.add_argument("--model_prefix", required=True, help="output path without '.model'")
  parser.add_argument("--vocab_size", type=int, default=32_000, help="pieces, before the 100 sentinels")
  parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "char", "word"])
  parser.add_argument("--character_coverage", type=float, default=1.0, help="0.9995 for large-alphabet languages")
  parser.add_argument("--max_sentences", type=int, default=10_000_000, help="sample at most this many lines")
  parser.add_argument("--no_byte_fallback", action="store_true", help="map unknown characters to <unk>")
  args = parser.parse_args(argv)

  files = sorted({f for pattern in args.input for f in glob.glob(pattern)})
  if not files:
    parser.error(f"no file matches {args.input}")
  path = train_sentencepiece(
      files, args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
      character_coverage=args.character_coverage, max_sentences=args.max_sentences,
      byte_fallback=not args.no_byte_fallback,
  )
  print(path)
  return path


if __name__ == "__main__":
  main()
