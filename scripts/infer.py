r"""Decode or score text with a trained checkpoint.

    echo "question: What is the capital of Veloria?" | python scripts/infer.py --checkpoint ./runs/finetune_qa
    python scripts/infer.py --checkpoint ./runs/finetune_qa --input questions.txt --decoding beam --beam_size 4
    python scripts/infer.py --checkpoint ./runs/finetune_qa --mode score --input pairs.tsv   # input<TAB>target

--mode predict: one input per line (file or stdin) -> one output per line on stdout.
--mode score:   `input<TAB>target` per line -> `log-likelihood<TAB>target tokens` per line on stdout
                (natural log, summed over the target tokens and EOS).
Either way stderr gets one line on routing at the eval capacity factor: the share of tokens the
MoE layers dropped in a teacher-forced pass over (input, output) (--stats_json writes it per layer).
--eval_capacity_factor replaces the checkpoint's value at load time.

A missing, incompatible or wholly damaged checkpoint (a damaged newest step is skipped for the
next older one, in one warning line), a config.json that does not read, an empty or non-UTF-8
input, a malformed score line or a bad decoding flag (--beam_size 0, --temperature 0, --top_k -5,
--max_decode_length 0; checked before the model loads): one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe import cli  # noqa: E402

PROGRAM = "infer.py"


def parse_args(argv):
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_checkpoint_args(parser)
    parser.add_argument("--mode", choices=("predict", "score"), default="predict")
    parser.add_argument("--input", default="-", help="text file; '-' = stdin")
    parser.add_argument("--output", default="-", help="'-' = stdout")
    parser.add_argument("--decoding", choices=("greedy", "beam", "sample"), default="greedy")
    parser.add_argument("--beam_size", type=cli.positive_int, default=4)
    parser.add_argument("--alpha", type=float, default=0.6, help="beam length penalty ((5 + len) / 6) ** alpha")
    parser.add_argument("--temperature", type=cli.positive_float, default=1.0)
    parser.add_argument("--top_k", type=cli.non_negative_int, default=0,
                        help="sample from the k most likely tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_decode_length", type=cli.positive_int, default=None,
                        help="default: the run's targets_length")
    parser.add_argument("--stats_json", default=None, help="write the per-layer routing stats here")
    return parser.parse_args(argv)


def read_lines(path: str, what: str) -> list[str]:
    try:
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            if not os.path.isfile(path):
                raise cli.UsageError(f"input file {path} does not exist")
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise cli.UsageError(f"input {'(stdin)' if path == '-' else path} is not UTF-8 text: byte "
                             f"{e.object[e.start:e.start + 1]!r} at offset {e.start}") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise cli.UsageError(f"input {'(stdin)' if path == '-' else path} is empty: nothing to {what}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cli.check_checkpoint_exists(args.checkpoint)
        for flag, path in (("--output", args.output), ("--stats_json", args.stats_json)):
            folder = os.path.dirname(os.path.abspath(path)) if path and path != "-" else None
            if folder and not os.path.isdir(folder):
                raise cli.UsageError(f"{flag}: folder {folder} does not exist")
        lines = read_lines(args.input, "score" if args.mode == "score" else "decode")
        if args.mode == "score":
            bad = [i + 1 for i, line in enumerate(lines) if line.count("\t") != 1]
            if bad:
                raise cli.UsageError(f"--mode score needs 'input<TAB>target' on every line; line {bad[0]} is not")
        cli.import_tensorflow_quietly()
        loaded = cli.load_model(args)
    except cli.UsageError as e:
        return cli.fail(PROGRAM, "input", e)

    from stmoe import inference

    if args.mode == "predict":
        inputs = inference.tokenize(loaded, lines)
        tokens = inference.predict_tokens(
            loaded, inputs, mode=args.decoding, batch_size=args.batch_size, max_decode_length=args.max_decode_length,
            beam_size=args.beam_size, alpha=args.alpha, temperature=args.temperature, top_k=args.top_k,
            seed=args.seed)
        outputs = inference.detokenize(loaded, tokens)
        targets = tokens
    else:
        pairs = [line.split("\t") for line in lines]
        inputs = inference.tokenize(loaded, [p[0] for p in pairs])
        targets = inference.tokenize(loaded, [p[1] for p in pairs], args.max_decode_length or loaded.targets_length)
        scores = inference.score_tokens(loaded, inputs, targets, batch_size=args.batch_size)
        outputs = [f"{s:.6f}\t{int(n)}" for s, n in zip(scores, (targets > 0).sum(axis=1))]

    stream = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        stream.write("".join(o.replace("\n", " ") + "\n" for o in outputs))
    finally:
        if stream is not sys.stdout:
            stream.close()

    capacity = inference.capacity_description(loaded.config)
    stats = inference.routing_stats(loaded, inputs, targets, batch_size=args.batch_size)
    print(f"{PROGRAM}: {len(lines)} rows; {cli.routing_summary(stats, capacity)}", file=sys.stderr, flush=True)
    if args.stats_json:
        from stmoe import reporting

        flags = reporting.health_flags(stats, num_experts=loaded.config.moe.num_experts)
        print(reporting.format_health(flags, stats), file=sys.stderr, flush=True)
        with open(args.stats_json, "w") as f:
            json.dump({"eval_capacity_factor": inference.applied_eval_capacity_factor(loaded.config),
                       "capacity": capacity, "checkpoint": loaded.checkpoint, "rows": len(lines),
                       "layers": stats, "health": [dataclasses.asdict(flag) for flag in flags]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
