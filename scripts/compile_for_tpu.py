r"""Compile a run's train step for a TPU slice on this machine (no TPU needed): memory, collectives, roofline.

    python scripts/compile_for_tpu.py --config configs/pretrain.py:tiny --topology v4:2x2x2 \
        --config.mesh.expert=8 --out /tmp/tiny_v4.json
    python scripts/compile_for_tpu.py --config configs/pretrain.py:st_moe_base --topology v4:2x4x4 \
        --config.mesh.expert=16 --mode decode

--config / --config.FIELD=VALUE / --gin_file are parsed exactly as scripts/train.py parses them; the
step compiled is the one that run executes (stmoe.trainer.build_steps), resolved for TPU, with XLA's
TPU compiler from libtpu (pip install 'jax[tpu]', same version as jax). --mode decode compiles one
cached decoding step of batch_size sequences instead. Prints per-chip memory against HBM, the
collectives of the optimized HLO by kind and mesh axis, FLOPs and a roofline step time (stmoe/aot.py
says how each is counted); --out writes the same as JSON, and `--table REPORT.json ...` prints those
reports as the markdown table of docs/tpu.md. A bad topology, a mesh or batch that does
not fit the slice, a bad config field or a missing libtpu: one line on stderr, exit status 2.
Topologies: GENERATION:SHAPE, e.g. v4:2x2x1, v4:2x2x2, v4:2x4x4, v5e:2x4, v5e:16x16, v5p:4x4x4, v6e:16x16.
"""
from __future__ import annotations

import os
import resource
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe import cli  # noqa: E402

DEFAULT_CONFIG = os.path.join(cli.REPO_ROOT, "configs", "pretrain.py") + ":tiny"
PROGRAM = "compile_for_tpu.py"


def _define_flags(flag_values):
    from absl import flags
    return {
        "topology": flags.DEFINE_string("topology", "v4:2x2x2", "TPU slice, GENERATION:SHAPE (e.g. v5e:2x4).",
                                        flag_values=flag_values),
        "mode": flags.DEFINE_enum("mode", "train", ["train", "decode"],
                                  "train: the train step; decode: one cached decoding step.",
                                  flag_values=flag_values),
        "out": flags.DEFINE_string("out", None, "Write the report as JSON here (default: print only).",
                                   flag_values=flag_values),
        "hlo_out": flags.DEFINE_string("hlo_out", None, "Write the optimized HLO text here.",
                                       flag_values=flag_values),
    }


def _without_outputs(args: list[str]) -> list[str]:
    """The arguments that decide what is compiled (--out / --hlo_out dropped), for the report."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--out", "--hlo_out"):
            skip = True
        elif not arg.startswith(("--out=", "--hlo_out=")):
            kept.append(arg)
    return kept


def _preset_name(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].rpartition(":")[2]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].rpartition(":")[2]
    return DEFAULT_CONFIG.rpartition(":")[2]


def print_table(paths: list[str]) -> int:
    """The markdown table of docs/tpu.md from reports written by --out."""
    import json

    from stmoe import aot
    print(aot.TABLE_HEADER)
    for path in paths:
        with open(path) as f:
            print(aot.markdown_row(json.load(f)))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] == "--table":  # --table REPORT.json ...: docs/tpu.md's table
        return print_table(argv[2:])
    try:
        config, flags = cli.script_config(argv, DEFAULT_CONFIG, _define_flags, program=PROGRAM, doc=__doc__)
    except cli.ExitStatus as done:
        return done.status

    from stmoe import aot
    from stmoe.config import ConfigError

    try:
        report = aot.compile_for_topology(config, flags["topology"], flags["mode"], hlo_out=flags["hlo_out"])
    except aot.AotError as e:
        return cli.fail(PROGRAM, "topology", e)
    except ConfigError as e:
        return cli.fail(PROGRAM, "config", e)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["peak_rss_bytes"] = usage.ru_maxrss * 1024
    report["process_cpu_s"] = usage.ru_utime + usage.ru_stime  # imports, tracing and compile
    report["preset"] = _preset_name(argv)
    report["command"] = shlex.join(["python", "scripts/compile_for_tpu.py"] + _without_outputs(argv[1:]))
    print(aot.format_report(report), flush=True)
    cli.write_result(flags["out"], report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
