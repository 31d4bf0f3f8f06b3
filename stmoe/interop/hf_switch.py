"""Hugging Face Switch Transformers <-> stmoe: configs and weights, both ways.

`load_pretrained(hf_dir)` reads a `SwitchTransformersForConditionalGeneration`
directory (config.json + model.safetensors, sharded or not; or pytorch_model.bin,
which needs torch) into an `EncoderDecoder`; `export(model, params, out_dir)` writes
config.json + model.safetensors that `from_pretrained` loads. The import needs no
torch: weights are read with `safetensors.numpy`.

What HF's model does (transformers 5.x, modeling_switch_transformers.py) and the
ModelConfig field that says the same thing -- no code path here is special-cased:

- Top-1 router in float32, no bias; the expert output is multiplied by the raw
  top-1 probability                                  -> moe.top_k=1, router_type="tokens_choose"
- Capacity: an integer `expert_capacity`, counted per sequence (the router's
  cumsum runs over the sequence axis of [batch, length, experts]), slots handed
  out in position order                              -> moe.expert_capacity, moe.group_size=None,
                                                        moe.batch_prioritized=False,
                                                        moe.decoder_priority="rank_major" (with one
                                                        choice per token both orders are position order)
- Padding is routed and takes capacity (`router_ignore_padding_tokens` is stored
  but never read)                                    -> moe.route_padding=True
- A dropped token gets zero from the sparse MLP (the experts scatter-add into
  zeros), so only the residual carries it. transformers 4.x instead kept the
  token's input times its router prob             -> moe.dropped_token_passthrough=False
- Sparse FFN in block i when `i % step == 1` (or step == 1), step =
  num_layers // num_sparse_layers, per stack; note num_sparse=0 still gives one
  sparse layer (i=1) and only step 0 gives none      -> sparse_interval/sparse_offset or sparse_layers
- Plain (un-gated) FFN `act(x wi) wo`, no biases   -> mlp_gated=False, mlp_activation
- RMS layer norm with `layer_norm_epsilon`; relative position bias only in block
  0's self-attention, reused by every block of the stack; none in cross-attention;
  no 1/sqrt(d_kv)                                    -> the T5.1.1 backbone in layers.py as is
- tie_word_embeddings: lm_head is the input embedding and the decoder output is
  scaled by d_model**-0.5 first                      -> tie_embeddings
- Losses: top-1 Switch balance loss (pre-capacity argmax) and router z-loss,
  per stack, padding included                        -> aux_loss_type="switch_top1",
                                                        router_aux_loss_coef / router_z_loss_coef ->
                                                        loss.balance_coef / loss.router_z_coef
Not mirrored: HF's router jitter multiplies its input in place, which in float32
also jitters what the experts see (training only); ours jitters the router input.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from stmoe.config import ConfigError, LossConfig, ModelConfig, MoeConfig
from stmoe.dispatch import resolve_model
from stmoe.models import EncoderDecoder

# HF's SwitchTransformersConfig defaults (configuration_switch_transformers.py) for keys a
# config.json may leave out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048, "expert_capacity": 64,
    "num_layers": 12, "num_sparse_encoder_layers": 3, "num_decoder_layers": None,
    "num_sparse_decoder_layers": 3, "num_heads": 12, "num_experts": 8, "router_bias": False,
    "router_jitter_noise": 0.01, "router_dtype": "float32", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
    "router_z_loss_coef": 0.001, "router_aux_loss_coef": 0.001, "dense_act_fn": "relu",
    "tie_word_embeddings": True, "pad_token_id": 0,
}
# HF activation name -> ours. Flax's gelu is the tanh approximation, HF's "gelu" is exact.
_ACT_FROM_HF = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu_new", "silu": "silu"}


# ----------------------------------------------------------------------------- configs

def hf_sparse_layers(num_layers: int, num_sparse: int) -> tuple[int, ...]:
    """The blocks HF makes sparse: step = num_layers // num_sparse (num_layers if 0), i % step == 1 or step == 1."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    if step <= 0:
        return ()
    return tuple(i for i in range(num_layers) if step == 1 or i % step == 1)


def _placement(enc: tuple[int, ...], dec: tuple[int, ...], n_enc: int, n_dec: int) -> dict[str, Any]:
    """ModelConfig fields that make exactly `enc` / `dec` sparse in stacks of n_enc / n_dec blocks."""
    def matches(fields: dict[str, Any]) -> bool:
        cfg = ModelConfig(num_encoder_layers=n_enc, num_decoder_layers=n_dec, **fields)
        return (tuple(i for i in range(n_enc) if cfg.is_sparse(i)) == enc
                and tuple(i for i in range(n_dec) if cfg.is_sparse(i)) == dec)

    # Prefer the periodic form (it reads like the HF step); fall back to an explicit list.
    for interval in range(1, max(n_enc, n_dec) + 1):
        fields = {"sparse_interval": interval, "sparse_offset": 1 % interval}
        if enc and matches(fields):
            return fields
    fields = {"sparse_layers": tuple(sorted(set(enc) | set(dec)))}
    if matches(fields):
        return fields
    raise ConfigError(f"model.sparse_layers: HF's encoder sparse blocks {enc} and decoder sparse blocks {dec} "
                      "disagree on blocks both stacks have; one ModelConfig places sparse FFNs in both stacks alike")


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """A `SwitchTransformersConfig` dict (config.json) -> the ModelConfig with HF's semantics (module docstring)."""
    hf = {**_HF_DEFAULTS, **hf_config}
    if hf["num_decoder_layers"] is None:  # HF: same depth as the encoder
        hf["num_decoder_layers"] = hf["num_layers"]
    act = hf["dense_act_fn"]
    if act not in _ACT_FROM_HF:
        raise ConfigError(f"dense_act_fn: {act!r} has no equivalent here; supported: {sorted(_ACT_FROM_HF)} "
                          "(HF 'gelu' is the exact erf form, ours the tanh approximation 'gelu_new')")
    if hf["router_bias"]:
        raise ConfigError("router_bias: the router here has no bias")
    if hf["pad_token_id"] not in (0, None):
        raise ConfigError(f"pad_token_id: must be 0 (token id 0 is padding here), got {hf['pad_token_id']}")
    router_dtype = hf["router_dtype"] if hf["router_dtype"] in ("float32", "bfloat16") else "float32"
    if hf["router_dtype"] != router_dtype:
        warnings.warn(f"router_dtype={hf['router_dtype']!r}: no equivalent here; the router runs in float32")
    n_enc, n_dec = int(hf["num_layers"]), int(hf["num_decoder_layers"])
    placement = _placement(hf_sparse_layers(n_enc, int(hf["num_sparse_encoder_layers"])),
                           hf_sparse_layers(n_dec, int(hf["num_sparse_decoder_layers"])), n_enc, n_dec)
    moe = MoeConfig(
        num_experts=int(hf["num_experts"]), router_type="tokens_choose", top_k=1,
        expert_capacity=int(hf["expert_capacity"]), group_size=None, batch_prioritized=False,
        decoder_priority="rank_major",
        route_padding=True, dropped_token_passthrough=False, aux_loss_type="switch_top1",
        jitter_noise=float(hf["router_jitter_noise"]), expert_dropout_rate=float(hf["dropout_rate"]),
        router_dtype=router_dtype)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), d_ff=int(hf["d_ff"]),
        num_heads=int(hf["num_heads"]), d_kv=int(hf["d_kv"]), num_encoder_layers=n_enc,
        num_decoder_layers=n_dec, mlp_activation=_ACT_FROM_HF[act], mlp_gated=False,
        dropout_rate=float(hf["dropout_rate"]),
        relative_attention_num_buckets=int(hf["relative_attention_num_buckets"]),
        relative_attention_max_distance=int(hf["relative_attention_max_distance"]),
        tie_embeddings=bool(hf["tie_word_embeddings"]), layer_norm_epsilon=float(hf["layer_norm_epsilon"]),
        dtype="float32", moe=moe, **placement).validate()


def _num_sparse_for(sparse: tuple[int, ...], num_layers: int, stack: str) -> int:
    """The HF num_sparse_*_layers that reproduces `sparse` (HF's rule is not invertible in general)."""
    for num_sparse in range(num_layers + 2):  # num_layers + 1 gives step 0: no sparse block
        if hf_sparse_layers(num_layers, num_sparse) == sparse:
            return num_sparse
    raise ConfigError(f"model.sparse_interval: sparse {stack} blocks {sparse} of {num_layers} cannot be written "
                      "as HF's 'i % (num_layers // num_sparse) == 1'")


def loss_from_hf(hf_config: Mapping[str, Any]) -> LossConfig:
    """The loss coefficients of a `SwitchTransformersConfig` dict (router_aux_loss_coef, router_z_loss_coef)."""
    hf = {**_HF_DEFAULTS, **hf_config}
    return LossConfig(balance_coef=float(hf["router_aux_loss_coef"]), router_z_coef=float(hf["router_z_loss_coef"]))


def config_to_hf(cfg: ModelConfig, loss: LossConfig | None = None) -> dict[str, Any]:
    """ModelConfig (and the run's LossConfig, default LossConfig()) -> a config.json dict for
    SwitchTransformersForConditionalGeneration.

    Refuses (ConfigError naming the field) anything that changes the forward pass and that HF
    cannot express; warns about training-only settings it drops.
    """
    moe, loss = cfg.moe, loss or LossConfig()
    required = {  # field: (value, HF's semantics)
        "mlp_gated": (cfg.mlp_gated, False), "sparse_dense": (cfg.sparse_dense, False),
        "sparse_positions_dense_d_ff": (cfg.sparse_positions_dense_d_ff, None),  # one d_ff in HF
        "layer_norm_scale": (cfg.layer_norm_scale, True),
        "moe.router_type": (moe.router_type, "tokens_choose"),
        "moe.decoder_router_type": (moe.decoder_router_type or moe.router_type, "tokens_choose"),
        "moe.top_k": (moe.top_k, 1),
        "moe.group_size": (moe.group_size, None), "moe.max_group_size": (moe.max_group_size, None),
        "moe.batch_prioritized": (moe.batch_prioritized, False),
        "moe.route_padding": (moe.route_padding, True),
        "moe.zero_padding_inputs": (moe.zero_padding_inputs, False),
        "moe.dropped_token_passthrough": (moe.dropped_token_passthrough, False),
    }
    for name, (value, wanted) in required.items():
        if value != wanted:
            raise ConfigError(f"model.{name}: HF Switch needs {wanted!r}, got {value!r}")
    if moe.expert_capacity is None:
        raise ConfigError("model.moe.expert_capacity: HF Switch needs an integer capacity, got None")
    if cfg.mlp_activation not in _ACT_TO_HF:
        raise ConfigError(f"model.mlp_activation: no HF name for {cfg.mlp_activation!r}")
    if moe.aux_loss_type != "switch_top1":
        warnings.warn(f"moe.aux_loss_type={moe.aux_loss_type!r}: HF computes 'switch_top1'")
    if moe.expert_dropout_rate != cfg.dropout_rate:
        warnings.warn("moe.expert_dropout_rate: HF uses dropout_rate inside the experts too")
    enc = tuple(i for i in range(cfg.num_encoder_layers) if cfg.is_sparse(i))
    dec = tuple(i for i in range(cfg.num_decoder_layers) if cfg.is_sparse(i))
    return {
        "architectures": ["SwitchTransformersForConditionalGeneration"], "model_type": "switch_transformers",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_sparse_encoder_layers": _num_sparse_for(enc, cfg.num_encoder_layers, "encoder"),
        "num_sparse_decoder_layers": _num_sparse_for(dec, cfg.num_decoder_layers, "decoder"),
        "num_experts": moe.num_experts, "expert_capacity": moe.expert_capacity, "router_bias": False,
        "router_jitter_noise": moe.jitter_noise, "router_dtype": moe.router_dtype,
        "router_ignore_padding_tokens": False,  # not read by HF; padding is routed either way
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "router_z_loss_coef": loss.router_z_coef, "router_aux_loss_coef": loss.balance_coef,
        "dense_act_fn": _ACT_TO_HF[cfg.mlp_activation], "tie_word_embeddings": cfg.tie_embeddings,
        "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "dtype": "float32",
    }


# ----------------------------------------------------------------------------- weights

# Layout conversions, HF torch layout <-> ours. nn.Linear stores [out, in]; ours are [in, out]
# with the attention heads split out: q/k/v [d_model, heads, d_kv], o [heads, d_kv, d_model].
@dataclasses.dataclass(frozen=True)
class _Layout:
    to_ours: Callable[[list[np.ndarray], ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], list[np.ndarray]]


_COPY = _Layout(lambda w, c: w[0], lambda x, c: [x])
_TRANSPOSE = _Layout(lambda w, c: w[0].T, lambda x, c: [x.T])
_HEADS_IN = _Layout(lambda w, c: w[0].T.reshape(c.d_model, c.num_heads, c.d_kv),
                    lambda x, c: [x.reshape(c.d_model, -1).T])
_HEADS_OUT = _Layout(lambda w, c: w[0].T.reshape(c.num_heads, c.d_kv, c.d_model),
                     lambda x, c: [x.reshape(-1, c.d_model).T])
_EXPERTS = _Layout(lambda w, c: np.stack([e.T for e in w]), lambda x, c: [e.T for e in x])


def _weight_map(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], tuple[str, ...], _Layout]]:
    """(HF keys, our param path, layout) for every parameter of the model."""
    yield ("shared.weight",), ("token_embedder", "embedding"), _COPY
    if not cfg.tie_embeddings:
        yield ("lm_head.weight",), ("decoder", "logits_dense"), _TRANSPOSE
    for stack, num_layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        yield ((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
               (stack, "relative_position_bias", "rel_embedding"), _TRANSPOSE)
        yield (f"{stack}.final_layer_norm.weight",), (stack, "final_norm", "scale"), _COPY
        for i in range(num_layers):
            hf, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
            attentions = [("0.SelfAttention", "pre_attention_norm", "attention")]
            if stack == "decoder":
                attentions = [("0.SelfAttention", "pre_self_attention_norm", "self_attention"),
                              ("1.EncDecAttention", "pre_cross_attention_norm", "encoder_decoder_attention")]
            for hf_attn, norm, attn in attentions:
                yield (f"{hf}.{hf_attn.split('.')[0]}.layer_norm.weight",), ours + (norm, "scale"), _COPY
                for hf_name, name in (("q", "query"), ("k", "key"), ("v", "value")):
                    yield (f"{hf}.{hf_attn}.{hf_name}.weight",), ours + (attn, name), _HEADS_IN
                yield (f"{hf}.{hf_attn}.o.weight",), ours + (attn, "out"), _HEADS_OUT
            ff = f"{hf}.{len(attentions)}"
            yield (f"{ff}.layer_norm.weight",), ours + ("ffn", "pre_mlp_norm", "scale"), _COPY
            if cfg.is_sparse(i):
                moe = ours + ("ffn", "moe")
                yield (f"{ff}.mlp.router.classifier.weight",), moe + ("router", "kernel"), _TRANSPOSE
                for name in ("wi", "wo"):
                    keys = tuple(f"{ff}.mlp.experts.expert_{e}.{name}.weight" for e in range(cfg.moe.num_experts))
                    yield keys, moe + (f"expert_{name}",), _EXPERTS
            else:
                for name in ("wi", "wo"):
                    yield (f"{ff}.mlp.{name}.weight",), ours + ("ffn", "mlp", name), _TRANSPOSE


def _param_shapes(model: EncoderDecoder) -> dict[tuple[str, ...], tuple[int, ...]]:
    tokens = jnp.ones((1, 2), jnp.int32)
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                                  tokens, tokens, tokens, enable_dropout=False))
    params = flax.linen.meta.unbox(variables["params"])
    return {path: leaf.shape for path, leaf in flax.traverse_util.flatten_dict(params).items()}


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """HF state dict (numpy) -> our params tree (float32), checked against the model's own shapes."""
    model = EncoderDecoder(cfg)
    expected = _param_shapes(model)
    flat, used = {}, set()
    for keys, path, layout in _weight_map(cfg):
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise KeyError(f"HF checkpoint lacks {missing[0]} (needed for {'/'.join(path)})")
        flat[path] = np.asarray(layout.to_ours([np.asarray(tensors[k], np.float32) for k in keys], cfg))
        used.update(keys)
    # Untied HF 5.x checkpoints store separate encoder/decoder input embeddings; ours has one.
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if alias in tensors:
            if not np.array_equal(np.asarray(tensors[alias], np.float32), flat[("token_embedder", "embedding")]):
                raise ValueError(f"{alias} differs from shared.weight: this model has one input embedding")
            used.add(alias)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        used.add("lm_head.weight")  # the tied copy
    unused = sorted(set(tensors) - used)
    if unused:
        raise KeyError(f"HF checkpoint has weights this model does not use, e.g. {unused[:3]}")
    if set(flat) != set(expected):
        raise KeyError(f"weight map and model disagree: {sorted(set(flat) ^ set(expected))[:3]}")
    for path, shape in expected.items():
        if flat[path].shape != shape:
            raise ValueError(f"{'/'.join(path)}: HF gives shape {flat[path].shape}, model wants {shape}")
    return flax.traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()})


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params tree (boxed or not) -> HF state dict, float32, contiguous."""
    flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(params))
    tensors: dict[str, np.ndarray] = {}
    for keys, path, layout in _weight_map(cfg):
        for key, value in zip(keys, layout.to_hf(np.asarray(flat[path], np.float32), cfg)):
            tensors[key] = np.ascontiguousarray(value)
    if not cfg.tie_embeddings:  # HF 5.x then reads separate encoder/decoder input embeddings
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            tensors[alias] = tensors["shared.weight"].copy()
    return tensors


# ----------------------------------------------------------------------------- files

def _read_weight_files(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy: safetensors first, pytorch_model.bin only with torch."""
    def shards(index_name: str) -> list[str]:
        with open(os.path.join(hf_dir, index_name)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))

    if os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        safetensor_files = ["model.safetensors"]
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")):
        safetensor_files = shards("model.safetensors.index.json")
    else:
        safetensor_files = []
    if safetensor_files:
        from safetensors.numpy import load_file
        tensors: dict[str, np.ndarray] = {}
        for name in safetensor_files:
            tensors.update(load_file(os.path.join(hf_dir, name)))
        return tensors

    if os.path.exists(os.path.join(hf_dir, "pytorch_model.bin")):
        bin_files = ["pytorch_model.bin"]
    elif os.path.exists(os.path.join(hf_dir, "pytorch_model.bin.index.json")):
        bin_files = shards("pytorch_model.bin.index.json")
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{hf_dir} holds only pytorch_model.bin, and reading it needs torch, which is not "
                          "installed: `pip install torch`, or convert the checkpoint to model.safetensors") from err
    tensors = {}
    for name in bin_files:
        state = torch.load(os.path.join(hf_dir, name), map_location="cpu", weights_only=True)
        tensors.update({k: v.detach().to(torch.float32).numpy() for k, v in state.items()})
    return tensors


def load_pretrained(hf_dir: str) -> tuple[EncoderDecoder, dict[str, Any]]:
    """A SwitchTransformersForConditionalGeneration directory -> (EncoderDecoder, float32 params).

    The params are plain (unboxed) arrays, ready for `model.apply({'params': params}, ...)`.
    """
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    cfg = config_from_hf(hf_config)
    return EncoderDecoder(resolve_model(cfg)), params_from_hf(cfg, _read_weight_files(hf_dir))


def export(model: EncoderDecoder, params: Mapping[str, Any], out_dir: str, loss: LossConfig | None = None) -> None:
    """Writes config.json + model.safetensors that SwitchTransformersForConditionalGeneration loads."""
    from safetensors.numpy import save_file
    hf_config = config_to_hf(model.config, loss)
    tensors = params_to_hf(model.config, params)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
