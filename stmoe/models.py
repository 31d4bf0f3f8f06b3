"""Encoder, Decoder and EncoderDecoder: T5.1.1 stacks where some FFNs are MoE layers.

Block i of a stack is sparse when `config.is_sparse(i)`: i % sparse_interval ==
sparse_interval - 1 by default (every 4th, ST-MoE; interval 2 is Switch's
every-other layout), or an explicit list. With `sparse_dense` a dense FFN follows
each sparse FFN (ST-MoE-32B, sec. 3.3). With `sparse_positions_dense_d_ff` the sparse
positions hold a dense FFN of that width instead (a FLOP-matched dense baseline).

The call signature follows t5x's EncoderDecoder:
    logits = model.apply({'params': p}, encoder_input_tokens, decoder_input_tokens,
                         decoder_target_tokens, enable_dropout=False, mutable=['moe'])
The MoE losses and router metrics of every sparse layer are sown into the 'moe'
collection (see metrics.collect_layers and losses.moe_losses).

With `scan_layers` each stack is one `nn.scan` over units of `sparse_interval` blocks
(interval - 1 dense + 1 sparse), so the compiled step has one unit's code whatever the
depth. Parameters then live under `{stack}/scan_{interval}/layers_{j}` with a leading
'layers' axis (unit u holds block u * interval + j); sown MoE metrics get the same
leading axis and metrics.expand_scanned gives them back the unscanned names. `remat`
("full" / "save_dots") wraps every block in `nn.remat`. The KV-cache decode path is not
supported with scan_layers (an error says so).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.config import ModelConfig
from stmoe.layers import (Embed, Mlp, MultiHeadAttention, RelativePositionBias, RMSNorm,
                          attention_mask, constrain, decoder_input_token_mask)
from stmoe.moe import MoeLayer

Array = jax.Array


def _dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def _zero_padding(cfg: ModelConfig, x: Array, token_mask: Array) -> Array:
    """x: [batch, length, d] zeroed where token_mask [batch, length] is False, with
    model.zero_padding_activations (flaxformer's logit_mask); x unchanged otherwise."""
    return x * token_mask[..., None].astype(x.dtype) if cfg.zero_padding_activations else x


class FeedForward(nn.Module):
    """The FFN sublayer of block `layer`: pre-norm, dense or MoE (+ optional dense), dropout, residual."""

    config: ModelConfig
    layer: int
    causal: bool

    @nn.compact
    def __call__(self, x: Array, token_mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        dense = lambda name: Mlp(cfg.ffn_width(self.layer), cfg.mlp_activation, cfg.mlp_gated, cfg.dropout_rate,
                                 _dtype(cfg), name=name)
        residual_dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        normed = _zero_padding(cfg, RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), cfg.layer_norm_scale,
                                            name="pre_mlp_norm")(x), token_mask)
        if cfg.is_sparse(self.layer):
            y = MoeLayer(cfg, causal=self.causal, name="moe")(normed, token_mask, deterministic)
        else:
            y = dense("mlp")(normed, deterministic)
        x = x + residual_dropout(y, deterministic)
        if cfg.is_sparse(self.layer) and cfg.sparse_dense:
            normed = _zero_padding(cfg, RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), cfg.layer_norm_scale,
                                                name="pre_extra_mlp_norm")(x), token_mask)
            x = x + residual_dropout(dense("extra_mlp")(normed, deterministic), deterministic)
        return x


class EncoderLayer(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, position_bias: Array, mask: Array, token_mask: Array,
                 deterministic: bool) -> Array:
        cfg = self.config
        normed = _zero_padding(cfg, RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), cfg.layer_norm_scale,
                                            name="pre_attention_norm")(x), token_mask)
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
        normed = _zero_padding(cfg, RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), cfg.layer_norm_scale,
                                            name="pre_self_attention_norm")(x), token_mask)
        y = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, _dtype(cfg), name="self_attention")(
            normed, normed, position_bias, self_mask, deterministic, decode=decode)
        x = x + dropout(y, deterministic)
        normed = _zero_padding(cfg, RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), cfg.layer_norm_scale,
                                            name="pre_cross_attention_norm")(x), token_mask)
        y = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, _dtype(cfg), cross_attention=True,
                               name="encoder_decoder_attention")(normed, encoded, None, cross_mask, deterministic,
                                                                 decode=decode)
        x = x + dropout(y, deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        return FeedForward(cfg, self.layer, causal=True, name="ffn")(x, token_mask, deterministic)


REMAT_POLICIES = {"full": None, "save_dots": jax.checkpoint_policies.checkpoint_dots}


def _block(cls, cfg: ModelConfig, static_argnums: tuple[int, ...]):
    """The block class, wrapped in nn.remat when `cfg.remat` asks for it."""
    if cfg.remat == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[cfg.remat], static_argnums=static_argnums)


class _ScanUnit(nn.Module):
    """`sparse_interval` consecutive blocks (local indices 0..interval-1), the body of nn.scan."""

    config: ModelConfig
    layer_cls: type
    static_argnums: tuple[int, ...]
    static_args: tuple

    @nn.compact
    def __call__(self, x: Array, *args) -> tuple[Array, None]:
        cls = _block(self.layer_cls, self.config, self.static_argnums)
        for j in range(self.config.sparse_interval):
            x = cls(self.config, j, name=f"layers_{j}")(x, *args, *self.static_args)
        return x, None


def _scan_stack(cfg: ModelConfig, layer_cls: type, num_layers: int, static_argnums: tuple[int, ...],
                static_args: tuple, num_broadcast: int):
    """nn.scan over num_layers // interval units; params and sown 'moe' / 'intermediates' values get a leading
    'layers' axis."""
    scanned = nn.scan(_ScanUnit, variable_axes={"params": 0, "moe": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * num_broadcast,
                      length=num_layers // cfg.sparse_interval, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, layer_cls, static_argnums, static_args, name=f"scan_{cfg.sparse_interval}")


def scan_params(params, cfg: ModelConfig):
    """Unscanned (unboxed) params -> scan_layers layout: layers_{u*interval + j} -> scan_{interval}/layers_{j}[u]."""
    interval, out = cfg.sparse_interval, dict(params)
    for stack in ("encoder", "decoder"):
        tree = dict(out[stack])
        count = sum(1 for k in tree if k.startswith("layers_"))
        if count == 0:
            continue
        blocks = [tree.pop(f"layers_{i}") for i in range(count)]
        tree[f"scan_{interval}"] = {f"layers_{j}": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                                                         *blocks[j::interval])
                                    for j in range(interval)}
        out[stack] = tree
    return out


def unscan_params(params, cfg: ModelConfig):
    """The inverse of scan_params: e.g. to decode (KV cache) with a model trained with scan_layers."""
    interval, out = cfg.sparse_interval, dict(params)
    for stack in ("encoder", "decoder"):
        tree = dict(out[stack])
        scanned = tree.pop(f"scan_{interval}", {})
        for j, block in scanned.items():
            j = int(j.split("_")[1])
            units = jax.tree_util.tree_leaves(block)[0].shape[0]
            for u in range(units):
                tree[f"layers_{u * interval + j}"] = jax.tree_util.tree_map(lambda x: x[u], block)
        out[stack] = tree
    return out


def _stack_inputs(cfg: ModelConfig, embed: Embed, tokens: Array, query_positions: Array, key_positions: Array,
                  bidirectional: bool, deterministic: bool):
    """What a stack computes once before its blocks: the shared position bias and the dropped-out embeddings.

    Call from inside a stack's compact __call__ (the bias module is named in that scope).
    """
    bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, bidirectional=bidirectional,
                                name="relative_position_bias")(query_positions, key_positions)
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    x = constrain(dropout(embed(tokens), deterministic), ("batch", "length", "embed"))
    return bias, x, dropout


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
        bias, x, dropout = _stack_inputs(cfg, self.embed, tokens, positions, positions, True, deterministic)
        if cfg.scan_layers:
            x, _ = _scan_stack(cfg, EncoderLayer, cfg.num_encoder_layers, (5,), (deterministic,), 3)(
                x, bias, mask, token_mask)
        else:
            layer_cls = _block(EncoderLayer, cfg, static_argnums=(5,))  # (self, x, bias, mask, token_mask, det.)
            for i in range(cfg.num_encoder_layers):
                x = layer_cls(cfg, i, name=f"layers_{i}")(x, bias, mask, token_mask, deterministic)
        x = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), cfg.layer_norm_scale, name="final_norm")(x)
        return _zero_padding(cfg, dropout(x, deterministic), token_mask)


class Decoder(nn.Module):
    config: ModelConfig
    embed: Embed

    @nn.compact
    def __call__(self, encoded: Array, tokens: Array, encoder_segment_ids: Array,
                 target_tokens: Array | None = None, segment_ids: Array | None = None,
                 positions: Array | None = None, deterministic: bool = True, decode: bool = False,
                 max_decode_length: int | None = None) -> Array:
        """encoded: [batch, enc_len, d]; tokens: [batch, dec_len] (shifted targets). Returns logits.

        Padding is read from `target_tokens` (the input at position 0 is the pad id); the MoE
        layers' padding from `tokens` instead with moe.decoder_padding_from="decoder_input_tokens".
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
        token_mask = segments > 0  # which positions the MoE layers route and count in their losses
        if not decode and cfg.moe.decoder_padding_from == "decoder_input_tokens":
            token_mask = decoder_input_token_mask(tokens)  # flaxformer's: also the position after each EOS
        bias, x, dropout = _stack_inputs(cfg, self.embed, tokens, query_positions, key_positions, False,
                                         deterministic)
        if cfg.scan_layers:
            if decode:
                raise ValueError("model.scan_layers: the KV-cache decode path is not supported with scanned "
                                 "layers; decode with scan_layers=False and models.unscan_params(params).")
            x, _ = _scan_stack(cfg, DecoderLayer, cfg.num_decoder_layers, (7, 8), (deterministic, decode), 5)(
                x, encoded, bias, self_mask, cross_mask, token_mask)
        else:
            layer_cls = _block(DecoderLayer, cfg, static_argnums=(7, 8))  # deterministic, decode
            for i in range(cfg.num_decoder_layers):
                x = layer_cls(cfg, i, name=f"layers_{i}")(x, encoded, bias, self_mask, cross_mask,
                                                          token_mask, deterministic, decode)
        x = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg), cfg.layer_norm_scale, name="final_norm")(x)
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
