r"""Pretrain or fine-tune: parse flags, call stmoe.trainer.train_and_evaluate.

    python scripts/train.py                      # quick start: tiny preset, ./runs/quickstart
    python scripts/train.py --config configs/pretrain.py:st_moe_base --workdir DIR \
        --config.total_steps=1000 --config.mesh.expert=8

(Fine-tuning has its own entry point with the checkpoint checks: scripts/finetune.py.)
A bad config (unknown field, impossible value, missing file or preset) prints one line on
stderr naming the field and exits with status 2; so do a workdir that cannot be written (checked
before any step), a workdir whose checkpoints are of another model, and a checkpoint that could
not be saved (e.g. a full disk; the previous one stays intact), and a workdir another run is using
(its lock file stmoe.lock names the host and pid). Rerunning the same command resumes from the
newest complete checkpoint in --workdir (damaged or unfinished steps are skipped and named);
SIGTERM / Ctrl-C saves a checkpoint before exiting.

Exit status: 0 finished; 2 bad input (one line on stderr); 3 training diverged (non-finite steps,
nothing non-finite saved); 130 (SIGINT) / 143 (SIGTERM) stopped early, checkpoint saved.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe import cli  # noqa: E402

DEFAULT_CONFIG = os.path.join(cli.REPO_ROOT, "configs", "pretrain.py") + ":tiny"
DEFAULT_WORKDIR = "./runs/quickstart"


def _define_workdir(flag_values):
    from absl import flags
    return {"workdir": flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "Checkpoints, TensorBoard logs, metrics.",
                                           flag_values=flag_values)}


def main(argv: list[str]) -> int:
    try:
        config, flags = cli.script_config(argv, DEFAULT_CONFIG, _define_workdir, program="train.py", doc=__doc__)
    except cli.ExitStatus as done:
        return done.status

    # A bad field fails inside, before any device work, as one line with exit status 2 (cli.run_training).
    return cli.run_training("train.py", config, flags["workdir"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
