"""gin as a second way to write a run config, for t5x users (`--gin_file`, `--gin.X=...`).

Every section of the run config is one gin configurable whose parameters are exactly that
section's fields, so one table documents both syntaxes:

    --gin.MoeConfig.num_experts=64     ==  --config.model.moe.num_experts=64
    --gin.RUN.total_steps=1000         ==  --config.total_steps=1000

`SECTIONS` maps each configurable name to its config path. A gin file or binding is parsed by
gin-config itself (its syntax, `include`, macros), validated against the sections' field names
(an unknown configurable or parameter is refused by gin, in one line), and then applied to a
base ml_collections config as overrides; what follows (validation, training) is the same as for
`--config` runs. `configs/gin/*.gin` holds every preset as bindings over the package defaults
(tests/test_gin.py checks that they resolve to the same configs as `configs/*.py`).

    python scripts/train.py --gin_file=configs/gin/st_moe_l.gin --gin.MoeConfig.num_experts=64
"""
from __future__ import annotations

import copy
import inspect
import os
import re
from typing import Sequence

import ml_collections

from stmoe.config import get_field

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "gin")
GIN_MODULE = "stmoe"  # `stmoe.MoeConfig.num_experts` also works (gin's module prefix)
RUN = "RUN"  # the top-level fields of a run (batch_size, total_steps, ...)
# What gin files are applied to when no --config is given: every field at its package default.
DEFAULTS_SPEC = os.path.join(os.path.dirname(GIN_DIR), "defaults.py")


class GinError(ValueError):
    """A gin file or binding stmoe cannot apply; the message is one line naming it."""


def sections(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{gin configurable name: config path} for every section (nested ConfigDict) of `config`
    and RUN for its top level. The names are the typed config classes' names (stmoe.config)."""
    table = {RUN: ""}
    for path in _section_paths(config):
        table[SECTION_NAMES.get(path) or _camel(path)] = path
    return table


# Config path -> the class that validates it (when the class name differs from the path's CamelCase).
SECTION_NAMES = {
    "model": "ModelConfig",
    "model.moe": "MoeConfig",
    "mesh": "MeshConfig",
    "optim": "OptimConfig",
    "data": "DataConfig",
    "infer_eval": "InferEvalConfig",
    "loss": "LossConfig",
}


def _camel(path: str) -> str:
    return "".join(part.title().replace("_", "") for part in path.split(".")) + "Config"


def _section_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    paths = []
    for key in config.keys():
        if isinstance(config[key], ml_collections.ConfigDict):
            paths.append(prefix + key)
            paths.extend(_section_paths(config[key], f"{prefix}{key}."))
    return paths


def _leaf_fields(section: ml_collections.ConfigDict) -> list[str]:
    return [k for k in section.keys() if not isinstance(section[k], ml_collections.ConfigDict)]


def _register(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Registers one gin configurable per section, whose keyword parameters are the section's
    fields (gin then refuses unknown names itself). Idempotent for one schema."""
    import gin

    table = sections(config)
    for name, path in table.items():
        fields = _leaf_fields(get_field(config, path))
        try:
            existing = gin.get_configurable(f"{GIN_MODULE}.{name}")
        except ValueError:
            existing = None
        if existing is not None:
            if list(inspect.signature(existing).parameters) != fields:
                raise GinError(f"gin configurable {name} is registered with other fields")
            continue

        def section(**values):
            return values

        section.__signature__ = inspect.Signature(
            [inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY, default=None) for f in fields])
        section.__name__ = section.__qualname__ = name
        gin.external_configurable(section, name=name, module=GIN_MODULE)
    return table


def split_gin_args(args: Sequence[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """-> (gin files, gin bindings, search paths, the other args). `--gin_file F` / `--gin_file=F`
    (repeatable), `--gin.SELECTOR=VALUE` (t5x's spelling of a binding) and `--gin_search_path D`."""
    files, bindings, search, rest = [], [], [], []
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        for flag, target in (("--gin_file", files), ("--gin_search_path", search)):
            if arg == flag:
                if i + 1 >= len(args):
                    raise GinError(f"{flag} needs a value")
                target.append(args[i + 1])
                i += 1
                break
            if arg.startswith(flag + "="):
                target.append(arg[len(flag) + 1:])
                break
        else:
            if arg.startswith("--gin."):
                selector, eq, value = arg[len("--gin."):].partition("=")
                if not eq:
                    raise GinError(f"{arg}: a gin binding needs a value, e.g. --gin.MoeConfig.num_experts=64")
                bindings.append(f"{selector} = {value}")
            else:
                rest.append(arg)
        i += 1
    return files, bindings, search, rest


def apply(base: ml_collections.ConfigDict, files: Sequence[str] = (), bindings: Sequence[str] = (),
          search_paths: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`base` (not modified) with the gin files, then the bindings, applied; raises GinError."""
    import gin

    config = copy.deepcopy(base)  # keeps field references (optim.total_steps follows total_steps) and types
    table = _register(config)
    for path in files:
        if not os.path.isfile(path) and not any(os.path.isfile(os.path.join(d, path))
                                                for d in (*search_paths, GIN_DIR)):
            raise GinError(f"--gin_file: no such gin file {path!r} (presets: {GIN_DIR})")
    gin.clear_config()
    try:
        for directory in (GIN_DIR, *search_paths):
            gin.add_config_file_search_path(directory)
        gin.parse_config_files_and_bindings(list(files), list(bindings), skip_unknown=False,
                                            finalize_config=False)
    except Exception as e:  # noqa: BLE001 - a gin file's syntax, a missing `import`d module, a bad value
        raise GinError(_one_line(e)) from None
    try:
        config.unlock()
        for name, path in table.items():
            section = get_field(config, path)
            for field, value in gin.get_bindings(f"{GIN_MODULE}.{name}").items():
                where = f"{path}.{field}" if path else field
                try:
                    section[field] = tuple(value) if isinstance(value, list) else value
                except (TypeError, ValueError):
                    kind = type(section[field]).__name__ if section[field] is not None else "value of its type"
                    raise GinError(f"gin binding {name}.{field} (config field {where!r}) takes a {kind}, "
                                   f"got {value!r}") from None
        config.lock()
    finally:
        gin.clear_config()
    return config


def _one_line(error: BaseException) -> str:
    """gin's errors add 'In file ..., line N' and the offending text on later lines: keep the
    message and where. A value gin cannot read is a SyntaxError whose first line is Python's ast
    repr of it ('<ast.Name object at 0x...>': a bare word) and whose second names the token: keep
    the token, the file and the line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if isinstance(error, SyntaxError) and re.search(r"<ast\.\w+ object at 0x", lines[0]):
        token = next((line for line in lines[1:] if line.startswith("Failed to parse")), lines[0])
        token = re.sub(r"\s*\([^()]*line \d+\)$", "", token)
        where = f"{error.filename or 'bindings'}, line {error.lineno}" if error.lineno else ""
        hint = "; a string value needs quotes" if "ast.Name" in lines[0] else ""
        return f"{token} ({where}{hint})" if where else f"{token}{' (' + hint[2:] + ')' if hint else ''}"
    where = next((line for line in lines[1:] if re.match(r"In (file|bindings string)", line)), "")
    if not where and isinstance(error, SyntaxError) and error.lineno and not re.search(r"line \d+\)$", lines[0]):
        where = f"{error.filename or 'bindings'}, line {error.lineno}"
    return f"{lines[0]}{' (' + where + ')' if where else ''}"


def to_gin(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> str:
    """The bindings that turn `base` into `config` (fields that differ), one section per block.
    A field that follows another one (a FieldReference, e.g. optim.total_steps = total_steps) is
    left to it."""
    blocks, seen = [], set()
    references = copy.deepcopy(config)  # get_ref turns plain fields into references: not on `config`
    for name, path in sections(base).items():
        mine, theirs, refs = get_field(config, path), get_field(base, path), get_field(references, path)
        lines = []
        for f in _leaf_fields(theirs):
            ref = id(refs.get_ref(f))
            if ref in seen:
                continue
            seen.add(ref)
            if mine[f] != theirs[f]:
                lines.append(f"{name}.{f} = {mine[f]!r}")
        if lines:
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"

