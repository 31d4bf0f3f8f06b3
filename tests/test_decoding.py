"""Greedy / beam / sampling decoding and scoring (stmoe/decoding.py).

The model is tiny and randomly initialized, made less bland by hand so that the checks
mean something (see `params`): a sharpened router (experts matter), larger attention / MLP
weights (the output depends on the prefix and the input), and a nudge towards EOS (some
sequences end early, so the padding and early-stop paths run). Its eval capacity factor
equals the number of experts, so no token is dropped in a teacher-forced pass either:
only then is recomputing the prefix the same function as stepping with the cache
(decoding.py's docstring explains why).

Independent checks: cached vs recomputed prefixes, greedy vs a beam of one, beam scores vs a
teacher-forced rescoring of the beams, `score` vs numpy on the model's logits, sampling in its
greedy limits, top-k sampling's drawn set vs numpy's top-k of the first-step logits, and beam
search under a mesh with sharded params.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe import decoding, partitioning
from stmoe.config import ModelConfig, MoeConfig
from stmoe.models import EncoderDecoder

BATCH, ENCODER_LENGTH, DECODE_LENGTH, BEAMS = 2, 8, 6, 3
EOS = decoding.EOS_ID


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=64, d_model=32, d_ff=64, num_heads=2, d_kv=16, num_encoder_layers=2,
                      num_decoder_layers=2, sparse_interval=2,  # layer 1 of each stack is sparse
                      moe=MoeConfig(num_experts=4, top_k=2, eval_capacity_factor=4.0)).validate()
    return EncoderDecoder(cfg)


@pytest.fixture(scope="module")
def encoder_inputs():
    tokens = np.random.default_rng(0).integers(2, 64, (BATCH, ENCODER_LENGTH)).astype(np.int32)
    tokens[1, 6:] = 0  # padding in the encoder input
    return jnp.asarray(tokens)


@pytest.fixture(scope="module")
def params(model, encoder_inputs):
    """Random params drawn in numpy on the model's (eval_shape) structure, at T5 init scales
    (normal, std 1 / sqrt(fan_in), the query's extra 1 / sqrt(d_kv), embedding std 1, norms 1),
    except: router std 1 instead of 2e-2 (peaked routing: which experts a token reaches changes
    its output), attention / MLP / expert kernels x2.5 (at init scale greedy repeats one token),
    and +0.75 on the EOS column of the output layer. numpy, because compiling model.init
    (truncated normals) costs ~8 s on CPU."""
    cfg = model.config
    decoder_tokens = jnp.ones((BATCH, DECODE_LENGTH), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), encoder_inputs, decoder_tokens, decoder_tokens, enable_dropout=False)["params"]))
    rng = np.random.default_rng(0)
    gain = 2.5

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":  # RMSNorm
            return np.ones(shape, np.float32)
        std = {"embedding": 1.0, "kernel": 1.0,  # token embedding; router
               "rel_embedding": shape[-1] ** -0.5, "logits_dense": shape[0] ** -0.5,
               "query": gain * (shape[0] * cfg.d_kv) ** -0.5, "key": gain * shape[0] ** -0.5,
               "value": gain * shape[0] ** -0.5, "out": gain * (shape[0] * shape[1]) ** -0.5,
               }.get(name, gain * shape[-2] ** -0.5)  # dense and expert MLP kernels [(experts), in, out]
        return (rng.standard_normal(shape) * std).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    params["decoder"]["logits_dense"][:, EOS] += 0.75
    return jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def greedy(model, params, encoder_inputs):
    return np.asarray(decoding.greedy_decode(model, params, encoder_inputs, max_decode_length=DECODE_LENGTH))


@pytest.fixture(scope="module")
def beams(model, params, encoder_inputs):
    tokens, scores = decoding.beam_search(model, params, encoder_inputs, beam_size=BEAMS,
                                          max_decode_length=DECODE_LENGTH, alpha=0.6)
    return np.asarray(tokens), np.asarray(scores)


def assert_well_formed(tokens: np.ndarray) -> None:
    """[..., length]: no pad before the first EOS, only pad after it."""
    for row in tokens.reshape(-1, tokens.shape[-1]):
        ends = np.flatnonzero(row == EOS)
        stop = ends[0] + 1 if len(ends) else len(row)
        assert np.all(row[:stop] != 0), row
        assert np.all(row[stop:] == 0), row


def teacher_forced_batch(encoder_inputs, targets):
    targets = np.asarray(targets, np.int32)
    return {"encoder_input_tokens": encoder_inputs, "decoder_target_tokens": jnp.asarray(targets),
            "decoder_input_tokens": jnp.asarray(np.pad(targets[:, :-1], ((0, 0), (1, 0))))}


def test_outputs_are_well_formed_and_not_trivial(greedy, beams):
    assert greedy.shape == (BATCH, DECODE_LENGTH)
    assert beams[0].shape == (BATCH, BEAMS, DECODE_LENGTH) and beams[1].shape == (BATCH, BEAMS)
    assert_well_formed(greedy)
    assert_well_formed(beams[0])
    # The test model must exercise both an early EOS and a sequence that runs to the end.
    ended = (greedy == EOS).any(axis=1)
    assert ended.any() and not ended.all(), greedy
    assert np.all(np.diff(beams[1], axis=1) <= 0), "beams are sorted best first"
    assert len({tuple(b) for b in beams[0].reshape(-1, DECODE_LENGTH)}) == BATCH * BEAMS


def test_decoder_experts_matter(model, params, encoder_inputs, greedy):
    """Guards the test model: permuting the decoder's experts (not the router) changes the scores,
    so the checks above do run tokens through different experts."""
    moe = params["decoder"]["layers_1"]["ffn"]["moe"]
    permuted = {**moe, **{name: moe[name][::-1] for name in ("expert_wi_0", "expert_wi_1", "expert_wo")}}
    swapped = {**params, "decoder": {**params["decoder"], "layers_1": {
        **params["decoder"]["layers_1"], "ffn": {**params["decoder"]["layers_1"]["ffn"], "moe": permuted}}}}
    batch = teacher_forced_batch(encoder_inputs, greedy)
    difference = np.abs(np.asarray(decoding.score(model, params, batch) - decoding.score(model, swapped, batch)))
    assert np.all(difference > 0.1), difference


def test_greedy_cache_matches_recomputed_prefix(model, params, encoder_inputs, greedy):
    recomputed = decoding.greedy_decode(model, params, encoder_inputs, max_decode_length=DECODE_LENGTH,
                                        use_cache=False)
    np.testing.assert_array_equal(greedy, recomputed)


def test_beam_cache_matches_recomputed_prefix(model, params, encoder_inputs, beams):
    tokens, scores = decoding.beam_search(model, params, encoder_inputs, beam_size=BEAMS,
                                          max_decode_length=DECODE_LENGTH, alpha=0.6, use_cache=False)
    np.testing.assert_array_equal(beams[0], tokens)
    np.testing.assert_allclose(beams[1], scores, rtol=1e-5)


def test_greedy_is_a_beam_of_one(model, params, encoder_inputs, greedy):
    # With alpha 0 a single beam keeps the argmax path: a finished EOS sequence can only be beaten
    # by a continuation with a higher log-prob, and log-probs only fall.
    tokens, _ = decoding.beam_search(model, params, encoder_inputs, beam_size=1,
                                     max_decode_length=DECODE_LENGTH, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(tokens)[:, 0], greedy)


def test_beam_scores_match_teacher_forced_rescoring(model, params, encoder_inputs, beams):
    """Every beam's score is its teacher-forced log-likelihood over its GNMT length penalty."""
    tokens, scores = beams
    for k in range(BEAMS):
        log_likelihood = np.asarray(decoding.score(model, params, teacher_forced_batch(encoder_inputs, tokens[:, k])))
        lengths = (tokens[:, k] != 0).sum(axis=1)  # EOS included
        np.testing.assert_allclose(scores[:, k], log_likelihood / ((5.0 + lengths) / 6.0) ** 0.6, rtol=1e-5)


def test_beam_search_beats_or_ties_greedy_here(model, params, encoder_inputs, greedy, beams):
    # Not a theorem for every model, but it holds for this one and shows the beams search:
    # the best beam's penalized score is at least greedy's.
    greedy_ll = np.asarray(decoding.score(model, params, teacher_forced_batch(encoder_inputs, greedy)))
    greedy_scores = greedy_ll / ((5.0 + (greedy != 0).sum(axis=1)) / 6.0) ** 0.6
    assert np.all(beams[1][:, 0] >= greedy_scores - 1e-5)


def test_score_matches_numpy_log_softmax(model, params, encoder_inputs):
    rng = np.random.default_rng(1)
    targets = rng.integers(1, 64, (BATCH, DECODE_LENGTH)).astype(np.int32)
    targets[0, 4:] = 0  # padding: not counted
    batch = teacher_forced_batch(encoder_inputs, targets)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b["encoder_input_tokens"], b["decoder_input_tokens"],
                                             b["decoder_target_tokens"], enable_dropout=False))
    logits = np.asarray(apply(params, batch), np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(decoding.score(model, params, batch), (picked * (targets > 0)).sum(axis=1),
                               rtol=1e-5)
    weights = rng.uniform(size=targets.shape).astype(np.float32)
    np.testing.assert_allclose(decoding.score(model, params, {**batch, "decoder_loss_weights": weights}),
                               (picked * weights).sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("temperature,top_k", [(1e-4, 0), (1.0, 1)])
def test_sampling_limits_equal_greedy(model, params, encoder_inputs, greedy, temperature, top_k):
    for seed in range(2):
        tokens = decoding.sample(model, params, encoder_inputs, jax.random.key(seed),
                                 max_decode_length=DECODE_LENGTH, temperature=temperature, top_k=top_k)
        np.testing.assert_array_equal(tokens, greedy)


def test_top_k_sampling_draws_exactly_the_k_highest_logit_first_tokens(model, params, encoder_inputs):
    """The first decoded token depends only on the encoder input and the start token, so 128 copies
    of each input row are 128 independent draws from the same first-step distribution. At a high
    temperature the top_k set (from numpy on the teacher-forced logits of position 0, pad excluded)
    is hit in full and nothing outside it, while plain sampling at that temperature would leave it."""
    copies, temperature = 128, 4.0
    tiled = jnp.repeat(encoder_inputs, copies, axis=0)  # rows 0..127: input 0, 128..255: input 1
    start = jnp.zeros((BATCH, 1), jnp.int32)
    logits = np.asarray(jax.jit(lambda p: model.apply({"params": p}, encoder_inputs, start, start + 1,
                                                      enable_dropout=False))(params)[:, 0], np.float64)
    logits[:, 0] = -np.inf  # decoding never emits the pad id
    for top_k in (2, 3, 5):
        first = np.asarray(decoding.sample(model, params, tiled, jax.random.key(7), max_decode_length=1,
                                           temperature=temperature, top_k=top_k))[:, 0].reshape(BATCH, copies)
        for row in range(BATCH):
            order = np.argsort(-logits[row])
            assert logits[row, order[top_k - 1]] > logits[row, order[top_k]]  # no tie at the k-th place
            want = set(order[:top_k].tolist())
            # Guards the check: within the top k every token has probability > 5% (so 128 draws miss
            # one with probability < 1e-2), and outside it the softmax keeps > 30% of the mass.
            p = np.exp((logits[row] - logits[row].max()) / temperature)
            p /= p.sum()
            restricted = p[order[:top_k]] / p[order[:top_k]].sum()
            assert restricted.min() > 0.05 and p[order[top_k:]].sum() > 0.3, (restricted, p[order[top_k:]].sum())
            drawn = sorted(set(first[row].tolist()))
            assert drawn == sorted(want), f"top_k={top_k}, row {row}: drew {drawn}, numpy top-k {sorted(want)}"


def test_sampling_at_temperature_one_is_well_formed_and_random(model, params, encoder_inputs, greedy):
    samples = [np.asarray(decoding.sample(model, params, encoder_inputs, jax.random.key(seed),
                                          max_decode_length=DECODE_LENGTH)) for seed in range(3)]
    for tokens in samples:
        assert_well_formed(tokens)
    assert any(not np.array_equal(tokens, greedy) for tokens in samples)


def test_beam_search_under_a_mesh_with_sharded_params(model, params, encoder_inputs, beams):
    """Experts over `expert` (2), heads / mlp / vocab over `model` (2); batch * beams divides 2.

    Beam search covers the cached step and the cache reordering under sharding (greedy runs
    the same step function)."""
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, expert=2, model=2), jax.devices()[:4])
    shapes = {"encoder_input_tokens": (BATCH, ENCODER_LENGTH), "decoder_input_tokens": (BATCH, DECODE_LENGTH),
              "decoder_target_tokens": (BATCH, DECODE_LENGTH)}
    _, shardings = partitioning.abstract_params_and_shardings(model, mesh, shapes, jax.random.key(0))
    sharded = jax.device_put(params, shardings)
    assert sharded["decoder"]["layers_1"]["ffn"]["moe"]["expert_wo"].sharding.spec[0] == "expert"
    with partitioning.activate(mesh):
        tokens, scores = decoding.beam_search(model, sharded, encoder_inputs, beam_size=BEAMS,
                                              max_decode_length=DECODE_LENGTH, alpha=0.6)
    np.testing.assert_array_equal(tokens, beams[0])
    np.testing.assert_allclose(scores, beams[1], rtol=1e-5)


def test_init_cache(model, params):
    """Self-attention caches start empty; cross-attention holds the encoded sequence's keys and
    values in the dot layouts, checked against numpy projections of a random `encoded`."""
    cfg = model.config
    encoded = np.random.default_rng(1).standard_normal((5, ENCODER_LENGTH, cfg.d_model)).astype(np.float32)
    cache = decoding.init_cache(model, params, jnp.asarray(encoded), jnp.ones((5, ENCODER_LENGTH), jnp.int32),
                                max_decode_length=DECODE_LENGTH)
    layers = cache["decoder"]
    assert sorted(layers) == [f"layers_{i}" for i in range(cfg.num_decoder_layers)]
    for name, layer in layers.items():
        attention = layer["self_attention"]
        assert attention["cached_key"].shape == (5, cfg.num_heads, cfg.d_kv, DECODE_LENGTH)
        assert attention["cached_value"].shape == (5, cfg.num_heads, DECODE_LENGTH, cfg.d_kv)
        assert attention["cache_index"].shape == ()
        assert all(not np.any(x) for x in jax.tree.leaves(attention))
        cross = layer["encoder_decoder_attention"]
        kernels = params["decoder"][name]["encoder_decoder_attention"]
        key = np.einsum("bld,dhk->bhkl", encoded, np.asarray(kernels["key"]))
        value = np.einsum("bld,dhk->bhlk", encoded, np.asarray(kernels["value"]))
        np.testing.assert_allclose(cross["encoded_key"], key, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cross["encoded_value"], value, rtol=1e-5, atol=1e-5)


def test_invalid_arguments(model, params, encoder_inputs):
    with pytest.raises(ValueError, match="temperature"):
        decoding.sample(model, params, encoder_inputs, jax.random.key(0), max_decode_length=4, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        decoding.beam_search(model, params, encoder_inputs, beam_size=2, max_decode_length=4, alpha=-1.0)
