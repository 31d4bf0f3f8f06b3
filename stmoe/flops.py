"""The model's useful matmul work in multiply-adds (MACs; FLOPs = 2 x MACs): MFU, FLOP-matched models.

Counted: every matmul of the encoder-decoder (query / key / value / output projections, attention
scores and weighted values over the whole length, FFNs, routers, the output logits), each expert
`top_k` times per token as if nothing were dropped and no capacity slot were padding: the work the
model needs, not the work an implementation does (capacity slots, one-hot dispatch einsums).
Softmaxes, norms, gathers and other elementwise work are left out, as in PaLM's MFU (Chowdhery et
al. 2022, App. B). A train step is 3 forward passes' worth (the backward pass runs two matmuls per
forward matmul). Used by scripts/benchmark_train.py, benchmark_peers.py and compare_dense.py.
"""
from __future__ import annotations

from stmoe.config import ModelConfig


def mlp_macs(d_model: int, d_ff: int, gated: bool) -> int:
    """Per token, one dense FFN: d_model x d_ff in (two such matrices when gated, GEGLU) and out."""
    return d_model * d_ff * (3 if gated else 2)


def router_macs(cfg: ModelConfig, layer: int) -> int:
    """Per token, block `layer`'s router ([d_model] x [d_model, experts]); 0 for a dense block."""
    return cfg.d_model * cfg.moe.num_experts if cfg.is_sparse(layer) else 0


def ffn_macs(cfg: ModelConfig, layer: int) -> int:
    """Per token, block `layer`'s FFN: its dense FFN (`ffn_width`), or top_k experts plus the router
    (plus the dense FFN beside the experts with `sparse_dense`, ST-MoE sec. 3.3)."""
    mlp = mlp_macs(cfg.d_model, cfg.ffn_width(layer), cfg.mlp_gated)
    if not cfg.is_sparse(layer):
        return mlp
    return cfg.moe.top_k * mlp + router_macs(cfg, layer) + (mlp if cfg.sparse_dense else 0)


def _encoder_token_macs(cfg: ModelConfig, enc_len: int) -> int:
    inner = cfg.num_heads * cfg.d_kv
    return sum(4 * cfg.d_model * inner + 2 * enc_len * inner + ffn_macs(cfg, i) for i in range(cfg.num_encoder_layers))


def _decoder_token_macs(cfg: ModelConfig, enc_len: int, keys: int) -> int:
    """One decoder token attending to `keys` decoder positions, without the logits and the
    cross-attention keys / values (those are per sequence)."""
    inner = cfg.num_heads * cfg.d_kv
    return sum(4 * cfg.d_model * inner + 2 * keys * inner  # self-attention
               + 2 * cfg.d_model * inner + 2 * enc_len * inner  # cross-attention: query, output, scores, values
               + ffn_macs(cfg, i) for i in range(cfg.num_decoder_layers))


def _cross_kv_macs(cfg: ModelConfig, enc_len: int) -> int:
    """Per sequence: every decoder layer's keys and values of the encoder output."""
    return cfg.num_decoder_layers * 2 * cfg.d_model * cfg.num_heads * cfg.d_kv * enc_len


def forward_macs(cfg: ModelConfig, batch: int, enc_len: int, dec_len: int) -> int:
    """One teacher-forced forward pass of `batch` sequences (encoder enc_len, decoder dec_len tokens)."""
    per_sequence = (enc_len * _encoder_token_macs(cfg, enc_len) + _cross_kv_macs(cfg, enc_len)
                    + dec_len * (_decoder_token_macs(cfg, enc_len, dec_len) + cfg.d_model * cfg.vocab_size))
    return batch * per_sequence


def train_step_flops(cfg: ModelConfig, batch: int, enc_len: int, dec_len: int) -> int:
    """Forward + backward of one step: 3 forward passes, 2 FLOPs per multiply-add."""
    return 3 * 2 * forward_macs(cfg, batch, enc_len, dec_len)


def generation_macs(cfg: ModelConfig, batch: int, enc_len: int, steps: int) -> int:
    """Cached decoding of `steps` tokens: the encoder and the cross-attention keys / values once, then
    at step t one token per sequence against t + 1 cached keys, and its logits."""
    decode = sum(_decoder_token_macs(cfg, enc_len, t + 1) + cfg.d_model * cfg.vocab_size for t in range(steps))
    return batch * (enc_len * _encoder_token_macs(cfg, enc_len) + _cross_kv_macs(cfg, enc_len) + decode)
