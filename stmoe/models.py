"""Encoder, Decoder and EncoderDecoder: T5.1.1 stacks where some FFNs are MoE layers.

Block i of a stack is sparse when `config.is_sparse(i)`: i % sparse_interval ==
sparse_interval - 1 by default (every 4th, ST-MoE; interval 2 is Switch's
every-other layout), or an explicit list. With `sparse_dense` a dense FFN follows
each sparse FFN (ST-MoE-32B, sec. 3.3).

The call signature follows t5x's EncoderDecoder:
    logits = model.apply({'params': p}, encoder_input_tokens, decoder_input_tokens,
                         decoder_target_tokens, enable_dropout=False, mutable=['moe'])
The MoE losses and router metrics of every sparse layer are sown into the 'moe'
collection (see metrics.collect_layers and losses.moe_losses).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.config import ModelConfig
from stmoe.layers import (Embed, Mlp, MultiHeadAttention, RelativePositionBias, RMSNorm,
                          attention_mask, constrain)
from stmoe.moe import MoeLayer

Array = jax.Array


def _dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


class FeedForward(nn.Module):
    """The FFN sublayer of block `layer`: pre-norm, dense or MoE (+ optional dense), dropout, residual."""

    config: ModelConfig
    layer: int
    causal: bool

    @nn.compact
    def __call__(self, x: Array, token_mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        dense = lambda name: Mlp(cfg.d_ff, cfg.mlp_activation, cfg.mlp_gated, cfg.dropout_rate,
                                 _dtype(cfg), name=name)
        residual_dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        normed = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), name="pre_mlp_norm")(x)
        if cfg.is_sparse(self.layer):
            y = MoeLayer(cfg, causal=self.causal, name="moe")(normed, token_mask, deterministic)
        else:
            y = dense("mlp")(normed, deterministic)
        x = x + residual_dropout(y, deterministic)
        if cfg.is_sparse(self.layer) and cfg.sparse_dense:
            normed = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), name="pre_extra_mlp_norm")(x)
            x = x + residual_dropout(dense("extra_mlp")(normed, deterministic), deterministic)
        return x


class EncoderLayer(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, position_bias: Array, mask: Array, token_mask: Array,
                 deterministic: bool) -> Array:
        cfg = self.config
        normed = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), name="pre_attention_norm")(x)
        y = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, _dtype(cfg), name="attention")(
            normed, normed, position_bias, mask, deterministic)
        x = x + nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        return FeedForward(cfg, self.layer, causal=False, name="ffn")(x, token_mask, deterministic)


class DecoderLayer(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, encoded: Array, position_bias: Array, self_mask: Array | None,
                 cross_mask: Array, token_mask: Array, deterministic: bool, decode: bool) -> Array:
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        normed = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), name="pre_self_attention_norm")(x)
        y = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, _dtype(cfg), name="self_attention")(
            normed, normed, position_bias, self_mask, deterministic, decode=decode)
        x = x + dropout(y, deterministic)
        normed = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), name="pre_cross_attention_norm")(x)
        y = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, _dtype(cfg),
                               name="encoder_decoder_attention")(normed, encoded, None, cross_mask, deterministic)
        x = x + dropout(y, deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        return FeedForward(cfg, self.layer, causal=True, name="ffn")(x, token_mask, deterministic)


class Encoder(nn.Module):
    config: ModelConfig
    embed: Embed

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None = None, deterministic: bool = True) -> Array:
        """tokens: [batch, length] -> [batch, length, d_model]. Token id 0 is padding."""
        cfg = self.config
        segments = (tokens > 0).astype(jnp.int32) if segment_ids is None else segment_ids
        token_mask = segments > 0
        mask = attention_mask(segments, segments)
        positions = jnp.arange(tokens.shape[1])
        bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance, bidirectional=True,
                                    name="relative_position_bias")(positions, positions)
        dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        x = dropout(self.embed(tokens), deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        for i in range(cfg.num_encoder_layers):
            x = EncoderLayer(cfg, i, name=f"layers_{i}")(x, bias, mask, token_mask, deterministic)
        x = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), name="final_norm")(x)
        return dropout(x, deterministic)


class Decoder(nn.Module):
    config: ModelConfig
    embed: Embed

    @nn.compact
    def __call__(self, encoded: Array, tokens: Array, encoder_segment_ids: Array,
                 target_tokens: Array | None = None, segment_ids: Array | None = None,
                 positions: Array | None = None, deterministic: bool = True, decode: bool = False,
                 max_decode_length: int | None = None) -> Array:
        """encoded: [batch, enc_len, d]; tokens: [batch, dec_len] (shifted targets). Returns logits.

        Padding is read from `target_tokens` (the input at position 0 is the pad id).
        With `decode=True`, `tokens` is one step [batch, 1] at `positions` [batch, 1] and the
        self-attention keys come from the cache (allocated by an init call with the full length).
        """
        cfg = self.config
        batch, length = tokens.shape
        if decode:
            segments = jnp.ones_like(tokens)
            self_mask = None  # the cache builds the causal mask
            key_positions = jnp.arange(max_decode_length or length)
            query_positions = positions if positions is not None else jnp.zeros((batch, 1), jnp.int32)
        else:
            reference = tokens if target_tokens is None else target_tokens
            segments = (reference > 0).astype(jnp.int32) if segment_ids is None else segment_ids
            self_mask = attention_mask(segments, segments, causal=True)
            key_positions = jnp.arange(length)
            query_positions = key_positions
        cross_mask = attention_mask(segments, encoder_segment_ids)
        bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance, bidirectional=False,
                                    name="relative_position_bias")(query_positions, key_positions)
        dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        x = dropout(self.embed(tokens), deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        for i in range(cfg.num_decoder_layers):
            x = DecoderLayer(cfg, i, name=f"layers_{i}")(x, encoded, bias, self_mask, cross_mask,
                                                         segments > 0, deterministic, decode)
        x = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), name="final_norm")(x)
        x = dropout(x, deterministic)
        if cfg.tie_embeddings:
            # Tied logits are rescaled by d_model**-0.5 (Mesh TF T5) since the embedding init has std 1.
            logits = self.embed.attend(x * cfg.d_model ** -0.5)
        else:
            kernel = self.param("logits_dense", nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"), ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), jnp.float32)
            logits = jnp.einsum("bld,dv->blv", x, kernel.astype(x.dtype))
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class EncoderDecoder(nn.Module):
    """T5.1.1 / ST-MoE encoder-decoder with a shared token embedding."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, _dtype(cfg))
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
               enable_dropout: bool = False) -> Array:
        return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic=not enable_dropout)

    def decode(self, encoded: Array, encoder_segment_ids: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None, decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None, enable_dropout: bool = False, decode: bool = False,
               max_decode_length: int | None = None) -> Array:
        return self.decoder(encoded, decoder_input_tokens, encoder_segment_ids, decoder_target_tokens,
                            decoder_segment_ids, decoder_positions, deterministic=not enable_dropout,
                            decode=decode, max_decode_length=max_decode_length)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
                 decoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
                 decoder_positions: Array | None = None, *, enable_dropout: bool = True,
                 decode: bool = False) -> Array:
        """[batch, enc_len], [batch, dec_len], [batch, dec_len] int32 -> logits [batch, dec_len, vocab] float32.

        Positions are accepted for t5x compatibility; relative attention only needs distances
        inside a segment, which packing does not change.
        """
        del encoder_positions
        enc_segments = (encoder_input_tokens > 0).astype(jnp.int32) if encoder_segment_ids is None \
            else encoder_segment_ids
        encoded = self.encode(encoder_input_tokens, enc_segments, enable_dropout)
        return self.decode(encoded, enc_segments, decoder_input_tokens, decoder_target_tokens,
                           decoder_segment_ids, decoder_positions, enable_dropout, decode)
