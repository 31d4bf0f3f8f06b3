"""stmoe vs Hugging Face `SwitchTransformersForConditionalGeneration` on the same weights.

    python scripts/benchmark_peers.py --reps 3 --out /tmp/benchmark_peers.json
    python scripts/benchmark_peers.py --small --reps 2     # a tiny model: checks the script in a minute
    python scripts/benchmark_peers.py --reps 3 --expert-execution sequential   # stmoe's slot loop (A/B)

What is measured and how: stmoe.experiments.benchmark_peers.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for both frameworks")
    parser.add_argument("--reps", type=int, default=5, help="interleaved timing rounds (median)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed interleaved rounds first (each side's heap grows to fit both)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=256, help="encoder length")
    parser.add_argument("--targets", type=int, default=64, help="decoder length and generated tokens")
    parser.add_argument("--small", action="store_true", help="a tiny model (d_model 64, 2 + 2 layers, vocab 512)")
    parser.add_argument("--expert-execution", default="auto", choices=("auto", "sequential", "batched", "grouped"),
                        help="stmoe's moe.expert_execution (auto: dispatch.resolve_model's choice for this backend)")
    parser.add_argument("--out", default=None, help="write JSON here")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.exit(2, f"benchmark_peers.py: --warmup must be >= 0, got {args.warmup}\n")
    for name in ("threads", "reps", "batch", "inputs", "targets"):
        if getattr(args, name) < 1:
            parser.exit(2, f"benchmark_peers.py: --{name} must be >= 1, got {getattr(args, name)}\n")
    if args.threads > len(os.sched_getaffinity(0)):
        parser.exit(2, f"benchmark_peers.py: --threads {args.threads} > {len(os.sched_getaffinity(0))} cores\n")
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    # Pinned before jax and torch are imported: their thread pools start on these cores.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from stmoe.experiments import benchmark_peers

    sys.exit(benchmark_peers.main(ARGS))
