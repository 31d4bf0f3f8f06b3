r"""Pretrain or fine-tune: parse flags, call stmoe.trainer.train_and_evaluate.

    python scripts/train.py                      # quick start: tiny preset, ./runs/quickstart
    python scripts/train.py --config configs/pretrain.py:st_moe_base --workdir DIR \
        --config.total_steps=1000 --config.mesh.expert=8
    python scripts/train.py --config configs/finetune.py:tiny --workdir ./runs/finetune_qa

A bad config (unknown field, impossible value, missing file or preset) prints one line on
stderr naming the field and exits with status 2. Rerunning the same command resumes from the
newest checkpoint in --workdir; SIGTERM / Ctrl-C saves a checkpoint before exiting.
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "pretrain.py") + ":tiny"
DEFAULT_WORKDIR = "./runs/quickstart"


def _import_tensorflow_quietly() -> None:
    """seqio's TensorFlow prints C++ log lines on fd 2 at import (TF_CPP_MIN_LOG_LEVEL does not stop
    all of them); keep stderr for our own messages. Import errors still surface, after the restore."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
        tensorflow.config.set_visible_devices([], "GPU")  # the input pipeline never needs an accelerator
    except ImportError:
        pass  # reported properly by the import of stmoe.data below
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _one_line(error: BaseException) -> str:
    """The informative last line of an error whose text may embed a traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, (KeyError, AttributeError)):
        name = (lines[-1] if lines else str(error)).strip("\"'\\ ")
        return f"unknown config field {name!r} (check the --config.* overrides)"
    return lines[-1] if lines else type(error).__name__


def main(argv: list[str]) -> int:
    if _ROOT not in sys.path:  # `configs` next to this script, even without `pip install -e .`
        sys.path.insert(0, _ROOT)
    _import_tensorflow_quietly()
    from absl import flags
    from ml_collections import config_flags

    try:
        # config_flags reads the --config.* overrides from argv while defining the flag.
        config_flag = config_flags.DEFINE_config_file(
            "config", DEFAULT_CONFIG,
            "Config file and preset, e.g. configs/pretrain.py:tiny; override fields with --config.FIELD=VALUE.",
            lock_config=True)
        workdir_flag = flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "Checkpoints, TensorBoard logs, metrics.")
        flags.FLAGS(argv)
        config = config_flag.value
        config.to_dict()  # a config file that failed to load raises here
    except Exception as e:  # noqa: BLE001 - bad file, preset or override: one line, status 2
        print(f"train.py: config error: {_one_line(e)}", file=sys.stderr)
        return 2

    from stmoe import trainer
    from stmoe.config import ConfigError

    try:
        trainer.validate_config(config)
    except ConfigError as e:
        print(f"train.py: config error: {_one_line(e)}", file=sys.stderr)
        return 2
    trainer.train_and_evaluate(config, workdir_flag.value)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
