"""MoeLayer: route token groups to stacked experts and combine their outputs.

Algorithm (ST-MoE sec. 2; Switch sec. 2):
1. Flatten [batch, length, d] tokens into groups [groups, group_size, d]; capacity is
   counted per group (one group per sequence by default; `max_group_size` gives
   flaxformer's batch-wide groups, routing.flaxformer_num_groups).
2. The float32 router scores every token; routing.py decides which (expert, slot)
   each token occupies and with which weight (tokens-choose top-k or expert-choice).
3. Dispatch fills per-expert buffers [experts, groups, capacity, d]. Under a mesh the
   expert axis of that buffer is sharded over `expert` while the group axis of the
   tokens is sharded over (data, expert): the sharding constraint between the two
   makes XLA move tokens by all-to-all (partitioning.py).
4. Every expert runs the same T5 MLP on its buffer (stacked weights [experts, ...],
   experts may run in bfloat16): one batched matmul, or on CPU one expert after another
   (`expert_mlps`).
5. Combine brings each slot's output back to its token, times its weight (with tokens-choose
   and "gather", every token gathers its k slots). A token that got no slot receives zero
   and is carried by the residual connection.
6. The layer's raw loss terms and router health are sown into the 'moe' collection as one
   metrics.RouterStats (losses.py weighs and schedules the terms); with
   mutable=['intermediates'] also each token's choices (expert_index / wanted / kept, [batch, length, k]).

The dispatch implementations (dispatch.py) give the same numbers (tests).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe import metrics as moe_metrics
from stmoe import routing
from stmoe.config import ModelConfig
from stmoe.dispatch import DISPATCH, combine_gather_tokens, dropless_moe, ragged_mlp, resolve_dispatch
from stmoe.layers import ACTIVATIONS, constrain, fan_in_init, mlp_apply

Array = jax.Array


# Backends on which the experts run one after another (expert_mlps, sequential=True).
SEQUENTIAL_EXPERT_BACKENDS = ("cpu",)


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
      it ~1.5x faster than "egcd,edf"). What GPUs and TPUs run best, and what the SPMD
      partitioner splits when the experts are sharded over devices.
    - sequential: the experts one after another (lax.map). On XLA:CPU each expert's
      [rows, d_ff] intermediates (5 MiB at T=8192, E=32) stay in cache, where the batched
      matmuls write and read back [experts, rows, d_ff] (168 MiB each). Measured MoeLayer
      forward at T=8192, E=32 (README Performance): ~1.05x the FLOP-matched dense FFN against
      ~1.38x batched in the same process; 1.15x in the benchmark table. The backward keeps only
      each expert's matmul outputs (jax.checkpoint, dots saveable) and recomputes the
      activation: activation memory 0.64x the dense FFN's, where saving everything the loop
      body computes made it 1.7x (batched: 1.1x). With few rows per expert the loop's fixed
      costs show in the backward (T=2048, E=32, 160 rows: forward+backward 1.26x vs 1.19x).
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


def _expert_axis_split() -> int:
    """How many ways the current mesh splits the expert axis of the weights (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes(("expert",))[0]
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


class MoeLayer(nn.Module):
    """A sparse FFN: router + `num_experts` T5 MLPs with stacked weights.

    inputs: [batch, length, d_model] (already pre-normed), token_mask: [batch, length].
    `causal` marks a decoder layer: routers that look at other tokens are refused there.
    """

    config: ModelConfig
    causal: bool = False

    @nn.compact
    def __call__(self, inputs: Array, token_mask: Array, deterministic: bool = True) -> Array:
        cfg, moe = self.config, self.config.moe
        router_type = moe.router_for(self.causal)
        if self.causal and router_type == "experts_choose":
            raise ValueError("moe.router_type='experts_choose' cannot be used in a causal decoder: each "
                             "expert's choice depends on later tokens. Use 'tokens_choose' there.")
        batch, length, d_model = inputs.shape
        dtype = jnp.dtype(cfg.dtype)

        # 1. Token groups.
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
            pad_rows = pad_positions = 0
            group_size = moe.group_size or length
        num_tokens = batch * length
        if num_tokens % group_size:
            raise ValueError(f"moe.group_size={group_size} must divide batch * length = {num_tokens}")
        groups = num_tokens // group_size
        x = constrain(inputs.reshape(groups, group_size, d_model), ("batch", None, "embed"))
        mask = jnp.ones((groups, group_size), jnp.float32) if moe.route_padding else \
            token_mask.reshape(groups, group_size).astype(jnp.float32)

        # 2. Router (float32) and routing decisions.
        impl = resolve_dispatch(moe.dispatch)  # "auto" -> per backend; "dropless" refused on CPU
        if impl == "dropless" and router_type == "experts_choose":
            raise ValueError("moe.dispatch='dropless' needs moe.router_type='tokens_choose': expert choice "
                             "has a capacity by construction.")
        if impl == "dropless":
            capacity = group_size  # an expert can take every token of a group: nothing is dropped
        elif moe.expert_capacity is not None:
            capacity = min(moe.expert_capacity, group_size)  # more slots than tokens only compute padding
        else:
            factor = moe.eval_capacity_factor if deterministic else moe.train_capacity_factor
            capacity = routing.expert_capacity(group_size, moe.num_experts, factor, moe.min_capacity,
                                               moe.capacity_rounding)
        logits = routing.Router(moe.num_experts, moe.router_init_std, moe.jitter_noise, name="router")(
            x, deterministic)  # [g, t, e] float32
        probs = jax.nn.softmax(logits, axis=-1)
        if router_type == "experts_choose":
            route = routing.experts_choose_routing(probs, mask, capacity=capacity)
        else:
            use_random = moe.second_expert_policy == "random" and not deterministic and moe.top_k > 1
            route = routing.tokens_choose_routing(
                probs, mask, top_k=moe.top_k, capacity=capacity,
                second_expert_policy=moe.second_expert_policy,
                second_expert_threshold=moe.second_expert_threshold, normalize_gates=moe.normalize_gates,
                batch_prioritized=moe.batch_prioritized_for(self.causal),  # decoders: token order
                rng=self.make_rng("dropout") if use_random else None)

        # 3. Dispatch to [experts, groups, capacity, d]; the constraint is where the all-to-all happens.
        names = ("expert_wi_0", "expert_wi_1") if cfg.mlp_gated else ("expert_wi",)
        # Each expert is initialized as its own dense layer: the expert axis is a batch axis, not fan-in.
        expert_init = fan_in_init(1.0, (-2,), (-1,), batch_axes=(0,))
        wi_init = nn.with_logical_partitioning(expert_init, ("expert", "embed", "expert_mlp"))
        wi = [self.param(n, wi_init, (moe.num_experts, d_model, cfg.d_ff), jnp.float32) for n in names]
        wo = self.param("expert_wo", nn.with_logical_partitioning(expert_init, ("expert", "expert_mlp", "embed")),
                        (moe.num_experts, cfg.d_ff, d_model), jnp.float32)
        if impl == "dropless":
            dropout = lambda h: nn.Dropout(moe.expert_dropout_rate)(h, deterministic)
            # 3-5 without capacity: rows sorted by expert, grouped matmuls, weighted unsort (dispatch.py).
            experts = lambda rows, sizes: ragged_mlp(rows, sizes, wi, wo, ACTIVATIONS[cfg.mlp_activation],
                                                     dropout, dtype)
            outputs = dropless_moe(x.astype(dtype), route.expert_index, route.choice_weight, route.kept,
                                   moe.num_experts, experts)  # [g, t, d]
        else:
            dispatch, combine = DISPATCH[impl]
            expert_inputs = dispatch(x.astype(dtype), route.slot_token)
            expert_inputs = constrain(expert_inputs, ("expert", "expert_group", None, "embed"))

            # 4. Experts: the dense MLP's math on stacked weights [experts, ...], one [slots, d] matrix
            # per expert. On CPU one expert after another (cache-friendly, expert_mlps), unless the
            # experts are split over devices: then the batched matmul that the partitioner splits.
            shape = expert_inputs.shape
            sequential = jax.default_backend() in SEQUENTIAL_EXPERT_BACKENDS and _expert_axis_split() == 1
            use_dropout = moe.expert_dropout_rate > 0 and not deterministic
            expert_outputs = expert_mlps(
                expert_inputs.reshape(shape[0], -1, shape[-1]), wi, wo, cfg.mlp_activation, dtype,
                sequential=sequential, dropout_rate=moe.expert_dropout_rate,
                dropout_rng=self.make_rng("dropout") if use_dropout else None).reshape(shape)
            expert_outputs = constrain(expert_outputs, ("expert", "expert_group", None, "embed"))

            # 5. Combine back to token order. gather with tokens-choose: each token reads its k slots
            # (dispatch.combine_gather_tokens); expert choice bounds no token's slot count, so it scatters.
            if impl == "gather" and route.choice_slot is not None:
                # Group-major, sharded like the tokens: the all-to-all back, and the gather stays local.
                group_outputs = constrain(expert_outputs.transpose(1, 0, 2, 3), ("batch", None, None, "embed"))
                outputs = combine_gather_tokens(group_outputs, route.choice_slot, route.choice_weight)
            else:
                outputs = combine(expert_outputs, route.slot_token, route.slot_weight, group_size)  # [g, t, d]
        outputs = constrain(outputs, ("batch", None, "embed"))
        if moe.dropped_token_passthrough:
            # transformers 4.x Switch: a token that reached no expert keeps its input x its top-1 router prob.
            reached_none = ~jnp.any(route.kept, axis=-1, keepdims=True)
            outputs = outputs + jnp.where(reached_none, x * jnp.max(probs, axis=-1, keepdims=True), 0.0)

        # 6. This layer's raw loss terms and router health (losses.py weighs them).
        aux_loss = (jnp.zeros((), jnp.float32) if router_type == "experts_choose"
                    else routing.auxiliary_loss(moe.aux_loss_type, probs, route, mask))
        self.sow("moe", "stats", moe_metrics.router_stats(route, probs, mask, aux_loss=aux_loss,
                                                          router_z_loss=routing.router_z_loss(logits, mask)))
        # Opt-in per-token routing for stmoe.tracing: stored only under mutable=['intermediates'].
        unpad = lambda a: a.reshape(batch, length, -1)[:batch - pad_rows, :length - pad_positions]
        self.sow("intermediates", "routing", {name: unpad(getattr(route, name))
                                              for name in ("expert_index", "wanted", "kept")})
        outputs = outputs.reshape(batch, length, d_model)
        return outputs[:batch - pad_rows, :length - pad_positions].astype(dtype)
