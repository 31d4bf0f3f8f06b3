"""Parity with Hugging Face `SwitchTransformersForConditionalGeneration` (transformers 5.x), float32 on CPU.

The golden numbers are HF's own forward pass (torch, eval mode, eager attention) on a
tiny randomly initialised model saved with `save_pretrained`; the dropped-token
counts are recomputed here in numpy from HF's router logits. Two capacities: one
where no expert can overflow and one where tokens must be dropped.
"""
from __future__ import annotations

import functools
import sys
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stmoe import losses  # noqa: E402
from stmoe.interop import hf_switch  # noqa: E402
from stmoe.metrics import collect_layers  # noqa: E402
from stmoe.models import EncoderDecoder  # noqa: E402

VOCAB, BATCH, ENC_LEN, DEC_LEN, EXPERTS = 128, 2, 12, 8, 4
AMPLE = ENC_LEN  # at most ENC_LEN tokens of a sequence can pick one expert: nothing is dropped
SMALL = 2  # 4 experts x 2 slots = 8 < 12 encoder tokens per sequence: drops are certain
ATOL = 1e-4


def _hf_config(capacity: int, **overrides):
    """3 + 3 blocks, num_sparse 1 -> step 3 -> block 1 of each stack is sparse: one MoE layer per stack,
    followed by a dense block. (Were the MoE block last, with unit norm scales, what a dropped token
    gets would only rescale the last hidden state, and the final RMSNorm would hide it.)"""
    fields = dict(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=3,
                  num_decoder_layers=3, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                  num_experts=EXPERTS, expert_capacity=capacity, dropout_rate=0.0, router_jitter_noise=0.0,
                  tie_word_embeddings=True)
    fields.update(overrides)
    return transformers.SwitchTransformersConfig(**fields)


def _hf_load(path):
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def _hf_forward(model, enc, dec_in, enc_mask=None, dec_mask=None):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_mask if enc_mask is not None
                                                                                else np.ones_like(enc)),
                     decoder_input_ids=torch.tensor(dec_in),
                     decoder_attention_mask=None if dec_mask is None else torch.tensor(dec_mask),
                     output_router_logits=True)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model: EncoderDecoder):
    return jax.jit(functools.partial(model.apply, enable_dropout=False, mutable=["moe"]))


def _layer(stats: dict, stack: str) -> dict:
    (name,) = [n for n in stats if n.startswith(stack + "/")]  # exactly one sparse layer per stack
    return stats[name]


@pytest.fixture(scope="module", autouse=True)
def _torch_float32_deterministic():
    dtype, deterministic = torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    yield
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    enc = rng.integers(1, VOCAB, (BATCH, ENC_LEN))  # no id 0: no padding
    target = rng.integers(1, VOCAB, (BATCH, DEC_LEN))
    dec_in = np.concatenate([np.zeros((BATCH, 1), np.int64), target[:, :-1]], axis=1)  # start token 0
    return enc, dec_in, target


@pytest.fixture(scope="module", params=[AMPLE, SMALL], ids=["ample_capacity", "dropping"])
def case(request, tmp_path_factory, tokens):
    """The same random weights (seed 0) saved with the given capacity, run by HF and by us."""
    capacity = request.param
    torch.manual_seed(0)
    hf_dir = tmp_path_factory.mktemp(f"hf_cap{capacity}")
    hf_model = transformers.SwitchTransformersForConditionalGeneration(_hf_config(capacity))
    with torch.no_grad():  # HF inits norm scales to 1; random ones make the norm weights count
        for name, param in hf_model.named_parameters():
            if "layer_norm" in name:
                param.uniform_(0.5, 1.5)
    hf_model.save_pretrained(hf_dir)
    hf_model = _hf_load(hf_dir)
    enc, dec_in, target = tokens
    hf_out = _hf_forward(hf_model, enc, dec_in)

    model, params = hf_switch.load_pretrained(str(hf_dir))
    logits, state = _jitted_apply(model)({"params": params}, enc, dec_in, target)
    return types.SimpleNamespace(capacity=capacity, hf_dir=hf_dir, hf_model=hf_model, hf_out=hf_out,
                                 model=model, params=params, logits=np.asarray(logits),
                                 stats=collect_layers(state["moe"]), moe=state["moe"])


def test_config_semantics(case):
    cfg = case.model.config
    assert (cfg.moe.top_k, cfg.moe.expert_capacity, cfg.moe.group_size) == (1, case.capacity, None)
    assert cfg.moe.route_padding and not cfg.moe.dropped_token_passthrough and not cfg.moe.batch_prioritized
    assert cfg.moe.decoder_priority == "rank_major"
    assert (cfg.mlp_activation, cfg.mlp_gated, cfg.tie_embeddings) == ("relu", False, True)
    assert [cfg.is_sparse(i) for i in range(3)] == [b.is_sparse for b in case.hf_model.encoder.block]


def test_logits_match(case):
    hf_logits = case.hf_out.logits.numpy()
    diff = np.max(np.abs(case.logits - hf_logits))
    print(f"capacity {case.capacity}: max |logits - HF| = {diff:.3e} (logit scale {np.abs(hf_logits).max():.2f})")
    np.testing.assert_allclose(case.logits, hf_logits, rtol=0, atol=ATOL)


def test_dropped_tokens_get_zero_not_their_input(case, tokens):
    """transformers 5.x gives a dropped token zero from the sparse MLP; 4.x kept its input times its
    router prob (moe.dropped_token_passthrough). The parity above must be able to tell them apart."""
    if case.capacity == AMPLE:
        pytest.skip("nothing is dropped")
    cfg = case.model.config
    legacy = EncoderDecoder(cfg.replace(moe=cfg.moe.replace(dropped_token_passthrough=True)))
    logits, _ = _jitted_apply(legacy)({"params": case.params}, *tokens)
    assert np.max(np.abs(np.asarray(logits) - case.hf_out.logits.numpy())) > 100 * ATOL


def _hf_dropped_fraction(router_logits: np.ndarray, capacity: int) -> float:
    """HF drops, recomputed: per sequence, an expert keeps its first `capacity` top-1 tokens in position order."""
    choice = np.eye(router_logits.shape[-1])[np.argmax(router_logits, axis=-1)]  # [b, l, e]
    over = np.maximum(choice.sum(axis=1) - capacity, 0)  # [b, e]
    return float(over.sum() / (router_logits.shape[0] * router_logits.shape[1]))


def test_dropped_tokens_match(case):
    for stack in ("encoder", "decoder"):
        (hf_logits,) = getattr(case.hf_out, f"{stack}_router_logits")  # one sparse layer
        expected = _hf_dropped_fraction(hf_logits.numpy(), case.capacity)
        ours = float(_layer(case.stats, stack).dropped_tokens)
        assert ours == pytest.approx(expected, abs=1e-7), stack
        if case.capacity == AMPLE:
            assert ours == 0.0
    if case.capacity == SMALL:
        assert float(_layer(case.stats, "encoder").dropped_tokens) > 0  # the parity above covered drops


def test_router_losses_match(case):
    out = case.hf_out
    for stack in ("encoder", "decoder"):
        layer = _layer(case.stats, stack)
        # HF concatenates the router logits of a stack's sparse layers along the sequence; with one
        # sparse layer per stack that is exactly our per-layer loss.
        np.testing.assert_allclose(float(layer.router_z_loss), float(getattr(out, f"{stack}_z_loss")), rtol=1e-4)
        np.testing.assert_allclose(float(layer.aux_loss), float(getattr(out, f"{stack}_aux_loss")), rtol=1e-4)
    # HF's training loss adds coef * (encoder + decoder); ours averages over the (here two) MoE layers.
    ours = losses.moe_losses(case.moe)
    np.testing.assert_allclose(float(ours["router_z_loss"]),
                               (float(out.encoder_z_loss) + float(out.decoder_z_loss)) / 2, rtol=1e-4)
    np.testing.assert_allclose(float(ours["aux_loss"]),
                               (float(out.encoder_aux_loss) + float(out.decoder_aux_loss)) / 2, rtol=1e-4)


def test_right_padding_matches_on_real_tokens(case, tokens):
    """Padding is routed but comes last in position order, so it takes no slot from a real token."""
    enc, dec_in, target = (t.copy() for t in tokens)
    enc[0, 9:], target[1, 5:] = 0, 0
    dec_in[1, 6:] = 0
    hf_out = _hf_forward(case.hf_model, enc, dec_in, enc_mask=(enc > 0).astype(np.int64),
                         dec_mask=np.concatenate([np.ones((BATCH, 1), np.int64), (target[:, :-1] > 0)], axis=1))
    logits, _ = _jitted_apply(case.model)({"params": case.params}, enc, dec_in, target)
    real = target > 0
    np.testing.assert_allclose(np.asarray(logits)[real], hf_out.logits.numpy()[real], rtol=0, atol=ATOL)


def test_export_reloads_in_hf(case, tmp_path, tokens):
    hf_switch.export(case.model, case.params, str(tmp_path))
    reloaded = _hf_load(tmp_path)
    enc, dec_in, _ = tokens
    np.testing.assert_allclose(_hf_forward(reloaded, enc, dec_in).logits.numpy(), case.hf_out.logits.numpy(),
                               rtol=0, atol=1e-6)
    model, params = hf_switch.load_pretrained(str(tmp_path))  # and back: the same config and bits
    assert model.config == case.model.config
    jax.tree.map(np.testing.assert_array_equal, params, case.params)


def test_untied_embeddings_export(case, tokens, tmp_path):
    """Untied export: one input embedding + logits_dense -> HF 5.x's shared/encoder/decoder/lm_head.

    logits_dense = embedding.T * d_model**-0.5 is the tied model written untied, so HF must give
    the tied logits again (no new compilation needed on our side).
    """
    cfg = case.model.config.replace(tie_embeddings=False)
    params = dict(case.params)
    decoder = dict(params["decoder"])
    decoder["logits_dense"] = params["token_embedder"]["embedding"].T * cfg.d_model ** -0.5
    params["decoder"] = decoder
    hf_switch.export(EncoderDecoder(cfg), params, str(tmp_path))
    enc, dec_in, _ = tokens
    hf_logits = _hf_forward(_hf_load(tmp_path), enc, dec_in).logits.numpy()
    np.testing.assert_allclose(hf_logits, case.hf_out.logits.numpy(), rtol=0, atol=1e-5)
    model, reloaded = hf_switch.load_pretrained(str(tmp_path))
    assert model.config == cfg
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)


@pytest.mark.parametrize("enc_layers,enc_sparse,dec_layers,dec_sparse",
                         [(12, 6, 12, 6), (12, 3, 12, 3), (8, 2, 4, 1), (4, 4, 4, 4), (6, 7, 6, 7), (12, 0, 12, 0)])
def test_sparse_placement_matches_hf(enc_layers, enc_sparse, dec_layers, dec_sparse):
    """Which blocks HF builds sparse (read off its modules), and the config round trip."""
    hf_cfg = _hf_config(4, vocab_size=8, d_model=8, d_ff=8, d_kv=4, num_heads=2, num_experts=2,
                        num_layers=enc_layers, num_sparse_encoder_layers=enc_sparse,
                        num_decoder_layers=dec_layers, num_sparse_decoder_layers=dec_sparse)
    hf_model = transformers.SwitchTransformersForConditionalGeneration(hf_cfg)
    cfg = hf_switch.config_from_hf(hf_cfg.to_dict())
    assert [cfg.is_sparse(i) for i in range(enc_layers)] == [b.is_sparse for b in hf_model.encoder.block]
    assert [cfg.is_sparse(i) for i in range(dec_layers)] == [b.is_sparse for b in hf_model.decoder.block]
    assert hf_switch.config_from_hf(hf_switch.config_to_hf(cfg)) == cfg


def test_import_needs_no_torch(case, tmp_path, monkeypatch):
    """safetensors loads without torch; pytorch_model.bin says torch is needed when it is missing."""
    (tmp_path / "config.json").write_text((case.hf_dir / "config.json").read_text())
    torch.save(case.hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    _, bin_params = hf_switch.load_pretrained(str(tmp_path))  # with torch
    jax.tree.map(np.testing.assert_array_equal, bin_params, case.params)

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    _, params = hf_switch.load_pretrained(str(case.hf_dir))
    jax.tree.map(np.testing.assert_array_equal, params, case.params)
    with pytest.raises(ImportError, match="needs torch"):
        hf_switch.load_pretrained(str(tmp_path))
