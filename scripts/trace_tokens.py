r"""Token tracing of a trained checkpoint: per MoE layer, where tokens go (stmoe/tracing.py).

    python scripts/trace_tokens.py --checkpoint runs/quickstart
    python scripts/trace_tokens.py --checkpoint runs/finetune_qa --task stmoe_synthetic_qa --num_batches 4 \
        --eval_capacity_factor 4.0 --out /tmp/trace_qa

Teacher-forced passes over --num_batches batches of --batch_size held-out rows of --task (default:
the run's data.task) at the eval capacity factor, with each MoE layer's per-token routing captured.
Writes to --out (default: <run workdir>/trace):

  report.md           per-layer entropy of the top-1 expert distribution (all tokens, sentinels; ST-MoE
                      Table 14), routing health flags, each expert's most frequent tokens, the
                      expert-by-domain matrix (offline corpus), first vs second choice
  trace.json          the same numbers, machine-readable
  entropy.png         entropy per layer (all vs sentinel vs ln E)
  domain_routing.png  per layer, share of each domain's tokens per expert (offline corpus only)
  expert_pairs.png    per layer, (first, second) choice co-occurrence (top-2 only)

A missing or incompatible checkpoint, an unknown task or split, a bad number or an --out that
cannot be a folder: one line on stderr and exit status 2 (before anything is compiled).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe import cli  # noqa: E402

PROGRAM = "trace_tokens.py"


def parse_args(argv):
    parser = cli.checkpoint_task_parser(__doc__, "seqio task family (stmoe.data.tasks); default: the run's",
                                        parser_class=argparse.ArgumentParser)
    parser.add_argument("--num_batches", type=int, default=8, help="batches of --batch_size rows to trace")
    parser.add_argument("--out", default=None, help="output directory; default: <run workdir>/trace")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.import_tensorflow_quietly()
    import seqio
    from stmoe import tracing

    try:
        for name in ("num_batches", "batch_size"):
            if getattr(args, name) < 1:
                raise cli.UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.out:
            cli.check_output_dir("--out", args.out)
        loaded = cli.load_model(args)
        try:
            task = tracing.resolve_task(loaded, args.task)
        except KeyError as e:
            raise cli.UsageError(f"--task: {e.args[0]}") from None
        splits = seqio.get_mixture_or_task(task).splits
        if args.split not in splits:
            raise cli.UsageError(f"--split {args.split!r}: task {task} has splits {sorted(splits)}")
        run_dir = os.path.dirname(os.path.dirname(os.path.dirname(loaded.checkpoint)))
        out = args.out or os.path.join(run_dir, "trace")
        cli.check_output_dir("--out", out)  # before anything is traced
    except cli.UsageError as e:
        return cli.fail(PROGRAM, "input", e)

    rows = args.num_batches * args.batch_size
    inputs, targets = tracing.task_examples(loaded, task, args.split, rows)
    if not len(inputs):
        return cli.fail(PROGRAM, "input", f"split {args.split!r} of {task} gave no examples")
    domain_rows, domains = None, None
    if tracing.has_domains(task):
        from stmoe.data import corpus

        # As many domain-labelled rows as traced rows, in equal parts per domain.
        domain_rows = tracing.domain_examples(loaded, task, args.split, -(-rows // len(corpus.DOMAINS)))
        domains = corpus.DOMAINS
    result = tracing.trace(loaded, inputs, targets, domain_rows=domain_rows, domain_names=domains,
                           batch_size=args.batch_size)
    result["meta"] = {"checkpoint": loaded.checkpoint, "step": cli.step_of(loaded.checkpoint), "task": task,
                      "split": args.split}
    paths = tracing.write_outputs(result, out)

    ln_e = result["ln_num_experts"]
    print(f"{'layer':<24} {'H all':>7} {'H sentinel':>10}   (nats; ln E = {ln_e:.3f})")
    for layer, s in result["layers"].items():
        print(f"{layer:<24} {s['entropy_all']:>7.3f} {s['entropy_sentinel']:>10.3f}")
    print(result["health"]["text"])
    print("written: " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
