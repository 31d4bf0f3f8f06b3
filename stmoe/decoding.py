"""Greedy, beam and temperature / top-k decoding for the encoder-decoder, with a decoder KV cache.

Every decoder runs the same loop (`jax.lax.while_loop` over at most
`max_decode_length` steps, one jit per function and static shapes):
1. Encode the inputs once: `encoded` [batch, enc_len, d_model]. Beam search repeats it
   to [batch * beams, enc_len, d_model]; the beams of an example share one encoder pass.
2. Step t feeds the token chosen at t - 1 (the pad id 0 at t = 0: it is also the decoder
   start token) and reads the logits of position t. With the KV cache that is one
   position, [batch, 1], whose self-attention reads the keys / values of earlier steps
   from the 'cache' collection (layers.MultiHeadAttention); its cross-attention reads the
   keys / values of `encoded`, projected once before the loop (init_cache). With
   `use_cache=False` the whole prefix [batch, max_decode_length] is recomputed, positions
   > t marked as padding.
3. Choose the next token(s): argmax, a sample, or the beam update below.
4. Stop at max_decode_length or when every sequence is done (EOS, id 1).

The model runs deterministically (`enable_dropout=False`), so MoE layers use the eval
capacity factor. Cached steps route one token per sequence, so no token is ever dropped
there; a teacher-forced pass (`score`, `use_cache=False`) routes whole sequences, where a
tight capacity can drop tokens (and with `moe.decoder_priority="rank_major"` a later token's
first choice even outranks an earlier token's second choice: docs/design.md "Causal decoder
routing"). Cached and recomputed decoding therefore
agree exactly only while no token is dropped in the recomputed pass, e.g. with
eval capacity factor >= num_experts (as in the tests) or min_capacity >= decode length.
A fixed `moe.group_size` must divide batch (* beams): cached steps have one token per sequence.

The pad id is never emitted before EOS: a 0 inside a sequence could not be told apart
from padding when the output is fed back as targets (`score`). Its probability is not
renormalized away, so beam scores are the model's log-likelihoods and agree with `score`.

Outputs are the generated tokens without the start token, EOS included, then pad (0).

Everything is plain jit-traced array code: the functions run inside
`partitioning.activate(mesh)` with sharded params, and the model's logical sharding
constraints apply (batch * beams must then divide the data-parallel size).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

PAD_ID = 0  # padding, and the decoder start token
EOS_ID = 1


def jit_static(fn: Callable, **static) -> Callable:
    """jax.jit of `fn` with the static (hashable) arguments bound; one compiled function per binding
    (also used by stmoe.inference)."""
    return _jit_cached(fn, tuple(sorted(static.items())))


@functools.lru_cache(maxsize=None)
def _jit_cached(fn: Callable, static: tuple) -> Callable:
    return jax.jit(functools.partial(fn, **dict(static)))


def _unbox(params: PyTree) -> PyTree:
    """Accepts boxed (nn.Partitioned) or plain (possibly sharded) params."""
    return nn.meta.unbox(params)


def length_penalty(length: Array | int, alpha: float) -> Array:
    """GNMT / T5 length normalization ((5 + length) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ---------------------------------------------------------------------------------------------
# Model calls: the encoder once, the decoder one step at a time.


def _encode(model: nn.Module, params: PyTree, encoder_input_tokens: Array) -> tuple[Array, Array]:
    """[batch, enc_len] -> (encoded [batch, enc_len, d_model], encoder segment ids [batch, enc_len])."""
    segments = (encoder_input_tokens > 0).astype(jnp.int32)
    encoded = model.apply({"params": params}, encoder_input_tokens, segments, method="encode")
    return encoded, segments


def init_cache(model: nn.Module, params: PyTree, encoded: Array, encoder_segments: Array,
               max_decode_length: int) -> PyTree:
    """The 'cache' collection of a decoder that runs `max_decode_length` steps over `encoded`.

    Per decoder layer: self-attention `cached_key` [batch, heads, d_kv, max_decode_length] and
    `cached_value` [batch, heads, max_decode_length, d_kv] (zeros), `cache_index` [] (0);
    cross-attention `encoded_key` [batch, heads, d_kv, enc_len] and `encoded_value`
    [batch, heads, enc_len, d_kv], the projections of `encoded` [batch, enc_len, d_model].
    A decode-mode call with full-length inputs creates them; under jit nothing but these
    projections is computed (the call's logits are dead code), so it is jitted here too.
    """
    return jit_static(_allocate_cache, model=model, max_decode_length=max_decode_length)(
        params, encoded, encoder_segments)


def _allocate_cache(params: PyTree, encoded: Array, encoder_segments: Array, *, model: nn.Module,
                    max_decode_length: int) -> PyTree:
    tokens = jnp.ones((encoded.shape[0], max_decode_length), jnp.int32)
    _, variables = model.apply({"params": _unbox(params)}, encoded, encoder_segments, tokens, decode=True,
                               max_decode_length=max_decode_length, mutable=["cache"], method="decode")
    return variables["cache"]


def _step_logits(model: nn.Module, params: PyTree, encoded: Array, encoder_segments: Array, inputs: Array,
                 cache: PyTree | None, step: Array) -> tuple[Array, PyTree | None]:
    """Logits of decoder position `step` [batch, vocab] and the updated cache.

    inputs: decoder inputs [batch, max_decode_length]; positions <= step are filled (position 0
    is the start token). With a cache only position `step` is fed; without one the full buffer
    runs with positions > step marked as padding (segment id 0), so they are neither attended
    to nor routed to experts.
    """
    batch, max_length = inputs.shape
    if cache is not None:
        token = jax.lax.dynamic_slice_in_dim(inputs, step, 1, axis=1)  # [batch, 1]
        positions = jnp.full((batch, 1), step, jnp.int32)
        logits, variables = model.apply(
            {"params": params, "cache": cache}, encoded, encoder_segments, token, decoder_positions=positions,
            decode=True, max_decode_length=max_length, mutable=["cache"], method="decode")
        return logits[:, 0], variables["cache"]
    # Explicit segment ids: a generated token is real even where its id is 0 (the start token).
    segments = jnp.broadcast_to((jnp.arange(max_length) <= step).astype(jnp.int32), inputs.shape)
    logits = model.apply({"params": params}, encoded, encoder_segments, inputs, decoder_segment_ids=segments,
                         method="decode")  # [batch, max_length, vocab]
    return jax.lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False), None


def _no_pad(logits: Array) -> Array:
    """[..., vocab]: the pad id can never be chosen."""
    return logits.at[..., PAD_ID].set(-jnp.inf)


# ---------------------------------------------------------------------------------------------
# Greedy and sampling: one token per sequence and step.


def _autoregressive(params: PyTree, encoder_input_tokens: Array, rng: Array, temperature: Array, top_k: Array, *,
                    model: nn.Module, max_decode_length: int, eos_id: int, use_cache: bool, greedy: bool) -> Array:
    """The greedy / sampling loop. Returns tokens [batch, max_decode_length]."""
    batch = encoder_input_tokens.shape[0]
    encoded, encoder_segments = _encode(model, params, encoder_input_tokens)
    cache = init_cache(model, params, encoded, encoder_segments, max_decode_length) if use_cache else None

    def choose(logits: Array, key: Array) -> Array:  # [batch, vocab] -> [batch]
        if greedy:
            return jnp.argmax(_no_pad(logits), axis=-1)
        logits = _no_pad(logits) / temperature  # before top-k: the k kept must be choosable
        # top_k is traced (a sort instead of lax.top_k, which needs a static k); 0 keeps everything.
        descending = -jnp.sort(-logits, axis=-1)  # [batch, vocab]
        kth_best = jnp.take(descending, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1), axis=-1)[:, None]
        logits = jnp.where((top_k > 0) & (logits < kth_best), -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1)

    # sequences [batch, 1 + max_decode_length]: column 0 is the start token, column t + 1 the
    # token chosen at step t; the decoder inputs are the first max_decode_length columns.
    def body(state):
        step, sequences, done, cache, rng, params = state
        logits, cache = _step_logits(model, params, encoded, encoder_segments,
                                     sequences[:, :max_decode_length], cache, step)
        rng, key = jax.random.split(rng)
        token = jnp.where(done, PAD_ID, choose(logits, key)).astype(jnp.int32)
        sequences = jax.lax.dynamic_update_slice_in_dim(sequences, token[:, None], step + 1, axis=1)
        return step + 1, sequences, done | (token == eos_id), cache, rng, params

    def cond(state):
        step, _, done, _, _, _ = state
        return (step < max_decode_length) & ~jnp.all(done)

    state = (jnp.array(0, jnp.int32), jnp.zeros((batch, max_decode_length + 1), jnp.int32),
             jnp.zeros((batch,), bool), cache, rng, params)
    _, sequences, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    return sequences[:, 1:]


def greedy_decode(model: nn.Module, params: PyTree, encoder_input_tokens: Array, *, max_decode_length: int,
                  eos_id: int = EOS_ID, use_cache: bool = True) -> Array:
    """Argmax decoding. encoder_input_tokens [batch, enc_len] -> tokens [batch, max_decode_length]."""
    fn = jit_static(_autoregressive, model=model, max_decode_length=max_decode_length, eos_id=eos_id,
              use_cache=use_cache, greedy=True)
    return fn(_unbox(params), encoder_input_tokens, jax.random.key(0), jnp.float32(1.0), jnp.int32(0))


def sample(model: nn.Module, params: PyTree, encoder_input_tokens: Array, rng: Array, *, max_decode_length: int,
           temperature: float = 1.0, top_k: int = 0, eos_id: int = EOS_ID, use_cache: bool = True) -> Array:
    """Ancestral sampling from softmax(logits / temperature), restricted to the top_k tokens if top_k > 0.

    encoder_input_tokens [batch, enc_len] -> tokens [batch, max_decode_length]. `temperature` and
    `top_k` are traced: one compiled function serves every value.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy_decode for argmax), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    fn = jit_static(_autoregressive, model=model, max_decode_length=max_decode_length, eos_id=eos_id,
              use_cache=use_cache, greedy=False)
    return fn(_unbox(params), encoder_input_tokens, rng, jnp.float32(temperature), jnp.int32(top_k))


# ---------------------------------------------------------------------------------------------
# Beam search.


def _gather_beams(tree: PyTree, index: Array) -> PyTree:
    """Rows [batch, beams, ...] picked by index [batch, n] -> [batch, n, ...]."""
    return jax.tree.map(lambda x: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), 1),
                        tree)


def _gather_cache(cache: PyTree, index: Array) -> PyTree:
    """Cache rows [batch * beams, ...] of the parent beams index [batch, beams].

    Kept as they are: scalars (cache_index) and the encoder keys / values, which are the same
    for every beam of an example (copying them would cost a full cache copy per step).
    """
    batch, beams = index.shape
    flat = (jnp.arange(batch)[:, None] * beams + index).reshape(-1)  # [batch * beams]

    def gather(path, x):
        per_beam = x.ndim and path[-1].key not in ("encoded_key", "encoded_value")
        return x[flat] if per_beam else x

    return jax.tree_util.tree_map_with_path(gather, cache)


def _beam_search(params: PyTree, encoder_input_tokens: Array, alpha: Array, *, model: nn.Module, beam_size: int,
                 max_decode_length: int, eos_id: int, use_cache: bool) -> tuple[Array, Array]:
    """Beam search with an alive set and a finished set of `beam_size` each (as in tensor2tensor / t5x).

    Per step:
    1. Extend each alive beam by every token: log p(prefix) + log p(token) [batch, beams * vocab].
    2. Keep the 2 * beams best extensions: enough for `beams` of them not to end in EOS.
    3. Extensions that end in EOS, or reach max_decode_length, enter the finished set with score
       log p / length_penalty(length); the finished set keeps its `beams` best.
    4. The best `beams` extensions that do not end in EOS become the alive set; their parents'
       cache rows are gathered.
    5. An example is done when its worst finished score beats the best score any alive beam
       could still reach: log p(alive) / length_penalty(max_decode_length) (log p only falls,
       and for alpha >= 0 the penalty is largest at the maximum length).
    """
    batch = encoder_input_tokens.shape[0]
    beams, length = beam_size, max_decode_length
    encoded, encoder_segments = _encode(model, params, encoder_input_tokens)
    # Beams share the encoder pass: rows b * beams + j all read example b.
    encoded = jnp.repeat(encoded, beams, axis=0)  # [batch * beams, enc_len, d_model]
    encoder_segments = jnp.repeat(encoder_segments, beams, axis=0)
    cache = init_cache(model, params, encoded, encoder_segments, length) if use_cache else None
    neg_inf = jnp.float32(-jnp.inf)

    def body(state):
        step, alive_seqs, alive_logp, finished_seqs, finished_scores, cache = state
        vocab = model.config.vocab_size
        inputs = alive_seqs[:, :, :length].reshape(batch * beams, length)
        logits, cache = _step_logits(model, params, encoded, encoder_segments, inputs, cache, step)
        logp = _no_pad(jax.nn.log_softmax(logits, axis=-1)).reshape(batch, beams, vocab)
        # 1-2. [batch, 2 * beams] best extensions, their parent beams and tokens.
        extended = (alive_logp[:, :, None] + logp).reshape(batch, beams * vocab)
        top_logp, top_index = jax.lax.top_k(extended, 2 * beams)
        parent, token = top_index // vocab, top_index % vocab
        top_seqs = _gather_beams(alive_seqs, parent)  # [batch, 2 * beams, 1 + length]
        top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, token[:, :, None], step + 1, axis=2)
        ends = token == eos_id
        # 3. Finished set.
        new_scores = jnp.where(ends | (step == length - 1), top_logp / length_penalty(step + 1, alpha), neg_inf)
        all_scores = jnp.concatenate([finished_scores, new_scores], axis=1)  # [batch, 3 * beams]
        finished_scores, keep = jax.lax.top_k(all_scores, beams)
        finished_seqs = _gather_beams(jnp.concatenate([finished_seqs, top_seqs], axis=1), keep)
        # 4. Alive set.
        alive_logp, keep = jax.lax.top_k(jnp.where(ends, neg_inf, top_logp), beams)
        alive_seqs = _gather_beams(top_seqs, keep)
        if cache is not None:
            cache = _gather_cache(cache, jnp.take_along_axis(parent, keep, axis=1))
        return step + 1, alive_seqs, alive_logp, finished_seqs, finished_scores, cache

    def cond(state):
        step, _, alive_logp, _, finished_scores, _ = state
        best_reachable = alive_logp[:, 0] / length_penalty(length, alpha)  # alive_logp is sorted
        done = jnp.min(finished_scores, axis=1) > best_reachable
        return (step < length) & ~jnp.all(done)

    # Only beam 0 is alive at first; the others would duplicate it.
    alive_logp = jnp.where(jnp.arange(beams) == 0, 0.0, neg_inf) * jnp.ones((batch, 1), jnp.float32)
    sequences = jnp.zeros((batch, beams, length + 1), jnp.int32)
    state = (jnp.array(0, jnp.int32), sequences, alive_logp, sequences,
             jnp.full((batch, beams), neg_inf), cache)
    _, _, _, finished_seqs, finished_scores, _ = jax.lax.while_loop(cond, body, state)
    return finished_seqs[:, :, 1:], finished_scores


def beam_search(model: nn.Module, params: PyTree, encoder_input_tokens: Array, *, beam_size: int,
                max_decode_length: int, alpha: float = 0.6, eos_id: int = EOS_ID,
                use_cache: bool = True) -> tuple[Array, Array]:
    """Beam search with the GNMT / T5 length penalty ((5 + len) / 6) ** alpha.

    encoder_input_tokens [batch, enc_len] -> (tokens [batch, beams, max_decode_length], best first;
    scores [batch, beams] = sum of token log-probs (EOS included) / length_penalty(len)). A beam
    that reaches max_decode_length without EOS is finished there. `alpha` is traced (no recompile
    per value). Needs vocab_size > 2 * beam_size + 1.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (the early stop relies on it), got {alpha}")
    if model.config.vocab_size <= 2 * beam_size + 1:
        raise ValueError(f"vocab_size {model.config.vocab_size} is too small for beam_size {beam_size}")
    fn = jit_static(_beam_search, model=model, beam_size=beam_size, max_decode_length=max_decode_length,
              eos_id=eos_id, use_cache=use_cache)
    return fn(_unbox(params), encoder_input_tokens, jnp.float32(alpha))


# ---------------------------------------------------------------------------------------------
# Scoring.


def _score(params: PyTree, batch: Mapping[str, Array], *, model: nn.Module) -> Array:
    targets = batch["decoder_target_tokens"]
    logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                         targets, encoder_segment_ids=batch.get("encoder_segment_ids"),
                         decoder_segment_ids=batch.get("decoder_segment_ids"), enable_dropout=False)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [batch, length, vocab]
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [batch, length]
    weights = batch.get("decoder_loss_weights")
    weights = (targets > 0) if weights is None else weights
    return jnp.sum(target_logp * weights.astype(jnp.float32), axis=-1)


def score(model: nn.Module, params: PyTree, batch: Mapping[str, Array]) -> Array:
    """Teacher-forced log-likelihood per row [batch]: sum over positions of weight * log p(target).

    batch: encoder_input_tokens [batch, enc_len], decoder_input_tokens and decoder_target_tokens
    [batch, dec_len]; optional decoder_loss_weights (default: target != pad) and segment ids
    (a packed row is scored as one sum). Runs deterministically (eval capacity factor).
    """
    keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "encoder_segment_ids", "decoder_segment_ids")
    return jit_static(_score, model=model)(_unbox(params), {k: batch[k] for k in keys if k in batch})
