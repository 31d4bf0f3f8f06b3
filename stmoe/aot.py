"""Compile a run's train step (or one cached decoding step) for a TPU slice without one: "before you rent".

libtpu ships XLA's TPU compiler; `jax.experimental.topologies.get_topology_desc` describes a slice
("v4:2x2x2", "v5e:16x16", ...) as compile-only devices, and jit lowers and compiles against them on
any machine (docs/tpu.md). What is compiled is the trainer's own step: `trainer.build_steps` on a mesh
of the slice's devices, the model resolved for their platform ("tpu", partitioning.resolve_model), the
state and batch as abstract values with their shardings. From the compiled executable:

- memory per chip (`memory_analysis`: arguments, outputs, temporaries, peak) against the chip's HBM;
- the collectives of the optimized HLO by kind and by the mesh axes their replica groups span, with
  a loud warning for an all-gather of an expert weight (`expert_weight_gathers`);
- FLOPs, HBM bytes and collective bytes per chip counted from the HLO text with every loop body
  (scanned layers, microbatches) multiplied by its known trip count (`HloModule`), since
  `cost_analysis()` counts a while-loop body once;
- a roofline step time, max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes / ICI bandwidth),
  and the MFU it implies for the model FLOPs of stmoe.flops (capacity counted as the model runs it).

All of it is an estimate from the compiler's plan, not a measurement: the roofline ignores overlap
limits, latencies and the ICI topology (it divides by the chip's whole ICI bandwidth), so real step
times are longer; memory and collectives are what the TPU executable would do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

GiB = 2 ** 30
HEADROOM = 0.10  # a peak within 10% of HBM is flagged: fragmentation and runtime buffers need room


class AotError(Exception):
    """A bad topology name, a mesh that does not fit it, or no libtpu: one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, per second
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # per chip, all links, one direction
    source: str


# Per-chip figures from the vendor's public pages (retrieved for this table):
CHIPS = {
    # cloud.google.com/tpu/docs/v4, "Key specifications": 275 TFLOP/s bf16, HBM2 32 GiB at 1200 GBps.
    # ICI: the page gives no per-chip figure; 6 links (3D torus, Jouppi et al. 2023, "TPU v4: An
    # Optically Reconfigurable Supercomputer", arXiv 2304.01433) x 45 GB/s one way per link (the JAX
    # scaling book, jax-ml.github.io/scaling-book/tpus, its TPU table) = 270 GB/s: the least certain entry.
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 6 * 45e9,
               "cloud.google.com/tpu/docs/v4; ICI: 6 links x 45 GB/s (jax-ml.github.io/scaling-book/tpus)"),
    # cloud.google.com/tpu/docs/v5e, "System architecture": 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GBps,
    # inter-chip interconnect 1600 Gbps.
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 1600e9 / 8, "cloud.google.com/tpu/docs/v5e"),
    # cloud.google.com/tpu/docs/v5p, "Key specifications": 459 TFLOP/s bf16, HBM2e 95 GiB at 2765 GBps,
    # interchip interconnect 4800 Gbps.
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 4800e9 / 8, "cloud.google.com/tpu/docs/v5p"),
    # cloud.google.com/tpu/docs/v6e, "System architecture": 918 TFLOP/s bf16, 32 GB HBM at 1640 GBps,
    # inter-chip interconnect 3584 Gbps.
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 3584e9 / 8, "cloud.google.com/tpu/docs/v6e"),
}
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e"}
# v4 runs its two TensorCores as one device ("megacore"), as a v4 TPU VM does by default.
CHIP_CONFIG = {"v4": "megacore"}
EXAMPLE_TOPOLOGIES = ("v4:2x2x1", "v4:2x2x2", "v4:2x4x4", "v5e:2x4", "v5e:16x16", "v5p:4x4x4", "v6e:16x16")
MODES = ("train", "decode")


# ------------------------------------------------------------------------------------ devices


def topology_devices(name: str) -> list:
    """The compile-only devices of TPU slice `name` ("GEN:AxB[xC]", e.g. "v4:2x2x2"); raises AotError."""
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(f"libtpu is not installed (it has XLA's TPU compiler): "
                       f"pip install 'jax[tpu]=={jax.__version__}'")
    generation, _, shape = name.partition(":")
    if generation not in CHIPS or not re.fullmatch(r"\d+x\d+(x\d+)?", shape):
        raise AotError(f"--topology {name!r}: expected GENERATION:SHAPE with GENERATION one of {sorted(CHIPS)}, "
                       f"e.g. {', '.join(EXAMPLE_TOPOLOGIES[:4])}")
    from jax.experimental import topologies
    # Compiling claims no chip: without this, libtpu takes /tmp/libtpu_lockfile and a second process
    # (or one whose jax already probed for a TPU) is refused ("ABORTED: ... lockfile").
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"chip_config_name": CHIP_CONFIG[generation]} if generation in CHIP_CONFIG else {}
    try:
        with _quiet_stderr():  # libtpu logs that it found no TPU VM metadata (expected here) on fd 2
            devices = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
    except Exception as e:  # noqa: BLE001 - libtpu refuses shapes it cannot build (INVALID_ARGUMENT ...)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise AotError(f"--topology {name!r}: {lines[0] if lines else type(e).__name__}") from None
    return list(devices)


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def chip_of(devices: Sequence[Any]) -> Chip:
    kind = devices[0].device_kind
    if kind not in DEVICE_KINDS:
        raise AotError(f"no chip figures for device kind {kind!r} (stmoe.aot.CHIPS)")
    return CHIPS[DEVICE_KINDS[kind]]


# ------------------------------------------------------------------------------------ HLO text

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
SHAPE = re.compile(r"\b([a-z]\w*?)\[([\d,]*)\]")
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute", "ragged-all-to-all")
# Instructions that move no HBM bytes of their own.
NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
              "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "custom-call"}


def _dtype_bytes(dtype: str) -> float:
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    if dtype.startswith("f8"):
        return 1
    bits = re.search(r"\d+", dtype)
    return int(bits.group()) / 8 if bits else 4


def shapes_in(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array type `dtype[d0,d1,...]` in `text`, in order."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in SHAPE.findall(text)
            if dtype in DTYPE_BYTES or dtype.startswith("f8")]


def nbytes(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> float:
    return sum(_dtype_bytes(dtype) * math.prod(dims) for dtype, dims in shapes)


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] ('(' or '{')."""
    close = {"(": ")", "{": "}", "[": "]"}
    depth, opener = 0, text[start]
    for i in range(start, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == close[opener]:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


@dataclasses.dataclass
class Instruction:
    name: str
    result: str  # the result type, e.g. "f32[8,16]{1,0}" or a tuple "(f32[2], s32[])"
    opcode: str
    operands: str  # the text inside the operand parentheses (operand types included)
    attributes: str  # everything after them

    def called(self) -> list[tuple[str, str]]:
        """(attribute, computation) for every computation this instruction calls."""
        out = []
        for match in re.finditer(r"\b(calls|body|condition|to_apply|branch_computations|called_computations)="
                                 r"(\{[^}]*\}|%?[\w.\-]+)", self.attributes):
            for name in re.findall(r"%?([\w.\-]+)", match.group(2)):
                out.append((match.group(1), name))
        return out

    def trip_count(self) -> int | None:
        match = re.search(r'"known_trip_count":\{"n":"(\d+)"', self.attributes)
        return int(match.group(1)) if match else None


INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")


def parse_instruction(line: str) -> Instruction | None:
    match = INSTRUCTION.match(line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        result, rest = rest[:end], rest[end:].lstrip()
    else:
        result, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _balanced(rest, op.end() - 1)
    return Instruction(match.group(1), result, op.group(1), rest[op.end():end - 1], rest[end:])


class HloModule:
    """An optimized HLO module's text (`compiled.as_text()`): computations, and how many times each
    one runs per execution (`multiplier`: the product of the known trip counts of the while loops
    around it; a loop without a known trip count counts once and is listed in `unknown_trip_counts`)."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = None
        current = None
        for line in text.splitlines():
            header = HEADER.match(line)
            if header and not INSTRUCTION.match(line):
                current = header.group(2)
                self.computations[current] = []
                if header.group(1):
                    self.entry = current
                continue
            if line.strip() == "}":
                current = None
                continue
            if current is not None:
                instruction = parse_instruction(line)
                if instruction is not None:
                    self.computations[current].append(instruction)
        if self.entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        # Operands are printed by name: their types come from the instructions that define them.
        self.types = {i.name: i.result for body in self.computations.values() for i in body}
        self.unknown_trip_counts: list[str] = []
        self.multiplier: dict[str, int] = {}
        self.fused: set[str] = set()  # computations that run inside a fusion (no HBM traffic of their own)
        self._visit(self.entry, 1, fused=False)

    def _visit(self, name: str, times: int, fused: bool) -> None:
        if name not in self.computations:
            return
        self.multiplier[name] = self.multiplier.get(name, 0) + times
        if fused:
            self.fused.add(name)
        for instruction in self.computations[name]:
            for attribute, callee in instruction.called():
                if attribute == "to_apply":
                    continue  # reductions' scalar combiners
                factor = 1
                if instruction.opcode == "while" and attribute == "body":
                    trips = instruction.trip_count() or self._counted_trips(instruction)
                    if trips is None:
                        self.unknown_trip_counts.append(instruction.name)
                    factor = trips or 1
                self._visit(callee, times * factor, fused or instruction.opcode == "fusion")

    def _counted_trips(self, loop: Instruction) -> int | None:
        """The trip count of a counted loop without `known_trip_count` (XLA:TPU prints none): its
        condition's ROOT is `compare(get-tuple-element(p), index=k, constant(N)), direction=LT` and
        element k of the loop's initial tuple is a constant (jax's scan / fori_loop counters)."""
        condition = dict(loop.called()).get("condition")
        body = self.computations.get(condition, [])
        by_name = {i.name: i for i in body}
        root = body[-1] if body else None
        if root is None or root.opcode != "compare" or "direction=LT" not in root.attributes:
            return None
        names = re.findall(r"%([\w.\-]+)", root.operands)
        if len(names) != 2 or names[0] not in by_name or names[1] not in by_name:
            return None
        counter, bound = by_name[names[0]], by_name[names[1]]
        index = re.search(r"index=(\d+)", counter.attributes)
        limit = re.fullmatch(r"\s*(-?\d+)\s*", bound.operands)
        if counter.opcode != "get-tuple-element" or bound.opcode != "constant" or not index or not limit:
            return None
        start = self._constant_element(loop, int(index.group(1)))
        return None if start is None else max(int(limit.group(1)) - start, 0)

    def _constant_element(self, loop: Instruction, index: int) -> int | None:
        """The integer constant at position `index` of the tuple a while loop starts from (through copies)."""
        names = re.findall(r"%([\w.\-]+)", loop.operands)
        init = self._by_name().get(names[0]) if names else None
        if init is None or init.opcode != "tuple":
            return None
        elements = re.findall(r"%([\w.\-]+)", re.sub(r"/\*.*?\*/", "", init.operands))
        element = self._by_name().get(elements[index]) if index < len(elements) else None
        while element is not None and element.opcode in ("copy", "bitcast", "convert"):  # copy(constant(0))
            element = self._by_name().get(element.operands.strip().lstrip("%"))
        value = re.fullmatch(r"\s*(-?\d+)\s*", element.operands) if element and element.opcode == "constant" else None
        return int(value.group(1)) if value else None

    def _by_name(self) -> dict[str, Instruction]:
        if not hasattr(self, "_instructions_by_name"):
            self._instructions_by_name = {i.name: i for body in self.computations.values() for i in body}
        return self._instructions_by_name

    def instructions(self) -> Iterable[tuple[Instruction, int, bool]]:
        """(instruction, runs per execution, inside a fusion) for every reachable instruction."""
        for name, times in self.multiplier.items():
            for instruction in self.computations[name]:
                yield instruction, times, name in self.fused

    def operand_shapes(self, instruction: Instruction) -> list[tuple[str, tuple[int, ...]]]:
        """The array types of `instruction`'s operands (tuple operands: every element)."""
        text = re.sub(r"/\*.*?\*/", "", instruction.operands)
        names = re.findall(r"%([\w.\-]+)", text)
        if not names:  # printed with types: "f32[2]{0} %x" or bare names without %
            names = [token for token in re.findall(r"[\w.\-]+", text) if token in self.types]
        return [shape for name in names for shape in shapes_in(self.types.get(name, ""))]

    def while_loops(self) -> list[tuple[str, int | None]]:
        return [(i.name, i.trip_count() or self._counted_trips(i)) for i, _, _ in self.instructions()
                if i.opcode == "while"]


def replica_groups(attributes: str, num_devices: int) -> list[list[int]]:
    """The replica groups of a collective: explicit `{{0,1},{2,3}}`, iota `[2,4]<=[8]` or
    `[4,2]<=[2,4]T(1,0)`, or `{}` (all devices); collective-permute's source_target_pairs as pairs."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:<=\[([\d,]+)\](?:T\(([\d,]+)\))?)?\s*\{([^}]*)\}",
                     attributes)
    if mesh:  # replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: groups along the listed axes
        axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        ids = np.arange(math.prod(sizes))
        if mesh.group(2):
            ids = ids.reshape([int(d) for d in mesh.group(2).split(",")])
            if mesh.group(3):
                ids = ids.transpose([int(d) for d in mesh.group(3).split(",")])
        ids = ids.reshape(sizes)
        listed = [names.index(a) for a in re.findall(r"'([^']+)'", mesh.group(4))]
        rest = [i for i in range(len(sizes)) if i not in listed]
        size = math.prod(sizes[i] for i in listed)
        return ids.transpose(rest + listed).reshape(-1, size).tolist()
    match = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attributes)
    if match:
        shape = [int(d) for d in match.group(1).split(",")]
        iota = np.arange(math.prod(int(d) for d in match.group(2).split(","))).reshape(
            [int(d) for d in match.group(2).split(",")])
        if match.group(3):
            iota = iota.transpose([int(d) for d in match.group(3).split(",")])
        return iota.reshape(shape).tolist()
    for key in ("replica_groups", "source_target_pairs"):
        match = re.search(key + r"=\{((?:\{[\d,]*\},?)*)\}", attributes)
        if match:
            groups = [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", match.group(1))]
            return groups or [list(range(num_devices))]
    return [list(range(num_devices))]


def axes_of(groups: Sequence[Sequence[int]], mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes along which the members of some group differ (device i of a group is position i
    of the mesh's row-major device order: the executable's device assignment)."""
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    varying = set()
    for group in groups:
        if len(group) < 2:
            continue
        coords = np.array(np.unravel_index(np.asarray(group), sizes)).T  # [members, axes]
        varying.update(names[a] for a in range(len(names)) if len(set(coords[:, a])) > 1)
    return tuple(name for name in names if name in varying)


@dataclasses.dataclass
class Collective:
    kind: str
    axes: tuple[str, ...]
    count: int  # executions per step (loop trip counts included)
    group_size: int
    operand_shapes: list
    result_shapes: list
    bytes_per_chip: float  # bytes each chip sends per execution (ring / pairwise estimate)
    name: str

    @property
    def axis_label(self) -> str:
        return "+".join(self.axes) or "none"


def collective_traffic(kind: str, operand_bytes: float, n: int) -> float:
    """Bytes one chip sends for one collective over groups of `n`: all-gather (n - 1) x its shard,
    reduce-scatter and all-to-all (n - 1) / n of their operand, all-reduce twice that (reduce-scatter
    + all-gather), collective-permute its operand."""
    if n <= 1 and kind != "collective-permute":
        return 0.0
    if kind == "all-gather":
        return operand_bytes * (n - 1)
    if kind in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return operand_bytes * (n - 1) / n
    if kind == "all-reduce":
        return 2 * operand_bytes * (n - 1) / n
    return operand_bytes


def collectives(module: HloModule, mesh_shape: Mapping[str, int]) -> list[Collective]:
    num_devices = math.prod(mesh_shape.values())
    out = []
    for instruction, times, _ in module.instructions():
        kind = instruction.opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        groups = replica_groups(instruction.attributes, num_devices)
        n = max((len(g) for g in groups), default=1)
        operands = module.operand_shapes(instruction)
        results = shapes_in(instruction.result)
        if instruction.opcode.endswith("-start") and results:  # async: (operands..., outputs..., context)
            results = results[len(operands):len(operands) * 2] or results
        if kind == "collective-permute":
            axes = axes_of(groups, mesh_shape)  # pairs (source, target)
            n = 2
        else:
            axes = axes_of(groups, mesh_shape)
        out.append(Collective(kind, axes, times, n, operands, results,
                              collective_traffic(kind, nbytes(operands), n), instruction.name))
    return out


def expert_weight_gathers(gathers: Sequence[Collective], expert_shapes: Sequence[tuple[int, ...]],
                          expert_dims: Sequence[int], model_split: int = 1) -> list[Collective]:
    """The all-gathers whose result is an expert weight, or its gradient or optimizer moment (same
    shape), gathered along its experts dimension: what expert parallelism is there to avoid.

    expert_shapes: the global shapes of the expert weights ([experts, d_model, d_ff] ...; scanned:
    [repeats, experts, ...]); expert_dims: the index of the experts dimension in each. A match has the
    weight's rank, its two matrix dimensions whole or split `model_split` ways (tensor parallelism),
    every dimension a divisor of the weight's, and more experts than its operand."""
    flagged = []
    for c in gathers:
        if c.kind != "all-gather" or not c.result_shapes or not c.operand_shapes:
            continue
        result, operand = c.result_shapes[0][1], c.operand_shapes[0][1]
        for shape, e_dim in zip(expert_shapes, expert_dims):
            if len(result) != len(shape) or len(operand) != len(shape) or not all(result):
                continue
            matrix_ok = all(result[i] in (shape[i], shape[i] // model_split) for i in (-2, -1))
            divides = all(size % r == 0 for size, r in zip(shape, result))
            if matrix_ok and divides and result[e_dim] > operand[e_dim]:
                flagged.append(c)
                break
    return flagged


def hlo_traffic_bytes(module: HloModule) -> float:
    """HBM bytes per execution: operands and results of every instruction outside fusions (a fusion
    reads its operands and writes its result once), times its loop trip counts."""
    total = 0.0
    for instruction, times, fused in module.instructions():
        if fused or instruction.opcode in NO_TRAFFIC or instruction.opcode.endswith("-done"):
            continue
        total += times * (nbytes(module.operand_shapes(instruction)) + nbytes(shapes_in(instruction.result)))
    return total


# ------------------------------------------------------------------------------------ compile


@dataclasses.dataclass
class CompiledStep:
    compiled: Any
    mesh: Any
    run: Any
    model_config: Any  # resolved for the mesh's platform
    model_flops: float  # stmoe.flops for the whole step (all chips)
    expert_shapes: list
    expert_dims: list
    num_moe_layers: int
    compile_s: float


def _abstract_batch(run, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The trainer's batch (stmoe.data.pipeline: int32 [batch, length] arrays) as abstract values."""
    from stmoe import partitioning
    from stmoe.data.pipeline import KEYS, PACKED_KEYS
    sharding = partitioning.batch_sharding(mesh)
    lengths = {"encoder": run.data.inputs_length, "decoder": run.data.targets_length}
    keys = KEYS + (PACKED_KEYS if run.data.pack else ())
    return {k: jax.ShapeDtypeStruct((run.batch_size, lengths[k.split("_")[0]]), jnp.int32, sharding=sharding)
            for k in keys}


def _expert_leaves(abstract_params, scanned: bool) -> tuple[list, list]:
    shapes, dims = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        if "expert_w" in jax.tree_util.keystr(path):
            shapes.append(tuple(leaf.shape))
            dims.append(1 if scanned and len(leaf.shape) == 4 else 0)
    return shapes, dims


def setup_run(config, devices: Sequence[Any]):
    """The run's typed config validated for `devices` (their count and hosts) -> (run, devices used)."""
    from stmoe import config as config_lib
    from stmoe import preflight
    run = config_lib.run_config(config)
    count = run.resolve_devices(available=len(devices))
    devices = list(devices)[:count]
    hosts = len({d.process_index for d in devices})
    preflight.preflight(run, count, available_devices=len(devices), process_count=hosts)
    return run, devices


def compile_train(run, devices: Sequence[Any]) -> CompiledStep:
    """The trainer's train step (trainer.build_steps) compiled for `devices`."""
    import time

    from stmoe import flops, partitioning, trainer
    mesh = partitioning.make_mesh(run.mesh, devices)
    built = trainer.build_steps(run, mesh)
    batch = _abstract_batch(run, mesh)
    start = time.perf_counter()
    with partitioning.activate(mesh):
        compiled = built.train_step.lower(built.layout.abstract, batch).compile()
    compile_s = time.perf_counter() - start
    cfg = built.model_config
    shapes, dims = _expert_leaves(built.layout.abstract.params, cfg.scan_layers)
    model_flops = flops.train_step_flops(cfg, run.batch_size, run.data.inputs_length, run.data.targets_length)
    return CompiledStep(compiled, mesh, run, cfg, model_flops, shapes, dims, _moe_layers(cfg), compile_s)


def _moe_layers(cfg) -> int:
    return sum(cfg.is_sparse(i) for i in range(cfg.num_encoder_layers)) + \
        sum(cfg.is_sparse(i) for i in range(cfg.num_decoder_layers))


def compile_decode(run, devices: Sequence[Any]) -> CompiledStep:
    """One cached decoding step (decoding._step_logits, as the greedy / sampling loop runs it) for a
    batch of `batch_size` sequences, the cache sized for `data.targets_length` steps, compiled for
    `devices`. The model runs unscanned, as stmoe.inference loads it. Its MoE layers route groups
    of one token through the grouped matmuls (moe.MoeLayer), whatever expert_execution says."""
    import time

    from stmoe import decoding, flops, partitioning
    from stmoe.models import EncoderDecoder
    mesh = partitioning.make_mesh(run.mesh, devices)
    cfg = partitioning.resolve_model(run.model.replace(scan_layers=False), mesh)
    model = EncoderDecoder(cfg)
    batch, enc_len, max_len = run.batch_size, run.data.inputs_length, run.data.targets_length
    shapes = {"encoder_input_tokens": (2, enc_len), "decoder_input_tokens": (2, max_len),
              "decoder_target_tokens": (2, max_len)}
    abstract_params, param_shardings = partitioning.abstract_params_and_shardings(
        model, mesh, shapes, jax.random.key(run.seed))
    params = partitioning.with_shardings(abstract_params, param_shardings)
    batch_sharding, replicated = partitioning.batch_sharding(mesh), partitioning.replicated(mesh)
    encoded = jax.ShapeDtypeStruct((batch, enc_len, cfg.d_model), jnp.dtype(cfg.dtype), sharding=batch_sharding)
    segments = jax.ShapeDtypeStruct((batch, enc_len), jnp.int32, sharding=batch_sharding)
    inputs = jax.ShapeDtypeStruct((batch, max_len), jnp.int32, sharding=batch_sharding)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    with partitioning.activate(mesh):
        cache = jax.eval_shape(functools.partial(decoding._allocate_cache, model=model, max_decode_length=max_len),
                               params, encoded, segments)
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=batch_sharding if x.ndim and x.shape[0] == batch else replicated), cache)

    def decode_step(params, encoded, segments, inputs, cache, step):
        return decoding._step_logits(model, params, encoded, segments, inputs, cache, step)

    start = time.perf_counter()
    with partitioning.activate(mesh):
        compiled = jax.jit(decode_step, donate_argnums=(4,)).lower(
            params, encoded, segments, inputs, cache, step).compile()
    compile_s = time.perf_counter() - start
    expert_shapes, dims = _expert_leaves(abstract_params, False)
    # The last step of the loop, whose self-attention reads all max_len cached positions.
    model_flops = 2 * flops.decode_step_macs(cfg, batch, enc_len, max_len)
    decoder_moe_layers = sum(cfg.is_sparse(i) for i in range(cfg.num_decoder_layers))
    return CompiledStep(compiled, mesh, run, cfg, model_flops, expert_shapes, dims, decoder_moe_layers, compile_s)


# ------------------------------------------------------------------------------------ report


def analyze_hlo(text: str, mesh_shape: Mapping[str, int], expert_shapes: Sequence[tuple[int, ...]] = (),
                expert_dims: Sequence[int] = (), num_moe_layers: int = 0) -> dict[str, Any]:
    """Collectives (by kind, by mesh axes, bytes), expert-weight all-gathers, HBM and ICI bytes per chip
    of an optimized HLO module's text, loop bodies times their trip counts."""
    module = HloModule(text)
    found = collectives(module, mesh_shape)
    by_kind: dict[str, int] = {}
    by_kind_axes: dict[str, dict[str, int]] = {}
    bytes_by_kind: dict[str, float] = {}
    for c in found:
        by_kind[c.kind] = by_kind.get(c.kind, 0) + c.count
        axes = by_kind_axes.setdefault(c.kind, {})
        axes[c.axis_label] = axes.get(c.axis_label, 0) + c.count
        bytes_by_kind[c.kind] = bytes_by_kind.get(c.kind, 0.0) + c.count * c.bytes_per_chip
    gathered = expert_weight_gathers(found, expert_shapes, expert_dims, mesh_shape.get("model", 1))
    all_to_all_expert = sum(c.count for c in found if c.kind == "all-to-all" and "expert" in c.axes)
    return {
        "collectives": {"count_by_kind": by_kind, "count_by_kind_and_axes": by_kind_axes,
                        "bytes_per_chip_by_kind": bytes_by_kind, "all_to_all_on_expert_axis": all_to_all_expert,
                        "moe_layers": num_moe_layers,
                        "all_to_all_per_moe_layer": all_to_all_expert / num_moe_layers if num_moe_layers else 0.0},
        "expert_weight_all_gathers": [{"name": c.name, "result": list(c.result_shapes[0][1]), "axes": c.axis_label,
                                       "count": c.count} for c in gathered],
        "hbm_bytes_per_chip": hlo_traffic_bytes(module), "ici_bytes_per_chip": sum(bytes_by_kind.values()),
        # Inside loops, an in-place update of a loop-carried stack (scanned layers' [repeats, ...]
        # buffers) is counted as reading and writing the whole stack: the HBM term is then too high.
        "hbm_bytes_overestimated_in_loops": bool(module.while_loops()),
        "while_loops": [[name, trips] for name, trips in module.while_loops()],
        "unknown_trip_counts": module.unknown_trip_counts,
    }


def analyze(step: CompiledStep, chip: Chip, topology: str, mode: str) -> dict[str, Any]:
    """The report of a compiled step (module docstring); every figure per chip unless named otherwise."""
    compiled, mesh = step.compiled, step.mesh
    devices = list(mesh.devices.flat)
    memory = compiled.memory_analysis()
    arguments, outputs = memory.argument_size_in_bytes, memory.output_size_in_bytes
    temps, aliased = memory.temp_size_in_bytes, memory.alias_size_in_bytes
    # XLA's peak can come out below the temporaries alone; the fit is judged on the larger of it and
    # everything live at once (arguments, outputs not aliased to them, temporaries).
    xla_peak = int(getattr(memory, "peak_memory_in_bytes", 0) or 0)
    total = arguments + outputs - aliased + temps
    peak = max(xla_peak, total)
    hlo = analyze_hlo(compiled.as_text(), dict(mesh.shape), step.expert_shapes, step.expert_dims,
                      step.num_moe_layers)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    model_flops_chip = step.model_flops / len(devices)
    if not hlo["while_loops"] and cost.get("flops", 0) > 0:
        flops_chip = float(cost["flops"])
        counted_by = "cost_analysis() of the executable (no loop in the HLO: every op counted)"
    else:
        flops_chip = model_flops_chip
        counted_by = ("stmoe.flops / chips: the HLO has while loops (scanned layers, microbatches), whose "
                      "bodies cost_analysis() counts once")
    hbm_bytes, ici_bytes = hlo["hbm_bytes_per_chip"], hlo["ici_bytes_per_chip"]
    terms = {"compute": flops_chip / chip.peak_bf16_flops, "hbm": hbm_bytes / chip.hbm_bytes_per_s,
             "ici": ici_bytes / chip.ici_bytes_per_s}
    step_s = max(terms.values())
    return {
        "topology": topology, "mode": mode, "chip": chip.name, "chip_source": chip.source,
        "devices": len(devices), "hosts": len({d.process_index for d in devices}),
        "mesh": dict(mesh.shape),
        "dispatch": step.model_config.moe.dispatch, "expert_execution": step.model_config.moe.expert_execution,
        "grouped_kernel": step.model_config.moe.grouped_kernel,
        "scan_layers": step.model_config.scan_layers, "batch_size": step.run.batch_size,
        "lengths": [step.run.data.inputs_length, step.run.data.targets_length],
        "memory": {"arguments": arguments, "outputs": outputs, "aliased": aliased, "temporaries": temps,
                   "xla_peak": xla_peak, "arguments_outputs_temporaries": total, "peak": peak,
                   "hbm": chip.hbm_bytes, "peak_fraction_of_hbm": peak / chip.hbm_bytes,
                   "fits": peak <= chip.hbm_bytes, "fits_with_headroom": peak <= (1 - HEADROOM) * chip.hbm_bytes},
        "collectives": hlo["collectives"],
        "expert_weight_all_gathers": hlo["expert_weight_all_gathers"],
        "flops": {"per_chip": flops_chip, "counted_by": counted_by, "model_per_chip": model_flops_chip,
                  "model_counted_by": "stmoe.flops (expert rows as capacity lets them run) / chips",
                  "cost_analysis_flops": float(cost.get("flops", -1.0)),
                  "cost_analysis_bytes_accessed": float(cost.get("bytes accessed", -1.0)),
                  "while_loops": hlo["while_loops"], "unknown_trip_counts": hlo["unknown_trip_counts"]},
        "roofline": {"hbm_bytes_per_chip": hbm_bytes, "ici_bytes_per_chip": ici_bytes,
                     "compute_s": terms["compute"], "hbm_s": terms["hbm"], "ici_s": terms["ici"],
                     "step_s": step_s, "bound_by": max(terms, key=terms.get),
                     "mfu": model_flops_chip / (step_s * chip.peak_bf16_flops) if step_s else 0.0,
                     "peak_bf16_flops": chip.peak_bf16_flops, "hbm_bytes_per_s": chip.hbm_bytes_per_s,
                     "ici_bytes_per_s": chip.ici_bytes_per_s},
        "compile_s": step.compile_s,
    }


def _gib(value: float) -> str:
    return f"{value / GiB:.3f} GiB"


def format_report(r: Mapping[str, Any]) -> str:
    m, c, f, roof = r["memory"], r["collectives"], r["flops"], r["roofline"]
    fits = "yes" if m["fits_with_headroom"] else ("yes, but within 10% of HBM" if m["fits"] else "NO")
    lines = [
        f"{r['mode']} step on {r['topology']}: {r['devices']} chips ({r['chip']}), {r['hosts']} hosts, "
        f"mesh {r['mesh']}, dispatch {r['dispatch']!r}, experts {r['expert_execution']!r}, "
        f"batch {r['batch_size']}, lengths {r['lengths']}, compiled in {r['compile_s']:.1f} s",
        "memory per chip:",
        f"  arguments    {_gib(m['arguments'])}",
        f"  outputs      {_gib(m['outputs'])} (aliased with arguments: {_gib(m['aliased'])})",
        f"  temporaries  {_gib(m['temporaries'])}",
        f"  peak         {_gib(m['peak'])} of {_gib(m['hbm'])} HBM ({m['peak_fraction_of_hbm']:.1%}): fits: {fits} "
        f"(XLA's peak {_gib(m['xla_peak'])}; arguments + outputs - aliased + temporaries "
        f"{_gib(m['arguments_outputs_temporaries'])})",
        "collectives per step (by mesh axes):",
    ]
    for kind in COLLECTIVES:
        if kind in c["count_by_kind"]:
            axes = ", ".join(f"{a} {n}" for a, n in sorted(c["count_by_kind_and_axes"][kind].items()))
            lines.append(f"  {kind:<19} {c['count_by_kind'][kind]:5d}   {axes}   "
                         f"{c['bytes_per_chip_by_kind'][kind] / 1e6:.2f} MB sent per chip")
    if not c["count_by_kind"]:
        lines.append("  none")
    if c["moe_layers"]:
        lines.append(f"  all-to-all on the expert axis: {c['all_to_all_on_expert_axis']} "
                     f"({c['all_to_all_per_moe_layer']:.1f} per MoE layer, {c['moe_layers']} MoE layers)")
    for g in r["expert_weight_all_gathers"]:
        lines.append(f"  WARNING: EXPERT WEIGHT ALL-GATHERED: {g['name']} -> {g['result']} over {g['axes']} "
                     f"({g['count']}x per step): expert parallelism is not working here")
    lines += [
        f"FLOPs per chip: {f['per_chip'] / 1e12:.5f} TFLOP ({f['counted_by']}); "
        f"model FLOPs {f['model_per_chip'] / 1e12:.5f} TFLOP (stmoe.flops / chips)",
        f"roofline per chip: compute {roof['compute_s'] * 1e3:.3f} ms, HBM {roof['hbm_s'] * 1e3:.3f} ms "
        f"({roof['hbm_bytes_per_chip'] / 1e9:.2f} GB), ICI {roof['ici_s'] * 1e3:.3f} ms "
        f"({roof['ici_bytes_per_chip'] / 1e9:.3f} GB): step >= {roof['step_s'] * 1e3:.3f} ms "
        f"({roof['bound_by']}-bound), MFU <= {roof['mfu']:.1%}",
    ]
    return "\n".join(lines)


def compile_for_topology(config, topology: str, mode: str = "train", hlo_out: str | None = None) -> dict[str, Any]:
    """Validates `config` for TPU slice `topology`, compiles its `mode` step there and analyzes it
    (`hlo_out`: also write the optimized HLO text there). Raises AotError (topology, libtpu) or
    stmoe.config.ConfigError (a field, the mesh)."""
    if mode not in MODES:
        raise AotError(f"--mode {mode!r}: must be one of {MODES}")
    devices = topology_devices(topology)
    chip = chip_of(devices)
    run, devices = setup_run(config, devices)
    step = (compile_train if mode == "train" else compile_decode)(run, devices)
    if hlo_out:
        with open(hlo_out, "w") as f:
            f.write(step.compiled.as_text())
    return analyze(step, chip, topology, mode)


TABLE_HEADER = ("| preset, slice | mesh (data, expert, model) | peak per chip / HBM | fits | all-to-all per MoE layer "
                "(expert axis) | expert weights all-gathered | roofline step, bound | MFU bound | compile | command |\n"
                "|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(r: Mapping[str, Any]) -> str:
    """One row of docs/tpu.md's table from a report (the JSON of scripts/compile_for_tpu.py --out)."""
    m, c, roof = r["memory"], r["collectives"], r["roofline"]
    fits = "yes" if m["fits_with_headroom"] else ("within 10%" if m["fits"] else "**no**")
    mesh = r["mesh"]
    gathers = sum(g["count"] for g in r["expert_weight_all_gathers"])
    rss = f", {r['peak_rss_bytes'] / GiB:.1f} GiB RSS" if r.get("peak_rss_bytes") else ""
    return (f"| {r.get('preset', '?')} {r['mode']}, {r['topology']} ({r['devices']} chips, {r['hosts']} hosts) "
            f"| {mesh['data']}, {mesh['expert']}, {mesh['model']} "
            f"| {m['peak'] / GiB:.2f} / {m['hbm'] / GiB:.0f} GiB | {fits} "
            f"| {c['all_to_all_per_moe_layer']:g} | {'**' + str(gathers) + '**' if gathers else 'none'} "
            f"| {roof['step_s'] * 1e3:.2f} ms, {roof['bound_by']} | {roof['mfu']:.0%} "
            f"| {r['compile_s']:.0f} s{rss} | `{r.get('command', '')}` |")
