"""The model's matmul work in multiply-adds (MACs; FLOPs = 2 x MACs): MFU, FLOP-matched models.

Counted: every matmul of the encoder-decoder (query / key / value / output projections, attention
scores and weighted values over the whole length, FFNs, routers, the output logits) and the expert
rows that the routing lets run: per routing group of T tokens (moe.MoeLayer's groups),
- tokens-choose with a capacity: min(top_k * T, experts * C) rows, C the layer's capacity
  (routing.layer_capacity: the train factor in a train step, the eval factor in deterministic
  passes). With ST-MoE's top-2 and capacity factor 1.25, experts * C = 1.25 T < 2 T: the expert
  buffers hold fewer rows than there are choices, and that is what runs;
- expert choice: experts * min(C, T) rows (every expert fills its slots);
- dropless dispatch, and groups of one token (a cached decoding step): top_k * T rows.
Not counted: one-hot dispatch / combine einsums and the slots of an expert left empty by an
unbalanced router (the buffers are counted as if every slot that can be filled were), softmaxes,
norms, gathers and other elementwise work, as in PaLM's MFU (Chowdhery et al. 2022, App. B). A train
step is 3 forward passes' worth (the backward pass runs two matmuls per forward matmul). Used by
scripts/benchmark_train.py, benchmark_peers.py, compare_dense.py and stmoe.aot.

`ffn_macs` (per token, experts `top_k` times) is the design figure a FLOP-matched dense model is
matched to; `forward_macs` and the functions built on it count the capacity as above.
"""
from __future__ import annotations

from stmoe import routing
from stmoe.config import ModelConfig


def mlp_macs(d_model: int, d_ff: int, gated: bool) -> int:
    """Per token, one dense FFN: d_model x d_ff in (two such matrices when gated, GEGLU) and out."""
    return d_model * d_ff * (3 if gated else 2)


def router_macs(cfg: ModelConfig, layer: int) -> int:
    """Per token, block `layer`'s router ([d_model] x [d_model, experts]); 0 for a dense block."""
    return cfg.d_model * cfg.moe.num_experts if cfg.is_sparse(layer) else 0


def ffn_macs(cfg: ModelConfig, layer: int) -> int:
    """Per token, block `layer`'s FFN: its dense FFN (`ffn_width`), or top_k experts plus the router
    (plus the dense FFN beside the experts with `sparse_dense`, ST-MoE sec. 3.3), no capacity limit."""
    mlp = mlp_macs(cfg.d_model, cfg.ffn_width(layer), cfg.mlp_gated)
    if not cfg.is_sparse(layer):
        return mlp
    return cfg.moe.top_k * mlp + router_macs(cfg, layer) + (mlp if cfg.sparse_dense else 0)


def _non_expert_ffn_macs(cfg: ModelConfig, layer: int) -> int:
    """Per token, block `layer`'s FFN without the experts (dense FFN, or router + sparse_dense FFN)."""
    mlp = mlp_macs(cfg.d_model, cfg.ffn_width(layer), cfg.mlp_gated)
    if not cfg.is_sparse(layer):
        return mlp
    return router_macs(cfg, layer) + (mlp if cfg.sparse_dense else 0)


def routing_groups(cfg: ModelConfig, batch: int, length: int) -> tuple[int, int]:
    """(groups, tokens per group) of an MoE layer fed [batch, length] tokens (moe.MoeLayer._token_groups:
    one group per sequence, `moe.group_size` tokens, or flaxformer's padded batch-wide groups)."""
    moe = cfg.moe
    if moe.max_group_size is not None:
        pad_rows, pad_positions = routing.flaxformer_padding(batch, length, moe.num_groups_multiple)
        tokens = (batch + pad_rows) * (length + pad_positions)
        groups = routing.flaxformer_num_groups(tokens, moe.max_group_size, moe.num_groups_multiple)
        return groups, tokens // groups
    size = moe.group_size or length
    return batch * length // size, size


def expert_rows(cfg: ModelConfig, group_size: int, *, causal: bool, deterministic: bool) -> int:
    """Expert rows one routing group of `group_size` tokens runs (module docstring)."""
    moe = cfg.moe
    router = moe.router_for(causal)
    if moe.dispatch == "dropless" or (group_size == 1 and router == "tokens_choose"):
        return moe.top_k * group_size
    capacity = routing.layer_capacity(moe, group_size, deterministic)
    if router == "experts_choose":
        return moe.num_experts * min(capacity, group_size)
    return min(moe.top_k * group_size, moe.num_experts * capacity)


def _expert_macs(cfg: ModelConfig, num_layers: int, batch: int, length: int, *, causal: bool,
                 deterministic: bool) -> int:
    """The experts of one stack (`num_layers` blocks) on [batch, length] tokens."""
    sparse = sum(cfg.is_sparse(i) for i in range(num_layers))
    if not sparse or not batch * length:
        return 0
    groups, group_size = routing_groups(cfg, batch, length)
    rows = groups * expert_rows(cfg, group_size, causal=causal, deterministic=deterministic)
    return sparse * rows * mlp_macs(cfg.d_model, cfg.d_ff, cfg.mlp_gated)


def _encoder_token_macs(cfg: ModelConfig, enc_len: int) -> int:
    """One encoder token, the experts left out (`_expert_macs`)."""
    inner = cfg.num_heads * cfg.d_kv
    return sum(4 * cfg.d_model * inner + 2 * enc_len * inner + _non_expert_ffn_macs(cfg, i)
               for i in range(cfg.num_encoder_layers))


def _decoder_token_macs(cfg: ModelConfig, enc_len: int, keys: int) -> int:
    """One decoder token attending to `keys` decoder positions, without the experts, the logits and
    the cross-attention keys / values (those are per sequence)."""
    inner = cfg.num_heads * cfg.d_kv
    return sum(4 * cfg.d_model * inner + 2 * keys * inner  # self-attention
               + 2 * cfg.d_model * inner + 2 * enc_len * inner  # cross-attention: query, output, scores, values
               + _non_expert_ffn_macs(cfg, i) for i in range(cfg.num_decoder_layers))


def _cross_kv_macs(cfg: ModelConfig, enc_len: int) -> int:
    """Per sequence: every decoder layer's keys and values of the encoder output."""
    return cfg.num_decoder_layers * 2 * cfg.d_model * cfg.num_heads * cfg.d_kv * enc_len


def _encoder_macs(cfg: ModelConfig, batch: int, enc_len: int, deterministic: bool) -> int:
    return (batch * (enc_len * _encoder_token_macs(cfg, enc_len) + _cross_kv_macs(cfg, enc_len))
            + _expert_macs(cfg, cfg.num_encoder_layers, batch, enc_len, causal=False, deterministic=deterministic))


def forward_macs(cfg: ModelConfig, batch: int, enc_len: int, dec_len: int, *, deterministic: bool = False) -> int:
    """One teacher-forced forward pass of `batch` sequences (encoder enc_len, decoder dec_len tokens),
    the experts at the train capacity factor (`deterministic`: the eval factor, as scoring runs)."""
    decoder = batch * dec_len * (_decoder_token_macs(cfg, enc_len, dec_len) + cfg.d_model * cfg.vocab_size)
    return (_encoder_macs(cfg, batch, enc_len, deterministic) + decoder
            + _expert_macs(cfg, cfg.num_decoder_layers, batch, dec_len, causal=True, deterministic=deterministic))


def train_step_flops(cfg: ModelConfig, batch: int, enc_len: int, dec_len: int) -> int:
    """Forward + backward of one step: 3 forward passes (train capacity), 2 FLOPs per multiply-add."""
    return 3 * 2 * forward_macs(cfg, batch, enc_len, dec_len)


def decode_step_macs(cfg: ModelConfig, batch: int, enc_len: int, keys: int) -> int:
    """One cached decoding step: one token per sequence against `keys` cached positions, its logits,
    and its experts (groups of one token, or moe.group_size tokens across sequences)."""
    return (batch * (_decoder_token_macs(cfg, enc_len, keys) + cfg.d_model * cfg.vocab_size)
            + _expert_macs(cfg, cfg.num_decoder_layers, batch, 1, causal=True, deterministic=True))


def generation_macs(cfg: ModelConfig, batch: int, enc_len: int, steps: int) -> int:
    """Cached decoding of `steps` tokens: the encoder and the cross-attention keys / values once, then
    at step t one token per sequence against t + 1 cached keys, and its logits."""
    return _encoder_macs(cfg, batch, enc_len, True) + sum(decode_step_macs(cfg, batch, enc_len, t + 1)
                                                           for t in range(steps))
