"""t5x checkpoint -> stmoe: file layout, name mapping, logits, and flaxformer's routing semantics.

The t5x checkpoint is written here in the layout t5x/checkpoints.py writes (msgpack `checkpoint` file
`{'version': 3, 'optimizer': {'target', 'state'}}`, 2-D+ arrays as zarr tensorstores referenced by
relative specs, small ones inline), with flaxformer's parameter names and shapes listed by hand
below from flaxformer's modules (not from the converter). The expected stmoe params come from a
hand-written mapping; routing semantics are checked against numpy ports of flaxformer's
TokensChooseMaskedRouter, group count and padding (flaxformer/architectures/moe/routing.py:542-644,
moe_layers.py:154-178, 715-901).
"""
from __future__ import annotations

import importlib.util
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe import inference, partitioning, routing
from stmoe.config import ConfigError, ModelConfig, MoeConfig
from stmoe.interop import t5x
from stmoe.models import EncoderDecoder
from stmoe.moe import MoeLayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, D, HEADS, DKV, DFF, EXPERTS, LAYERS = 384, 32, 2, 8, 48, 4, 4
SPARSE = (1, 3)  # flaxformer MIXED layout with num_sparse_layers=2 of 4: i % 2 == 1


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flaxformer_params(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny ST-MoE (sparse-dense, untied logits, gated gelu) in flaxformer's names and shapes."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embedder/embedding": (VOCAB, D), "decoder/logits_dense/kernel": (D, VOCAB),
              "encoder/encoder_norm/scale": (D,), "decoder/decoder_norm/scale": (D,),
              "encoder/relpos_bias/rel_embedding": (HEADS, 32), "decoder/relpos_bias/rel_embedding": (HEADS, 32)}
    stacks = (("encoder", ("attention",)), ("decoder", ("self_attention", "encoder_decoder_attention")))
    for stack, attentions in stacks:
        for i in range(LAYERS):
            p = f"{stack}/layers_{i}/"
            norms = ["pre_attention_layer_norm"] if stack == "encoder" else \
                ["pre_self_attention_layer_norm", "pre_cross_attention_layer_norm"]
            for norm in norms + ["pre_mlp_layer_norm"]:
                shapes[p + norm + "/scale"] = (D,)
            for attn in attentions:  # DenseGeneral with reshape_kernel: [d, heads * d_kv], out [heads * d_kv, d]
                for name in ("query", "key", "value"):
                    shapes[p + f"{attn}/{name}/kernel"] = (D, HEADS * DKV)
                shapes[p + f"{attn}/out/kernel"] = (HEADS * DKV, D)
            if i in SPARSE:
                shapes[p + "mlp/router/router_weights/w/kernel"] = (D, EXPERTS)
                shapes[p + "mlp/expert/wi_0/kernel"] = (EXPERTS, D, DFF)
                shapes[p + "mlp/expert/wi_1/kernel"] = (EXPERTS, D, DFF)
                shapes[p + "mlp/expert/wo/kernel"] = (EXPERTS, DFF, D)
                shapes[p + "pre_extra_mlp_layer_norm/scale"] = (D,)
                for name, shape in (("wi_0", (D, DFF)), ("wi_1", (D, DFF)), ("wo", (DFF, D))):
                    shapes[p + f"extra_mlp/{name}/kernel"] = shape
            else:
                for name, shape in (("wi_0", (D, DFF)), ("wi_1", (D, DFF)), ("wo", (DFF, D))):
                    shapes[p + f"mlp/{name}/kernel"] = shape
    out = {}
    for name, shape in shapes.items():
        fan_in = shape[-2] if len(shape) > 1 else 1
        scale = 1.0 if name.endswith(("embedding", "rel_embedding")) else 1.0 / np.sqrt(fan_in)
        value = rng.normal(size=shape) * scale
        out[name] = (1.0 + 0.1 * value if name.endswith("/scale") else value).astype(np.float32)
    return out


def _nest(flat):
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def write_t5x_checkpoint(step_dir: str, target: dict[str, np.ndarray]) -> None:
    """t5x/checkpoints.py's legacy layout: arrays of rank >= 2 (partitioned ones, in t5x) go to zarr
    tensorstores at `<step_dir>/target.<name with . for />` with a relative spec in the msgpack
    (:350-376, :877-921); the rest inline. Optimizer param_states come along and must be ignored."""
    import tensorstore as ts
    from flax import serialization

    os.makedirs(step_dir, exist_ok=True)
    written = {}
    for name, value in target.items():
        if value.ndim < 2:
            written[name] = value
            continue
        relative = ("target/" + name).replace("/", ".")
        spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": relative},
                "metadata": {"compressor": {"id": "gzip"}, "shape": list(value.shape),
                             "chunks": [max(1, s // 2) for s in value.shape]}}
        absolute = dict(spec, kvstore={"driver": "file", "path": os.path.join(step_dir, relative)})
        ts.open(absolute, create=True, delete_existing=True).result().write(value).result()
        written[name] = spec
    state = {"step": np.int32(100),
             "param_states": {"token_embedder": {"embedding": {"v_row": np.ones((VOCAB,), np.float32)}}}}
    contents = {"version": 3, "optimizer": {"target": _nest(written), "state": state}}
    with open(os.path.join(step_dir, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(contents))


def hand_mapping(ff: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """flaxformer names -> stmoe's '/'-paths, written out by hand (models.py, layers.py, moe.py)."""
    out = {"token_embedder/embedding": ff["token_embedder/embedding"],
           "decoder/logits_dense": ff["decoder/logits_dense/kernel"]}
    for stack in ("encoder", "decoder"):
        out[f"{stack}/final_norm/scale"] = ff[f"{stack}/{stack}_norm/scale"]
        out[f"{stack}/relative_position_bias/rel_embedding"] = ff[f"{stack}/relpos_bias/rel_embedding"]
        for i in range(LAYERS):
            src, dst = f"{stack}/layers_{i}/", f"{stack}/layers_{i}/"
            if stack == "encoder":
                pairs = [("pre_attention_layer_norm", "pre_attention_norm", "attention")]
            else:
                pairs = [("pre_self_attention_layer_norm", "pre_self_attention_norm", "self_attention"),
                         ("pre_cross_attention_layer_norm", "pre_cross_attention_norm", "encoder_decoder_attention")]
            for norm_src, norm_dst, attn in pairs:
                out[dst + norm_dst + "/scale"] = ff[src + norm_src + "/scale"]
                for name in ("query", "key", "value"):
                    out[dst + f"{attn}/{name}"] = ff[src + f"{attn}/{name}/kernel"].reshape(D, HEADS, DKV)
                out[dst + f"{attn}/out"] = ff[src + f"{attn}/out/kernel"].reshape(HEADS, DKV, D)
            out[dst + "ffn/pre_mlp_norm/scale"] = ff[src + "pre_mlp_layer_norm/scale"]
            if i in SPARSE:
                out[dst + "ffn/moe/router/kernel"] = ff[src + "mlp/router/router_weights/w/kernel"]
                for name in ("wi_0", "wi_1", "wo"):
                    out[dst + f"ffn/moe/expert_{name}"] = ff[src + f"mlp/expert/{name}/kernel"]
                    out[dst + f"ffn/extra_mlp/{name}"] = ff[src + f"extra_mlp/{name}/kernel"]
                out[dst + "ffn/pre_extra_mlp_norm/scale"] = ff[src + "pre_extra_mlp_layer_norm/scale"]
            else:
                for name in ("wi_0", "wi_1", "wo"):
                    out[dst + f"ffn/mlp/{name}"] = ff[src + f"mlp/{name}/kernel"]
    return out


# The config the t5x ST-MoE gins describe for this model, written out by hand (module docstring of
# stmoe/interop/t5x.py lists the flaxformer lines behind each value).
HAND_CONFIG = ModelConfig(
    vocab_size=VOCAB, d_model=D, d_ff=DFF, num_heads=HEADS, d_kv=DKV, num_encoder_layers=LAYERS,
    num_decoder_layers=LAYERS, mlp_activation="gelu", mlp_gated=True, dropout_rate=0.0,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, tie_embeddings=False,
    sparse_interval=2, sparse_dense=True,
    moe=MoeConfig(num_experts=EXPERTS, top_k=2, second_expert_policy="all", normalize_gates=False,
                  train_capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4, capacity_rounding="round",
                  max_group_size=4096, num_groups_multiple=EXPERTS, route_padding=True, zero_padding_inputs=True,
                  aux_loss_type="switch_all_k", decoder_priority="rank_major"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(flaxformer params, stmoe run dir, script stdout) after `--from t5x MODEL_DIR --to stmoe OUT`."""
    root = tmp_path_factory.mktemp("t5x")
    ff = flaxformer_params()
    write_t5x_checkpoint(str(root / "model" / "checkpoint_100"), ff)
    out = root / "stmoe"
    import contextlib
    import io
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = _script("convert_checkpoint").main(
            ["--from", "t5x", str(root / "model"), "--to", "stmoe", str(out), "--num_heads", str(HEADS),
             "--preset", "tiny"])
    assert status == 0
    return ff, str(out), stdout.getvalue()


def test_every_parameter_lands_in_place(converted):
    ff, out, report = converted
    loaded = inference.load(out)
    got = {"/".join(k): np.asarray(v) for k, v in
           flax.traverse_util.flatten_dict(jax.device_get(loaded.params)).items()}
    want = hand_mapping(ff)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    # The loader builds the model from the run's config resolved for this backend and mesh.
    assert loaded.config == partitioning.resolve_model(HAND_CONFIG, loaded.mesh)
    # AUX_LOSS_FACTOR / ROUTER_Z_LOSS_FACTOR of the gins (tokens_choose_base.gin:39, st_moe_base.gin:17)
    assert (loaded.run_config.loss.balance_coef, loaded.run_config.loss.router_z_coef) == (0.01, 1e-4)
    # Counts per kind, from the hand list: 4 + 8 attention blocks x 4 kernels; 4 dense + 4 extra MLPs
    # x 3 kernels; 4 sparse layers x 3 expert kernels; norms 4 x 2 + 4 x 3 + 4 extra + 2 final.
    assert ("tensors mapped: embeddings 1, attention 48, dense mlp 24, experts 12, routers 4, norms 26, "
            "position bias 2, logits 1") in report
    assert "moe.normalize_gates=False" in report and "moe.route_padding=True" in report
    assert "moe.decoder_priority='rank_major'" in report


def test_logits_match_hand_mapping(converted):
    ff, out, _ = converted
    loaded = inference.load(out)
    rng = np.random.default_rng(1)
    enc = rng.integers(3, VOCAB, (4, 12)).astype(np.int32)
    dec = rng.integers(3, VOCAB, (4, 8)).astype(np.int32)
    enc[1, 9:] = 0  # padding: routed, as in t5x
    apply = lambda model, params: np.asarray(jax.jit(lambda p: model.apply({"params": p}, enc, dec, dec,
                                                                         enable_dropout=False))(params))
    want = apply(EncoderDecoder(HAND_CONFIG), _nest({k: jnp.asarray(v) for k, v in hand_mapping(ff).items()}))
    got = apply(loaded.model, jax.device_get(loaded.params))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.std(want) > 0.1


def test_orbax_and_scanned_layouts_give_the_same_params(converted, tmp_path):
    ff, _, _ = converted
    import orbax.checkpoint as ocp
    state = tmp_path / "checkpoint_7" / "state"  # t5x's orbax layout (checkpoints.py:2367)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(str(state), {"target": _nest(ff), "state": {"step": np.int32(7)}})
    flat, directory = t5x.read_target(str(tmp_path))
    assert directory == str(state) and sorted(flat) == sorted(ff)
    reference = t5x.convert(ff, t5x.Options(num_heads=HEADS))
    # Scanned: encoder/encoder/subblock_{j}/..., blocks of 2 layers stacked on axis 1 (t5_architecture.py:735).
    scanned = {k: v for k, v in ff.items() if "/layers_" not in k}
    for stack in ("encoder", "decoder"):
        names = {k.split("/", 2)[2] for k in ff if k.startswith(f"{stack}/layers_1/")}
        names_dense = {k.split("/", 2)[2] for k in ff if k.startswith(f"{stack}/layers_0/")}
        for j, subnames in ((0, names_dense), (1, names)):
            for rest in subnames:
                blocks = [ff[f"{stack}/layers_{b * 2 + j}/{rest}"] for b in range(LAYERS // 2)]
                scanned[f"{stack}/{stack}/subblock_{j}/{rest}"] = np.stack(blocks, axis=1)
    cfg, mapped, _ = t5x.convert(scanned, t5x.Options(num_heads=HEADS))
    assert cfg == reference[0]
    for path, value in reference[1].items():
        np.testing.assert_array_equal(mapped[path], value, err_msg=path)


def test_fused_mlp_and_split_head_kernels(converted):
    """MlpBlock(fuse_kernels=True) stores wi_fused [(E,) d, 2, d_ff] (dense.py:358-370); split_head_kernel
    stores attention kernels [d, heads, d_kv] / [heads, d_kv, d] (dense_attention.py:788): the same params
    come out, and --num_heads is not needed."""
    ff, _, _ = converted
    reference = t5x.convert(ff, t5x.Options(num_heads=HEADS))
    variant = {}
    for name, value in ff.items():
        if name.endswith(("/query/kernel", "/key/kernel", "/value/kernel")):
            variant[name] = value.reshape(D, HEADS, DKV)
        elif name.endswith("/out/kernel"):
            variant[name] = value.reshape(HEADS, DKV, D)
        elif name.endswith("/wi_0/kernel"):
            variant[name.replace("wi_0", "wi_fused")] = np.stack([value, ff[name.replace("wi_0", "wi_1")]], axis=-2)
        elif not name.endswith("/wi_1/kernel"):
            variant[name] = value
    cfg, mapped, counts = t5x.convert(variant, t5x.Options())
    assert cfg == reference[0] and sorted(mapped) == sorted(reference[1])
    for path, value in reference[1].items():
        np.testing.assert_array_equal(mapped[path], value, err_msg=path)
    with pytest.raises(t5x.ConversionError, match="--num_heads"):
        t5x.convert(ff, t5x.Options())


# ------------------------------------------------------------------ routing semantics vs flaxformer


def _flaxformer_masked_router(probs: np.ndarray, k: int, capacity: int) -> np.ndarray:
    """numpy port of TokensChooseMaskedRouter._compute_routing_instructions without padding mask or BPR
    (routing.py:557-644) -> combine array [g, t, e, c] = raw probability x dispatch."""
    g, t, e = probs.shape
    index = np.argsort(-probs, axis=-1, kind="stable")[..., :k]  # lax.top_k: ties to the lower index
    order = index.transpose(0, 2, 1).reshape(g, k * t)  # all first choices, then all second choices
    mask = np.eye(e, dtype=np.int64)[order]  # [g, k*t, e]
    priority = np.cumsum(mask, axis=1) * mask - 1
    priority = priority.reshape(g, k, t, e).transpose(0, 2, 1, 3).max(axis=2)  # [g, t, e]
    dispatch = (priority[..., None] == np.arange(capacity)) & (priority[..., None] >= 0)
    return probs[..., None] * dispatch


@pytest.mark.parametrize("capacity", [2, 8])
def test_router_matches_flaxformer_masked_router(capacity):
    probs = np.asarray(jax.nn.softmax(np.random.default_rng(2).normal(size=(3, 10, 4)) * 2, axis=-1), np.float32)
    route = routing.tokens_choose_routing(jnp.asarray(probs), jnp.ones((3, 10)), top_k=2, capacity=capacity,
                                          second_expert_policy="all", normalize_gates=False)
    got = np.zeros((3, 10, 4, capacity), np.float32)
    slot_token, slot_weight = np.asarray(route.slot_token), np.asarray(route.slot_weight)
    for gi, ei, ci in np.ndindex(slot_token.shape):
        if slot_token[gi, ei, ci] < 10:
            got[gi, slot_token[gi, ei, ci], ei, ci] = slot_weight[gi, ei, ci]
    want = _flaxformer_masked_router(probs, 2, capacity)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    if capacity == 2:
        assert (want > 0).sum() < 2 * 3 * 10  # some choices were dropped


def test_relative_position_buckets_match_flaxformer():
    """numpy port of RelativePositionBiases._relative_position_bucket (relative_position_biases.py:91-141),
    whose log carries an extra float32 eps, against stmoe's buckets for every distance up to 3000."""
    from stmoe.layers import relative_position_bucket

    def flaxformer_bucket(relative, bidirectional, num_buckets, max_distance):
        ret, n = 0, -relative
        if bidirectional:
            num_buckets //= 2
            ret += (n < 0).astype(np.int32) * num_buckets
            n = np.abs(n)
        else:
            n = np.maximum(n, 0)
        max_exact = num_buckets // 2
        large = max_exact + (np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
                             / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
        return ret + np.where(n < max_exact, n, np.minimum(large, num_buckets - 1))

    relative = np.arange(-3000, 3000, dtype=np.int32)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (16, 64), (8, 16)):
            np.testing.assert_array_equal(
                np.asarray(relative_position_bucket(jnp.asarray(relative), bidirectional, num_buckets, max_distance)),
                flaxformer_bucket(relative, bidirectional, num_buckets, max_distance))


def _flaxformer_num_groups(num_tokens, max_group_size, multiple):
    """moe_layers.py:749-774 as written there."""
    num_groups = max(num_tokens // max_group_size, multiple)
    while num_groups < num_tokens and not (num_tokens % num_groups == 0 and num_groups % multiple == 0):
        num_groups += 1
    return None if num_tokens % num_groups else num_groups


def test_group_count_and_padding_follow_flaxformer():
    for tokens in range(1, 200):
        for max_group in (1, 3, 8, 64, 4096):
            for multiple in (1, 4, 6):
                want = _flaxformer_num_groups(tokens, max_group, multiple)
                if want is None:
                    with pytest.raises(ValueError):
                        routing.flaxformer_num_groups(tokens, max_group, multiple)
                else:
                    assert routing.flaxformer_num_groups(tokens, max_group, multiple) == want
    # Hand values: 2 x 4096 tokens, 16 experts: 16 groups of 512; 64 x 512 tokens, max 4096: 8 -> 16 groups.
    assert routing.flaxformer_num_groups(8192, 4096, 16) == 16
    assert routing.flaxformer_num_groups(64 * 512, 4096, 16) == 16
    assert routing.flaxformer_num_groups(64 * 512, 1024, 16) == 32
    # _maybe_pad (moe_layers.py:853-885), 4 experts. [3, 5]: one more row (5 tokens) or 3 more positions
    # (9 tokens) -> a row. [5, 3]: 3 rows (9) or 1 position (5) -> a position. [2, 2] with 8: 2 rows (4)
    # or 2 positions (4), a tie -> positions.
    assert routing.flaxformer_padding(3, 5, 4) == (1, 0)
    assert routing.flaxformer_padding(5, 3, 4) == (0, 1)
    assert routing.flaxformer_padding(2, 2, 8) == (0, 2)
    assert routing.flaxformer_padding(4, 5, 4) == (0, 0)


def test_capacity_rounding():
    # cf * T / E: 1.25 * 10 / 4 = 3.125; 2.0 * 10 / 8 = 2.5 (Python round: half to even -> 2).
    assert routing.expert_capacity(10, 4, 1.25, 1, "round") == 3
    assert routing.expert_capacity(10, 4, 1.25, 1, "ceil") == 4
    assert routing.expert_capacity(10, 8, 2.0, 1, "round") == 2
    assert routing.expert_capacity(14, 8, 2.0, 1, "round") == 4  # 3.5 -> 4
    assert routing.expert_capacity(10, 8, 2.0, 4, "round") == 4  # min capacity
    with pytest.raises(ConfigError, match="capacity_rounding"):
        MoeConfig(capacity_rounding="floor").validate()
    with pytest.raises(ConfigError, match="max_group_size"):
        MoeConfig(group_size=8, max_group_size=8).validate()
    with pytest.raises(ConfigError, match="num_groups_multiple"):
        MoeConfig(num_groups_multiple=4).validate()


def test_moe_layer_pads_and_groups_like_flaxformer():
    """max_group_size on [3, 5] tokens with 4 experts: flaxformer pads a zero row (20 tokens, see above)
    and routes 4 groups of 5. The same as an explicit group_size of 5 on the input with a zero row
    appended (padding routed), cut back to [3, 5]."""
    base = ModelConfig(d_model=8, d_ff=16, num_heads=1, d_kv=8,
                       moe=MoeConfig(num_experts=4, top_k=2, second_expert_policy="all", normalize_gates=False,
                                     route_padding=True, min_capacity=1, capacity_rounding="round"))
    flaxish = base.replace(moe=base.moe.replace(max_group_size=4096, num_groups_multiple=4)).validate()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 5, 8)), jnp.float32)
    mask = jnp.ones((3, 5), bool)
    layer = MoeLayer(flaxish)
    params = layer.init(jax.random.key(0), x, mask)
    got = jax.jit(lambda p: layer.apply(p, x, mask, mutable=["moe"])[0])(params)
    rows, positions = routing.flaxformer_padding(3, 5, 4)
    padded = jnp.pad(x, ((0, rows), (0, positions), (0, 0)))
    tokens = (3 + rows) * (5 + positions)
    explicit = base.replace(moe=base.moe.replace(group_size=tokens // 4)).validate()
    want = jax.jit(lambda p: MoeLayer(explicit).apply(p, padded, jnp.pad(mask, ((0, rows), (0, positions))),
                                                      mutable=["moe"])[0][:3, :5])(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert got.shape == (3, 5, 8)
