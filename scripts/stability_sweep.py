r"""The ST-MoE stability table (Zoph et al. 2022, arXiv 2202.08906, Table 3) at tiny scale on CPU.

    python scripts/stability_sweep.py                         # defaults: every variant, 3 seeds, 50 steps
    python scripts/stability_sweep.py --workers 4             # 4 runs at a time, one process each
    python scripts/stability_sweep.py --variants baseline,router_z_loss --seeds 5 --steps 150 \
        --out_dir runs/stability --json runs/stability.json --config.optim.learning_rate=0.5

The variants, the stability criterion, the flags and the output: stmoe.experiments.stability_sweep
(`--help` prints them).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe.experiments.stability_sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv))
