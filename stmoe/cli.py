"""What every script in scripts/ shares: quiet TensorFlow, ml_collections config flags, one-line errors.

Convention: a bad input (config field, missing or incompatible checkpoint, unknown task, empty input
file) prints ONE line on stderr, `<script>: <what> error: <message>`, and the script exits with
status 2. A run stopped by non-finite steps (stmoe.trainer.TrainingDiverged) prints one such line
and exits with status 3, its checkpoints kept. A crash in the computation itself keeps its
traceback (status 1).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

import ml_collections

USAGE_ERROR = 2
TRAINING_DIVERGED = 3  # non-finite steps stopped the run (stmoe.trainer.TrainingDiverged); checkpoints kept
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(Exception):
    """A bad input a script reports in one line with exit status 2."""


def import_tensorflow_quietly() -> None:
    """seqio's TensorFlow prints C++ log lines on fd 2 at import (TF_CPP_MIN_LOG_LEVEL does not stop
    all of them); keep stderr for our own messages. Import errors still surface, after the restore."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if REPO_ROOT not in sys.path:  # `configs` next to the scripts, even without `pip install -e .`
        sys.path.insert(0, REPO_ROOT)
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
        tensorflow.config.set_visible_devices([], "GPU")  # the input pipeline never needs an accelerator
    except ImportError:
        pass  # reported properly by the import of stmoe.data
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def one_line(error: BaseException) -> str:
    """The informative last line of an error whose text may embed a traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, (KeyError, AttributeError)):
        name = (lines[-1] if lines else str(error)).strip("\"'\\ ")
        return f"unknown config field {name!r} (check the --config.* overrides)"
    return lines[-1] if lines else type(error).__name__


def fail(program: str, kind: str, error: BaseException | str, status: int = USAGE_ERROR) -> int:
    """Prints `<program>: <kind> error: <one line>` on stderr; returns the exit status (default 2)."""
    message = error if isinstance(error, str) else one_line(error)
    print(f"{program}: {kind} error: {message}", file=sys.stderr, flush=True)
    return status


def parse_config_flags(argv: Sequence[str], default_config: str,
                       define_extra: Callable[..., dict] = lambda flag_values: {}) -> tuple[
                           ml_collections.ConfigDict, dict]:
    """Parses `--config FILE:PRESET --config.FIELD=VALUE ...` plus the flags `define_extra(flag_values)`
    defines (it returns {name: FlagHolder}); -> (config, {name: value}).

    Uses a fresh absl FlagValues per call, so `main(argv)` can run several times in one process
    (tests). Raises UsageError for a bad file, preset or override.
    """
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    try:
        config_flag = config_flags.DEFINE_config_file(
            "config", default_config,
            "Config file and preset, e.g. configs/pretrain.py:tiny; override fields with --config.FIELD=VALUE.",
            flag_values=flag_values, lock_config=True, sys_argv=list(argv))
        extra = define_extra(flag_values)
        flag_values(list(argv))
        config = config_flag.value
        config.to_dict()  # a config file that failed to load raises here
    except Exception as e:  # noqa: BLE001 - bad file, preset or override
        raise UsageError(one_line(e)) from e
    return config, {name: holder.value for name, holder in extra.items()}


def add_checkpoint_args(parser) -> None:
    """--checkpoint and --eval_capacity_factor, shared by infer.py and evaluate.py."""
    parser.add_argument("--checkpoint", required=True,
                        help="a training run's workdir (config.json + checkpoints/), its checkpoints dir or a step dir")
    parser.add_argument("--eval_capacity_factor", type=float, default=None,
                        help="replaces the checkpoint's model.moe.eval_capacity_factor (e.g. 2.0, or 4.0 to drop less)")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per decoding batch")


def load_model(args):
    """stmoe.inference.load for the parsed --checkpoint / --eval_capacity_factor; raises UsageError
    for a missing or incompatible checkpoint or a bad factor."""
    from stmoe import checkpoints, inference
    from stmoe.config import ConfigError

    try:
        return inference.load(args.checkpoint, eval_capacity_factor=args.eval_capacity_factor)
    except (FileNotFoundError, ConfigError, checkpoints.IncompatibleCheckpointError) as e:
        raise UsageError(one_line(e)) from e


def step_of(state_dir: str) -> int | None:
    """.../checkpoints/<step>/state -> step."""
    name = os.path.basename(os.path.dirname(state_dir))
    return int(name) if name.isdigit() else None


def routing_summary(stats: dict, capacity: str) -> str:
    """One line about what the eval capacity (`inference.capacity_description`) dropped
    (stmoe.inference.routing_stats)."""
    if "all" not in stats:
        return f"{capacity}: no MoE layer"
    overall = stats["all"]
    ranks = ", ".join(f"rank {k[-1]} {100 * v:.2f}%" for k, v in sorted(overall.items())
                      if k.startswith("dropped_fraction_rank"))
    return (f"{capacity}: {100 * overall['dropped_tokens']:.2f}% of tokens reached no "
            f"expert ({ranks} of choices dropped), mean over {len(stats) - 1} MoE layers")
