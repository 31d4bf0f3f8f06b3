r"""The ST-MoE stability table (Zoph et al. 2022, arXiv 2202.08906, Table 3) at tiny scale on CPU.

    python scripts/stability_sweep.py                         # defaults: every variant, 3 seeds, 50 steps
    python scripts/stability_sweep.py --workers 4             # 4 runs at a time, one process each
    python scripts/stability_sweep.py --variants baseline,router_z_loss --seeds 5 --steps 150 \
        --out_dir runs/stability --json runs/stability.json --config.optim.learning_rate=0.5

Each (variant, seed) is one `stmoe.trainer.train_and_evaluate` run of `configs/pretrain.py:tiny` with
the SETTING overrides below (the regime in which the baseline diverges in some seeds), then the
variant's overrides, then `--config.FIELD=VALUE` flags (last: they win), in its own workdir
`<out_dir>/<variant>/seed_<n>`. A finished run writes `sweep_result.json` there and is read back,
not retrained, when the sweep runs again (a crash or Ctrl-C loses only the runs in progress). Seeds
change `seed` (initialization, dropout, routing and jitter noise); the data order is the same. Runs go
seed by seed (every variant's seed 0 first), so a sweep cut short still has as many seeds per variant,
and `--seeds` of the finished count rebuilds the table from them.

Stability criterion (`classify`, stated in the output): a run is UNSTABLE if
  - a training step had a non-finite loss or gradients (the trainer skips such steps, and stops the
    run with TrainingDiverged after `optim.max_consecutive_nonfinite` in a row), or
  - after the first `warmup` steps, the training loss of a step exceeds `spike_factor` x the lowest
    training loss seen so far (a loss spike the run may or may not recover from; the paper's
    divergences at scale start the same way).
Quality is the paper's negative log perplexity: minus the held-out span-corruption cross-entropy
(nats per target token) at the end of the run, mean +/- std (ddof=1) over the stable seeds.

Output: a markdown table on stdout and in `<out_dir>/stability_sweep.md`, and JSON (`--json`, default
`<out_dir>/stability_sweep.json`) with one row per variant and every seed's details.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any, Mapping, Sequence

from stmoe import cli
from stmoe.config import get_field, set_field

PROGRAM = "stability_sweep.py"
BASE_CONFIG = "configs/pretrain.py:tiny"

# ------------------------------------------------------------- every config field path this script sets
# The unstable regime every variant shares: bfloat16 activations, a constant high learning rate with no
# warmup, no gradient-norm clipping and no router z-loss (the paper's baseline has none). Adafactor's
# update clipping stays at the paper's 1.0 (the update_clipping variant lowers it). The tiny preset is cut
# to 2 + 2 layers (one MoE layer per stack), 64-token inputs and 16 sequences per batch so that the whole
# table trains on two shared CPU cores in well under an hour.
SETTING: dict[str, Any] = {
    "model.num_encoder_layers": 2,
    "model.num_decoder_layers": 2,
    "data.inputs_length": 64,
    "data.targets_length": 14,  # stmoe.data.preprocessors.pre_corruption_length(64)[1]
    "batch_size": 16,
    "model.dtype": "bfloat16",
    "loss.router_z_coef": 0.0,
    "optim.optimizer": "adafactor",
    # The README's table and docs/stability_sweep.json were measured with optax's Adafactor (before t5x's
    # became the default); pinned so that this script reproduces them. "t5x" re-measures with the default.
    "optim.adafactor_style": "optax",
    "optim.schedule": "constant",
    "optim.warmup_steps": 0,
    "optim.learning_rate": 0.8,
    "optim.grad_clip_norm": 0.0,
    "optim.skip_nonfinite": True,
    "optim.max_consecutive_nonfinite": 5,
}
# ST-MoE Table 3 (and Table 4's router precision): variant -> overrides on top of SETTING.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "router_z_loss": {"loss.router_z_coef": 1e-3},  # c_z = 1e-3 (sec. 3.1)
    "input_jitter": {"model.moe.jitter_noise": 1e-2},  # router inputs x U[1 - 1e-2, 1 + 1e-2]
    "dropout": {"model.dropout_rate": 0.1},
    "update_clipping": {"optim.adafactor_clipping_threshold": 0.1},  # Adafactor update clipping 1.0 -> 0.1
    "no_geglu": {"model.mlp_gated": False},  # plain GELU FFN, same d_ff
    "no_rmsnorm_scale": {"model.layer_norm_scale": False},
    "bf16_router": {"model.moe.router_dtype": "bfloat16"},  # vs the float32 router of every other row
}
# Per-run bookkeeping: the length of the run, its seed, a train loss every step, one eval at the end.
RUN_FIELDS = {"steps": "total_steps", "seed": "seed", "log_every": "log_every_steps",
              "eval_every": "eval_every_steps", "checkpoint_every": "checkpoint_every_steps",
              "keep_checkpoints": "keep_checkpoints"}
# Where the trainer's metrics.jsonl keeps them.
TRAIN_LOSS, NONFINITE_SKIPS, EVAL_CROSS_ENTROPY = "train/loss", "train/nonfinite_skips", "eval/cross_entropy"
# ---------------------------------------------------------------------------------------------------

DEFAULT_STEPS = 50
DEFAULT_SEEDS = 3
SPIKE_FACTOR = 1.5
CRITERION_WARMUP = 20
RESULT_FILE = "sweep_result.json"


def classify(losses: Sequence[float], nonfinite_skips: int = 0, *, diverged: bool = False,
             spike_factor: float = SPIKE_FACTOR, warmup: int = CRITERION_WARMUP) -> dict[str, Any]:
    """The stability verdict of one run.

    losses: the training loss of steps 1..n in order (n < total steps when the run was stopped);
    nonfinite_skips: steps whose non-finite gradients the trainer skipped; diverged: the trainer
    stopped the run (TrainingDiverged). -> {"stable": bool, "reason": str, "step": first bad step
    or None}. A non-finite loss, a skipped step or a stopped run is unstable at once; otherwise a
    step after `warmup` whose loss exceeds `spike_factor` x the running minimum (steps 1..itself).
    """
    for step, loss in enumerate(losses, start=1):
        if not math.isfinite(loss):
            return {"stable": False, "reason": f"non-finite training loss at step {step}", "step": step}
    if diverged or nonfinite_skips:
        what = "the trainer stopped the run" if diverged else f"{nonfinite_skips} step(s) skipped"
        return {"stable": False, "reason": f"non-finite gradients ({what})", "step": len(losses) + 1 if diverged
                else None}
    running_min = math.inf
    for step, loss in enumerate(losses, start=1):
        running_min = min(running_min, loss)
        if step > warmup and loss > spike_factor * running_min:
            return {"stable": False, "step": step,
                    "reason": f"loss spike at step {step}: {loss:.3f} > {spike_factor} x min {running_min:.3f}"}
    return {"stable": True, "reason": "", "step": None}


def criterion_text(spike_factor: float = SPIKE_FACTOR, warmup: int = CRITERION_WARMUP) -> str:
    return (f"unstable = a non-finite training loss or gradients at any step (skipped or stopping the run), "
            f"or, after step {warmup}, a step's training loss above {spike_factor} x the lowest training "
            f"loss so far")


def run_overrides(variant: str, seed: int, steps: int, user: Mapping[str, Any]) -> dict[str, Any]:
    """Every field a (variant, seed) run changes from configs/pretrain.py:tiny, in application order."""
    overrides = {**SETTING, **VARIANTS[variant], **user}
    overrides.update({RUN_FIELDS["steps"]: steps, RUN_FIELDS["seed"]: seed, RUN_FIELDS["log_every"]: 1,
                      RUN_FIELDS["eval_every"]: steps, RUN_FIELDS["checkpoint_every"]: steps,
                      RUN_FIELDS["keep_checkpoints"]: 1})
    return overrides


def make_config(overrides: Mapping[str, Any]):
    config = cli.load_config_file(os.path.join(cli.REPO_ROOT, BASE_CONFIG.partition(":")[0]) + ":"
                                  + BASE_CONFIG.partition(":")[2])
    for path, value in overrides.items():
        set_field(config, path, value)
    return config


def read_metrics(workdir: str) -> tuple[list[float], int, float | None]:
    """metrics.jsonl -> (training loss per step, non-finite steps skipped, final held-out cross-entropy)."""
    losses, skips, eval_ce = [], 0, None
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return losses, skips, eval_ce
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if TRAIN_LOSS in record:
                losses.append(record[TRAIN_LOSS])
                skips = max(skips, int(record.get(NONFINITE_SKIPS, 0)))
            if EVAL_CROSS_ENTROPY in record:
                eval_ce = record[EVAL_CROSS_ENTROPY]
    return losses, skips, eval_ce


def train_one(variant: str, seed: int, steps: int, user: Mapping[str, Any], workdir: str) -> dict[str, Any]:
    """Trains one (variant, seed) from scratch in `workdir` and returns its result (also written there)."""
    import contextlib

    from stmoe import trainer

    overrides = run_overrides(variant, seed, steps, user)
    config = make_config(overrides)
    if os.path.exists(workdir):  # a run cut off before its result was written: start it again
        shutil.rmtree(workdir)
    os.makedirs(workdir)
    start = time.perf_counter()
    diverged_message = ""
    # The trainer's progress and report go to <workdir>/train.log; the sweep prints one line per run.
    with open(os.path.join(workdir, "train.log"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            outcome = trainer.train_and_evaluate(config, workdir)
        except trainer.TrainingDiverged as e:
            diverged_message = cli.one_line(e)
        else:
            if outcome.preempted:  # SIGTERM: not a finished run; the next sweep trains it again
                raise KeyboardInterrupt(f"{variant} seed {seed} stopped by a signal at step {outcome.step}")
    wall = time.perf_counter() - start
    losses, skips, eval_ce = read_metrics(workdir)
    verdict = classify(losses, skips, diverged=bool(diverged_message))
    result = {"variant": variant, "seed": seed, "steps": steps, "overrides": overrides, **verdict,
              "steps_run": len(losses), "nonfinite_skips": skips, "trainer_stopped": diverged_message,
              "eval_cross_entropy": eval_ce,
              "neg_log_perplexity": -eval_ce if eval_ce is not None and math.isfinite(eval_ce) else None,
              "final_train_loss": losses[-1] if losses else None,
              "min_train_loss": min(losses) if losses else None, "train_losses": losses, "wall_s": wall}
    with open(os.path.join(workdir, RESULT_FILE), "w") as f:
        json.dump(result, f, indent=1)
    return result


def finished_result(workdir: str, overrides: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result a previous sweep wrote for the same overrides, re-classified (the criterion may have
    changed since), or None."""
    path = os.path.join(workdir, RESULT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    if result.get("overrides") != json.loads(json.dumps(dict(overrides))):
        return None
    result.update(classify(result["train_losses"], result["nonfinite_skips"],
                           diverged=bool(result["trainer_stopped"])))
    return result


def summarize(results: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row per variant: stable seeds / seeds and quality mean +/- std over the stable ones."""
    rows = []
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant]
        quality = [r["neg_log_perplexity"] for r in runs if r["stable"] and r["neg_log_perplexity"] is not None]
        rows.append({
            "variant": variant, "overrides": VARIANTS[variant], "seeds": len(runs),
            "stable": sum(r["stable"] for r in runs),
            "fraction_stable": sum(r["stable"] for r in runs) / len(runs) if runs else None,
            "quality_mean": statistics.fmean(quality) if quality else None,
            "quality_std": statistics.stdev(quality) if len(quality) > 1 else None,
            "runs": [{k: r[k] for k in ("seed", "stable", "reason", "step", "steps_run", "nonfinite_skips",
                                        "eval_cross_entropy", "neg_log_perplexity", "final_train_loss",
                                        "min_train_loss", "wall_s")} for r in runs],
        })
    return rows


def _describe(value: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in value.items()) if value else "(the setting)"


def markdown(rows: Sequence[Mapping[str, Any]], setting: Mapping[str, Any], steps: int) -> str:
    lines = ["| Variant | Overrides | Fraction stable | Quality (neg. log perplexity, higher is better) | "
             "Unstable seeds |", "|---|---|---|---|---|"]
    for row in rows:
        if row["quality_mean"] is None:
            quality = "n/a (no stable seed)"
        elif row["quality_std"] is None:
            quality = f"{row['quality_mean']:.3f}"
        else:
            quality = f"{row['quality_mean']:.3f} +/- {row['quality_std']:.3f}"
        bad = "; ".join(f"seed {r['seed']}: {r['reason']}" for r in row["runs"] if not r["stable"]) or "-"
        lines.append(f"| {row['variant']} | {_describe(row['overrides'])} | {row['stable']}/{row['seeds']} | "
                     f"{quality} | {bad} |")
    lines += ["", f"Setting (every row; {BASE_CONFIG} overridden): {_describe(setting)}; {steps} steps.",
              f"Criterion: {criterion_text()}.",
              "Quality: minus the held-out cross-entropy (nats per target token) at the end, mean +/- std "
              "over the stable seeds."]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """-> (flags, {field: value} of the --config.FIELD=VALUE overrides). Bad input: UsageError / exit 2."""
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--seeds", type=cli.positive_int, default=DEFAULT_SEEDS, help="seeds 0..S-1 per variant")
    parser.add_argument("--steps", type=cli.positive_int, default=DEFAULT_STEPS, help="training steps per run")
    parser.add_argument("--out_dir", default="runs/stability_sweep", help="one workdir per (variant, seed) here")
    parser.add_argument("--workers", type=cli.positive_int, default=1,
                        help="runs trained at the same time, each in its own process (1: in this process)")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: the table of the runs already finished in --out_dir")
    parser.add_argument("--json", default="", help="the JSON output (default: <out_dir>/stability_sweep.json)")
    config_args = [a for a in argv[1:] if a.startswith(("--config.", "--noconfig."))]
    args = parser.parse_args([a for a in argv[1:] if a not in config_args])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise cli.UsageError(f"--variants: unknown {unknown or 'empty list'}; choose from {', '.join(VARIANTS)}")
    args.variants = list(dict.fromkeys(variants))
    user = {}
    if config_args:  # checked and typed by the shared machinery against the tiny preset
        config, _ = cli.parse_config_flags([PROGRAM, *config_args], BASE_CONFIG, program=PROGRAM)
        for arg in config_args:
            name = cli._override_name(arg)  # noqa: SLF001 - the shared parser's own naming of a flag
            user[name] = get_field(config, name)
            if isinstance(user[name], tuple):
                user[name] = list(user[name])
    args.json = args.json or os.path.join(args.out_dir, "stability_sweep.json")
    return args, user


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def main(argv: Sequence[str]) -> int:
    cli.import_tensorflow_quietly()  # before the config file imports seqio
    try:
        args, user = parse_args(argv)
    except cli.UsageError as e:
        return cli.fail(PROGRAM, "usage", e)
    from stmoe import trainer

    jobs = [(v, s) for s in range(args.seeds) for v in args.variants]  # seed-major: a cut sweep stays even
    print(f"{PROGRAM}: {len(args.variants)} variants x {args.seeds} seeds x {args.steps} steps -> {args.out_dir}",
          flush=True)
    print(f"criterion: {criterion_text()}", flush=True)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    trained_walls: list[float] = []
    sweep_start = time.perf_counter()

    def report(variant: str, seed: int, result: dict[str, Any], origin: str) -> None:
        results[(variant, seed)] = result
        remaining = len(jobs) - len(results)
        eta = _eta(remaining * statistics.fmean(trained_walls) / args.workers) if trained_walls else "?"
        quality = (f"held-out neg. log perplexity {result['neg_log_perplexity']:.3f}"
                   if result["neg_log_perplexity"] is not None else "no finite held-out loss")
        verdict = "stable" if result["stable"] else f"UNSTABLE ({result['reason']})"
        print(f"[{len(results)}/{len(jobs)}] {variant} seed {seed}: {verdict}, {quality}; {origin}; ETA {eta}",
              flush=True)

    pending = []
    for variant, seed in jobs:
        workdir = os.path.join(args.out_dir, variant, f"seed_{seed}")
        result = finished_result(workdir, run_overrides(variant, seed, args.steps, user))
        if result is not None:
            report(variant, seed, result, "read back")
        elif not args.report_only:
            pending.append((variant, seed, workdir))
    try:
        if args.workers == 1:
            for variant, seed, workdir in pending:
                result = train_one(variant, seed, args.steps, user, workdir)
                trained_walls.append(result["wall_s"])
                report(variant, seed, result, f"{result['wall_s']:.0f} s")
        elif pending:
            # Separate processes (spawned: JAX does not survive a fork), each importing once and
            # training one run after another; results arrive as they finish.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(args.workers, len(pending)), mp_context=context,
                                                        initializer=cli.import_tensorflow_quietly) as pool:
                futures = {pool.submit(train_one, variant, seed, args.steps, user, workdir): (variant, seed)
                           for variant, seed, workdir in pending}
                for future in concurrent.futures.as_completed(futures):
                    result = future.result()
                    trained_walls.append(result["wall_s"])
                    report(*futures[future], result, f"{result['wall_s']:.0f} s")
    except (trainer.USER_ERRORS, ValueError) as e:  # a bad override, an unwritable out_dir
        return cli.fail(PROGRAM, "config", e)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the finished runs are kept
        print(f"{PROGRAM}: interrupted ({e or 'Ctrl-C'}); rerun the same command to resume", file=sys.stderr)
        return 130
    results = [results[job] for job in jobs if job in results]  # all of them unless --report_only

    rows = summarize(results, args.variants)
    setting = {**SETTING, **user}
    table = markdown(rows, setting, args.steps)
    print("\n" + table, flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "stability_sweep.md"), "w") as f:
        f.write(table + "\n")
    output = {"command": " ".join(["python", "scripts/stability_sweep.py", *argv[1:]]), "base_config": BASE_CONFIG,
              "setting": setting, "steps": args.steps, "seeds": args.seeds, "criterion": criterion_text(),
              "quality": "minus the held-out cross-entropy (nats per target token), mean +/- std over stable seeds",
              "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
              "wall_s_this_invocation": time.perf_counter() - sweep_start,
              "wall_s_training_total": sum(r["wall_s"] for r in results), "rows": rows}
    json_dir = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(json_dir, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(output, f, indent=1)
    print(f"\nwrote {os.path.join(args.out_dir, 'stability_sweep.md')} and {args.json}", flush=True)
    return 0

