r"""Train with a router probe: how each router's weights, updates and gradients move (stmoe.experiments.router_learning).

    python scripts/diagnose_routers.py --workdir runs/router_learning/default      # the quick start + probe
    python scripts/diagnose_routers.py --workdir runs/router_learning/lr_x10 --config.optim.router_lr_multiplier=10
    python scripts/diagnose_routers.py --plot default=runs/router_learning/default \
        --plot lr_x10=runs/router_learning/lr_x10 --out docs/router_learning.png

Training is scripts/train.py's (same config flags, default the quick start) with a step hook
that records every router kernel's update / weight ratio each step and, every --probe_every
steps, the gradient of each objective term on one fixed held-out batch. Writes
WORKDIR/router_learning.jsonl and WORKDIR/router_learning_summary.json, and prints the summary.
--plot NAME=WORKDIR (repeatable) compares finished runs instead of training: prints a table (held-out
loss, router entropy, weight growth against a random walk, drops), draws --out and writes its JSON
beside it (same name, .json).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe import cli  # noqa: E402

DEFAULT_CONFIG = os.path.join(cli.REPO_ROOT, "configs", "pretrain.py") + ":tiny"


def _define(flag_values):
    from absl import flags
    return {
        "workdir": flags.DEFINE_string("workdir", "./runs/router_learning/default", "The run's directory.",
                                       flag_values=flag_values),
        "probe_every": flags.DEFINE_integer("probe_every", 10, "Steps between gradient probes.", lower_bound=1,
                                            flag_values=flag_values),
        "plot": flags.DEFINE_multi_string("plot", [], "NAME=WORKDIR of a finished run to draw (repeatable).",
                                          flag_values=flag_values),
        "out": flags.DEFINE_string("out", "router_learning.png", "The --plot figure's path.",
                                   flag_values=flag_values),
    }


def _print_table(label: str, rows: dict[str, dict], columns: tuple[str, ...], abbreviations=()) -> None:
    """One line per row name, a right-aligned column per field (header shortened by `abbreviations`)."""
    names = list(columns)
    for long, short in abbreviations:
        names = [name.replace(long, short) for name in names]
    widths = [max(len(name) + 2, 10) for name in names]
    first = max([len(label)] + [len(name) for name in rows]) + 2
    print(label.ljust(first) + "".join(name.rjust(width) for name, width in zip(names, widths)))
    for name, row in rows.items():
        print(name.ljust(first) + "".join(f"{row[c]:{width}.4g}" for c, width in zip(columns, widths)))


SUMMARY_COLUMNS = ("entropy_first", "entropy_last", "update_ratio_mean", "learning_rate_mean", "weight_rms_first",
                   "weight_rms_last", "balance_share_mean", "cos_ce_balance_mean")
COMPARISON_COLUMNS = ("eval_cross_entropy", "encoder_entropy_last", "decoder_entropy_last",
                      "encoder_weight_rms_growth", "encoder_growth_vs_random_walk", "encoder_balance_share",
                      "encoder_dropped_rank1", "decoder_dropped_rank1")
SHORT = (("_mean", ""), ("encoder_", "enc_"), ("decoder_", "dec_"), ("_vs_random_walk", "/walk"))


def main(argv: list[str]) -> int:
    try:
        config, flags = cli.script_config(argv, DEFAULT_CONFIG, _define, program="diagnose_routers.py", doc=__doc__)
    except cli.ExitStatus as done:
        return done.status
    from stmoe import trainer
    from stmoe.experiments import router_learning

    num_experts = config.model.moe.num_experts
    if flags["plot"]:
        runs = {}
        for spec in flags["plot"]:
            name, sep, workdir = spec.partition("=")
            if not sep or not os.path.exists(os.path.join(workdir, "router_learning.jsonl")):
                return cli.fail("diagnose_routers.py", "flag", ValueError(
                    f"--plot {spec!r}: want NAME=WORKDIR of a finished diagnose_routers.py run"))
            runs[name] = workdir
        rows = router_learning.compare(runs, num_experts)
        _print_table("run", {row["name"]: row for row in rows}, COMPARISON_COLUMNS, SHORT)
        figure = router_learning.plot({name: router_learning.load(w) for name, w in runs.items()}, num_experts,
                                      flags["out"])
        cli.write_result(os.path.splitext(figure)[0] + ".json", {"runs": rows})
        print(f"figure: {figure}")
        return 0
    try:
        records = router_learning.train_with_probe(config, flags["workdir"], probe_every=flags["probe_every"])
    except trainer.TrainingDiverged as e:
        return cli.fail("diagnose_routers.py", "training", e, status=cli.TRAINING_DIVERGED)
    except trainer.USER_ERRORS as e:
        return cli.fail("diagnose_routers.py", trainer.error_kind(e), e)
    summary = router_learning.summarize(records, num_experts)
    with open(os.path.join(flags["workdir"], "router_learning_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    _print_table("layer", summary, SUMMARY_COLUMNS, SHORT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
