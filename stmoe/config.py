"""Model and loss configuration: frozen dataclasses built in one place.

`MoeConfig` holds everything about routing and experts, `ModelConfig` the
T5.1.1 backbone, `LossConfig` the training objective's coefficients and schedule. ml_collections presets (configs/models.py) are converted with
`ModelConfig.from_dict`, which rejects unknown fields by name; `validate()`
checks every field once, at start, and names the offending one. Eval and
inference variants are derived with `dataclasses.replace`, e.g.
`cfg.replace(moe=cfg.moe.replace(eval_capacity_factor=4.0))`.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

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
BALANCE_SCHEDULES = ("constant", "linear_decay")


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
    """A run config as nested dicts (e.g. an older run's config.json) with MOVED_FIELDS in their new places."""
    out = copy.deepcopy(dict(values))
    for old, new in MOVED_FIELDS.items():
        *parents, leaf = old.split(".")
        holder = out
        for key in parents:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and leaf in holder:
            section, name = new.split(".")
            out.setdefault(section, {})[name] = holder.pop(leaf)
    if out.get("aux_loss_schedule") == {}:
        del out["aux_loss_schedule"]
    return out


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


class _Replaceable:
    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def _from_mapping(cls, values: Mapping[str, Any], prefix: str, nested: Mapping[str, type]):
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in dict(values).items():
            moved = MOVED_FIELDS.get(f"{prefix}{key}")
            _check(moved is None, f"{prefix}{key}", f"moved to {moved} (config.upgrade_run_config reads an older run's "
                                                    "config.json)")
            _check(key in known, f"{prefix}{key}", f"unknown field; allowed: {sorted(known)}")
            if key in nested and not isinstance(value, nested[key]):
                value = nested[key].from_dict(value, prefix=f"{prefix}{key}.")
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class MoeConfig(_Replaceable):
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
    route_padding: bool = False  # HF routes padding tokens; ST-MoE does not
    # flaxformer multiplies every sublayer's input by the padding mask, so routed padding reaches the
    # router as zero vectors (uniform probabilities: experts 0..k-1) and takes their slots; converted
    # t5x models set this to route it the same way (stmoe.interop.t5x).
    zero_padding_inputs: bool = False
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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], prefix: str = "moe.") -> "MoeConfig":
        return cls._from_mapping(values, prefix, {})

    def validate(self, prefix: str = "moe.") -> "MoeConfig":
        p = prefix
        _check(self.num_experts >= 1, f"{p}num_experts", f"must be >= 1, got {self.num_experts}")
        _check(self.router_type in ROUTER_TYPES, f"{p}router_type",
               f"must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        _check(self.decoder_router_type in (None,) + ROUTER_TYPES, f"{p}decoder_router_type",
               f"must be None or one of {ROUTER_TYPES}, got {self.decoder_router_type!r}")
        _check(1 <= self.top_k <= self.num_experts, f"{p}top_k",
               f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _check(self.second_expert_policy in SECOND_EXPERT_POLICIES, f"{p}second_expert_policy",
               f"must be one of {SECOND_EXPERT_POLICIES}, got {self.second_expert_policy!r}")
        _check(self.second_expert_threshold > 0, f"{p}second_expert_threshold",
               f"must be > 0, got {self.second_expert_threshold}")
        for name in ("train_capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            _check(value > 0, f"{p}{name}", f"must be > 0, got {value}")
        _check(self.min_capacity >= 1, f"{p}min_capacity", f"must be >= 1, got {self.min_capacity}")
        _check(self.expert_capacity is None or self.expert_capacity >= 1, f"{p}expert_capacity",
               f"must be None or >= 1, got {self.expert_capacity}")
        _check(self.capacity_rounding in CAPACITY_ROUNDINGS, f"{p}capacity_rounding",
               f"must be one of {CAPACITY_ROUNDINGS}, got {self.capacity_rounding!r}")
        _check(self.group_size is None or self.group_size >= 1, f"{p}group_size",
               f"must be None or >= 1, got {self.group_size}")
        _check(self.max_group_size is None or self.max_group_size >= 1, f"{p}max_group_size",
               f"must be None or >= 1, got {self.max_group_size}")
        _check(self.max_group_size is None or self.group_size is None, f"{p}max_group_size",
               f"set group_size={self.group_size} or max_group_size={self.max_group_size}, not both")
        _check(self.num_groups_multiple >= 1, f"{p}num_groups_multiple",
               f"must be >= 1, got {self.num_groups_multiple}")
        _check(self.num_groups_multiple == 1 or self.max_group_size is not None, f"{p}num_groups_multiple",
               f"={self.num_groups_multiple} needs max_group_size (it shapes flaxformer's batch-wide groups)")
        _check(self.aux_loss_type in AUX_LOSS_TYPES, f"{p}aux_loss_type",
               f"must be one of {AUX_LOSS_TYPES}, got {self.aux_loss_type!r}")
        _check(self.jitter_noise >= 0, f"{p}jitter_noise", f"must be >= 0, got {self.jitter_noise}")
        _check(0 <= self.expert_dropout_rate < 1, f"{p}expert_dropout_rate",
               f"must be in [0, 1), got {self.expert_dropout_rate}")
        _check(self.dispatch in DISPATCH_IMPLS, f"{p}dispatch",
               f"must be one of {DISPATCH_IMPLS}, got {self.dispatch!r}")
        _check(self.router_dtype in DTYPES, f"{p}router_dtype", f"must be one of {DTYPES}, got {self.router_dtype!r}")
        _check(self.dispatch != "dropless" or self.router_type == "tokens_choose", f"{p}dispatch",
               "'dropless' needs router_type='tokens_choose': expert choice has a capacity by construction")
        _check(self.expert_execution in EXPERT_EXECUTIONS, f"{p}expert_execution",
               f"must be one of {EXPERT_EXECUTIONS}, got {self.expert_execution!r}")
        _check(self.expert_execution != "grouped" or self.router_type == "tokens_choose", f"{p}expert_execution",
               "'grouped' needs router_type='tokens_choose' (an expert-choice token may fill any number of slots)")
        _check(self.grouped_kernel in GROUPED_KERNELS, f"{p}grouped_kernel",
               f"must be one of {GROUPED_KERNELS}, got {self.grouped_kernel!r}")
        return self


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Replaceable):
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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], prefix: str = "model.") -> "ModelConfig":
        return cls._from_mapping(values, prefix, {"moe": MoeConfig})

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
            _check(getattr(self, name) >= 1, f"{p}{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            _check(getattr(self, name) >= 0, f"{p}{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.mlp_activation in MLP_ACTIVATIONS, f"{p}mlp_activation",
               f"must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
        _check(0 <= self.dropout_rate < 1, f"{p}dropout_rate", f"must be in [0, 1), got {self.dropout_rate}")
        _check(self.dtype in DTYPES, f"{p}dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.sparse_interval >= 1, f"{p}sparse_interval",
               f"must be >= 1, got {self.sparse_interval}")
        _check(self.sparse_offset is None or 0 <= self.sparse_offset < self.sparse_interval,
               f"{p}sparse_offset", f"must be None or in [0, sparse_interval), got {self.sparse_offset}")
        num_layers = max(self.num_encoder_layers, self.num_decoder_layers)
        _check(self.sparse_layers is None or all(0 <= i < num_layers for i in self.sparse_layers),
               f"{p}sparse_layers", f"indices must be in [0, {num_layers}), got {self.sparse_layers}")
        _check(self.sparse_positions_dense_d_ff is None or self.sparse_positions_dense_d_ff >= 1,
               f"{p}sparse_positions_dense_d_ff", f"must be None or >= 1, got {self.sparse_positions_dense_d_ff}")
        _check(self.sparse_positions_dense_d_ff is None or not self.sparse_dense, f"{p}sparse_positions_dense_d_ff",
               "a dense model has no sparse FFN for sparse_dense to follow; set one of the two")
        _check(self.remat in REMAT_POLICIES, f"{p}remat", f"must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.scan_layers:
            for name in ("num_encoder_layers", "num_decoder_layers"):
                _check(getattr(self, name) % self.sparse_interval == 0, f"{p}scan_layers",
                       f"needs {name}={getattr(self, name)} to be a multiple of sparse_interval="
                       f"{self.sparse_interval} (the scanned unit is one interval of blocks)")
            _check(self.sparse_layers is None, f"{p}scan_layers",
                   "needs the periodic layout (sparse_interval/sparse_offset), not an explicit sparse_layers list")
        self.moe.validate(prefix=f"{p}moe.")
        has_sparse_decoder = any(self.is_sparse(i) for i in range(self.num_decoder_layers))
        _check(not has_sparse_decoder or self.moe.router_for(causal=True) == "tokens_choose",
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

    balance_coef: float = 1e-2  # c_B (ST-MoE: 1e-2)
    router_z_coef: float = 1e-3  # c_z (ST-MoE sec. 3.1: 1e-3)
    output_z_coef: float = 1e-4  # z-loss on the output softmax normalizer (Mesh TF T5); 0 = off
    # 'constant' c_B, or 'linear_decay': c_B * balance_warmup_multiplier at step 0, linearly down to c_B
    # over balance_decay_steps (a stronger push towards balance while the router is still random).
    balance_schedule: str = "constant"
    balance_warmup_multiplier: float = 1.0
    balance_decay_steps: int = 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], prefix: str = "loss.") -> "LossConfig":
        return cls._from_mapping(values, prefix, {})

    def validate(self, prefix: str = "loss.") -> "LossConfig":
        p = prefix
        for name in ("balance_coef", "router_z_coef", "output_z_coef", "balance_warmup_multiplier"):
            _check(getattr(self, name) >= 0, f"{p}{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.balance_schedule in BALANCE_SCHEDULES, f"{p}balance_schedule",
               f"must be one of {BALANCE_SCHEDULES}, got {self.balance_schedule!r}")
        _check(isinstance(self.balance_decay_steps, int) and self.balance_decay_steps >= 1,
               f"{p}balance_decay_steps", f"must be an integer >= 1, got {self.balance_decay_steps!r}")
        return self
