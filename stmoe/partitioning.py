"""Mesh, logical axis rules, and the shardings of params, optimizer state and batches.

One mesh with three axes, `('data', 'expert', 'model')`, all `AxisType.Auto`
(GSPMD: the sharding constraints in the model are hints that XLA's SPMD
partitioner propagates; jax 0.10's `jax.make_mesh` would make Explicit axes,
whose `with_sharding_constraint` refuses logical specs, see docs/design.md "Sharding").

Every parameter carries logical axis names (`nn.with_logical_partitioning` in
layers.py / moe.py / routing.py) and the activations are constrained with
logical names (`layers.constrain`). `LOGICAL_RULES` maps them onto the mesh:

    batch -> (data, expert)    every device holds different sequences
    expert -> expert           expert weights [experts, ...] split over `expert`
    expert_group -> data       the MoE buffer [experts, groups, capacity, d]
    mlp, heads, vocab, expert_mlp -> model    tensor parallelism (Megatron-style)
    embed, kv, length, relpos_buckets, unmodeled -> replicated

Layouts (all tested against a 1-device run to 1e-5, tests/test_partitioning.py):
- num_experts == expert axis: one expert per device (the ST-MoE / Switch layout);
- num_experts a multiple of the expert axis: several experts per device;
- expert axis < device count: experts replicated over `data`, their gradients
  all-reduced over `data` like any dense weight;
- model axis 2: expert MLPs (and dense MLPs, heads, vocab) split over `model`.

How tokens reach their experts: all-to-all from sharding constraints.
The tokens `[groups, group_size, d]` are constrained to `('batch', None, 'embed')`,
i.e. groups split over (data, expert); right after dispatch the buffer
`[experts, groups, capacity, d]` is constrained to `('expert', 'expert_group',
None, 'embed')`, i.e. experts over `expert` and groups over `data` only. The
dispatch itself is local to a group, so the SPMD partitioner goes from the first
layout to the second by exchanging slices of the expert axis for slices of the
group axis across `expert`: an all-to-all (and its mirror after the experts, and
their transposes in the backward pass). The compiled train step of the tests
(8 experts, expert axis 8) has its all-to-alls and no all-gather at all
(tests/test_partitioning.py::test_train_step_hlo_has_all_to_all).

Measured alternative: `shard_map` with `jax.lax.all_to_all` written by hand
(scripts/bench_all_to_all.py; the table is in docs/performance.md, "Expert parallelism").
Neither gathers the experts; the hand-written version was faster on simulated CPU
devices (GSPMD emits two more all-to-alls than the hand-written version; which tensors
they move was not analysed). We still take the constraint route, for now: it is the same
model code on 1 device and on a pod, it covers the four layouts (one or several
experts per device, experts replicated over `data`, expert MLPs over `model`)
with no per-layout code, and its gradients equal the 1-device ones with no
rescaling (tests). Simulated CPU devices time memory copies, not ICI; the
decision should be re-measured on TPU with the same script (`--expert 32` on
a v4-64), and if the gap holds, steps 3-5 of MoeLayer.__call__ can be swapped
for the benchmark's `make_layer_shard_map` (shard_map is also the route for a
dropless `ragged_all_to_all` dispatch, which XLA:CPU cannot run, docs/design.md "Sharding").

No all-gather of router probabilities either: `jax.lax.top_k` on probabilities sharded
along groups used to be all-gathered by the SPMD partitioner; routing.small_top_k (k argmax
passes) partitions along groups, and the token-major combine's input is constrained to the
tokens' sharding so that XLA does not all-gather its gradients.

Usage (the trainer):

    mesh = partitioning.make_mesh(MeshConfig(expert=8))
    with partitioning.activate(mesh):          # jax.set_mesh + nn.logical_axis_rules
        abstract, shardings = partitioning.abstract_params_and_shardings(model, mesh, shapes, rng)
        params = partitioning.init_sharded(init_fn, mesh, shardings, rng)
        step = jax.jit(train_step, in_shardings=..., out_shardings=...)
        state = step(state, partitioning.shard_batch(batch, mesh))
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from stmoe.config import MESH_AXES, MeshConfig, ModelConfig  # noqa: F401 - MeshConfig: partitioning.MeshConfig
from stmoe.config import check
BATCH_AXES = ("data", "expert")  # the data-parallel axes: a sequence lives on exactly one (data, expert) slot

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("expert", "expert"),
    ("expert_group", "data"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("expert_mlp", "model"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
    ("unmodeled", None),
)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'expert', 'model') mesh of Auto axes over `devices` (default: all devices).

    On TPU `jax.make_mesh` orders devices by the physical topology (the `model` and
    `expert` axes end up on the nearest chips); elsewhere it is a plain reshape.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_cfg.resolve(len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # e.g. an irregular device subset
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)


def validate_layout(mesh_cfg: MeshConfig, model_cfg: ModelConfig, batch_size: int, device_count: int,
                    sequence_lengths: Sequence[int] = (), *, process_count: int | None = None) -> None:
    """Fails at start, naming the field, on a layout that cannot be sharded.

    `batch_size` is the global batch; `sequence_lengths` (encoder and decoder lengths, optional)
    are checked against `model.moe.group_size`; `process_count` hosts (default jax.process_count())
    each feed an equal share of the batch.
    """
    process_count = jax.process_count() if process_count is None else process_count
    data, expert, model = mesh_cfg.resolve(device_count)
    num_experts = model_cfg.moe.num_experts
    check(num_experts % expert == 0, "model.moe.num_experts",
           f"{num_experts} experts cannot be split evenly over mesh.expert = {expert}; "
           f"use a divisor of {num_experts} for mesh.expert")
    replicas = data * expert
    check(batch_size % replicas == 0, "batch_size",
           f"{batch_size} is not divisible by the data-parallel size mesh.data * mesh.expert = "
           f"{data} * {expert} = {replicas}")
    if process_count > 1:
        check(batch_size % process_count == 0, "batch_size",
               f"{batch_size} is not divisible by the process count {process_count}")
    for field, value in (("d_ff", model_cfg.d_ff), ("num_heads", model_cfg.num_heads),
                         ("vocab_size", model_cfg.vocab_size)):
        check(value % model == 0, f"model.{field}",
               f"{value} is not divisible by mesh.model = {model}")
    group_size = model_cfg.moe.group_size
    for length in sequence_lengths:
        if group_size is None:
            continue
        check(batch_size * length % group_size == 0, "model.moe.group_size",
               f"{group_size} must divide batch_size * length = {batch_size} * {length}")
        groups = batch_size * length // group_size
        check(groups % replicas == 0, "model.moe.group_size",
               f"{groups} groups (batch_size * length / group_size) are not divisible by "
               f"mesh.data * mesh.expert = {replicas}")


def data_parallel_size(mesh: Mesh) -> int:
    """How many batch shards the mesh has: the size of the data-parallel axes (BATCH_AXES) together."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def expert_split(mesh: Mesh) -> int:
    """How many ways `mesh` splits the experts: the size of the mesh axes the logical 'expert' axis maps to."""
    axes = dict(LOGICAL_RULES)["expert"]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def resolve_model(cfg: ModelConfig, mesh: Mesh) -> ModelConfig:
    """`cfg` with its MoE dispatch and expert execution chosen for the mesh's devices and shape
    (dispatch.resolve_model); what the model is built from. The backend is the platform of the
    mesh's devices, not jax.default_backend(): a mesh of a TPU topology's compile-only devices
    (stmoe.aot, on a CPU-only machine) resolves as on that TPU."""
    from stmoe import dispatch
    return dispatch.resolve_model(cfg, backend=mesh.devices.flat[0].platform, expert_split=expert_split(mesh),
                                  mesh_devices=mesh.size)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` current and installs LOGICAL_RULES.

    Needed around model.init / model.apply (and their jit tracing) so that
    nn.with_logical_constraint emits constraints: flax 0.12 skips them unless
    jax.sharding.get_abstract_mesh() is set, which `jax.set_mesh` does.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def logical_to_sharding(logical_specs: Any, mesh: Mesh) -> Any:
    """A tree of logical PartitionSpecs -> NamedShardings under LOGICAL_RULES."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """A tree of ShapeDtypeStructs with `.sharding` set from the matching tree of shardings
    (what orbax restores into, and what jit lowers against)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ('data', 'expert'); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _model_inputs(sample_batch_shapes: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    inputs = {}
    for name, value in sample_batch_shapes.items():
        shape = tuple(getattr(value, "shape", value))
        dtype = getattr(value, "dtype", jnp.int32)
        inputs[name] = jax.ShapeDtypeStruct(shape, dtype)
    return inputs


def abstract_params_and_shardings(model: nn.Module, mesh: Mesh, sample_batch_shapes: Mapping[str, Any],
                                  rng: jax.Array, boxed: bool = False) -> tuple[Any, Any]:
    """Shapes of the 'params' collection (unboxed ShapeDtypeStructs) and their NamedShardings.

    sample_batch_shapes: keyword arguments of `model.__call__` -> shapes (or arrays /
    ShapeDtypeStructs), e.g. {'encoder_input_tokens': (8, 512), 'decoder_input_tokens': (8, 114),
    'decoder_target_tokens': (8, 114)}. Nothing is allocated (jax.eval_shape). With `boxed` the
    shapes stay in their nn.Partitioned boxes (logical axis names: what t5x-style Adafactor reads).
    """
    inputs = _model_inputs(sample_batch_shapes)

    def init(rng, inputs):
        return model.init(rng, **inputs, enable_dropout=False)["params"]

    with activate(mesh):
        boxed_params = jax.eval_shape(init, rng, inputs)
    shardings = logical_to_sharding(nn.get_partition_spec(boxed_params), mesh)
    return (boxed_params if boxed else nn.unbox(boxed_params)), shardings


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, out_shardings: Any, *args, **kwargs) -> Any:
    """Runs `init_fn(*args, **kwargs)` under jit with `out_shardings`: every device only ever
    allocates its own shard. Boxed (nn.Partitioned) outputs are unboxed first."""
    with activate(mesh):
        return jax.jit(lambda *a, **k: nn.unbox(init_fn(*a, **k)), out_shardings=out_shardings)(*args, **kwargs)


def init_params(model: nn.Module, mesh: Mesh, sample_batch_shapes: Mapping[str, Any],
                rng: jax.Array) -> tuple[Any, Any]:
    """Convenience: sharded params and their shardings, from abstract_params_and_shardings + init_sharded."""
    _, shardings = abstract_params_and_shardings(model, mesh, sample_batch_shapes, rng)
    inputs = {name: jnp.zeros(s.shape, s.dtype) for name, s in _model_inputs(sample_batch_shapes).items()}
    params = init_sharded(lambda r, x: model.init(r, **x, enable_dropout=False)["params"], mesh, shardings,
                          rng, inputs)
    return params, shardings


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def opt_state_shardings(optimizer: Any, abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for `optimizer.init(params)` that mirror the parameters' shardings.

    Every leaf of the optimizer state is matched to the parameter whose path is the longest
    suffix of the leaf's path (optax keeps param-shaped trees inside its states: mu, nu,
    Adafactor's v_row / v_col / v, masked and chained states alike):
    - same shape as the parameter: the parameter's sharding;
    - the parameter's shape with one dimension dropped (optax Adafactor's factored moments):
      the parameter's spec without that dimension;
    - the parameter's rank with some dimensions reduced to 1 (t5x-style Adafactor's factored
      moments, stmoe.adafactor): the parameter's spec, replicated along the reduced dimensions;
    - anything else (step counts, scalars, placeholders): replicated.
    """
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    by_path: dict[tuple, tuple[tuple[int, ...], P]] = {}
    param_leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
    sharding_leaves = jax.tree_util.tree_leaves(param_shardings)
    for (path, leaf), sharding in zip(param_leaves, sharding_leaves, strict=True):
        by_path[tuple(_key_name(k) for k in path)] = (tuple(leaf.shape), sharding.spec)
    lengths = sorted({len(path) for path in by_path}, reverse=True)

    def for_leaf(path, leaf):
        names = tuple(_key_name(k) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        for length in lengths:
            if length > len(names) or (names[-length:] if length else ()) not in by_path:
                continue
            param_shape, spec = by_path[names[-length:] if length else ()]
            spec = tuple(spec) + (None,) * (len(param_shape) - len(spec))
            if shape == param_shape:
                return NamedSharding(mesh, P(*spec))
            if len(shape) == len(param_shape) and all(n in (1, m) for n, m in zip(shape, param_shape)):
                # A moment reduced with keepdims (stmoe.adafactor's factored v_row / v_col).
                return NamedSharding(mesh, P(*(None if n != m else axis for n, m, axis in
                                               zip(shape, param_shape, spec))))
            if len(shape) == len(param_shape) - 1:
                for dim in range(len(param_shape)):
                    if shape == param_shape[:dim] + param_shape[dim + 1:]:
                        return NamedSharding(mesh, P(*(spec[:dim] + spec[dim + 1:])))
            break
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(for_leaf, abstract_state)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global jax.Arrays sharded by batch_sharding.

    Single process: `batch` is the whole batch. Multi-process: each process passes its own
    shard (data_shard_info), the global batch is the concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in batch.items()}


def _distributed_is_initialized() -> bool:
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is not None:
        return bool(is_initialized())
    from jax._src import distributed  # older jax: no public predicate
    return distributed.global_state.client is not None


def _managed_cluster_detected() -> bool:
    """A TPU pod slice, SLURM, Open MPI or Kubernetes job that jax can auto-configure."""
    if os.environ.get("STMOE_DISTRIBUTED", "").lower() in ("0", "false", "no"):
        return False
    if os.environ.get("STMOE_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return True
    try:
        from jax._src import clusters
        return any(not env.opt_in_only_method and env.is_env_present()
                   for env in clusters.ClusterEnv._cluster_types)
    except Exception as error:  # private API: never let detection itself break a run
        logging.warning("stmoe: cluster auto-detection failed (%s); assuming one process", error)
        return False


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> tuple[int, int]:
    """Calls jax.distributed.initialize() when this is one process of several; returns
    (process_index, process_count).

    Multi-process when: arguments are given, JAX_COORDINATOR_ADDRESS is set (then
    JAX_NUM_PROCESSES and JAX_PROCESS_ID give the rest), or jax detects a managed cluster
    (TPU pod slice via the metadata server, SLURM, Open MPI, Kubernetes; STMOE_DISTRIBUTED=0/1
    overrides the detection). Must run before anything touches a device. Idempotent.
    """
    if not _distributed_is_initialized():
        address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
        if address:
            env_int = lambda name: int(os.environ[name]) if os.environ.get(name) else None
            jax.distributed.initialize(
                address,
                num_processes if num_processes is not None else env_int("JAX_NUM_PROCESSES"),
                process_id if process_id is not None else env_int("JAX_PROCESS_ID"))
        elif _managed_cluster_detected():
            jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def data_shard_info() -> tuple[int, int]:
    """(index, num_shards) for seqio.ShardInfo: each process reads its own shard of the data."""
    return jax.process_index(), jax.process_count()
