r"""MoE vs FLOP-matched dense baselines: held-out loss at equal steps and at equal wall-clock.

    python scripts/compare_dense.py                       # offline corpus (the default task), 1 seed
    python scripts/compare_dense.py --text_file licenses  # English text: /usr/share/common-licenses
    python scripts/compare_dense.py --steps 240 --set batch_size=16 --seeds 0,1 --out_dir runs/short

The models, the flags and the output: stmoe.experiments.compare_dense (`--help` prints them).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe.experiments.compare_dense import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv))
