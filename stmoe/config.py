"""The run configuration: one tree of frozen dataclasses, every default written once, here.

    RunConfig                 the loop: batch, steps, cadences, seed, restore sources, freeze
    ├── model: ModelConfig    the T5.1.1 backbone and the sparse layout
    │   └── moe: MoeConfig    routing, capacity, experts, dispatch
    ├── mesh: MeshConfig      device mesh axis sizes
    ├── optim: OptimConfig    optimizer and learning-rate schedule
    ├── loss: LossConfig      the objective's coefficients and schedule
    ├── data: DataConfig      seqio task, lengths, packing, held-out split
    └── infer_eval: InferEvalConfig   task metrics by decoding during training

Experiment files (configs/*.py, big_vision's `get_config(arg)`) only override these defaults:
they start from `to_config_dict(RunConfig())` (an ml_collections ConfigDict, so that
`--config.FIELD=VALUE` works) and set what differs. `RunConfig.from_dict` turns such a dict (or
a run's config.json) back into the typed tree, naming any unknown field; `RunConfig.validate`
checks every field once, at start, raising ConfigError with the field's dotted path, and
touches nothing: this module imports only the standard library and ml_collections
(tests/test_imports.py). What needs the machine or the files (devices, hosts, the mesh layout,
span-corruption lengths, globs) is stmoe/preflight.py's; seqio task names are
stmoe.data.resolve_tasks'. Eval and inference variants are `.replace(...)` of the same tree,
e.g. `cfg.replace(moe=cfg.moe.replace(eval_capacity_factor=4.0))`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import re
import types
import typing
from typing import Any, Mapping

import ml_collections

ROUTER_TYPES = ("tokens_choose", "experts_choose")
SECOND_EXPERT_POLICIES = ("random", "all")
AUX_LOSS_TYPES = ("switch_top1", "switch_all_k", "cv2")
DISPATCH_IMPLS = ("einsum", "gather", "dropless", "auto")
EXPERT_EXECUTIONS = ("auto", "sequential", "batched", "grouped")
GROUPED_KERNELS = ("tiled", "ragged_dot", "auto")
REMAT_POLICIES = ("none", "full", "save_dots")
MLP_ACTIVATIONS = ("gelu", "relu", "silu")
DTYPES = ("float32", "bfloat16")
CAPACITY_ROUNDINGS = ("ceil", "round")
DECODER_PRIORITIES = ("rank_major", "position_major")  # routing.tokens_choose_routing's `priority`
BALANCE_SCHEDULES = ("constant", "linear_decay")
OPTIMIZERS = ("adamw", "adafactor")
ADAFACTOR_STYLES = ("t5x", "optax")
LOSS_NORMALIZING_FACTORS = ("num_real_target_tokens", "num_total_target_tokens", "average_per_sequence", "none")
DECODER_PADDING_SOURCES = ("targets", "decoder_input_tokens")
LR_SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "rsqrt")
MESH_AXES = ("data", "expert", "model")  # the mesh's logical axes (stmoe.partitioning names the physical ones)
DECODINGS = ("greedy", "beam")


class ConfigError(ValueError):
    """An invalid configuration; the message names the field."""


# Run-config fields that moved: old path -> new path. An older run's config.json is read with
# `upgrade_run_config`; a config that sets an old path is refused by name (the CLI names the new one).
MOVED_FIELDS = {
    "model.moe.aux_loss_coef": "loss.balance_coef",
    "model.moe.z_loss_coef": "loss.router_z_coef",
    "output_z_loss": "loss.output_z_coef",
    "aux_loss_schedule.schedule": "loss.balance_schedule",
    "aux_loss_schedule.warmup_multiplier": "loss.balance_warmup_multiplier",
    "aux_loss_schedule.decay_steps": "loss.balance_decay_steps",
}


def upgrade_run_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """A run config as nested dicts (e.g. an older run's config.json) with MOVED_FIELDS in their new places,
    and a field added since (model.moe.decoder_priority) at the value such a run had."""
    check(isinstance(values, Mapping), "config", f"must be a mapping of fields, got {type(values).__name__}")
    out = copy.deepcopy(dict(values))
    for old, new in MOVED_FIELDS.items():
        *parents, leaf = old.split(".")
        holder = out
        for key in parents:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and leaf in holder:
            section, name = new.split(".")
            out.setdefault(section, {})[name] = holder.pop(leaf)
    if isinstance(out.get("optim"), dict) and "adafactor_style" not in out["optim"]:
        out["optim"]["adafactor_style"] = "optax"  # written before t5x's Adafactor existed: optax's is what it ran
    if out.get("aux_loss_schedule") == {}:
        del out["aux_loss_schedule"]
    moe = out.get("model", {}).get("moe") if isinstance(out.get("model"), dict) else None
    if isinstance(moe, dict) and "decoder_priority" not in moe:
        # Written before the field existed: its decoder routed rank-major, the only order then.
        moe["decoder_priority"] = "rank_major"
    return out


def check(condition: bool, field: str, message: str) -> None:
    """Raises ConfigError("field: message") unless `condition`: the one way config checks fail."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def _positive_number(text: Any) -> bool:
    try:
        return isinstance(text, str) and math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        return False


class _Replaceable:
    """`replace`, `to_dict` and `from_dict` (unknown or moved fields refused by their dotted path)."""

    PREFIX = ""  # this section's dotted path in a RunConfig, e.g. "model.moe."

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], prefix: str | None = None):
        """The section from nested dicts; an unknown or moved field, or a value of another type than
        the field's annotation (e.g. a hand-edited config.json's "d_model": "64"), is a ConfigError
        naming the field. Ints are accepted for float fields, lists for tuples."""
        prefix = cls.PREFIX if prefix is None else prefix
        if isinstance(values, ml_collections.ConfigDict):  # the CLI's view of the same tree
            values = values.to_dict()
        check(isinstance(values, Mapping), prefix.rstrip(".") or "config",
              f"must be a mapping of fields, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in dict(values).items():
            moved = MOVED_FIELDS.get(f"{prefix}{key}")
            check(moved is None, f"{prefix}{key}", f"moved to {moved} (config.upgrade_run_config reads an older run's "
                                                    "config.json)")
            check(key in known, f"{prefix}{key}", f"unknown field; allowed: {sorted(known)}")
            section = hints[key] if dataclasses.is_dataclass(hints[key]) else None
            if section is not None and not isinstance(value, section):
                value = section.from_dict(value, prefix=f"{prefix}{key}.")
            elif section is None:
                value = _typed(value, hints[key], f"{prefix}{key}")
            kwargs[key] = value
        return cls(**kwargs)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"a tuple of {getattr(args[0], '__name__', args[0])} values" if args else "a tuple"
    return "None" if hint is type(None) else f"{'an' if hint.__name__[0] in 'aeiou' else 'a'} {hint.__name__}"


def _typed(value: Any, hint: Any, field: str) -> Any:
    """`value` as the annotation `hint` takes it (list -> tuple, int -> float), else ConfigError
    naming `field`. Annotations other than None / bool / int / float / str / tuple[X, ...] and their
    unions are not checked."""
    def convert(v, h):  # -> (ok, converted)
        origin, args = typing.get_origin(h), typing.get_args(h)
        if origin in (typing.Union, types.UnionType):
            for arg in args:
                ok, out = convert(v, arg)
                if ok:
                    return True, out
            return False, v
        if origin is tuple:
            if not isinstance(v, (tuple, list)):
                return False, v
            element = args[0] if args else Any
            items = [convert(x, element) for x in v]
            return all(ok for ok, _ in items), tuple(x for _, x in items)
        if h is type(None):
            return v is None, v
        if h is bool:
            return isinstance(v, bool), v
        if h is int:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool), v
        if h is float:
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
            return ok, float(v) if ok else v
        if h is str:
            return isinstance(v, str), v
        return True, v  # Any, or a kind this check does not know

    ok, out = convert(value, hint)
    check(ok, field, f"must be {_type_name(hint)}, got {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class MoeConfig(_Replaceable):
    PREFIX = "model.moe."

    num_experts: int = 8
    router_type: str = "tokens_choose"  # "experts_choose" is encoder-only (it looks at future tokens)
    decoder_router_type: str | None = None  # None = router_type; decoders need "tokens_choose"
    top_k: int = 2  # 2 = ST-MoE, 1 = Switch; for experts_choose unused
    # ST-MoE App. G: "random" routes to the 2nd expert with prob min(1, g2 / threshold) in training.
    second_expert_policy: str = "random"
    second_expert_threshold: float = 0.2
    normalize_gates: bool = True  # top-k gates divided by their sum (k > 1 only)
    # Capacity per expert and group: max(min_capacity, ceil(cf * group_size / num_experts)), not x k.
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    expert_capacity: int | None = None  # an integer overrides both factors (HF Switch semantics)
    capacity_rounding: str = "ceil"  # "round": int(round(cf * group_size / E)), half to even (flaxformer)
    group_size: int | None = None  # tokens per routing group; None = one group per sequence
    # flaxformer's groups over the whole batch (routing.flaxformer_num_groups): at most max_group_size tokens
    # each, a group count that is a multiple of num_groups_multiple (its num_experts x expert replicas).
    max_group_size: int | None = None
    num_groups_multiple: int = 1
    # Encoder layers hand out capacity slots by descending top-1 router probability (V-MoE's
    # batch-prioritized routing, Riquelme et al. 2021 sec. 4.1) instead of token order. Decoder layers
    # always use token order: a priority by confidence would let later tokens take an earlier one's
    # slot, i.e. look at the future (router_for / batch_prioritized_for give each stack's rule).
    batch_prioritized: bool = False
    # In which order decoder layers hand out capacity slots: "position_major" serves token t's k choices
    # before token t+1's (by position in the sequence when a group spans rows), so no later token can
    # take an earlier one's slot (causal); "rank_major" serves every first choice before any second
    # choice, in token order, as the encoder does and as flaxformer does in both stacks, which lets a
    # later token's first choice evict an earlier token's second
    # (docs/design.md "Causal decoder routing"). Converted t5x / HF models set "rank_major"; a run's
    # config.json without this field was trained with it (upgrade_run_config).
    decoder_priority: str = "position_major"
    route_padding: bool = False  # HF routes padding tokens; ST-MoE does not
    # flaxformer multiplies every sublayer's input by the padding mask, so routed padding reaches the
    # router as zero vectors (uniform probabilities: experts 0..k-1) and takes their slots; converted
    # t5x models set this to route it the same way (stmoe.interop.t5x).
    zero_padding_inputs: bool = False
    # Which decoder positions are padding for routing and the MoE losses: "targets" (decoder_target_tokens
    # == 0, or the segment ids) or "decoder_input_tokens", flaxformer's mask from the inputs
    # (layers.decoder_input_token_mask), which also counts the position whose input is the EOS.
    decoder_padding_from: str = "targets"
    # transformers 4.x Switch kept a dropped token's (normed) input x router prob; 5.x (and Mesh TF) give zero.
    dropped_token_passthrough: bool = False
    aux_loss_type: str = "switch_top1"  # which balance loss the layer computes (its weight: LossConfig)
    jitter_noise: float = 0.0  # multiplicative uniform noise on router inputs (training only)
    router_init_std: float = 2e-2
    expert_dropout_rate: float = 0.0  # dropout inside the experts (fine-tuning: ST-MoE sec. 4.3)
    dispatch: str = "gather"  # "einsum" | "gather" | "dropless" (no capacity) | "auto" (per backend; stmoe/dispatch.py)
    # Router logits and softmax in float32 whatever model.dtype is ("selective precision", ST-MoE sec. 3.2);
    # "bfloat16" rounds the router's inputs, weights, logits and probabilities (the paper's unstable Table 4 row).
    router_dtype: str = "float32"
    # How the experts run: "sequential" (one after another, lax.map: XLA:CPU's cache-friendly choice),
    # "batched" (one batched matmul: GPU/TPU, and what the partitioner splits when the mesh shards the
    # experts), "grouped" (capacity-limited routing as `dispatch` decides it, then only the kept rows
    # through the grouped kernel: no empty slot computed; tokens-choose routers), or "auto": chosen from
    # the backend, router and mesh by dispatch.resolve_model when the model is built (a layer built
    # from an unresolved config runs them one after another).
    expert_execution: str = "auto"
    # How dropless dispatch (and a group of one token, a decoding step) runs its grouped matmuls:
    # "tiled" (grouped_matmul.py: XLA:CPU), "ragged_dot" (jax.lax.ragged_dot: GPU/TPU) or "auto",
    # chosen per backend by dispatch.resolve_model (unresolved, the layer runs the tiled loop).
    grouped_kernel: str = "auto"

    def router_for(self, causal: bool) -> str:
        return (self.decoder_router_type or self.router_type) if causal else self.router_type

    def batch_prioritized_for(self, causal: bool) -> bool:
        """Batch-prioritized routing in this stack: the encoder's choice; a causal decoder never."""
        return self.batch_prioritized and not causal

    def priority_for(self, causal: bool) -> str:
        """The slot priority of this stack (routing.tokens_choose_routing): decoder_priority in a causal
        decoder, rank-major (ST-MoE) in the encoder."""
        return self.decoder_priority if causal else "rank_major"


    def validate(self, prefix: str = "model.moe.") -> "MoeConfig":
        p = prefix
        check(self.num_experts >= 1, f"{p}num_experts", f"must be >= 1, got {self.num_experts}")
        check(self.router_type in ROUTER_TYPES, f"{p}router_type",
               f"must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        check(self.decoder_router_type in (None,) + ROUTER_TYPES, f"{p}decoder_router_type",
               f"must be None or one of {ROUTER_TYPES}, got {self.decoder_router_type!r}")
        check(1 <= self.top_k <= self.num_experts, f"{p}top_k",
               f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        check(self.second_expert_policy in SECOND_EXPERT_POLICIES, f"{p}second_expert_policy",
               f"must be one of {SECOND_EXPERT_POLICIES}, got {self.second_expert_policy!r}")
        check(self.second_expert_threshold > 0, f"{p}second_expert_threshold",
               f"must be > 0, got {self.second_expert_threshold}")
        for name in ("train_capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            # inf would size the experts' buffers without bound (and breaks the capacity arithmetic)
            check(value > 0 and math.isfinite(value), f"{p}{name}",
                  f"must be a finite number > 0, got {value} (to drop no token: a factor of num_experts "
                  f"or more, or dispatch='dropless')")
        check(self.min_capacity >= 1, f"{p}min_capacity", f"must be >= 1, got {self.min_capacity}")
        check(self.expert_capacity is None or self.expert_capacity >= 1, f"{p}expert_capacity",
               f"must be None or >= 1, got {self.expert_capacity}")
        check(self.capacity_rounding in CAPACITY_ROUNDINGS, f"{p}capacity_rounding",
               f"must be one of {CAPACITY_ROUNDINGS}, got {self.capacity_rounding!r}")
        check(self.group_size is None or self.group_size >= 1, f"{p}group_size",
               f"must be None or >= 1, got {self.group_size}")
        check(self.max_group_size is None or self.max_group_size >= 1, f"{p}max_group_size",
               f"must be None or >= 1, got {self.max_group_size}")
        check(self.max_group_size is None or self.group_size is None, f"{p}max_group_size",
               f"set group_size={self.group_size} or max_group_size={self.max_group_size}, not both")
        check(self.num_groups_multiple >= 1, f"{p}num_groups_multiple",
               f"must be >= 1, got {self.num_groups_multiple}")
        check(self.num_groups_multiple == 1 or self.max_group_size is not None, f"{p}num_groups_multiple",
               f"={self.num_groups_multiple} needs max_group_size (it shapes flaxformer's batch-wide groups)")
        check(self.decoder_priority in DECODER_PRIORITIES, f"{p}decoder_priority",
              f"must be one of {DECODER_PRIORITIES}, got {self.decoder_priority!r}")
        check(self.aux_loss_type in AUX_LOSS_TYPES, f"{p}aux_loss_type",
               f"must be one of {AUX_LOSS_TYPES}, got {self.aux_loss_type!r}")
        check(self.decoder_padding_from in DECODER_PADDING_SOURCES, f"{p}decoder_padding_from",
              f"must be one of {DECODER_PADDING_SOURCES}, got {self.decoder_padding_from!r}")
        check(self.jitter_noise >= 0, f"{p}jitter_noise", f"must be >= 0, got {self.jitter_noise}")
        check(0 <= self.expert_dropout_rate < 1, f"{p}expert_dropout_rate",
               f"must be in [0, 1), got {self.expert_dropout_rate}")
        check(self.dispatch in DISPATCH_IMPLS, f"{p}dispatch",
               f"must be one of {DISPATCH_IMPLS}, got {self.dispatch!r}")
        check(self.router_dtype in DTYPES, f"{p}router_dtype", f"must be one of {DTYPES}, got {self.router_dtype!r}")
        check(self.dispatch != "dropless" or self.router_type == "tokens_choose", f"{p}dispatch",
               "'dropless' needs router_type='tokens_choose': expert choice has a capacity by construction")
        check(self.expert_execution in EXPERT_EXECUTIONS, f"{p}expert_execution",
               f"must be one of {EXPERT_EXECUTIONS}, got {self.expert_execution!r}")
        check(self.expert_execution != "grouped" or self.router_type == "tokens_choose", f"{p}expert_execution",
              "'grouped' needs router_type='tokens_choose' (an expert-choice token may fill any number of slots)")
        check(self.grouped_kernel in GROUPED_KERNELS, f"{p}grouped_kernel",
              f"must be one of {GROUPED_KERNELS}, got {self.grouped_kernel!r}")
        return self


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Replaceable):
    PREFIX = "model."

    vocab_size: int = 384  # ByteVocabulary (3 + 256 + 100 sentinels = 359) rounded up to 128s
    d_model: int = 64
    d_ff: int = 128
    num_heads: int = 4
    d_kv: int = 16
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    mlp_activation: str = "gelu"  # gated (GEGLU) when mlp_gated; T5.1.1 uses gated gelu
    mlp_gated: bool = True
    dropout_rate: float = 0.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    tie_embeddings: bool = False  # T5.1.1 unties; Switch checkpoints tie (logits * d_model**-0.5)
    layer_norm_epsilon: float = 1e-6
    layer_norm_scale: bool = True  # RMSNorm's learned per-channel scale (T5); False: x / rms(x) only
    dtype: str = "float32"  # activations and experts; the router's precision is moe.router_dtype
    # flaxformer zeroes every sublayer's normed input at padding, and the encoder's output
    # (t5_architecture.py:319-320, 342-343, 596-604, 645, 669, 872-873; moe_architecture.py:93-94): only
    # the positions the mask calls padding change, and through attention the position after an EOS that
    # moe.decoder_padding_from="decoder_input_tokens" counts as real. True for t5x training parity.
    zero_padding_activations: bool = False
    # Sparse blocks: i % sparse_interval == sparse_offset (default interval - 1), or an explicit list.
    sparse_interval: int = 4
    sparse_offset: int | None = None
    sparse_layers: tuple[int, ...] | None = None
    sparse_dense: bool = False  # an extra dense FFN after each sparse FFN (ST-MoE-32B)
    # A dense baseline with the MoE's layout: an int puts a dense FFN of this width (instead of an MoE
    # layer) at every sparse position, e.g. top_k * d_ff for the FFN FLOPs of a top-k MoE. None = MoE layers.
    sparse_positions_dense_d_ff: int | None = None
    scan_layers: bool = False  # nn.scan over repeated (interval-1 dense + 1 sparse) blocks: compile time flat in depth
    remat: str = "none"  # recompute blocks in the backward pass: "none" | "full" | "save_dots" (keep matmul outputs)
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)


    def is_sparse_position(self, layer: int) -> bool:
        """Block `layer` sits at a sparse position of the layout (whether or not it holds experts)."""
        if self.sparse_layers is not None:
            return layer in self.sparse_layers
        offset = self.sparse_interval - 1 if self.sparse_offset is None else self.sparse_offset
        return layer % self.sparse_interval == offset

    def is_sparse(self, layer: int) -> bool:
        """Block `layer`'s FFN is an MoE layer."""
        return self.sparse_positions_dense_d_ff is None and self.is_sparse_position(layer)

    def ffn_width(self, layer: int) -> int:
        """d_ff of block `layer`'s dense FFN (of each expert when the block is sparse)."""
        if self.sparse_positions_dense_d_ff is not None and self.is_sparse_position(layer):
            return self.sparse_positions_dense_d_ff
        return self.d_ff

    def validate(self, prefix: str = "model.") -> "ModelConfig":
        p = prefix
        for name in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            check(getattr(self, name) >= 1, f"{p}{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            check(getattr(self, name) >= 0, f"{p}{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.mlp_activation in MLP_ACTIVATIONS, f"{p}mlp_activation",
               f"must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
        check(0 <= self.dropout_rate < 1, f"{p}dropout_rate", f"must be in [0, 1), got {self.dropout_rate}")
        check(self.dtype in DTYPES, f"{p}dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        check(self.sparse_interval >= 1, f"{p}sparse_interval",
               f"must be >= 1, got {self.sparse_interval}")
        check(self.sparse_offset is None or 0 <= self.sparse_offset < self.sparse_interval,
               f"{p}sparse_offset", f"must be None or in [0, sparse_interval), got {self.sparse_offset}")
        num_layers = max(self.num_encoder_layers, self.num_decoder_layers)
        check(self.sparse_layers is None or all(0 <= i < num_layers for i in self.sparse_layers),
               f"{p}sparse_layers", f"indices must be in [0, {num_layers}), got {self.sparse_layers}")
        check(self.sparse_positions_dense_d_ff is None or self.sparse_positions_dense_d_ff >= 1,
               f"{p}sparse_positions_dense_d_ff", f"must be None or >= 1, got {self.sparse_positions_dense_d_ff}")
        check(self.sparse_positions_dense_d_ff is None or not self.sparse_dense, f"{p}sparse_positions_dense_d_ff",
               "a dense model has no sparse FFN for sparse_dense to follow; set one of the two")
        check(self.remat in REMAT_POLICIES, f"{p}remat", f"must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.scan_layers:
            for name in ("num_encoder_layers", "num_decoder_layers"):
                check(getattr(self, name) % self.sparse_interval == 0, f"{p}scan_layers",
                       f"needs {name}={getattr(self, name)} to be a multiple of sparse_interval="
                       f"{self.sparse_interval} (the scanned unit is one interval of blocks)")
            check(self.sparse_layers is None, f"{p}scan_layers",
                   "needs the periodic layout (sparse_interval/sparse_offset), not an explicit sparse_layers list")
        self.moe.validate(prefix=f"{p}moe.")
        has_sparse_decoder = any(self.is_sparse(i) for i in range(self.num_decoder_layers))
        check(not has_sparse_decoder or self.moe.router_for(causal=True) == "tokens_choose",
               f"{p}moe.decoder_router_type",
               "'experts_choose' looks at all tokens of a group and cannot route a causal decoder; "
               "set moe.decoder_router_type='tokens_choose'")
        return self


@dataclasses.dataclass(frozen=True)
class LossConfig(_Replaceable):
    """L = L_CE + output_z_coef * z_out + c_B(step) * L_B + router_z_coef * L_z (ST-MoE sec. 3.1).

    The MoE layers report L_B and L_z unweighted (metrics.RouterStats); losses.py weighs them with
    these coefficients, and c_B follows `balance_schedule` (losses.balance_coef_schedule).
    """

    PREFIX = "loss."

    balance_coef: float = 1e-2  # c_B (ST-MoE: 1e-2)
    router_z_coef: float = 1e-3  # c_z (ST-MoE sec. 3.1: 1e-3)
    output_z_coef: float = 1e-4  # z-loss on the output softmax normalizer (Mesh TF T5); 0 = off
    # 'constant' c_B, or 'linear_decay': c_B * balance_warmup_multiplier at step 0, linearly down to c_B
    # over balance_decay_steps (a stronger push towards balance while the router is still random).
    balance_schedule: str = "constant"
    balance_warmup_multiplier: float = 1.0
    balance_decay_steps: int = 1
    # t5x's cross-entropy (t5x/losses.py:132-190): label smoothing puts 1 - s on the target and
    # s / (vocab - 1) on every other id, minus the entropy of those soft targets; 0 = off.
    label_smoothing: float = 0.0
    # What the cross-entropy sum (+ output z-loss) is divided by (t5x's loss_normalizing_factor,
    # t5x/losses.py:193-353); the MoE terms are added after (t5x/contrib/moe/models.py:278-293):
    # "num_real_target_tokens" (the loss weights' sum), "num_total_target_tokens" (batch x length),
    # "average_per_sequence" (each sequence's mean, averaged), "none" (the sum), or a number, e.g. "1024".
    loss_normalizing_factor: str = "num_real_target_tokens"


    def validate(self, prefix: str = "loss.") -> "LossConfig":
        p = prefix
        for name in ("balance_coef", "router_z_coef", "output_z_coef", "balance_warmup_multiplier"):
            check(getattr(self, name) >= 0, f"{p}{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.balance_schedule in BALANCE_SCHEDULES, f"{p}balance_schedule",
               f"must be one of {BALANCE_SCHEDULES}, got {self.balance_schedule!r}")
        check(isinstance(self.balance_decay_steps, int) and self.balance_decay_steps >= 1,
               f"{p}balance_decay_steps", f"must be an integer >= 1, got {self.balance_decay_steps!r}")
        check(0.0 <= self.label_smoothing < 1.0, f"{p}label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        factor = self.loss_normalizing_factor
        check(factor in LOSS_NORMALIZING_FACTORS or _positive_number(factor), f"{p}loss_normalizing_factor",
              f"must be one of {LOSS_NORMALIZING_FACTORS} or a positive number as a string, got {factor!r}")
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Replaceable):
    """Sizes of the mesh axes; -1 (at most one axis) means "the rest of the devices"."""

    PREFIX = "mesh."

    data: int = -1  # data parallelism (experts replicated over it)
    expert: int = 1  # expert parallelism (must divide model.moe.num_experts); also data-parallel for dense layers
    model: int = 1  # tensor parallelism: mlp / heads / vocab / expert_mlp

    def validate(self, device_count: int | None = None, prefix: str = "mesh.") -> "MeshConfig":
        """Checks the fields; with `device_count`, also that they fit it. Returns self."""
        self.resolve(device_count, prefix)
        return self

    def resolve(self, device_count: int | None = None, prefix: str = "mesh.") -> tuple[int, int, int]:
        """(data, expert, model) with -1 replaced; the product must equal device_count."""
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            check(isinstance(size, int) and (size >= 1 or size == -1), f"{prefix}{name}",
                   f"must be a positive integer or -1 (the rest of the devices), got {size!r}")
        rest = [name for name, size in sizes.items() if size == -1]
        check(len(rest) <= 1, f"{prefix}{rest[-1] if rest else 'data'}",
               f"only one axis may be -1, got -1 for {rest}")
        if device_count is None:
            return tuple(sizes.values())  # type: ignore[return-value]
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if rest:
            check(device_count % fixed == 0, f"{prefix}{rest[0]}",
                   f"-1 needs the other axes ({fixed} devices) to divide the device count {device_count}")
            sizes[rest[0]] = device_count // fixed
        product = math.prod(sizes.values())
        check(product == device_count, prefix.rstrip("."),
               f"data * expert * model = {sizes['data']} * {sizes['expert']} * {sizes['model']} = "
               f"{product} must equal the device count {device_count}")
        return sizes["data"], sizes["expert"], sizes["model"]


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Replaceable):
    """Optimizer and learning-rate schedule (stmoe.optim builds them with optax)."""

    PREFIX = "optim."

    optimizer: str = "adafactor"  # 'adafactor' (the paper's) or 'adamw'
    learning_rate: float = 1e-2  # peak learning rate
    schedule: str = "rsqrt"  # 'rsqrt' (T5), 'warmup_cosine', 'warmup_linear', 'constant' (optim.learning_rate_schedule)
    warmup_steps: int = 10_000  # linear warmup length; rsqrt: the length of the constant plateau
    total_steps: int | None = None  # end of the cosine / linear decay; None = the run's total_steps
    end_learning_rate_fraction: float = 0.0  # final LR / peak for the decaying schedules
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.999  # AdamW second-moment decay (0.95 for large models)
    eps: float = 1e-8  # AdamW epsilon
    # Decoupled weight decay, multiplied by the scheduled LR (AdamW convention, used for Adafactor
    # too); never applied to norm scales or biases.
    weight_decay: float = 0.0
    adafactor_decay_rate: float = 0.8  # Adafactor second-moment decay exponent (paper)
    # Adafactor update clipping (paper: 1.0; sec. 3.1 lowers it to 0.1 for stability); 0 = off. Any
    # threshold > 0 works (optax.clip_by_block_rms divides by max(1, RMS / threshold)).
    adafactor_clipping_threshold: float = 1.0
    # Adafactor's semantics (docs/design.md, "Optimization"): "t5x" (stmoe/adafactor.py: t5x's
    # factoring by logical axes, one second moment, parameter scale and update clipping per expert,
    # attention kernels factored as flaxformer's 2-D kernels) or "optax" (optax.adafactor: each array one block).
    adafactor_style: str = "t5x"
    adafactor_epsilon1: float = 1e-30  # added to the squared gradients (t5x epsilon1)
    adafactor_epsilon2: float = 1e-3  # floor of the parameter-RMS step scale (t5x epsilon2; "t5x" style only)
    adafactor_min_dim_size_to_factor: int = 128  # a 2-D parameter is factored once both dims are >= this
    adafactor_factored: bool = True  # factored second moments; False: a full second moment for every parameter
    adafactor_multiply_by_parameter_scale: bool = True  # relative step: lr x max(RMS(param), epsilon2)
    adafactor_beta1: float | None = None  # momentum of the update; None = none (t5x's default, no memory)
    adafactor_max_parameter_scale: float | None = None  # cap on the parameter-RMS scale; None = none ("t5x" only)
    adafactor_step_offset: int = 0  # the second-moment decay restarts at this step (t5x step_offset; fine-tuning)
    # t5x's weight decay (t5x/adafactor.py:561-562): param *= 1 - rate at every step, not times the
    # learning rate, on every parameter; None = off ("t5x" only; optim.weight_decay is the AdamW convention).
    adafactor_weight_decay_rate: float | None = None
    grad_clip_norm: float = 1.0  # global-norm gradient clipping; 0 = off
    router_lr_multiplier: float = 1.0  # scales the updates of params with 'router' in their path
    # Regexes searched in '/'-joined param paths; matching params are frozen (see also RunConfig.freeze).
    freeze_patterns: tuple[str, ...] = ()
    skip_nonfinite: bool = True  # skip (and count) steps with Inf/NaN gradients or update; never apply one
    # The trainer stops the run after this many skipped steps in a row; 0 stops at the first.
    max_consecutive_nonfinite: int = 10

    def validate(self, prefix: str = "optim.") -> "OptimConfig":
        p = prefix
        for field in dataclasses.fields(self):  # an Inf or NaN setting makes every update non-finite
            value = getattr(self, field.name)
            if isinstance(value, float):
                check(math.isfinite(value), f"{p}{field.name}", f"must be finite, got {value}")
        check(self.optimizer in OPTIMIZERS, f"{p}optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        # Adam divides by sqrt(v) + eps, and v stays 0 for a parameter whose gradient has been 0.
        check(self.optimizer != "adamw" or self.eps > 0, f"{p}eps",
              f"must be > 0 for optimizer 'adamw' (0 / 0 where a gradient has always been 0), got {self.eps}")
        check(self.schedule in LR_SCHEDULES, f"{p}schedule", f"must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        check(self.learning_rate > 0, f"{p}learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.warmup_steps >= 0, f"{p}warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.schedule != "rsqrt" or self.warmup_steps >= 1, f"{p}warmup_steps",
               f"schedule 'rsqrt' needs warmup_steps >= 1 (lr ~ 1/sqrt(max(step, warmup_steps))), "
               f"got {self.warmup_steps}")
        if self.schedule in ("warmup_cosine", "warmup_linear"):
            check(self.total_steps is not None and self.total_steps > self.warmup_steps, f"{p}total_steps",
                   f"must be > warmup_steps={self.warmup_steps} for schedule {self.schedule!r}, got {self.total_steps}")
        check(0.0 <= self.end_learning_rate_fraction <= 1.0, f"{p}end_learning_rate_fraction",
               f"must be in [0, 1], got {self.end_learning_rate_fraction}")
        for name in ("b1", "b2", "adafactor_decay_rate"):
            check(0.0 <= getattr(self, name) < 1.0, f"{p}{name}", f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("eps", "weight_decay", "grad_clip_norm", "router_lr_multiplier"):
            check(getattr(self, name) >= 0, f"{p}{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.adafactor_clipping_threshold >= 0, f"{p}adafactor_clipping_threshold",
               f"must be 0 (off) or > 0, got {self.adafactor_clipping_threshold}")
        check(self.adafactor_style in ADAFACTOR_STYLES, f"{p}adafactor_style",
              f"must be one of {ADAFACTOR_STYLES}, got {self.adafactor_style!r}")
        check(self.adafactor_epsilon1 > 0, f"{p}adafactor_epsilon1", f"must be > 0, got {self.adafactor_epsilon1}")
        check(self.adafactor_epsilon2 >= 0, f"{p}adafactor_epsilon2", f"must be >= 0, got {self.adafactor_epsilon2}")
        check(isinstance(self.adafactor_min_dim_size_to_factor, int) and self.adafactor_min_dim_size_to_factor >= 1,
              f"{p}adafactor_min_dim_size_to_factor",
              f"must be an integer >= 1, got {self.adafactor_min_dim_size_to_factor!r}")
        for name in ("adafactor_factored", "adafactor_multiply_by_parameter_scale"):
            check(isinstance(getattr(self, name), bool), f"{p}{name}", f"must be True or False, got {getattr(self, name)!r}")
        check(self.adafactor_beta1 is None or 0.0 <= self.adafactor_beta1 < 1.0, f"{p}adafactor_beta1",
              f"must be None (no momentum) or in [0, 1), got {self.adafactor_beta1}")
        check(self.adafactor_max_parameter_scale is None or self.adafactor_max_parameter_scale > 0,
              f"{p}adafactor_max_parameter_scale", f"must be None or > 0, got {self.adafactor_max_parameter_scale}")
        check(isinstance(self.adafactor_step_offset, int) and self.adafactor_step_offset >= 0,
              f"{p}adafactor_step_offset", f"must be an integer >= 0, got {self.adafactor_step_offset!r}")
        check(self.adafactor_weight_decay_rate is None or 0.0 <= self.adafactor_weight_decay_rate < 1.0,
              f"{p}adafactor_weight_decay_rate", f"must be None or in [0, 1), got {self.adafactor_weight_decay_rate}")
        if self.adafactor_style == "optax":  # what optax.adafactor has no argument for
            for name, default in (("adafactor_epsilon2", 1e-3), ("adafactor_max_parameter_scale", None),
                                  ("adafactor_weight_decay_rate", None)):
                check(getattr(self, name) == default, f"{p}{name}",
                      f"is t5x's; set adafactor_style='t5x' or leave it at {default}")
        check(isinstance(self.freeze_patterns, tuple), f"{p}freeze_patterns",
               f"must be a tuple of regex strings, got {self.freeze_patterns!r}")
        for pattern in self.freeze_patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ConfigError(f"{p}freeze_patterns: bad regex {pattern!r}: {e}") from None
        check(self.max_consecutive_nonfinite >= 0, f"{p}max_consecutive_nonfinite",
               f"must be >= 0, got {self.max_consecutive_nonfinite}")
        return self


@dataclasses.dataclass(frozen=True)
class DataConfig(_Replaceable):
    PREFIX = "data."

    task: str = "stmoe_synthetic_span_corruption"  # seqio task/mixture family (stmoe.data.tasks)
    eval_task: str = ""  # held-out task; "" = task
    eval_split: str = "validation"  # held-out split of the eval task
    vocab_path: str = ""  # SentencePiece model; "" = the task family's default (bytes for the synthetic corpus)
    inputs_length: int = 128  # encoder tokens per example (packed)
    # Decoder tokens; span corruption of inputs_length needs stmoe.data.pre_corruption_length(inputs_length)[1]
    # (29 for 128: tests/test_config_validation.py checks the pair).
    targets_length: int = 29
    pack: bool = True  # several examples per row (segment ids keep them apart)
    seed: int = 0  # shuffling and span-corruption masks
    text_files: str = ""  # glob of local text files (one document per line): overrides task
    # Held-out loss on text_files: these files, or ("") the held_out_percent of text_files' documents
    # whose hash bucket (stmoe.data.tasks.held_out_bucket) is lowest; training never sees them.
    eval_text_files: str = ""
    held_out_percent: int = 5

    def validate(self, prefix: str = "data.") -> "DataConfig":
        p = prefix
        for name in ("inputs_length", "targets_length"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{p}{name}", f"must be a positive integer, got {value!r}")
        check(not self.eval_text_files or self.text_files, f"{p}eval_text_files",
               "needs data.text_files (the training text)")
        if self.text_files:
            check(isinstance(self.held_out_percent, int) and 0 <= self.held_out_percent < 100,
                   f"{p}held_out_percent", f"must be an integer in [0, 100), got {self.held_out_percent!r}")
        return self


@dataclasses.dataclass(frozen=True)
class InferEvalConfig(_Replaceable):
    """Task metrics by decoding (a seqio Evaluator, stmoe/evaluation.py) at every evaluation."""

    PREFIX = "infer_eval."

    task: str = ""  # seqio task/mixture family with metric fns (e.g. exact match); "" = off
    split: str = "validation"
    num_examples: int = 256  # per task; -1 = the whole split
    batch_size: int = 64  # decoding batch (rounded up to the data-parallel size)
    decoding: str = "greedy"  # or 'beam'
    beam_size: int = 4

    def validate(self, prefix: str = "infer_eval.") -> "InferEvalConfig":
        p = prefix
        if not self.task:
            return self
        check(self.decoding in DECODINGS, f"{p}decoding", f"must be one of {DECODINGS}, got {self.decoding!r}")
        for name in ("batch_size", "beam_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{p}{name}", f"must be an integer >= 1, got {value!r}")
        check(isinstance(self.num_examples, int) and (self.num_examples >= 1 or self.num_examples == -1),
               f"{p}num_examples", f"must be -1 (all) or >= 1, got {self.num_examples!r}")
        return self


# `freeze` presets (ST-MoE sec. 4.2, "fine-tuning a subset of parameters"): regexes of parameter
# paths to FREEZE (added to optim.freeze_patterns). Paths look like 'encoder/layers_1/ffn/moe/expert_wi_0',
# 'decoder/layers_0/ffn/mlp/wo', 'encoder/layers_0/attention/query' (scanned: 'encoder/scan_2/...').
#   name               updated                                       paper's row
#   none               everything                                    All
#   moe                everything but the MoE layers (router+experts) Non-MoE  (the paper's best)
#   non_moe            only the MoE layers                           MoE      (much worse)
#   attention          only self- and cross-attention                Attention
#   non_moe_ffn_only   only the dense (non-MoE) FFNs                 FFN
FREEZE_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "moe": (r"/moe/",),
    "non_moe": (r"^(?!.*/moe/)",),
    "attention": (r"^(?!.*attention/)",),
    "non_moe_ffn_only": (r"^(?!.*/ffn/(mlp|extra_mlp)/)",),
}


@dataclasses.dataclass(frozen=True)
class RunConfig(_Replaceable):
    """A training run. Its own fields are the loop's: batch, steps, cadences, seed, where it starts."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    num_devices: int = -1  # use only the first N devices (-1 = all); e.g. 1 to resume a pod run locally
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    batch_size: int = 32  # global batch (sequences per step), over all devices and microbatches
    microbatches: int = 1  # gradient accumulation: the batch is split into this many microbatches
    total_steps: int = 300  # optimizer steps of the run (a resumed run counts from its checkpoint's step)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    checkpoint_every_steps: int = 100  # async checkpoint cadence (also saved at the end and on SIGTERM)
    keep_checkpoints: int = 3  # newest checkpoints kept
    eval_every_steps: int = 100  # held-out evaluation cadence (also at the end)
    eval_steps: int = 8  # held-out batches per evaluation (0 = none)
    log_every_steps: int = 20  # metrics to TensorBoard / metrics.jsonl cadence
    seed: int = 0  # parameter init and dropout / routing rngs (fold_in(seed, step): resume is exact)
    resume_from: str = ""  # another run's checkpoint dir: full state + data position (if the workdir has none)
    init_checkpoint: str = ""  # pretrained checkpoint dir (or its step dir): params only (fine-tuning)
    reset_optimizer_state: bool = True  # with init_checkpoint: a fresh optimizer state (False: keep its state)
    freeze: str = "none"  # parameters NOT updated: a FREEZE_PRESETS name (frozen params get no optimizer state)
    infer_eval: InferEvalConfig = dataclasses.field(default_factory=InferEvalConfig)

    def optimizer(self) -> OptimConfig:
        """`optim` as the trainer builds it: total_steps filled in, the freeze preset's patterns added."""
        return self.optim.replace(
            total_steps=self.total_steps if self.optim.total_steps is None else self.optim.total_steps,
            freeze_patterns=tuple(self.optim.freeze_patterns) + FREEZE_PRESETS.get(self.freeze, ()))

    def resolve_devices(self, available: int) -> int:
        """How many devices the run uses (`num_devices`, or all of them) out of `available`."""
        check(self.num_devices == -1 or 1 <= self.num_devices <= available, "num_devices",
               f"must be -1 (all) or in [1, {available}], got {self.num_devices}")
        return available if self.num_devices == -1 else self.num_devices

    def validate(self) -> "RunConfig":
        """Checks every field alone and against the others; raises ConfigError naming the first bad
        one. Returns self. What needs the machine (devices, hosts, files, the mesh layout, span
        lengths) is stmoe.preflight's."""
        self.model.validate()
        self.loss.validate()
        check(self.num_devices == -1 or (isinstance(self.num_devices, int) and self.num_devices >= 1),
              "num_devices", f"must be -1 (all) or >= 1, got {self.num_devices!r}")
        for name in ("batch_size", "microbatches"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        check(self.batch_size % self.microbatches == 0, "microbatches",
               f"must divide batch_size={self.batch_size}, got {self.microbatches}")
        for name in ("total_steps", "checkpoint_every_steps", "eval_every_steps", "log_every_steps",
                     "keep_checkpoints"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        check(isinstance(self.eval_steps, int) and self.eval_steps >= 0, "eval_steps",
               f"must be an integer >= 0 (0 = no evaluation), got {self.eval_steps!r}")
        check(self.freeze in FREEZE_PRESETS, "freeze", f"must be one of {sorted(FREEZE_PRESETS)}, got {self.freeze!r}")
        check(not (self.reset_optimizer_state is False and not self.init_checkpoint),
               "reset_optimizer_state", "False needs init_checkpoint (whose optimizer state is kept)")
        self.data.validate()
        self.optimizer().validate()
        self.infer_eval.validate()
        return self


def run_config(config: "RunConfig | ml_collections.ConfigDict | Mapping[str, Any]") -> RunConfig:
    """The typed tree of a run given as a RunConfig, an ml_collections ConfigDict (configs/*.py,
    command-line overrides applied) or nested dicts (config.json: upgrade_run_config first)."""
    if isinstance(config, RunConfig):
        return config
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return RunConfig.from_dict(values)


def to_config_dict(section: Any) -> ml_collections.ConfigDict:
    """A config dataclass as an ml_collections ConfigDict with the same fields and values, for
    configs/*.py and `--config.FIELD=VALUE` overrides. A None field becomes a typed placeholder (so
    `--config.model.moe.group_size=4` parses as an int), and a RunConfig's `optim.total_steps`
    left at None follows `total_steps` (a FieldReference)."""
    from ml_collections import config_dict

    hints = typing.get_type_hints(type(section))
    out = ml_collections.ConfigDict()
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            out[field.name] = to_config_dict(value)
        elif value is None:
            kinds = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
            out[field.name] = config_dict.placeholder(typing.get_origin(kinds[0]) or kinds[0])
        else:
            out[field.name] = value
    if isinstance(section, RunConfig) and section.optim.total_steps is None:
        del out.optim["total_steps"]  # replaced, not chained to its placeholder: gin_config.to_gin sees one field
        out.optim.total_steps = out.get_ref("total_steps")
    return out


def get_field(config: Any, path: str) -> Any:
    """The field a dotted path names in an ml_collections ConfigDict (or nested dicts): 'model.moe.top_k'
    -> config.model.moe.top_k, as `--config.model.moe.top_k` names it; '' -> config itself. An unknown
    name raises (KeyError / AttributeError)."""
    node = config
    for name in path.split(".") if path else ():
        node = node[name]
    return node


def set_field(config: Any, path: str, value: Any) -> None:
    """config.a.b = value for path 'a.b' (`get_field` of 'a', then its field 'b' set; a locked ConfigDict
    refuses an unknown field)."""
    parent, _, name = path.rpartition(".")
    get_field(config, parent)[name] = value
