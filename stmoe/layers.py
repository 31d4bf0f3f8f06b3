"""Dense T5.1.1 building blocks: RMSNorm, MLP, attention with relative position bias, embeddings.

Conventions shared by every module here:
- No biases anywhere (T5.1.1).
- Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`);
  partitioning.py maps them onto a mesh. Activations are computed in `dtype`.
- Attention does not divide by sqrt(d_kv): the factor is folded into the query
  initializer, as in Mesh TensorFlow T5.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Array]

ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu, "silu": nn.silu}


def fan_in_init(scale: float = 1.0, fan_in_axes: tuple[int, ...] = (-2,), out_axes: tuple[int, ...] = (-1,),
                batch_axes: tuple[int, ...] = (), distribution: str = "truncated_normal") -> Initializer:
    """Variance scale / fan_in, fan_in = the product of `fan_in_axes` only (T5's init).

    Every axis of the kernel must be named as fan-in, output or batch: jax's variance_scaling
    multiplies any other axis into BOTH fans as a "receptive field". T5 initializes a
    multi-axis kernel as the 2-D matrix it reshapes to (t5x `t5x/examples/t5/layers.py:398-411`,
    `DenseGeneral` draws a `(prod(in), prod(out))` kernel), and each stacked expert as its own
    dense layer (flaxformer `architectures/moe/moe_layers.py:565-575`, `vmap` with
    `variable_axes={'params': 0}`): so `[d_model, heads, d_kv]` has fan-in d_model (out_axes
    (-2, -1)) and `[experts, d_model, d_ff]` fan-in d_model (batch_axes (0,)).
    """
    return nn.initializers.variance_scaling(scale, "fan_in", distribution, in_axis=fan_in_axes,
                                            out_axis=out_axes, batch_axis=batch_axes)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Logical sharding constraint on an activation; a no-op outside a mesh context."""
    return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; variance in float32.

    `use_scale=False` drops the learned per-channel scale (no parameter): x / rms(x), the
    "no RMSNorm scale" ablation of ST-MoE Table 3.
    """

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    use_scale: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                               (x.shape[-1],), jnp.float32)
            x32 = x32 * scale
        return x32.astype(self.dtype)


def mlp_apply(x: Array, wi: list[Array], wo: Array, activation: str, dropout: Callable[[Array], Array],
              dtype: jnp.dtype, prefix: str = "") -> Array:
    """The T5 FFN math shared by the dense MLP and the stacked experts.

    x: [..., d_model]; wi: one ([gated] two) kernels [(prefix...), d_model, d_ff]; wo: [(prefix...), d_ff, d_model].
    With `prefix` = "e" the leading dimension of x and of the kernels is the expert axis.
    """
    spec_in = f"{prefix}...d,{prefix}df->{prefix}...f"
    spec_out = f"{prefix}...f,{prefix}fd->{prefix}...d"
    hidden = ACTIVATIONS[activation](jnp.einsum(spec_in, x, wi[0].astype(dtype)))
    if len(wi) == 2:  # gated: act(x W0) * (x W1), GEGLU in T5.1.1
        hidden = hidden * jnp.einsum(spec_in, x, wi[1].astype(dtype))
    hidden = dropout(hidden)
    return jnp.einsum(spec_out, hidden, wo.astype(dtype))


class Mlp(nn.Module):
    """Dense T5.1.1 FFN: gated (GEGLU) or plain (ReLU, Switch)."""

    d_ff: int
    activation: str = "gelu"
    gated: bool = True
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        d_model = x.shape[-1]
        wi_init = nn.with_logical_partitioning(fan_in_init(), ("embed", "mlp"))
        names = ("wi_0", "wi_1") if self.gated else ("wi",)
        wi = [self.param(n, wi_init, (d_model, self.d_ff), jnp.float32) for n in names]
        wo = self.param("wo", nn.with_logical_partitioning(fan_in_init(), ("mlp", "embed")),
                        (self.d_ff, d_model), jnp.float32)
        dropout = lambda h: nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic)
        return mlp_apply(x, wi, wo, self.activation, dropout, self.dtype)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's log-spaced buckets for key_position - query_position.

    Half the buckets hold exact small distances, the rest grow logarithmically up
    to max_distance. Bidirectional (encoder) splits the buckets by sign; causal
    (decoder) only sees keys at or before the query.
    """
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), shared by every layer of a stack."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """query_positions: [q] or [batch, q]; key_positions: [k]. Returns [1 or batch, heads, q, k] float32."""
        # T5 / t5x: variance_scaling(1.0, 'fan_avg', 'uniform') over [heads, buckets], i.e. uniform with
        # variance 2 / (heads + buckets) (t5x `t5x/examples/t5/network.py:199-201`, flaxformer
        # `t5x/configs/moe/architectures/moe.gin:205-209`).
        bias_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1)
        table = self.param("rel_embedding",
                           nn.with_logical_partitioning(bias_init, ("heads", "relpos_buckets")),
                           (self.num_heads, self.num_buckets), jnp.float32)
        query_positions = jnp.atleast_2d(query_positions)  # [b, q]
        relative = key_positions[None, None, :] - query_positions[:, :, None]  # [b, q, k]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return jnp.take(table, buckets, axis=1).transpose(1, 0, 2, 3)  # [b, heads, q, k]


class MultiHeadAttention(nn.Module):
    """T5 attention: no biases, no 1/sqrt(d_kv) (folded into the query init), additive bias.

    Keys are kept as [batch, heads, d_kv, length] and values as [batch, heads, length, d_kv]:
    the operand layouts of the two attention dots, so neither is transposed before its dot.

    With `decode=True`, self-attention keeps the keys and values of earlier steps in the
    'cache' collection (`cached_key` [batch, heads, d_kv, max_length], `cached_value`
    [batch, heads, max_length, d_kv], `cache_index`), so a decoder step costs one query
    position. Cross-attention (`cross_attention=True`) projects the encoded sequence once, in
    the call that creates the cache (decoding.init_cache), into `encoded_key` /
    `encoded_value` [batch, heads, ..., enc_len], which every later step reads.
    """

    num_heads: int
    d_kv: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    cross_attention: bool = False

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array | None, mask: Array | None,
                 deterministic: bool = True, decode: bool = False) -> Array:
        """inputs_q: [b, q, d]; inputs_kv: [b, k, d]; bias: [b|1, heads, q, k]; mask: [b|1, 1|heads, q, k] bool."""
        d_model = inputs_q.shape[-1]
        head_names = ("embed", "heads", "kv")
        # Fan-in d_model for q/k/v, heads * d_kv for out, normal (not truncated) as t5x's attention
        # (`t5x/examples/t5/layers.py:155-157`). The query init carries the missing 1/sqrt(d_kv) of
        # dot-product attention (`layers.py:210-211`): std 1/sqrt(d_model * d_kv).
        kv_init = fan_in_init(1.0, (-3,), (-2, -1), distribution="normal")
        query_init = fan_in_init(1.0 / self.d_kv, (-3,), (-2, -1), distribution="normal")
        # Every projection is the plain [b*l, d] @ [d, heads*d_kv] matmul; keys and values are
        # transposed after it. Asked for in the attention layouts directly, XLA:CPU computed a
        # one-token decoding step's projection as kernel^T @ x^T and transposed each kernel at
        # every step (a tenth of greedy generation).
        project = lambda name, init, x: jnp.einsum(
            "bld,dhk->blhk", x,
            self.param(name, nn.with_logical_partitioning(init, head_names),
                       (d_model, self.num_heads, self.d_kv), jnp.float32).astype(self.dtype))
        query = project("query", query_init, inputs_q)  # [b, q, heads, d_kv]
        project_kv = lambda: (project("key", kv_init, inputs_kv).transpose(0, 2, 3, 1),  # [b, heads, d_kv, k]
                              project("value", kv_init, inputs_kv).transpose(0, 2, 1, 3))  # [b, heads, k, d_kv]
        if decode and self.cross_attention:
            key, value = self._encoded_cache(project_kv)
        else:
            key, value = project_kv()
            if decode:
                key, value, mask = self._update_cache(key, value, mask)

        logits = jnp.einsum("bqhk,bhks->bhqs", query, key).astype(jnp.float32)  # [b, heads, q, k]
        if bias is not None:
            logits = logits + bias
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic)
        attended = jnp.einsum("bhqs,bhsk->bqhk", weights, value)  # [b, q, heads, d_kv]
        out_kernel = self.param("out", nn.with_logical_partitioning(fan_in_init(1.0, (-3, -2), (-1,), distribution="normal"),
                                                                    ("heads", "kv", "embed")),
                                (self.num_heads, self.d_kv, d_model), jnp.float32)
        return jnp.einsum("bqhk,hkd->bqd", attended, out_kernel.astype(self.dtype))

    def _encoded_cache(self, project_kv: Callable[[], tuple[Array, Array]]) -> tuple[Array, Array]:
        """The encoded sequence's keys and values: projected by the call that creates the cache, read after.

        Why not project at every step: XLA hoists the loop-invariant projection out of the decode
        loop but leaves the transpose into the dot's layout inside it (a transpose alone is not
        worth hoisting), which cost a third of greedy generation on CPU. An array carried by the
        loop (the cache) is laid out once, before it.
        """
        if self.has_variable("cache", "encoded_key"):
            return self.get_variable("cache", "encoded_key"), self.get_variable("cache", "encoded_value")
        key, value = project_kv()
        self.put_variable("cache", "encoded_key", key)
        self.put_variable("cache", "encoded_value", value)
        return key, value

    def _update_cache(self, key: Array, value: Array, mask: Array | None):
        """Writes this step's key/value at cache_index; attends over everything written so far."""
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not is_initialized:  # the init call only allocates [b, heads, d_kv, max_length] and [b, heads, max_length, d_kv]
            return key, value, mask
        steps = value.shape[2]
        max_length = cached_value.value.shape[2]
        index = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, 0, 0, index))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, 0, index, 0))
        cache_index.value = index + steps
        # Query at position index + i sees keys at positions <= index + i.
        query_pos = index + jnp.arange(steps)
        step_mask = (jnp.arange(max_length)[None, :] <= query_pos[:, None])[None, None]  # [1, 1, q, max_len]
        mask = step_mask if mask is None else jnp.logical_and(mask, step_mask)
        return cached_key.value, cached_value.value, mask


class Embed(nn.Module):
    """Token embedding; `attend` gives tied output logits."""

    vocab_size: int
    d_model: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.vocab_size, self.d_model), jnp.float32)

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("bld,vd->blv", x, self.embedding.astype(self.dtype))


def attention_mask(query_segments: Array, key_segments: Array, causal: bool = False) -> Array:
    """[b, q] and [b, k] segment ids (0 = padding) -> [b, 1, q, k] bool.

    Packed examples only see their own segment; padding sees nothing.
    """
    mask = (query_segments[:, :, None] == key_segments[:, None, :]) & (query_segments[:, :, None] > 0)
    if causal:
        q, k = query_segments.shape[1], key_segments.shape[1]
        mask = mask & (np.arange(q)[:, None] >= np.arange(k)[None, :])
    return mask[:, None]


def decoder_input_token_mask(decoder_input_tokens: Array) -> Array:
    """flaxformer's decoder padding mask, read from the decoder's inputs (flaxformer
    `components/attention/dense_attention.py:2319-2377`, applied to every decoder layer's output by
    `architectures/t5/t5_architecture.py:1215-1225`): [batch, length] int32 -> [batch, length] bool.

    A position is real when its input is not 0, when the next input is not 0 (the 0-BOS starting
    the next packed sequence), or it is position 0. Unlike `decoder_target_tokens > 0` this also
    counts the position after a sequence's EOS target (its input is the EOS).
    """
    next_input = jnp.pad(decoder_input_tokens[:, 1:], ((0, 0), (0, 1)))
    first = jnp.arange(decoder_input_tokens.shape[1])[None, :] == 0
    return (decoder_input_tokens > 0) | (next_input > 0) | first
