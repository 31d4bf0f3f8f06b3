"""What every script in scripts/ shares: ml_collections config flags and config files, argparse helpers,
checkpoint flags, a training run's exit status.

Exit statuses and one-line errors (`fail`, UsageError, ...) live in stmoe.errors, the process probes
(`import_tensorflow_quietly`, `memory_allocator`, REPO_ROOT) in stmoe.host; both are re-exported
here, so a script needs `cli` only.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
import sys
from typing import Callable, Sequence

import ml_collections

from stmoe import errors
from stmoe.config import MOVED_FIELDS, get_field
# Re-exported: the scripts, tests and notebooks use cli.fail, cli.UsageError, cli.TRAINING_DIVERGED, ...
from stmoe.errors import STOPPED_BY_SIGNAL, TRAINING_DIVERGED, USAGE_ERROR, UsageError, fail, one_line  # noqa: F401
from stmoe.host import REPO_ROOT, import_tensorflow_quietly, memory_allocator  # noqa: F401


class HelpRequested(Exception):
    """--help was given: str(self) is the help text; the script prints it and exits with status 0."""


class ExitStatus(Exception):
    """A script's main is done before its work began: it returns `status`."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-help")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`FILE[:ARG]` -> FILE's get_config(ARG) (get_config() without ARG); raises UsageError in one line."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UsageError(f"--config: no such config file {path!r} (e.g. configs/pretrain.py:tiny)")
    module_spec = importlib.util.spec_from_file_location(
        "stmoe_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]), path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if get_config is None:
            raise UsageError(f"--config {spec}: {path} defines no get_config()")
        config = get_config(arg) if arg else get_config()
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - an unknown preset or a broken config file
        raise UsageError(f"--config {spec}: {one_line(e)}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"--config {spec}: get_config returned a {type(config).__name__}, not a ConfigDict")
    return config


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field of `config` as a dotted path, sorted."""
    paths = []
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            paths.extend(field_paths(value, f"{prefix}{key}."))
        else:
            paths.append(f"{prefix}{key}")
    return sorted(paths)


def _check_field(config: ml_collections.ConfigDict, path: str) -> None:
    """Raises UsageError `unknown config field 'a.b'; did you mean 'a.c'?` unless `path` names a field."""
    node = config
    for name in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            break
        node = node[name]
    else:
        return
    known = field_paths(config)
    known += sorted({p.rsplit(".", i)[0] for p in known for i in range(1, p.count(".") + 1)})  # parents
    close = [MOVED_FIELDS[path]] if MOVED_FIELDS.get(path) in known else \
        difflib.get_close_matches(path, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else " (python scripts/train.py --help lists the fields)"
    raise UsageError(f"unknown config field {path!r}{hint}")


def _split_config_arg(argv: Sequence[str], default_config: str | None) -> tuple[str | None, list[str]]:
    """Takes `--config FILE[:ARG]` / `--config=FILE[:ARG]` out of argv[1:]; -> (spec or default_config,
    the other args)."""
    spec, rest, args = default_config, [], list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise UsageError("--config needs a value: FILE[:PRESET], e.g. configs/pretrain.py:tiny")
            spec, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            spec = arg[len("--config="):]
        else:
            rest.append(arg)
        i += 1
    return spec, rest


def _override_name(arg: str) -> str | None:
    """'--config.a.b=1' / '--noconfig.a.b' -> 'a.b'; None for any other argument."""
    for prefix in ("--config.", "--noconfig."):
        if arg.startswith(prefix):
            return arg[len(prefix):].split("=", 1)[0]
    return None


def _help_text(program: str, doc: str, spec: str, config: ml_collections.ConfigDict, flag_values,
               extra: dict) -> str:
    config_file = os.path.relpath(spec.partition(":")[0], os.getcwd())
    flags_help = [f"  --config FILE[:PRESET]   config file and preset (this run: {config_file}"
                  f"{':' + spec.partition(':')[2] if spec.partition(':')[2] else ''})",
                  "  --config.FIELD=VALUE     override any field below (tuples: --config.FIELD='(1, 3)')",
                  "  --gin_file FILE          t5x style: gin bindings over the package defaults (configs/gin/*.gin;",
                  "                           repeatable; with --config, over that config instead)",
                  "  --gin.SECTION.FIELD=V    one gin binding, e.g. --gin.MoeConfig.num_experts=64 "
                  "(docs/usage.md, gin)"]
    for name in extra:
        flag = flag_values[name]
        flags_help.append(f"  --{name:<22} {flag.help} (default: {flag.default})")
    fields = [f"  {path} = {get_field(config, path)!r}" for path in field_paths(config)]
    return "\n".join([
        f"usage: {program} [--config FILE[:PRESET]] [--config.FIELD=VALUE ...]"
        + "".join(f" [--{name} VALUE]" for name in extra), "", doc.strip(), "", "flags:", *flags_help, "",
        f"fields: see {config_file} (model.*: configs/models.py; a comment on each); "
        "override any with --config.FIELD=VALUE.",
        "Fields and values of this config:", *fields])


def write_result(path: str | None, result: dict, announce: bool = True) -> None:
    """A benchmark's JSON result to `path` (nothing when None), and a line saying where. Written to
    a temporary file and renamed, so a run killed mid-write leaves the previous result whole. The
    result records the process's malloc (`memory_allocator`), which moves CPU timings."""
    if path:
        import json
        result = {**result, "malloc": memory_allocator()}
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        if announce:
            print(f"wrote {path}")


def run_training(program: str, config: ml_collections.ConfigDict, workdir: str) -> int:
    """stmoe.trainer.train_and_evaluate for a script: 0 (finished), 128 + the signal number (stopped
    by SIGINT / SIGTERM after saving), or one line and status 3 (a diverged run) or 2 (an unwritable
    workdir or one in use by another run, a checkpoint of another model, a failed save)."""
    from stmoe import trainer

    try:
        result = trainer.train_and_evaluate(config, workdir)
    except errors.TrainingDiverged as e:
        return fail(program, "training", e, status=TRAINING_DIVERGED)
    except errors.USER_ERRORS as e:
        return fail(program, errors.error_kind(e), e)
    return STOPPED_BY_SIGNAL + result.stop_signal if result.preempted else 0


def script_config(argv: Sequence[str], default_config: str, define_extra: Callable[..., dict], *,
                  program: str, doc: str) -> tuple[ml_collections.ConfigDict, dict]:
    """`parse_config_flags` for a training script's main, TensorFlow's start-up logs silenced first.
    --help prints the help and raises ExitStatus(0); a bad file, preset, field or value prints one
    line on stderr and raises ExitStatus(2)."""
    import_tensorflow_quietly()
    try:
        return parse_config_flags(argv, default_config, define_extra, program=program, doc=doc)
    except HelpRequested as text:
        print(text)
        raise ExitStatus(0) from None
    except UsageError as e:
        raise ExitStatus(fail(program, "config", e)) from None


def parse_config_flags(argv: Sequence[str], default_config: str,
                       define_extra: Callable[..., dict] = lambda flag_values: {}, *,
                       program: str = "", doc: str = "") -> tuple[ml_collections.ConfigDict, dict]:
    """Parses `--config FILE:PRESET --config.FIELD=VALUE ...` plus the flags `define_extra(flag_values)`
    defines (it returns {name: FlagHolder}); -> (config, {name: value}).

    The config file is loaded here (`load_config_file`) and every `--config.FIELD` is checked against
    it before absl parses the values, so a misspelled field is reported with the closest real one.
    Uses a fresh absl FlagValues per call, so `main(argv)` can run several times in one process
    (tests). Raises UsageError for a bad file, preset, field or value, HelpRequested for --help.
    """
    from absl import flags
    from ml_collections import config_flags

    from stmoe import gin_config

    wants_help = any(arg in HELP_FLAGS for arg in argv[1:])
    spec, rest = _split_config_arg([a for a in argv if a not in HELP_FLAGS], None)
    try:
        gin_files, gin_bindings, gin_search, rest = gin_config.split_gin_args(rest)
        if gin_files or gin_bindings:  # t5x style: gin over the package defaults (or over --config)
            spec = spec or gin_config.DEFAULTS_SPEC
            config = gin_config.apply(load_config_file(spec), gin_files, gin_bindings, gin_search)
        else:
            spec = spec or default_config
            config = load_config_file(spec)
    except gin_config.GinError as e:
        raise UsageError(str(e)) from None
    for arg in rest:
        name = _override_name(arg)
        if name is not None:
            _check_field(config, name)
    flag_values = flags.FlagValues()
    argv_rest = [argv[0]] + rest
    extra = define_extra(flag_values)
    if wants_help:
        raise HelpRequested(_help_text(program or os.path.basename(argv[0]), doc, spec, config, flag_values, extra))
    try:
        config_flag = config_flags.DEFINE_config_dict(  # defines one flag per --config.FIELD given
            "config", config, "Config; override fields with --config.FIELD=VALUE.",
            flag_values=flag_values, lock_config=True, sys_argv=argv_rest)
        flag_values(argv_rest)
        config = config_flag.value
        config.to_dict()
    except flags.IllegalFlagValueError as e:
        raise UsageError(_bad_value(str(e), config)) from e
    except flags.UnrecognizedFlagError as e:
        close = difflib.get_close_matches(e.flagname, ["config", *extra], n=1)
        hint = f"; did you mean --{close[0]}?" if close else f" ({program or 'the script'} --help lists them)"
        raise UsageError(f"unknown flag --{e.flagname}{hint}") from e
    except Exception as e:  # noqa: BLE001 - anything else absl or ml_collections refuse
        raise UsageError(one_line(e)) from e
    return config, {name: holder.value for name, holder in extra.items()}


def _bad_value(message: str, config: ml_collections.ConfigDict) -> str:
    """absl's 'flag --config.batch_size=3.5: invalid literal ...' -> one line naming field and type."""
    match = re.match(r"flag --config\.([\w.]+)=(.*?): ", message)
    if match:
        from ml_collections.config_flags import config_path
        field, value = match.groups()
        try:
            kind = config_path.get_type(field, config)
        except Exception:  # noqa: BLE001
            kind = None
        if kind is not None:
            name = getattr(kind, "__name__", str(kind))
            article = "an" if name[:1] in "aeiou" else "a"
            return (f"config field {field!r} takes {article} {name}, got {value!r} "
                    f"(--config.{field}=VALUE)")
    return one_line(Exception(message))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (`prog: usage error: ...`), exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: usage error: {message} ({self.prog} --help lists the flags)", file=sys.stderr,
              flush=True)
        raise SystemExit(USAGE_ERROR)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1)  # argparse type: an integer >= 1
non_negative_int = _int_at_least(0)  # argparse type: an integer >= 0


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def check_output_dir(flag: str, path: str) -> None:
    """Raises UsageError at once when the folder `path` (created later, with its parents) cannot be:
    it, or the nearest part of it that exists, is a file or is not writable."""
    if "://" in path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"{flag}: cannot write to {existing} (permission denied)")


def add_checkpoint_args(parser) -> None:
    """--checkpoint and --eval_capacity_factor, shared by infer.py and evaluate.py."""
    parser.add_argument("--checkpoint", required=True,
                        help="a training run's workdir (config.json + checkpoints/), its checkpoints dir or a step dir")
    parser.add_argument("--eval_capacity_factor", type=positive_float, default=None,
                        help="replaces the checkpoint's model.moe.eval_capacity_factor (e.g. 2.0, or 4.0 to drop less)")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="rows per decoding batch")


def checkpoint_task_parser(doc: str, task_help: str, parser_class: type | None = None,
                           prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a script that reads a trained checkpoint and a seqio task: add_checkpoint_args,
    --task and --split (default 'validation'). `prog`: the script's name in messages (default argv[0])."""
    parser = (parser_class or ArgumentParser)(prog=prog, description=doc,
                                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--task", default=None, help=task_help)
    parser.add_argument("--split", default="validation")
    return parser


def check_checkpoint_exists(path: str) -> None:
    """Raises UsageError at once for a local --checkpoint that does not exist (before reading any input)."""
    if "://" not in path and not os.path.exists(path):
        raise UsageError(f"--checkpoint: {path} does not exist (a training run's workdir, e.g. runs/quickstart)")


def load_model(args):
    """stmoe.inference.load for the parsed --checkpoint / --eval_capacity_factor; raises UsageError
    for a missing, incompatible or wholly damaged checkpoint, a config.json that does not read or a
    bad factor."""
    from stmoe import checkpoints, inference
    from stmoe.config import ConfigError

    try:
        return inference.load(args.checkpoint, eval_capacity_factor=args.eval_capacity_factor)
    except (FileNotFoundError, ConfigError, checkpoints.IncompatibleCheckpointError,
            checkpoints.CheckpointRestoreError) as e:
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
