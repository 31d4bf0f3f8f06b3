"""MoeLayer: route token groups to stacked experts and combine their outputs.

Algorithm (ST-MoE sec. 2; Switch sec. 2):
1. Flatten [batch, length, d] tokens into groups [groups, group_size, d]; capacity is
   counted per group (one group per sequence by default; `max_group_size` gives
   flaxformer's batch-wide groups, routing.flaxformer_num_groups).
2. The router (float32: moe.router_dtype) scores every token; routing.py decides which (expert, slot)
   each token occupies and with which weight (tokens-choose top-k or expert-choice), in a decoder
   in moe.decoder_priority's order (position-major: causal; docs/design.md).
3. Dispatch fills per-expert buffers [experts, groups, capacity, d]. Under a mesh the
   expert axis of that buffer is sharded over `expert` while the group axis of the
   tokens is sharded over (data, expert): the sharding constraint between the two
   makes XLA move tokens by all-to-all (partitioning.py).
4. Every expert runs the same T5 MLP on its buffer (stacked weights [experts, ...],
   experts may run in bfloat16): one batched matmul, or one expert after another
   (`expert_mlps`; moe.expert_execution). With expert_execution "grouped" (one CPU device)
   3-5 compute only the kept rows (`grouped_experts`): same routing and results, no empty slot.
5. Combine brings each slot's output back to its token, times its weight (with tokens-choose
   and "gather", every token gathers its k slots). A token that got no slot receives zero
   and is carried by the residual connection. With dispatch "dropless", 3-5 are one sorted,
   grouped computation without capacity (`grouped_experts`), and so is a group of one token (a
   cached decoding step), which no capacity >= 1 can drop: its k choices cost k rows, not every
   expert's slots.
6. The layer's raw loss terms and router health are sown into the 'moe' collection as one
   metrics.RouterStats (losses.py weighs and schedules the terms); with
   mutable=['intermediates'] also each token's choices (expert_index / wanted / kept, [batch, length, k]).

The dispatch implementations (dispatch.py) give the same numbers (tests). The layer reads its
choices from the config only: dispatch, expert execution and the grouped-matmul kernel are resolved
from the backend and the mesh when the model is built (dispatch.resolve_model), the combine follows from them
(dispatch.combine_for), and the config was validated once (config.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stmoe import metrics as moe_metrics
from stmoe import routing
from stmoe.config import ModelConfig
from stmoe.dispatch import COMBINE, DISPATCH, combine_for, combine_gather_tokens, dropless_moe, ragged_mlp
from stmoe.grouped_matmul import dropless_moe_tiled, grouped_mlp, t5_hidden
from stmoe.layers import ACTIVATIONS, constrain, fan_in_init, mlp_apply

Array = jax.Array


def expert_dropout(hidden: Array, rng: Array | None, rate: float) -> Array:
    """Inverted dropout, as nn.Dropout: keep with probability 1 - rate and scale by 1 / (1 - rate)."""
    if rng is None or rate == 0.0:
        return hidden
    keep = jax.random.bernoulli(rng, 1.0 - rate, hidden.shape)
    return jnp.where(keep, hidden / (1.0 - rate), jnp.zeros_like(hidden))


def expert_mlps(x: Array, wi: list[Array], wo: Array, activation: str, dtype, *, sequential: bool,
                dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
    """Every expert's T5 MLP (layers.mlp_apply) on its own rows.

    x: [experts, rows, d]; wi: one (gated: two) [experts, d, d_ff]; wo: [experts, d_ff, d]
    -> [experts, rows, d]. With `dropout_rng`, dropout on the hidden layer; expert e's mask is
    drawn from the e-th key of jax.random.split(dropout_rng, experts) in both modes, so the
    modes (and mesh layouts) drop the same units.

    - batched (sequential=False): one batched matmul per weight, "e(rows)d,edf" (XLA:CPU runs
      it faster than "egcd,edf"). What GPUs and TPUs run best, and what the SPMD partitioner
      splits when the experts are sharded over devices.
    - sequential: the experts one after another (lax.map). On XLA:CPU each expert's
      [rows, d_ff] intermediates stay in cache, where the batched matmuls write and read back
      [experts, rows, d_ff]. The backward keeps only each expert's matmul outputs
      (jax.checkpoint, dots saveable) and recomputes the activation, so the loop saves less
      activation memory than the batched form instead of more. With few rows per expert the
      loop's fixed per-expert costs show in the backward. Figures: docs/performance.md
      (scripts/benchmark_moe.py).
    Which one a model runs is moe.expert_execution, resolved when the model is built
    (dispatch.resolve_model).
    """
    num_experts = x.shape[0]
    keys = None if dropout_rng is None or dropout_rate == 0.0 else jax.random.split(dropout_rng, num_experts)

    def one_expert(args):  # x [rows, d], wi [d, d_ff] (x2 gated), wo [d_ff, d], key -> [rows, d]
        rows, *w, key = args
        dropout = lambda h: expert_dropout(h, key, dropout_rate)
        return mlp_apply(rows, w[:-1], w[-1], activation, dropout, dtype)

    if sequential:
        one_expert = jax.checkpoint(one_expert, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        return jax.lax.map(one_expert, (x, *wi, wo, keys))
    dropout = lambda h: h if keys is None else jax.vmap(lambda hid, key: expert_dropout(hid, key, dropout_rate))(h, keys)
    return mlp_apply(x, wi, wo, activation, dropout, dtype, prefix="e")


def grouped_experts(x: Array, route: routing.Routing, wi: list[Array], wo: Array, cfg: ModelConfig,
                    dropout_rng: Array | None = None) -> Array:
    """Steps 3-5 as grouped matmuls: every kept (token, choice) row through its expert, weighted sum back.

    Which rows are kept is `route.kept`: every choice with dispatch "dropless", the choices that
    got a slot with expert_execution "grouped" (so the result equals the slot dispatch's; expert
    dropout draws its masks per tile, a different draw from the slot loop's).

    x: [groups, tokens, d] -> [groups, tokens, d]. moe.grouped_kernel: "tiled" (grouped_matmul.py,
    CPU) or "ragged_dot" (dispatch.ragged_mlp, GPU/TPU), resolved per backend by
    dispatch.resolve_model; an unresolved "auto" runs the tiled loop, which is right on every
    backend. Expert dropout on the hidden layer when `dropout_rng` is given.
    """
    moe, dtype = cfg.moe, jnp.dtype(cfg.dtype)
    activation = ACTIVATIONS[cfg.mlp_activation]
    rate = moe.expert_dropout_rate if dropout_rng is not None else 0.0
    if moe.grouped_kernel != "ragged_dot":
        hidden = t5_hidden(activation, rate)
        experts = lambda rows, layout, tile: grouped_mlp(rows, wi, wo, layout, tile, hidden, dtype, dropout_rng)
        return dropless_moe_tiled(x, route.expert_index, route.choice_weight, route.kept, moe.num_experts, experts)
    dropout = lambda h: expert_dropout(h, dropout_rng, rate)
    experts = lambda rows, sizes: ragged_mlp(rows, sizes, wi, wo, activation, dropout, dtype)
    return dropless_moe(x, route.expert_index, route.choice_weight, route.kept, moe.num_experts, experts)


class MoeLayer(nn.Module):
    """A sparse FFN: router + `num_experts` T5 MLPs with stacked weights.

    inputs: [batch, length, d_model] (already pre-normed), token_mask: [batch, length].
    `causal` marks a decoder layer: routers that look at other tokens are refused there.
    """

    config: ModelConfig
    causal: bool = False

    def _token_groups(self, inputs: Array, token_mask: Array) -> tuple[Array, Array, Array, tuple[int, int]]:
        """[batch, length, d] -> tokens [groups, group_size, d], routing mask and real-token mask
        [groups, group_size] (they differ with route_padding: padding is routed but counts in no
        statistic) and the (rows, positions) of padding added for flaxformer's batch-wide groups."""
        moe = self.config.moe
        batch, length, d_model = inputs.shape
        if moe.zero_padding_inputs:  # flaxformer's routed padding: zero vectors (t5_architecture.py:319-320)
            inputs = inputs * token_mask[..., None].astype(inputs.dtype)
        pad_rows = pad_positions = 0
        if moe.max_group_size is not None:
            # flaxformer's batch-wide groups: zero-pad rows or positions to a multiple of the group
            # count (padding is routed only with route_padding, as there), then its group count.
            pad_rows, pad_positions = routing.flaxformer_padding(batch, length, moe.num_groups_multiple)
            inputs = jnp.pad(inputs, ((0, pad_rows), (0, pad_positions), (0, 0)))
            token_mask = jnp.pad(token_mask, ((0, pad_rows), (0, pad_positions)))
            batch, length = batch + pad_rows, length + pad_positions
            group_size = batch * length // routing.flaxformer_num_groups(
                batch * length, moe.max_group_size, moe.num_groups_multiple)
        else:
            group_size = moe.group_size or length
        if (batch * length) % group_size:
            raise ValueError(f"moe.group_size={group_size} must divide batch * length = {batch * length}")
        groups = batch * length // group_size
        x = constrain(inputs.reshape(groups, group_size, d_model), ("batch", None, "embed"))
        real = token_mask.reshape(groups, group_size).astype(jnp.float32)
        mask = jnp.ones((groups, group_size), jnp.float32) if moe.route_padding else real
        return x, mask, real, (pad_rows, pad_positions)

    def _capacity(self, group_size: int, deterministic: bool) -> int:
        return routing.layer_capacity(self.config.moe, group_size, deterministic)

    def _route(self, router_type: str, probs: Array, mask: Array, capacity: int, deterministic: bool,
               sequence_length: int) -> routing.Routing:
        moe = self.config.moe
        if router_type == "experts_choose":
            return routing.experts_choose_routing(probs, mask, capacity=capacity)
        use_random = moe.second_expert_policy == "random" and not deterministic and moe.top_k > 1
        priority = moe.priority_for(self.causal)
        groups, group_size = mask.shape
        token_position = None
        if priority == "position_major" and sequence_length % group_size:
            # A group spans several sequences (or parts of two): serve it by position in the sequence, so
            # that position t of one row never waits for a later position of an earlier row.
            flat = np.arange(groups * group_size, dtype=np.int32) % sequence_length
            token_position = jnp.asarray(flat.reshape(groups, group_size))
        return routing.tokens_choose_routing(
            probs, mask, top_k=moe.top_k, capacity=capacity, second_expert_policy=moe.second_expert_policy,
            second_expert_threshold=moe.second_expert_threshold, normalize_gates=moe.normalize_gates,
            batch_prioritized=moe.batch_prioritized_for(self.causal),  # decoders: token order
            priority=priority, token_position=token_position,
            rng=self.make_rng("dropout") if use_random else None)

    def _expert_weights(self, d_model: int) -> tuple[list[Array], Array]:
        cfg = self.config
        names = ("expert_wi_0", "expert_wi_1") if cfg.mlp_gated else ("expert_wi",)
        # Each expert is initialized as its own dense layer: the expert axis is a batch axis, not fan-in.
        expert_init = fan_in_init(1.0, (-2,), (-1,), batch_axes=(0,))
        wi_init = nn.with_logical_partitioning(expert_init, ("expert", "embed", "expert_mlp"))
        wi = [self.param(n, wi_init, (cfg.moe.num_experts, d_model, cfg.d_ff), jnp.float32) for n in names]
        wo = self.param("expert_wo", nn.with_logical_partitioning(expert_init, ("expert", "expert_mlp", "embed")),
                        (cfg.moe.num_experts, cfg.d_ff, d_model), jnp.float32)
        return wi, wo

    def _experts(self, expert_inputs: Array, wi: list[Array], wo: Array, deterministic: bool) -> Array:
        """[experts, groups, capacity, d] -> the same shape: each expert's MLP on its own slots."""
        cfg, moe = self.config, self.config.moe
        shape = expert_inputs.shape
        use_dropout = moe.expert_dropout_rate > 0 and not deterministic
        outputs = expert_mlps(
            expert_inputs.reshape(shape[0], -1, shape[-1]), wi, wo, cfg.mlp_activation, jnp.dtype(cfg.dtype),
            sequential=moe.expert_execution != "batched", dropout_rate=moe.expert_dropout_rate,
            dropout_rng=self.make_rng("dropout") if use_dropout else None)
        return outputs.reshape(shape)

    @nn.compact
    def __call__(self, inputs: Array, token_mask: Array, deterministic: bool = True) -> Array:
        cfg, moe = self.config, self.config.moe
        router_type = moe.router_for(self.causal)
        if self.causal and router_type == "experts_choose":
            raise ValueError("moe.router_type='experts_choose' cannot be used in a causal decoder: each "
                             "expert's choice depends on later tokens. Use 'tokens_choose' there.")
        if moe.dispatch not in DISPATCH and moe.dispatch != "dropless":
            raise ValueError(f"moe.dispatch={moe.dispatch!r} is resolved when the model is built: "
                             "EncoderDecoder(partitioning.resolve_model(config, mesh)) (dispatch.resolve_model)")
        batch, length, d_model = inputs.shape
        dtype = jnp.dtype(cfg.dtype)

        # 1. Token groups [groups, group_size, d] and the routing mask.
        x, mask, real_mask, (pad_rows, pad_positions) = self._token_groups(inputs, token_mask)
        group_size = x.shape[1]

        # 2. Router (float32 unless moe.router_dtype says otherwise) and routing decisions.
        logits = routing.Router(moe.num_experts, moe.router_init_std, moe.jitter_noise, jnp.dtype(moe.router_dtype),
                                name="router")(x, deterministic)  # [g, t, e] router_dtype
        probs = routing.router_probabilities(logits)  # [g, t, e] float32
        capacity = self._capacity(group_size, deterministic)
        route = self._route(router_type, probs, mask, capacity, deterministic, length + pad_positions)
        wi, wo = self._expert_weights(d_model)

        if (moe.dispatch == "dropless" or moe.expert_execution == "grouped"
                or (group_size == 1 and router_type == "tokens_choose")):
            # 3-5 as grouped matmuls over the kept (token, choice) rows only, sorted by expert, and a
            # weighted unsort. Dropless: every choice is kept. "grouped": the capacity-limited routing
            # above decided which are kept, so the result is the capacity dispatch's, without
            # computing empty slots. A group of one token (capacity >= 1 always) drops nothing, so
            # this is the same result at k rows' cost.
            use_dropout = moe.expert_dropout_rate > 0 and not deterministic
            outputs = grouped_experts(x.astype(dtype), route, wi, wo, cfg,
                                      dropout_rng=self.make_rng("dropout") if use_dropout else None)  # [g, t, d]
        else:
            # 3. Dispatch to [experts, groups, capacity, d]; the constraint is where the all-to-all happens.
            expert_inputs = DISPATCH[moe.dispatch](x.astype(dtype), route.slot_token)
            expert_inputs = constrain(expert_inputs, ("expert", "expert_group", None, "embed"))
            # 4. Experts: the dense MLP's math on stacked weights, one [slots, d] matrix per expert.
            expert_outputs = constrain(self._experts(expert_inputs, wi, wo, deterministic),
                                       ("expert", "expert_group", None, "embed"))
            # 5. Combine back to token order (dispatch.combine_for).
            combine = combine_for(moe.dispatch, router_type)
            if combine == "gather_tokens":
                # Group-major, sharded like the tokens: the all-to-all back, and the gather stays local.
                group_outputs = constrain(expert_outputs.transpose(1, 0, 2, 3), ("batch", None, None, "embed"))
                outputs = combine_gather_tokens(group_outputs, route.choice_slot, route.choice_weight)
            else:
                outputs = COMBINE[combine](expert_outputs, route.slot_token, route.slot_weight, group_size)
        outputs = constrain(outputs, ("batch", None, "embed"))  # [g, t, d]
        if moe.dropped_token_passthrough:
            # transformers 4.x Switch: a token that reached no expert keeps its input x its top-1 router prob.
            reached_none = ~jnp.any(route.kept, axis=-1, keepdims=True)
            outputs = outputs + jnp.where(reached_none, x * jnp.max(probs, axis=-1, keepdims=True), 0.0)

        # 6. This layer's raw loss terms and router health (losses.py weighs them).
        aux_loss = (jnp.zeros((), jnp.float32) if router_type == "experts_choose"
                    else routing.auxiliary_loss(moe.aux_loss_type, probs, route, mask))
        # The loss terms see what was routed (routed padding too, as Hugging Face computes them); the
        # health statistics count real tokens only, or a short input in a padded batch would report
        # mostly its padding (route_padding).
        self.sow("moe", "stats", moe_metrics.router_stats(route, probs, real_mask, aux_loss=aux_loss,
                                                          router_z_loss=routing.router_z_loss(logits, mask)))
        # Opt-in per-token routing for stmoe.tracing: stored only under mutable=['intermediates'].
        padded_batch, padded_length = batch + pad_rows, length + pad_positions
        unpad = lambda a: a.reshape(padded_batch, padded_length, -1)[:batch, :length]
        self.sow("intermediates", "routing", {name: unpad(getattr(route, name))
                                              for name in ("expert_index", "wanted", "kept")})
        return outputs.reshape(padded_batch, padded_length, d_model)[:batch, :length].astype(dtype)
