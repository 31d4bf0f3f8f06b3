r"""Task metrics of a checkpoint with seqio's Evaluator (stmoe/evaluation.py).

    python scripts/evaluate.py --checkpoint ./runs/finetune_qa                      # the run's own task
    python scripts/evaluate.py --checkpoint ./runs/finetune_qa --task stmoe_synthetic_qa --num_examples 1000 \
        --eval_capacity_factor 4.0 --output_dir /tmp/eval_cf4

Decodes the held-out split of --task (a task or mixture; default: the run's infer_eval.task, else
data.task) and computes each task's own metrics, at the eval capacity factor (the checkpoint's, or
--eval_capacity_factor). Writes TensorBoard scalars and <task>-metrics.jsonl per task (seqio
loggers) and metrics.json (all tasks, the step, the capacity factor, the routing) to --output_dir
(default: <run>/evaluate), and prints a table. A missing or incompatible checkpoint, an unknown
task, --beam_size 0 or an --output_dir that cannot be a folder (checked before decoding): one line
on stderr and exit status 2.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe import cli  # noqa: E402

PROGRAM = "evaluate.py"


def parse_args(argv):
    parser = cli.checkpoint_task_parser(__doc__, "seqio task / mixture family (stmoe.data.tasks)", prog=PROGRAM)
    parser.add_argument("--num_examples", type=int, default=None, help="per task; default: the whole split")
    parser.add_argument("--decoding", choices=("greedy", "beam"), default="greedy")
    parser.add_argument("--beam_size", type=cli.positive_int, default=4)
    parser.add_argument("--output_dir", default=None, help="default: <run workdir>/evaluate")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # the cheap checks before TensorFlow's import
        cli.check_checkpoint_exists(args.checkpoint)
        if args.num_examples is not None and args.num_examples < 1:
            raise cli.UsageError(f"--num_examples must be >= 1, got {args.num_examples}")
        if args.output_dir:
            cli.check_output_dir("--output_dir", args.output_dir)
    except cli.UsageError as e:
        return cli.fail(PROGRAM, "input", e)
    cli.import_tensorflow_quietly()
    from stmoe import evaluation, inference
    from stmoe.data import tasks

    try:
        loaded = cli.load_model(args)
        data = loaded.run_config.data
        family = args.task or loaded.run_config.infer_eval.task or data.task
        try:
            task = tasks.task_name_for(family, data.vocab_path or tasks.families().get(family))
        except KeyError as e:
            raise cli.UsageError(f"--task: {e.args[0]}") from None
        run_dir = os.path.dirname(os.path.dirname(os.path.dirname(loaded.checkpoint)))
        output_dir = args.output_dir or os.path.join(run_dir, "evaluate")
        cli.check_output_dir("--output_dir", output_dir)  # before decoding anything
        evaluator = evaluation.Evaluation(
            task, split=args.split, lengths={"inputs": loaded.inputs_length, "targets": loaded.targets_length},
            num_examples=args.num_examples, log_dir=output_dir, batch_size=args.batch_size,
            decoding=args.decoding, beam_size=args.beam_size)
    except (cli.UsageError, ValueError) as e:
        return cli.fail(PROGRAM, "input", e)

    step = cli.step_of(loaded.checkpoint)
    results = evaluator.run(loaded.model, loaded.params, loaded.mesh, step=step)
    capacity = inference.capacity_description(loaded.config)
    summary = {"checkpoint": loaded.checkpoint, "step": step, "split": args.split,
               "eval_capacity_factor": inference.applied_eval_capacity_factor(loaded.config), "capacity": capacity,
               "decoding": args.decoding, "tasks": results}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    width = max(len(t) for t in results)
    print(f"{'task':<{width}}  metric                       value")
    for task_name, metrics in results.items():
        for name, value in metrics.items():
            if isinstance(value, float):
                print(f"{task_name:<{width}}  {name:<27}  {value:.4f}")
    print(f"step {step}, {capacity}, {args.split} split; written to "
          f"{os.path.join(output_dir, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
