r"""MoE vs FLOP-matched dense baselines: held-out loss at equal steps and at equal wall-clock.

    python scripts/compare_dense.py                       # offline corpus (the default task), 1 seed
    python scripts/compare_dense.py --text_file licenses  # English text: /usr/share/common-licenses
    python scripts/compare_dense.py --steps 240 --set batch_size=16 --seeds 0,1 --out_dir runs/short

Three models, trained on the same tokens (same data seed and order) with the same init seeds, each
through `stmoe.trainer.train_and_evaluate` with `configs/pretrain.py:tiny` plus the overrides in
SETTING (below):

  moe                 the MoE model (experts at every other FFN)
  dense_same_d_ff     the same model without experts (model.sparse_layers=()): every FFN is d_ff wide
  dense_flop_matched  a dense FFN at each sparse position whose FLOPs per token equal the MoE layer's:
                      width top_k * d_ff plus the router's FLOPs converted to width (rounded), via
                      model.sparse_positions_dense_d_ff (see `flops_per_token`)

One workdir per (dataset, model, seed) under --out_dir: a finished run is read back, an unfinished
one resumes from its checkpoint. Wall-clock is the time of the training steps only (the first
step of a process, which compiles, and every step right after a held-out evaluation and checkpoint
count as the median step); on a shared machine it is noisy, so the load average is recorded beside it.
`--set FIELD=VALUE` changes the shared setting (a probe); `--models` trains a subset (e.g. one model
per process: a later run over all models reads the finished ones back).

`--text_file licenses` writes the GNU/BSD/Apache/... license texts that every Debian system ships
(/usr/share/common-licenses/*, sorted by name, symlinks skipped) one paragraph per line into
--out_dir and trains on that file (held out: the data.held_out_percent = 5% of paragraphs with the
lowest hash bucket, stmoe.data.tasks.held_out_bucket); any other value is a text file with one
document per line.
Bad flags: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import statistics
import sys
import time

from stmoe import cli, flops
from stmoe.config import get_field, set_field

PROGRAM = "compare_dense.py"

# Every config field path this script reads or sets, in one place (configs/pretrain.py, configs/models.py).
F_SPARSE_LAYERS = "model.sparse_layers"
F_SPARSE_DENSE_D_FF = "model.sparse_positions_dense_d_ff"
F_D_MODEL = "model.d_model"
F_D_FF = "model.d_ff"
F_NUM_ENC = "model.num_encoder_layers"
F_NUM_DEC = "model.num_decoder_layers"
F_NUM_EXPERTS = "model.moe.num_experts"
F_TOP_K = "model.moe.top_k"
F_SECOND_POLICY = "model.moe.second_expert_policy"
F_ROUTER_INIT = "model.moe.router_init_std"
F_AUX_COEF = "loss.balance_coef"
F_Z_COEF = "loss.router_z_coef"
F_ROUTER_LR_MULT = "optim.router_lr_multiplier"
F_LR = "optim.learning_rate"
F_TOTAL_STEPS = "total_steps"
F_BATCH = "batch_size"
F_SEED = "seed"
F_TEXT_FILES = "data.text_files"
F_INPUTS_LEN = "data.inputs_length"
F_TARGETS_LEN = "data.targets_length"
F_EVAL_EVERY = "eval_every_steps"
F_LOG_EVERY = "log_every_steps"
F_CKPT_EVERY = "checkpoint_every_steps"
F_KEEP_CKPT = "keep_checkpoints"
CONFIG_FIELDS = (F_SPARSE_LAYERS, F_SPARSE_DENSE_D_FF, F_D_MODEL, F_D_FF, F_NUM_ENC, F_NUM_DEC,
                 F_NUM_EXPERTS, F_TOP_K, F_SECOND_POLICY, F_ROUTER_INIT, F_AUX_COEF, F_Z_COEF, F_ROUTER_LR_MULT,
                 F_LR, F_TOTAL_STEPS, F_BATCH, F_SEED, F_TEXT_FILES, F_INPUTS_LEN, F_TARGETS_LEN, F_EVAL_EVERY,
                 F_LOG_EVERY, F_CKPT_EVERY, F_KEEP_CKPT)

# The setting every model shares (on top of configs/pretrain.py:tiny); see docs/experiments.md, "MoE vs dense".
SETTING = {
    F_NUM_ENC: 2,
    F_NUM_DEC: 2,  # with tiny's sparse_interval 2: block 1 of each stack is the MoE block
    F_NUM_EXPERTS: 8,
    F_TOP_K: 2,
    F_SECOND_POLICY: "all",  # every token really uses k experts: the FLOP count below is what runs
    # Adafactor scales updates by the parameter's RMS: with std 2e-2 the router's logits (~0.16) barely
    # move from uniform; a larger init and LR multiplier let it specialize.
    F_ROUTER_INIT: 1e-1,
    F_ROUTER_LR_MULT: 4.0,
    F_AUX_COEF: 1e-2,
    F_Z_COEF: 1e-3,
    F_LR: 1e-2,
    # The README's figures (docs/compare_dense_*.json) were measured with optax's Adafactor, before t5x's
    # became the default (optim.adafactor_style); pinned so that this script reproduces them.
    "optim.adafactor_style": "optax",
    F_BATCH: 32,
    F_INPUTS_LEN: 64,
}
# What --set may change (the rest is set per model or from the other flags).
SETTABLE = (F_D_MODEL, F_D_FF, F_NUM_ENC, F_NUM_DEC, F_NUM_EXPERTS, F_TOP_K, F_SECOND_POLICY, F_ROUTER_INIT,
            F_ROUTER_LR_MULT, F_AUX_COEF, F_Z_COEF, F_LR, F_BATCH, F_INPUTS_LEN,
            # routing groups: one per sequence (the default), group_size tokens, or flaxformer's groups
            # over the whole batch of at most max_group_size tokens; capacity per expert and group.
            "model.moe.group_size", "model.moe.max_group_size", "model.moe.train_capacity_factor",
            "model.moe.eval_capacity_factor", "optim.adafactor_style", "optim.warmup_steps")
MODELS = ("moe", "dense_same_d_ff", "dense_flop_matched")
LICENSES_DIR = "/usr/share/common-licenses"
ENTROPY_KEY = "eval/moe/router_entropy"  # metrics.jsonl: mean over MoE layers, nats (uniform: ln E)
EVAL_POINTS = 8  # held-out evaluations per run (the curves' resolution)


# ------------------------------------------------------------------------------------------- FLOPs

def flops_per_token(model_cfg) -> dict[str, int]:
    """Forward FFN FLOPs per token of a stmoe.config.ModelConfig, summed over the encoder's and decoder's
    blocks: {'ffn': all FFNs (experts counted top_k times, plus the router), 'router': the routers' part}
    (stmoe.flops, 2 FLOPs per multiply-add).

    With the 'random' second-expert policy the second expert runs for only part of the tokens in
    training, so this is an upper bound there.
    """
    blocks = [i for num_layers in (model_cfg.num_encoder_layers, model_cfg.num_decoder_layers)
              for i in range(num_layers)]
    return {"ffn": 2 * sum(flops.ffn_macs(model_cfg, i) for i in blocks),
            "router": 2 * sum(flops.router_macs(model_cfg, i) for i in blocks)}


def matched_dense_d_ff(model_cfg) -> int:
    """Width of the dense FFN at a sparse position with the MoE layer's FLOPs: top_k * d_ff, plus the
    router's 2 * d_model * E FLOPs turned into width (rounded to the nearest unit)."""
    moe = model_cfg.moe
    per_unit = flops.mlp_macs(model_cfg.d_model, 1, model_cfg.mlp_gated)
    return moe.top_k * model_cfg.d_ff + round(model_cfg.d_model * moe.num_experts / per_unit)


# ------------------------------------------------------------------------------------------ configs

def model_configs(setting: dict, steps: int, seed: int, text_file: str | None) -> dict[str, object]:
    """{model name: ml_collections config} for the three models of the comparison."""
    from configs import pretrain
    from stmoe.config import ModelConfig
    from stmoe.data import preprocessors

    def base():
        c = pretrain.get_config("tiny")
        c.unlock()
        for path, value in setting.items():
            set_field(c, path, value)
        # the decoder length span corruption of these inputs needs
        set_field(c, F_TARGETS_LEN, preprocessors.pre_corruption_length(get_field(c, F_INPUTS_LEN))[1])
        set_field(c, F_TOTAL_STEPS, steps)
        set_field(c, F_SEED, seed)
        every = max(1, steps // EVAL_POINTS)
        set_field(c, F_EVAL_EVERY, every)
        set_field(c, F_LOG_EVERY, every)
        set_field(c, F_CKPT_EVERY, every)
        set_field(c, F_KEEP_CKPT, 1)
        if text_file:
            set_field(c, F_TEXT_FILES, text_file)
        return c

    moe = base()
    same = base()
    set_field(same, F_SPARSE_LAYERS, ())
    matched = base()
    set_field(matched, F_SPARSE_DENSE_D_FF, matched_dense_d_ff(ModelConfig.from_dict(moe.model)))
    out = {"moe": moe, "dense_same_d_ff": same, "dense_flop_matched": matched}
    for c in out.values():
        c.lock()
    return out


# --------------------------------------------------------------------------------------- text file

def write_licenses_text(path: str, directory: str = LICENSES_DIR) -> str:
    """Writes the license texts in `directory` (regular files, sorted by name) one paragraph per line
    (paragraphs split at blank lines, inner whitespace collapsed) to `path`; -> path."""
    paragraphs = []
    for name in sorted(os.listdir(directory)):
        file = os.path.join(directory, name)
        if os.path.islink(file) or not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for block in text.split("\n\n"):
            line = " ".join(block.split())
            if line:
                paragraphs.append(line)
    if not paragraphs:
        raise cli.UsageError(f"--text_file licenses: no text in {directory}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(paragraphs) + "\n")
    return path


# ---------------------------------------------------------------------------------------- training

def _read_eval_curve(workdir: str) -> list[tuple[int, float, float | None]]:
    """[(step, held-out cross-entropy, router entropy or None)] from a run's metrics.jsonl."""
    from stmoe import reporting

    curve = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    for record in reporting.read_records(path, "eval"):
        curve[int(record["step"])] = (record["eval/cross_entropy"], record.get(ENTROPY_KEY))
    return [(s, ce, ent) for s, (ce, ent) in sorted(curve.items())]


class Stopped(Exception):
    """A run stopped by SIGTERM / SIGINT (its checkpoint saved): the comparison stops too."""


class StepTimer:
    """A trainer hook that appends (step, seconds of that step) to `path` as JSON lines."""

    def __init__(self, path: str):
        self.path, self.last = path, None

    def __call__(self, step: int, state) -> None:
        now = time.perf_counter()
        if self.last is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "seconds": now - self.last}) + "\n")
        self.last = now


def train_seconds(path: str, steps: int, eval_every: int) -> list[float]:
    """Cumulative training seconds after steps 1..steps: each step's time, where the steps that compile
    (the first of a process) or follow a held-out evaluation count as the median step."""
    times = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if record["step"] % eval_every != 1 and record["step"] != 1:
                    times[record["step"]] = record["seconds"]
    median = statistics.median(times.values()) if times else float("nan")
    total, out = 0.0, []
    for step in range(1, steps + 1):
        total += times.get(step, median)
        out.append(total)
    return out


def run_one(config, workdir: str) -> dict:
    """Trains (or reads back) one run; -> {'curve': [(step, seconds, loss, router entropy)]}."""
    from stmoe import trainer

    steps = get_field(config, F_TOTAL_STEPS)
    written = os.path.join(workdir, "config.json")
    if os.path.exists(written):
        with open(written) as f:
            if json.load(f) != json.loads(config.to_json_best_effort()):
                raise cli.UsageError(f"{workdir} holds a run of another setting; use another --out_dir")
    curve = _read_eval_curve(workdir)
    if not curve or curve[-1][0] < steps:
        timer = StepTimer(os.path.join(workdir, "step_seconds.jsonl"))
        os.makedirs(workdir, exist_ok=True)
        if trainer.train_and_evaluate(config, workdir, hooks=[timer]).preempted:
            raise Stopped(f"stopped by a signal in {workdir} (checkpoint saved); rerun the same command to resume")
        curve = _read_eval_curve(workdir)
    seconds = train_seconds(os.path.join(workdir, "step_seconds.jsonl"), steps, get_field(config, F_EVAL_EVERY))
    return {"curve": [(s, seconds[s - 1], ce, ent) for s, ce, ent in curve]}


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear y(x) through sorted (x, y) points; nan outside them."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1] if points and math.isclose(x, points[-1][0]) else float("nan")


def param_count(model_cfg) -> int:
    """Parameters of a stmoe.config.ModelConfig's EncoderDecoder (shapes only, nothing allocated)."""
    import jax
    import jax.numpy as jnp

    from stmoe import models

    tokens = jnp.ones((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: models.EncoderDecoder(model_cfg).init(
        jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes["params"]))


def summarize(runs: dict[str, dict[int, dict]], model_cfgs: dict[str, object], dataset: str) -> list[dict]:
    """One row per model: held-out loss at the last step, and at the wall-clock budget (the shortest
    training time of all runs, losses interpolated between evaluations); mean and std over seeds."""
    from stmoe.config import ModelConfig

    budget = min(r["curve"][-1][1] for seeds in runs.values() for r in seeds.values())
    rows = []
    for name, seeds in runs.items():
        cfg = ModelConfig.from_dict(model_cfgs[name].model).validate()
        ffn_flops = flops_per_token(cfg)
        final = [r["curve"][-1][2] for r in seeds.values()]
        at_time = [interpolate([(t, ce) for _, t, ce, _ in r["curve"]], budget) for r in seeds.values()]
        entropies = [r["curve"][-1][3] for r in seeds.values() if r["curve"][-1][3] is not None]
        rows.append({
            "dataset": dataset, "model": name, "params": param_count(cfg),
            "ffn_flops_per_token": ffn_flops["ffn"], "router_flops_per_token": ffn_flops["router"],
            "seeds": sorted(seeds), "steps": runs[name][min(seeds)]["curve"][-1][0],
            "loss_at_steps_mean": statistics.fmean(final), "loss_at_steps_std": _std(final),
            "wallclock_budget_s": budget,
            "loss_at_wallclock_mean": statistics.fmean(at_time), "loss_at_wallclock_std": _std(at_time),
            "train_seconds_mean": statistics.fmean(r["curve"][-1][1] for r in seeds.values()),
            "router_entropy_final": statistics.fmean(entropies) if entropies else None,
            "curves": {str(s): [list(p) for p in r["curve"]] for s, r in seeds.items()},
        })
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------------------ output

def markdown_table(rows: list[dict]) -> str:
    lines = ["| dataset | model | params | FFN kFLOPs/token (fwd) | held-out loss @ step {s} | "
             "held-out loss @ {t:.0f} s | train s | router entropy |".format(
                 s=rows[0]["steps"], t=rows[0]["wallclock_budget_s"]),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        entropy = "-" if r["router_entropy_final"] is None else f"{r['router_entropy_final']:.3f}"
        lines.append(f"| {r['dataset']} | {r['model']} | {r['params'] / 1e6:.3f}M | "
                     f"{r['ffn_flops_per_token'] / 1e3:.1f} | "
                     f"{r['loss_at_steps_mean']:.4f} ± {r['loss_at_steps_std']:.4f} | "
                     f"{r['loss_at_wallclock_mean']:.4f} ± {r['loss_at_wallclock_std']:.4f} | "
                     f"{r['train_seconds_mean']:.0f} | {entropy} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(9, 3.2 * len(datasets)), squeeze=False)
    for row_axes, dataset in zip(axes, datasets):
        for r in (r for r in rows if r["dataset"] == dataset):
            for seed, curve in r["curves"].items():
                steps, seconds, losses = zip(*[(p[0], p[1], p[2]) for p in curve])
                label = r["model"] if seed == str(r["seeds"][0]) else None
                color = {"moe": "C3", "dense_same_d_ff": "C0", "dense_flop_matched": "C2"}[r["model"]]
                row_axes[0].plot(steps, losses, color=color, label=label, marker=".")
                row_axes[1].plot(seconds, losses, color=color, label=label, marker=".")
        row_axes[0].set(xlabel="step", ylabel="held-out loss (nats/token)", title=f"{dataset}: equal steps")
        row_axes[1].set(xlabel="training seconds (shared CPU)", title=f"{dataset}: equal wall-clock")
        for ax in row_axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main

def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct seeds, e.g. 0,1,2")
    return seeds


def parse_args(argv):
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", type=cli.positive_int, default=1000, help="training steps per run")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="init seeds, comma-separated (data order fixed)")
    parser.add_argument("--text_file", "--data", dest="text_file", default="",
                        help="'' = the offline corpus; 'licenses' = /usr/share/common-licenses one paragraph "
                             "per line; else a text file, one document per line")
    parser.add_argument("--out_dir", default="runs/compare_dense", help="one workdir per (dataset, model, seed)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of SETTING for every model (repeatable), e.g. "
                             f"--set {F_TOP_K}=1 (a Python literal)")
    parser.add_argument("--json", default="", help="write the rows here (default: OUT_DIR/compare_dense.json)")
    parser.add_argument("--plot", default="", help="write the PNG here (default: OUT_DIR/compare_dense.png)")
    args = parser.parse_args(argv[1:])
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        parser.error(f"--models: unknown {bad or 'empty'}; choose from {list(MODELS)}")
    args.models = models
    args.setting = dict(SETTING)
    for item in args.set:
        path, sep, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string, e.g. --set model.moe.second_expert_policy=random
        if not sep or path not in SETTABLE:
            parser.error(f"--set {item!r}: FIELD=VALUE with FIELD one of {list(SETTABLE)}")
        args.setting[path] = value
    if args.text_file and args.text_file != "licenses" and not os.path.isfile(args.text_file):
        parser.error(f"--text_file: {args.text_file} is not a file")
    return args


def main(argv) -> int:
    args = parse_args(argv)
    cli.import_tensorflow_quietly()
    try:
        if args.text_file == "licenses":
            text_file, dataset = write_licenses_text(os.path.join(args.out_dir, "licenses.txt")), "licenses"
        elif args.text_file:
            text_file, dataset = os.path.abspath(args.text_file), os.path.basename(args.text_file)
        else:
            text_file, dataset = None, "offline_corpus"
    except (cli.UsageError, OSError) as e:
        return cli.fail(PROGRAM, "usage", e)
    # Every seed of a model compiles the same programs: JAX's persistent cache compiles them once.
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.out_dir, "jax_cache")))
    load_before = os.getloadavg()
    runs: dict[str, dict[int, dict]] = {m: {} for m in args.models}
    cfgs = None
    total = len(args.models) * len(args.seeds)
    for i, (seed, name) in enumerate([(s, m) for s in args.seeds for m in args.models], 1):
        cfgs = model_configs(args.setting, args.steps, seed, text_file)
        workdir = os.path.join(args.out_dir, dataset, f"{name}_seed{seed}")
        print(f"{PROGRAM}: [{i}/{total}] {dataset} {name} seed {seed} -> {workdir}", flush=True)
        try:
            runs[name][seed] = run_one(cfgs[name], workdir)
        except cli.UsageError as e:
            return cli.fail(PROGRAM, "usage", e)
        except Stopped as e:
            print(f"{PROGRAM}: {e}", file=sys.stderr)
            return 1
        print(f"{PROGRAM}: [{i}/{total}] held-out loss {runs[name][seed]['curve'][-1][2]:.4f} at step "
              f"{runs[name][seed]['curve'][-1][0]}", flush=True)
    rows = summarize(runs, cfgs, dataset)
    load_after = os.getloadavg()
    table = markdown_table(rows)
    print(table)
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}: "
          "wall-clock on a shared machine is noisy")
    json_path = args.json or os.path.join(args.out_dir, "compare_dense.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    document = {"setting": args.setting, "dataset": dataset, "text_file": text_file,
                "uniform_router_entropy": math.log(args.setting[F_NUM_EXPERTS]),
                "curve_columns": ["step", "train_seconds", "held_out_loss", "router_entropy"],
                "steps": args.steps, "seeds": args.seeds, "load_average_before": load_before,
                "load_average_after": load_after, "rows": rows}
    with open(json_path, "w") as f:
        json.dump(document, f, indent=1)
    plot_path = args.plot or os.path.join(args.out_dir, "compare_dense.png")
    plot(rows, plot_path)
    print(f"{PROGRAM}: wrote {json_path} and {plot_path}")
    return 0

