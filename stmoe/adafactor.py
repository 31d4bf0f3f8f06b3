"""Adafactor with t5x's semantics, as an optax GradientTransformation.

t5x (google-research/t5x at 130910a, `t5x/adafactor.py`) decides per parameter, from its
logical axis names, which dimensions are a batch of independent matrices and which two sets of
dimensions the second moment is factored over; flaxformer's MoE models use the MoE rules of
`t5x/contrib/moe/adafactor_utils.py:24-33`, where the `expert` axis is a batch axis. optax's
`optax.adafactor` instead treats every array as one block and factors its two largest
dimensions. On stmoe's parameters the two differ in three places:

- expert kernels `[experts, d_model, d_ff]`: t5x keeps one factored second moment, one
  parameter-RMS scale (`adafactor.py:502-506`) and one update-clipping RMS (`:547-553`) per
  expert (averaging over the non-batch dims only, `:374-379`), and factors them whatever their
  size (an explicit rule skips the `min_dim_size_to_factor` test, `:384-395`, `:514-516`);
- attention kernels: flaxformer stores `[d_model, heads, d_kv]` as the 2-D `[d_model,
  heads * d_kv]` with axes `('embed', 'joined_kv')` (flaxformer `components/dense.py:58-60`,
  `:115-137`) and the out kernel as `[heads * d_kv, d_model]`; a rank-2 parameter without a
  batch axis falls back to t5x's heuristic (`adafactor.py:384-393`): factored over its smaller
  and larger dimension once the smaller is >= min_dim_size_to_factor (`:397-417`). stmoe's
  kernels keep their 3-D shape and are factored as that 2-D view;
- scanned stacks: the `layers` axis is a batch axis (`adafactor.py:113`).

t5x hands the optimizer the model's logical axis names when it creates the train state
(`t5x/train_state.py:148-159`, `adafactor.py:629-660`); here they come from the parameters'
nn.Partitioned boxes. `factor_plan` turns one parameter's shape and logical axis names into those decisions, and
`t5x_adafactor` applies t5x's update (`adafactor.py:464-578`) with them. The factored moments are
stored with the reduced dimensions kept as size 1 (`v_row`: [.., 1 for each column dim],
`v_col`: [1 for each row dim, ..]), so every state array has its parameter's rank and is sharded
like it, replicated along the reduced dimensions (partitioning.opt_state_shardings).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROW, COLUMN, BATCH = "row", "column", "batch"

# t5x's logical factor rules for MoE models: `t5x/adafactor.py:104-122` updated by
# `t5x/contrib/moe/adafactor_utils.py:26-32`; None = not factored. stmoe's parameters use a
# subset of these names (tests/test_adafactor.py checks that every one is listed).
FACTOR_RULES: Mapping[str, str | None] = {
    "vocab": COLUMN,
    "embed": ROW,
    "mlp": COLUMN,
    "heads": COLUMN,
    "kv": COLUMN,
    "joined_kv": COLUMN,
    "relpos_buckets": None,
    "layers": BATCH,
    "stack": BATCH,
    "q_wi_fused": COLUMN,
    "o_wo_fused": COLUMN,
    "multiquery_heads": COLUMN,
    "kv_fused": COLUMN,
    "layer_norm_scale": None,
    "mlp_activations": COLUMN,
    "expert": BATCH,
    "expert_mlp": COLUMN,
    "unmodeled": None,
    "mlp_embed": ROW,
}

# flaxformer's DenseGeneral joins these adjacent kernel axes into one (components/dense.py:58-60).
JOINED_AXES = {("heads", "kv"): "joined_kv"}


@dataclasses.dataclass(frozen=True)
class FactorPlan:
    """How t5x's Adafactor treats one parameter, in the parameter's own dimensions.

    averaging_dims: the dims the parameter scale and the update-clipping RMS average over (every
        dim but the batch ones). row_dims / col_dims: the factored second moment's row and column
        dims (v_row keeps row_dims, v_col keeps col_dims), or None for a full second moment.
    """

    averaging_dims: tuple[int, ...]
    row_dims: tuple[int, ...] | None = None
    col_dims: tuple[int, ...] | None = None

    @property
    def factored(self) -> bool:
        return self.row_dims is not None


def flaxformer_axes(names: Sequence[str]) -> list[tuple[tuple[int, ...], str]]:
    """stmoe's axis names -> the axes of flaxformer's layout of the same parameter, each as (the
    stmoe dims it spans, its name): ('embed', 'heads', 'kv') -> [((0,), 'embed'), ((1, 2), 'joined_kv')]."""
    groups, dim = [], 0
    while dim < len(names):
        pair = tuple(names[dim:dim + 2])
        if pair in JOINED_AXES:
            groups.append(((dim, dim + 1), JOINED_AXES[pair]))
            dim += 2
        else:
            groups.append(((dim,), names[dim]))
            dim += 1
    return groups


def factor_plan(shape: Sequence[int], names: Sequence[str] | None, *, factored: bool = True,
                min_dim_size_to_factor: int = 128, path: str = "") -> FactorPlan:
    """t5x's factoring decision (`adafactor.py:318-417`, `:642-655`) for a parameter of `shape`
    whose logical axis names are `names` (None: unknown, allowed up to rank 2 as in t5x).

    A name missing from FACTOR_RULES counts as not factored (t5x raises a KeyError instead).
    """
    ndim = len(shape)
    every_dim = tuple(range(ndim))
    if not factored:
        return FactorPlan(every_dim)  # t5x: no rule at all, averaging over every dim (:354-356, :422-429)
    if names is None:
        if ndim > 2:
            raise ValueError(f"optim.adafactor_style='t5x': parameter {path or '?'} of rank {ndim} needs its "
                             "logical axis names (build the optimizer from nn.Partitioned params) to be factored "
                             "as in t5x (t5x/adafactor.py:359-363)")
        groups = [((d,), None) for d in range(ndim)]
        rules: list[str | None] = [None] * ndim
    else:
        if len(names) != ndim:
            raise ValueError(f"parameter {path or '?'}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
        groups = flaxformer_axes(names)
        rules = [FACTOR_RULES.get(name) for _, name in groups]
        if ROW in rules and COLUMN in rules and None in rules:  # t5x adafactor.py:649-650
            raise ValueError(f"parameter {path or '?'}: incomplete Adafactor factor rule {rules} for {tuple(names)}")
        if ROW not in rules or COLUMN not in rules:  # partial rules keep only their batch axes (:651-654)
            rules = [r if r == BATCH else None for r in rules]
    batch_dims = tuple(d for (dims, _), r in zip(groups, rules) if r == BATCH for d in dims)
    if len(groups) <= 2 and not batch_dims:
        # Heuristic (:384-393, :397-417): the smaller of the two (flaxformer) dims is the row, the
        # larger the column (ties: in order), factored once the smaller is >= min_dim_size_to_factor.
        if len(groups) < 2:
            return FactorPlan(every_dim)
        sizes = [math.prod(shape[d] for d in dims) for dims, _ in groups]
        small, large = (int(i) for i in np.argsort(sizes, kind="stable"))
        if sizes[small] < min_dim_size_to_factor:
            return FactorPlan(every_dim)
        return FactorPlan(every_dim, groups[small][0], groups[large][0])
    averaging = tuple(d for d in every_dim if d not in batch_dims)
    row = tuple(d for (dims, _), r in zip(groups, rules) if r == ROW for d in dims)
    col = tuple(d for (dims, _), r in zip(groups, rules) if r == COLUMN for d in dims)
    if not row and not col:
        return FactorPlan(averaging)
    return FactorPlan(averaging, row, col)


class T5xAdafactorState(NamedTuple):
    """count: [] int32 updates applied. v_row / v_col (factored) or v (full) second moments and m
    (momentum, beta1 set) are trees like the params; an unused entry is a [1] zero (as in t5x)."""

    count: jax.Array
    v_row: Any
    v_col: Any
    v: Any
    m: Any


def is_box(x: Any) -> bool:
    """A flax `nn.Partitioned` (any AxisMetadata) box: one parameter with its logical axis names."""
    return isinstance(x, nn.meta.AxisMetadata)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_path(path: tuple[Any, ...]) -> str:
    """'/'-joined names of a jax key path, e.g. 'decoder/layers_3/mlp/wi/kernel'."""
    return "/".join(_key_name(k) for k in path)


def logical_axes(params: Any) -> dict[str, tuple[str, ...]]:
    """'/'-joined path -> logical axis names of every nn.Partitioned box in `params`."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]
    return {param_path(path): tuple(leaf.names) for path, leaf in leaves
            if is_box(leaf) and getattr(leaf, "names", None) is not None}


def _unbox(x: Any) -> Any:
    if not is_box(x):
        return x
    return x.value if hasattr(x, "value") else x.unbox()  # the value, no sharding constraint


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of an array, a ShapeDtypeStruct or a box of either."""
    x = _unbox(x)
    return tuple(getattr(x, "shape", np.shape(x)))


def t5x_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    axis_names: Mapping[str, Sequence[str]] | None = None,
    *,
    factored: bool = True,
    multiply_by_parameter_scale: bool = True,
    beta1: float | None = None,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    clipping_threshold: float | None = 1.0,
    weight_decay_rate: float | None = None,
    min_dim_size_to_factor: int = 128,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    max_parameter_scale: float | None = None,
) -> optax.GradientTransformation:
    """t5x's Adafactor update (`t5x/adafactor.py:464-578`); the arguments are t5x's (`:199-219`).

    axis_names: '/'-joined parameter path -> logical axis names (`logical_axes(boxed_params)`);
    params passed to init / update as nn.Partitioned boxes carry their own. The factoring of each
    parameter is `factor_plan`'s. Returns the update `-lr * scale * clipped(y)` (or its momentum),
    minus `weight_decay_rate * param` (t5x's decay: a fixed fraction of the parameter per step,
    not multiplied by the learning rate, on every parameter, `:561-562`).
    """
    axis_names = dict(axis_names or {})
    placeholder = lambda: jnp.zeros((1,), jnp.float32)  # noqa: E731

    def plan_of(path: str, leaf: Any) -> FactorPlan:
        names = getattr(leaf, "names", None) if is_box(leaf) else None
        names = axis_names.get(path) if names is None else names
        return factor_plan(shape_of(leaf), names, factored=factored,
                           min_dim_size_to_factor=min_dim_size_to_factor, path=path)

    def flat(tree: Any):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
        return [param_path(p) for p, _ in leaves], [leaf for _, leaf in leaves], treedef

    def init_fn(params):
        paths, leaves, treedef = flat(params)
        v_row, v_col, v, m = [], [], [], []
        for path, leaf in zip(paths, leaves):
            plan, shape = plan_of(path, leaf), shape_of(leaf)
            if plan.factored:
                v_row.append(jnp.zeros([1 if d in plan.col_dims else n for d, n in enumerate(shape)], jnp.float32))
                v_col.append(jnp.zeros([1 if d in plan.row_dims else n for d, n in enumerate(shape)], jnp.float32))
                v.append(placeholder())
            else:
                v_row.append(placeholder())
                v_col.append(placeholder())
                v.append(jnp.zeros(shape, jnp.float32))
            m.append(placeholder() if beta1 is None else jnp.zeros(shape, jnp.float32))
        build = treedef.unflatten
        return T5xAdafactorState(jnp.zeros([], jnp.int32), build(v_row), build(v_col), build(v), build(m))

    def update_fn(updates, state, params=None):
        if params is None and (multiply_by_parameter_scale or weight_decay_rate is not None):
            raise ValueError("t5x_adafactor: update needs `params` (parameter scale, weight decay)")
        paths, grads, treedef = flat(updates)
        param_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
        states = [treedef.flatten_up_to(tree) for tree in (state.v_row, state.v_col, state.v, state.m)]
        step = state.count
        # t5x adafactor.py:312-315, :496: decay 1 - (step - step_offset + 1)^-decay_rate, step from 0.
        decay = 1.0 - (step - step_offset + 1.0).astype(jnp.float32) ** (-decay_rate)
        mixing = 1.0 - decay
        lr = learning_rate(step) if callable(learning_rate) else learning_rate
        out = {"u": [], "v_row": [], "v_col": [], "v": [], "m": []}
        for path, g_leaf, p_leaf, v_row, v_col, v, m in zip(paths, grads, param_leaves, *states):
            plan = plan_of(path, p_leaf if is_box(p_leaf) else g_leaf)
            grad = _unbox(g_leaf).astype(jnp.float32)
            param = None if p_leaf is None else _unbox(p_leaf).astype(jnp.float32)
            scale = lr
            if multiply_by_parameter_scale:  # :501-510
                param_scale = jnp.sqrt(jnp.mean(param * param, axis=plan.averaging_dims, keepdims=True))
                param_scale = jnp.maximum(param_scale, epsilon2)
                if max_parameter_scale is not None:
                    param_scale = jnp.minimum(param_scale, max_parameter_scale)
                scale = lr * param_scale
            grad_sqr = grad * grad + epsilon1
            if plan.factored:  # :516-541, the reduced dims kept as size 1
                v_row = decay * v_row + mixing * jnp.mean(grad_sqr, axis=plan.col_dims, keepdims=True)
                v_col = decay * v_col + mixing * jnp.mean(grad_sqr, axis=plan.row_dims, keepdims=True)
                row_col_mean = jnp.mean(v_row, axis=plan.row_dims, keepdims=True)
                y = grad * (v_row / row_col_mean) ** -0.5 * v_col ** -0.5
            else:  # :542-545
                v = decay * v + mixing * grad_sqr
                y = grad * v ** -0.5
            if clipping_threshold is not None:  # :547-553
                rms = jnp.sqrt(jnp.mean(y * y, axis=plan.averaging_dims, keepdims=True))
                y = y / jnp.maximum(1.0, rms / clipping_threshold)
            subtrahend = scale * y
            if beta1 is not None:  # :556-559
                m = beta1 * m + (1.0 - beta1) * subtrahend
                subtrahend = m
            update = -subtrahend
            if weight_decay_rate is not None:  # :561-562: (1 - rate) * param - subtrahend
                update = update - weight_decay_rate * param
            update = update.astype(_unbox(g_leaf).dtype)
            out["u"].append(g_leaf.replace_boxed(update) if is_box(g_leaf) else update)
            for name, value in (("v_row", v_row), ("v_col", v_col), ("v", v), ("m", m)):
                out[name].append(value)
        build = treedef.unflatten
        new_state = T5xAdafactorState(step + 1, build(out["v_row"]), build(out["v_col"]),
                                      build(out["v"]), build(out["m"]))
        return build(out["u"]), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def factor_plans(params: Any, axis_names: Mapping[str, Sequence[str]] | None = None, *, factored: bool = True,
                 min_dim_size_to_factor: int = 128) -> dict[str, FactorPlan]:
    """'/'-joined path -> FactorPlan of every parameter (boxed or not): what `t5x_adafactor` does to it."""
    axis_names = {**dict(axis_names or {}), **logical_axes(params)}
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]
    return {param_path(p): factor_plan(shape_of(leaf), axis_names.get(param_path(p)), factored=factored,
                                  min_dim_size_to_factor=min_dim_size_to_factor, path=param_path(p))
            for p, leaf in leaves}


