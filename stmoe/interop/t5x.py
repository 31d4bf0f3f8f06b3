"""t5x / flaxformer checkpoints -> stmoe: parameters, and a ModelConfig with flaxformer's routing.

`read_target(path)` reads the parameters ('target' subtree) of a t5x checkpoint; `convert(flat,
options)` maps flaxformer's names onto stmoe's and builds the config. Sources followed (files of
github.com/google-research/t5x at cc342d4 and github.com/google/flaxformer at 399ea3a):

Checkpoint layout
- Legacy t5x format (t5x/checkpoints.py): a msgpack file `checkpoint` in `checkpoint_<step>/`
  holding `{'version': 3, 'optimizer': state_dict}` (:816-821); state_dict is the train state's
  `{'target': params, 'state': {'step', 'param_states'}}` (t5x/optimizers.py:97-100,
  t5x/train_state.py:279-286). A partitioned array is written to tensorstore and replaced in the
  msgpack by its spec: zarr driver, kvstore path = the '/'-joined parameter name with '.' for '/'
  (`target.encoder.layers_0.attention.query.kernel`), relative to the step directory (:350-376),
  made absolute on restore (:236-269; tensorstore < 0.1.14 put `path` at the top level); an
  unpartitioned array is stored in the msgpack itself (:877-880). Only 'target' is read here
  (the Adafactor `param_states` are not needed).
- Orbax t5x format (t5x/checkpoints.py:2211-2373, t5x/checkpoint_utils.py:141-146): the same
  state dict saved by orbax's PyTreeCheckpointHandler under `checkpoint_<step>/state/` (with a
  `_METADATA` file); read with orbax, 'target' only.
- Scanned stacks (flaxformer/architectures/t5/t5_architecture.py:792-822 and
  flaxformer/architectures/moe/moe_architecture.py:215-264, 403-429): `encoder/encoder/subblock_<j>/...`,
  every parameter with the scanned-block axis at position 1 (scan_axis = 1, :735); block b's
  subblock j is layer b * len(subblock) + j. Moved to position 0 and split here.

Parameter names (unscanned; flaxformer/architectures/t5/t5_architecture.py:241-242, 416-420,
789, 1006, 1062-1071; moe_architecture.py:61, 132, 394, 483) -> stmoe (models.py, layers.py, moe.py)
- token_embedder/embedding [vocab, d] (embedding.py:215-216)        -> token_embedder/embedding
- {stack}/relpos_bias/rel_embedding [heads, buckets], shared by the stack's layers
  (relative_position_biases.py:194-198; moe.gin:103, 134)       -> {stack}/relative_position_bias/rel_embedding
- {stack}/layers_<i>/{attention | self_attention | encoder_decoder_attention}/{query,key,value}/kernel:
  [d, heads * d_kv] (DenseGeneral reshape_kernel, dense.py:114-148), or [d, heads, d_kv] with
  split_head_kernel (dense_attention.py:788)                    -> .../{query,key,value} [d, heads, d_kv]
  .../out/kernel [heads * d_kv, d] or [heads, d_kv, d] (dense_attention.py:1073-1083) -> .../out [heads, d_kv, d]
- pre_attention_layer_norm, pre_self_attention_layer_norm, pre_cross_attention_layer_norm,
  pre_mlp_layer_norm, pre_extra_mlp_layer_norm /scale            -> pre_attention_norm, pre_self_attention_norm,
                                                                   pre_cross_attention_norm, ffn/pre_mlp_norm,
                                                                   ffn/pre_extra_mlp_norm
- mlp/{wi_0, wi_1 | wi, wo}/kernel (dense.py:336-347); mlp/wi_fused/kernel [d, 2, d_ff] (:358-370)
                                                                -> ffn/mlp/{wi_0, wi_1 | wi, wo}
- mlp/expert/{wi_0, wi_1 | wi, wo}/kernel [experts, ...] (the expert MlpBlock vmapped with
  variable_axes {'params': 0}, moe_layers.py:564-582)           -> ffn/moe/expert_{wi_0, wi_1 | wi, wo}
- mlp/router/router_weights/w/kernel [d, experts] (routing.py:176-222; no bias, moe.gin:261)
                                                                -> ffn/moe/router/kernel
- extra_mlp/... (ST-MoE's sparse-dense block, moe_architecture.py:87-100) -> ffn/extra_mlp/..., sparse_dense=True
- {encoder/encoder_norm, decoder/decoder_norm}/scale            -> {stack}/final_norm/scale
- decoder/logits_dense/kernel [d, vocab]; absent = tied to the embedding, logits / sqrt(d)
  (t5_architecture.py:1152-1160)                                -> decoder/logits_dense; tie_embeddings
Nothing is transposed in the unscanned layout: flaxformer kernels are [in, out] as ours.

Architecture semantics (all as stmoe's T5.1.1 backbone)
- Sparse block i when i % (num_layers // num_sparse) == that - 1 (MIXED layout,
  moe_architecture.py:539-556) -> sparse_interval; other layouts come out as sparse_layers.
- 'gelu' is flax.linen.gelu, the tanh approximation (dense.py:171-180 `getattr(nn, name)`), the
  same as stmoe's "gelu"; gated ('gelu', 'linear') when wi_0/wi_1 are present (moe.gin:215, 275).
- T5LayerNorm: RMS, epsilon 1e-6 (layer_norm.py:46, 76); no 1/sqrt(d_kv) in attention
  (rescale_logits False, dense_attention.py:497, 144-145); relative position buckets: the same
  function as stmoe's (relative_position_biases.py:91-141; tests check every distance).

Routing semantics (TokensChooseMaskedRouter, flaxformer/architectures/moe/routing.py and
moe_layers.py) and the MoeConfig value that reproduces each:
- top-k combine weights are the RAW router probabilities of the chosen experts, not renormalized
  (routing.py:635-639 `router_probs * dispatch_mask`)           -> normalize_gates=False
- every token takes all its k choices, no random second expert (routing.py:561, 591-617)
                                                                -> second_expert_policy="all"
- first choices before second choices; inside a rank token order, or by top-1 probability with
  batch_prioritized_routing (routing.py:583-623), set for the encoder's routers only: the decoder's
  stay in token order (moe.gin:255-258), as stmoe's batch_prioritized_for(causal)
                                                                -> batch_prioritized
  and the decoder serves ranks the same way (every first choice before any second choice), which
  is not causal under teacher forcing (docs/design.md)          -> decoder_priority="rank_major"
- padding is routed and takes capacity: ignore_padding_tokens = False (moe.gin:254)
                                                                -> route_padding=True
- a dropped token gets zero from the layer (combine_array is zero there, routing.py:629-639)
                                                                -> dropped_token_passthrough=False
- tokens are grouped over the whole batch: the group count is the smallest n >=
  max(tokens // max_group_size, experts x expert replicas) that divides the tokens and is a
  multiple of experts x replicas (moe_layers.py:161-168, 715-797; replicas = devices /
  (expert partitions x model partitions), :798-819); the batch is first zero-padded along rows or
  positions to a multiple of that (moe_layers.py:154-157, 822-901)
                                                                -> max_group_size (GROUP_SIZE, moe.gin:62),
                                                                   num_groups_multiple = experts x replicas
- capacity = max(min_expert_capacity, int(round(cf * tokens_per_group / experts)))
  (moe_layers.py:170-178; min 4, :100)                          -> capacity_rounding="round", min_capacity,
                                                                   train/eval_capacity_factor
- balance loss counts all k choices: experts^2 * mean(f * P) (routing.py:720-754), padding included;
  it and the z-loss are scaled by AUX_LOSS_FACTOR / ROUTER_Z_LOSS_FACTOR and averaged over the MoE
  layers (t5x/contrib/moe/models.py:359-377), as in stmoe/losses.py
                                                                -> aux_loss_type="switch_all_k",
                                                                   loss.balance_coef, loss.router_z_coef
- router in float32 from float32 inputs, z-loss over all tokens (routing.py:290-324, 757-774);
  no jitter in t5x training (moe.gin:67)                        -> jitter_noise=0
Only tokens-choose routers: a checkpoint of flaxformer's ExpertsChooseMaskedRouter (experts_choose_*.gin)
has the same parameters and would convert silently to tokens-choose routing; do not convert those.
- every sublayer input is multiplied by the padding mask (t5_architecture.py:319-320, 342-343;
  moe_architecture.py:93-94), so routed padding reaches the router as zero vectors (uniform
  probabilities: experts 0..k-1) and takes their slots           -> moe.zero_padding_inputs=True
Checked against flaxformer itself (tests/test_flaxformer_parity.py, on checkpoints that t5x's
Checkpointer wrote from flaxformer's st_moe_base / switch_base gins): the logits of real target
positions agree within 1e-5 with ample and with tight capacity (without zero_padding_inputs the
tight case differs by up to 0.05: padding takes other experts' slots).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from stmoe.config import ConfigError, LossConfig, ModelConfig, MoeConfig

_STACKS = ("encoder", "decoder")
# flaxformer sublayer module -> ours (t5_architecture.py:241-242, 416-420; moe_architecture.py:61, 132).
_NORMS = {"pre_attention_layer_norm": "pre_attention_norm",
          "pre_self_attention_layer_norm": "pre_self_attention_norm",
          "pre_cross_attention_layer_norm": "pre_cross_attention_norm",
          "pre_mlp_layer_norm": "ffn/pre_mlp_norm", "pre_extra_mlp_layer_norm": "ffn/pre_extra_mlp_norm"}
_ATTENTIONS = {"encoder": ("attention",), "decoder": ("self_attention", "encoder_decoder_attention")}
KINDS = ("embeddings", "attention", "dense mlp", "experts", "routers", "norms", "position bias", "logits")


class ConversionError(ValueError):
    """A directory, parameter name or shape that cannot be converted (one-line message)."""


# ----------------------------------------------------------------------------------- reading


def find_checkpoint(path: str) -> tuple[str, str]:
    """(format, directory) of the t5x checkpoint at `path`: "msgpack" with the step directory that
    holds the `checkpoint` file, or "orbax" with the `state` directory. `path` may be the model dir
    (newest `checkpoint_<step>`), a step dir, its `state` dir or the `checkpoint` file, on a local
    disk (copy a gs:// checkpoint first: `gcloud storage cp -r gs://.../checkpoint_N .`)."""
    path = os.path.abspath(path)
    if os.path.isfile(path) and os.path.basename(path) == "checkpoint":
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConversionError(f"{path} does not exist")
    for state in (path, os.path.join(path, "state")):
        if os.path.isfile(os.path.join(state, "_METADATA")):
            return "orbax", state
    if os.path.isfile(os.path.join(path, "checkpoint")):
        return "msgpack", path
    steps = [int(m.group(1)) for name in os.listdir(path)
             if (m := re.fullmatch(r"checkpoint_(\d+)", name)) and os.path.isdir(os.path.join(path, name))]
    if steps:
        return find_checkpoint(os.path.join(path, f"checkpoint_{max(steps)}"))
    raise ConversionError(f"{path} is not a t5x checkpoint: no msgpack 'checkpoint' file, no orbax "
                          "'state/_METADATA', no checkpoint_<step> directories")


def _is_ts_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and "driver" in value and ("kvstore" in value or "path" in value)


def _read_ts(spec: Mapping[str, Any], step_dir: str) -> np.ndarray:
    """A tensorstore spec written by t5x (relative path) -> the array (t5x/checkpoints.py:236-269)."""
    import tensorstore as ts

    spec = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}
    if isinstance(spec.get("kvstore"), Mapping) and "path" in spec["kvstore"]:
        kvstore = spec["kvstore"]
    else:  # tensorstore < 0.1.14 kept `path` at the top level
        kvstore = {"driver": spec.get("kvstore", "file") if isinstance(spec.get("kvstore"), str) else "file",
                   "path": spec.pop("path")}
    # Written to GCS the spec says {"driver": "gcs", "bucket": "t5x-dummy-bucket"} (:350-365); the
    # relative path is all that matters for a local copy.
    kvstore = {"driver": "file", "path": os.path.join(step_dir, kvstore["path"])}
    spec["kvstore"] = kvstore
    try:
        return np.asarray(ts.open(spec, open=True, read=True).result().read().result())
    except Exception as e:  # noqa: BLE001 - a missing or damaged array file
        raise ConversionError(f"cannot read tensorstore array {kvstore['path']}: "
                              f"{str(e).splitlines()[0][:200]}") from e


def _flatten(tree: Mapping[str, Any], prefix: str, leaf: Callable[[Any], np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not _is_ts_spec(value):
            out.update(_flatten(value, name + "/", leaf))
        else:
            out[name] = leaf(value)
    return out


def read_target(path: str) -> tuple[dict[str, np.ndarray], str]:
    """({'encoder/layers_0/attention/query/kernel': array, ...} of the checkpoint's 'target', its
    directory). Raises ConversionError for anything that is not a t5x checkpoint."""
    kind, directory = find_checkpoint(path)
    if kind == "orbax":
        import orbax.checkpoint as ocp
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                tree = checkpointer.restore(directory)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{directory}: orbax cannot read it: {str(e).splitlines()[0][:200]}") from e
    else:
        from flax import serialization
        with open(os.path.join(directory, "checkpoint"), "rb") as f:
            data = f.read()
        try:
            tree = serialization.msgpack_restore(data)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{directory}/checkpoint is not a msgpack file: {type(e).__name__}") from e
        if isinstance(tree, Mapping) and "optimizer" in tree:  # version >= 1 (t5x/checkpoints.py:816-818)
            tree = tree["optimizer"]
    if not isinstance(tree, Mapping) or not isinstance(tree.get("target"), Mapping):
        raise ConversionError(f"{directory}: the checkpoint has no 'target' (parameters) subtree")
    leaf = lambda v: _read_ts(v, directory) if _is_ts_spec(v) else np.asarray(v)
    return _flatten(tree["target"], "", leaf), directory


# --------------------------------------------------------------------------------- unscanning


def unscan(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scanned stacks ({stack}/{stack}/subblock_<j>/..., block axis 1) -> {stack}/layers_<i>/..."""
    out = {}
    for name, value in flat.items():
        match = re.fullmatch(r"(encoder|decoder)/(encoder|decoder)/(?:subblock_(\d+)/)?(.+)", name)
        if not match or match.group(1) != match.group(2):
            out[name] = value
            continue
        stack, sub, rest = match.group(1), match.group(3), match.group(4)
        if value.ndim < 2:
            raise ConversionError(f"{name}: a scanned parameter needs a block axis at position 1, shape {value.shape}")
        per_block = 1 + max((int(m.group(1)) for n in flat
                             if (m := re.fullmatch(rf"{stack}/{stack}/subblock_(\d+)/.+", n))), default=0)
        blocks = np.moveaxis(value, 1, 0)  # flaxformer scans along axis 1 (scan_axis, t5_architecture.py:735)
        for b, block in enumerate(blocks):
            out[f"{stack}/layers_{b * per_block + int(sub or 0)}/{rest}"] = block
    return out


# ----------------------------------------------------------------------------------- mapping


@dataclasses.dataclass(frozen=True)
class Options:
    """What a t5x checkpoint does not store: gin values of the run (defaults: ST-MoE-Base, flaxformer
    t5x/configs/moe/models/st_moe_base.gin and tokens_choose_base.gin, architectures/moe.gin)."""

    num_heads: int | None = None  # NUM_HEADS; needed when attention kernels are [d, heads * d_kv]
    # NUM_SELECTED_EXPERTS (tokens_choose_base.gin:35: 2; switch_base.gin:33: 1). None: 2, unless the
    # checkpoint looks like a Switch Transformer (then ConversionError: the caller must say which).
    num_selected_experts: int | None = None
    train_capacity_factor: float = 1.25  # TRAIN_EXPERT_CAPACITY_FACTOR (tokens_choose_base.gin:32)
    eval_capacity_factor: float = 2.0  # EVAL_EXPERT_CAPACITY_FACTOR (:33)
    min_expert_capacity: int = 4  # MoeLayer.min_expert_capacity (moe_layers.py:100)
    group_size: int = 4096  # GROUP_SIZE = MoeLayer.max_group_size (moe.gin:62, 231)
    num_expert_replicas: int = 1  # devices / (expert partitions x model partitions) (moe_layers.py:798-819)
    batch_prioritized_routing: bool = False  # sparse_encoder router (st_moe_base.gin:20)
    aux_loss_factor: float = 0.01  # AUX_LOSS_FACTOR (tokens_choose_base.gin:39)
    router_z_loss_factor: float = 1e-4  # ROUTER_Z_LOSS_FACTOR (st_moe_base.gin:17; 32B: 1e-3)
    mlp_activation: str | None = None  # None: "gelu" if gated (wi_0/wi_1), "relu" if not (switch_base.gin:39)
    relative_attention_max_distance: int = 128  # RelativePositionBiases.max_distance (moe.gin:204)
    layer_norm_epsilon: float = 1e-6  # T5LayerNorm.epsilon (layer_norm.py:46)
    dropout_rate: float = 0.0
    expert_dropout_rate: float = 0.0


def _split_heads(value: np.ndarray, num_heads: int | None, name: str, out: bool) -> np.ndarray:
    if value.ndim == 3:
        return value
    if value.ndim != 2:
        raise ConversionError(f"{name}: attention kernel of shape {value.shape}, expected 2-D or 3-D")
    if num_heads is None:
        raise ConversionError(f"{name}: kernel {value.shape} fuses heads x d_kv; pass --num_heads (gin NUM_HEADS)")
    fused = value.shape[0] if out else value.shape[1]
    if fused % num_heads:
        raise ConversionError(f"{name}: {fused} = heads x d_kv is not divisible by --num_heads={num_heads}")
    if out:  # [heads * d_kv, d] -> [heads, d_kv, d]
        return value.reshape(num_heads, fused // num_heads, value.shape[1])
    return value.reshape(value.shape[0], num_heads, fused // num_heads)


def _map_name(name: str) -> tuple[str, str, str] | None:
    """flaxformer name -> (our '/'-path, kind, layout) or None if unknown. Layouts: copy, heads_in,
    heads_out, fused (wi_fused, split later)."""
    if name == "token_embedder/embedding":
        return "token_embedder/embedding", "embeddings", "copy"
    if name == "decoder/logits_dense/kernel":
        return "decoder/logits_dense", "logits", "copy"
    m = re.fullmatch(r"(encoder|decoder)/(relpos_bias/rel_embedding|encoder_norm/scale|decoder_norm/scale)", name)
    if m:
        stack, what = m.groups()
        if what.startswith("relpos"):
            return f"{stack}/relative_position_bias/rel_embedding", "position bias", "copy"
        if what.split("_")[0] == stack:
            return f"{stack}/final_norm/scale", "norms", "copy"
        return None
    m = re.fullmatch(r"(encoder|decoder)/layers_(\d+)/(.+)", name)
    if not m:
        return None
    stack, layer, rest = m.group(1), m.group(2), m.group(3)
    prefix = f"{stack}/layers_{layer}/"
    parts = rest.split("/")
    if len(parts) == 2 and parts[1] == "scale" and parts[0] in _NORMS:
        if stack == "encoder" and parts[0] in ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm"):
            return None
        if stack == "decoder" and parts[0] == "pre_attention_layer_norm":
            return None
        return prefix + _NORMS[parts[0]] + "/scale", "norms", "copy"
    if len(parts) == 3 and parts[0] in _ATTENTIONS[stack] and parts[2] == "kernel":
        if parts[1] in ("query", "key", "value"):
            return prefix + f"{parts[0]}/{parts[1]}", "attention", "heads_in"
        if parts[1] == "out":
            return prefix + f"{parts[0]}/out", "attention", "heads_out"
        return None
    if len(parts) == 3 and parts[0] in ("mlp", "extra_mlp") and parts[2] == "kernel" \
            and parts[1] in ("wi_0", "wi_1", "wi", "wo", "wi_fused"):
        target = "ffn/mlp" if parts[0] == "mlp" else "ffn/extra_mlp"
        return prefix + f"{target}/{parts[1]}", "dense mlp", "fused" if parts[1] == "wi_fused" else "copy"
    if len(parts) == 4 and parts[:2] == ["mlp", "expert"] and parts[3] == "kernel" \
            and parts[2] in ("wi_0", "wi_1", "wi", "wo", "wi_fused"):
        return prefix + f"ffn/moe/expert_{parts[2]}", "experts", "fused" if parts[2] == "wi_fused" else "copy"
    if rest == "mlp/router/router_weights/w/kernel":
        return prefix + "ffn/moe/router/kernel", "routers", "copy"
    return None


def _placement(sparse: dict[str, tuple[int, ...]], n_enc: int, n_dec: int) -> dict[str, Any]:
    """ModelConfig fields that make exactly the given blocks sparse in both stacks."""
    def matches(fields):
        cfg = ModelConfig(num_encoder_layers=n_enc, num_decoder_layers=n_dec, **fields)
        return all(tuple(i for i in range(n) if cfg.is_sparse(i)) == sparse[s]
                   for s, n in (("encoder", n_enc), ("decoder", n_dec)))

    for interval in range(1, max(n_enc, n_dec) + 1):  # flaxformer's MIXED layout: offset interval - 1
        for offset in [interval - 1] + list(range(interval - 1)):
            fields = {"sparse_interval": interval, "sparse_offset": None if offset == interval - 1 else offset}
            if matches(fields):
                return fields
    fields = {"sparse_layers": tuple(sorted(set(sparse["encoder"]) | set(sparse["decoder"])))}
    if matches(fields):
        return fields
    raise ConversionError(f"sparse encoder blocks {sparse['encoder']} and decoder blocks {sparse['decoder']} "
                          "disagree on blocks both stacks have; stmoe places sparse FFNs in both stacks alike")


def convert(flat: Mapping[str, np.ndarray], options: Options = Options()
            ) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, int]]:
    """flaxformer '/'-named params -> (ModelConfig, {our '/'-path: float32 array}, counts per kind).

    Raises ConversionError naming the first unknown parameter, a shape that disagrees with the rest
    of the model, or a feature stmoe does not have.
    """
    flat = unscan(flat)
    mapped: dict[str, np.ndarray] = {}
    counts = {kind: 0 for kind in KINDS}
    for name in sorted(flat):
        if re.fullmatch(r"(encoder|decoder)/layers_\d+/relpos_bias/rel_embedding", name):
            raise ConversionError(f"{name}: per-layer relative position biases; stmoe shares one per stack")
        if name.endswith("/bias"):
            raise ConversionError(f"{name}: a bias; stmoe's layers have none (use_bias=False in the t5x gins)")
        target = _map_name(name)
        if target is None:
            raise ConversionError(f"unknown parameter name {name!r} (not in flaxformer's dense/MoE T5 layout)")
        path, kind, layout = target
        value = np.asarray(flat[name], np.float32)
        if layout == "fused":  # [(experts,) d, n_activations, d_ff] -> wi_0, wi_1 (or wi)
            pieces = np.moveaxis(value, -2, 0)
            names = ["wi"] if len(pieces) == 1 else [f"wi_{k}" for k in range(len(pieces))]
            for piece, new in zip(pieces, names):
                mapped[path.replace("wi_fused", new)] = piece
        elif layout in ("heads_in", "heads_out"):
            mapped[path] = _split_heads(value, options.num_heads, name, out=layout == "heads_out")
        else:
            mapped[path] = value
        counts[kind] += 1
    cfg = _infer_config(mapped, options)
    _check_shapes(cfg, mapped)
    return cfg, mapped, counts


def _need(mapped: Mapping[str, np.ndarray], path: str) -> np.ndarray:
    if path not in mapped:
        raise ConversionError(f"the checkpoint lacks {path} (flaxformer: see stmoe/interop/t5x.py)")
    return mapped[path]


def _infer_config(mapped: Mapping[str, np.ndarray], o: Options) -> ModelConfig:
    vocab, d_model = _need(mapped, "token_embedder/embedding").shape
    layers = {s: sorted({int(m.group(1)) for p in mapped if (m := re.match(rf"{s}/layers_(\d+)/", p))})
              for s in _STACKS}
    for stack, found in layers.items():
        if found != list(range(len(found))):
            raise ConversionError(f"{stack} layers {found} are not numbered 0..n-1")
    query = _need(mapped, "encoder/layers_0/attention/query")
    num_heads, d_kv = query.shape[1:]
    sparse = {s: tuple(i for i in layers[s] if f"{s}/layers_{i}/ffn/moe/router/kernel" in mapped) for s in _STACKS}
    any_sparse = [(s, i) for s in _STACKS for i in sparse[s]]
    gated = any(p.endswith("/wi_1") for p in mapped)
    some_ffn = next((v for p, v in mapped.items() if re.search(r"/ffn/(mlp/wi(_0)?|moe/expert_wi(_0)?)$", p)), None)
    if some_ffn is None:
        raise ConversionError("the checkpoint has no MLP kernels (mlp/wi_0, mlp/wi or mlp/expert/wi_0)")
    d_ff = some_ffn.shape[-1]
    num_experts = mapped[f"{any_sparse[0][0]}/layers_{any_sparse[0][1]}/ffn/moe/router/kernel"].shape[1] \
        if any_sparse else 1
    extra = {(s, i) for s in _STACKS for i in layers[s] if f"{s}/layers_{i}/ffn/pre_extra_mlp_norm/scale" in mapped}
    if extra and extra != set(any_sparse):
        raise ConversionError(f"extra_mlp in blocks {sorted(extra)} but sparse blocks are {sorted(any_sparse)}; "
                              "stmoe's sparse_dense adds one after every sparse FFN and nowhere else")
    activation = o.mlp_activation or ("gelu" if gated else "relu")
    top_k = o.num_selected_experts
    if top_k is None and any_sparse:
        # A checkpoint does not store the router's k, and Switch (top-1) and ST-MoE (top-2) checkpoints
        # differ in what it does store: Switch ties the logits to the embedding, has no extra MLP after
        # its sparse FFNs and ungated ReLU experts (switch_base.gin:33-39); guessing 2 there builds a
        # model whose logits are far from the trained one's.
        if "decoder/logits_dense" not in mapped and not extra and not gated:
            raise ConversionError(
                "this checkpoint looks like a Switch Transformer (tied logits, no extra MLP, ungated experts), "
                "which routes each token to 1 expert, but a checkpoint does not store it: pass "
                "--num_selected_experts 1 for Switch (Options.num_selected_experts), or its "
                "NUM_SELECTED_EXPERTS gin value")
        top_k = 2
    rel = _need(mapped, "encoder/relative_position_bias/rel_embedding")
    placement = _placement(sparse, len(layers["encoder"]), len(layers["decoder"])) if any_sparse \
        else {"sparse_layers": ()}
    moe = MoeConfig(
        num_experts=int(num_experts), router_type="tokens_choose",
        top_k=top_k if any_sparse else 1,
        second_expert_policy="all", normalize_gates=False,
        train_capacity_factor=o.train_capacity_factor, eval_capacity_factor=o.eval_capacity_factor,
        min_capacity=o.min_expert_capacity, capacity_rounding="round", group_size=None,
        max_group_size=o.group_size, num_groups_multiple=int(num_experts) * o.num_expert_replicas,
        batch_prioritized=o.batch_prioritized_routing, decoder_priority="rank_major",
        route_padding=True, zero_padding_inputs=True,
        dropped_token_passthrough=False,
        aux_loss_type="switch_all_k", jitter_noise=0.0, expert_dropout_rate=o.expert_dropout_rate)
    try:
        return ModelConfig(
            vocab_size=int(vocab), d_model=int(d_model), d_ff=int(d_ff), num_heads=int(num_heads), d_kv=int(d_kv),
            num_encoder_layers=len(layers["encoder"]), num_decoder_layers=len(layers["decoder"]),
            mlp_activation=activation, mlp_gated=gated, dropout_rate=o.dropout_rate,
            relative_attention_num_buckets=int(rel.shape[1]),
            relative_attention_max_distance=o.relative_attention_max_distance,
            tie_embeddings="decoder/logits_dense" not in mapped, layer_norm_epsilon=o.layer_norm_epsilon,
            dtype="float32", sparse_dense=bool(extra), moe=moe, **placement).validate()
    except ConfigError as e:
        raise ConversionError(f"the converted config is invalid: {e}") from e


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{'/'-path: shape} of every parameter of EncoderDecoder(cfg), from jax.eval_shape (no memory)."""
    import flax
    import jax
    import jax.numpy as jnp

    from stmoe.models import EncoderDecoder

    tokens = jnp.ones((1, 2), jnp.int32)
    variables = jax.eval_shape(lambda: EncoderDecoder(cfg).init(jax.random.key(0), tokens, tokens, tokens,
                                                                enable_dropout=False))
    params = flax.linen.meta.unbox(variables["params"])
    return {"/".join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(params).items()}


def _check_shapes(cfg: ModelConfig, mapped: Mapping[str, np.ndarray]) -> None:
    expected = expected_shapes(cfg)
    for path, shape in sorted(expected.items()):
        if path not in mapped:
            raise ConversionError(f"the checkpoint lacks the parameter for {path} (config wants {shape})")
        if tuple(mapped[path].shape) != shape:
            raise ConversionError(f"{path}: checkpoint shape {tuple(mapped[path].shape)} disagrees with the "
                                  f"config's {shape} (d_model={cfg.d_model}, d_ff={cfg.d_ff}, heads={cfg.num_heads}, "
                                  f"d_kv={cfg.d_kv}, experts={cfg.moe.num_experts})")
    extra = sorted(set(mapped) - set(expected))
    if extra:
        raise ConversionError(f"{extra[0]}: no such parameter in the converted model (a dense/sparse layout the "
                              "config does not reproduce)")


def to_params(mapped: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{'/'-path: array} -> the nested params tree EncoderDecoder.apply takes."""
    import flax
    return flax.traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in mapped.items()})


def loss_config(options: Options) -> LossConfig:
    """The gin's loss factors as a LossConfig (AUX_LOSS_FACTOR, ROUTER_Z_LOSS_FACTOR)."""
    return LossConfig(balance_coef=options.aux_loss_factor, router_z_coef=options.router_z_loss_factor)


def semantics(cfg: ModelConfig, loss: LossConfig) -> list[str]:
    """The routing fields the converter set, as `field=value (why)` lines for the script's report."""
    m = cfg.moe
    return [
        f"moe.top_k={m.top_k} (num_selected_experts)",
        f"moe.normalize_gates={m.normalize_gates} (combine = raw router probabilities, routing.py:635)",
        f"moe.second_expert_policy={m.second_expert_policy!r} (every token takes its k choices)",
        f"moe.route_padding={m.route_padding} (ignore_padding_tokens=False, moe.gin:254)",
        f"moe.zero_padding_inputs={m.zero_padding_inputs} (padding's sublayer inputs are zeros, "
        "t5_architecture.py:319-320)",
        f"moe.max_group_size={m.max_group_size}, moe.num_groups_multiple={m.num_groups_multiple} "
        "(batch-wide groups, moe_layers.py:715)",
        f"moe.capacity_rounding={m.capacity_rounding!r}, moe.min_capacity={m.min_capacity}, "
        f"train/eval capacity factor {m.train_capacity_factor}/{m.eval_capacity_factor} (moe_layers.py:175)",
        f"moe.batch_prioritized={m.batch_prioritized}",
        f"moe.decoder_priority={m.decoder_priority!r} (first choices before second choices in the decoder "
        "too, routing.py:583-623)",
        f"moe.aux_loss_type={m.aux_loss_type!r}, loss.balance_coef={loss.balance_coef}, "
        f"loss.router_z_coef={loss.router_z_coef}",
        f"mlp_activation={cfg.mlp_activation!r} gated={cfg.mlp_gated} (flax gelu = tanh approximation)",
        f"tie_embeddings={cfg.tie_embeddings} (tied logits / sqrt(d_model), t5_architecture.py:1160)",
    ]
