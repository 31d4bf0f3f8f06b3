"""Logit parity with flaxformer itself, on checkpoints written by t5x's own Checkpointer.

tests/data/flaxformer_reference/ (its README says which t5x / flaxformer commits, gin files and
overrides produced it) holds a tiny ST-MoE (top-2, every fourth block sparse, sparse-dense, untied
logits) and a tiny Switch (top-1, every other block sparse, relu, tied logits), a padded batch, and
flaxformer's eval-mode logits for it with ample and with tight expert capacity. Each checkpoint goes
through `scripts/convert_checkpoint.py --from t5x` with the gin values the checkpoint does not store,
then `inference.load` (with `eval_capacity_factor` for the tight case) runs stmoe's model.

Compared on the target positions (decoder_target_tokens > 0): flaxformer zeroes the decoder output
at padded positions (t5_architecture.py:1145-1146), so its logits there are 0 by construction.

Padding: flaxformer multiplies every sublayer input by the padding mask (t5_architecture.py:
319-320, 342-343; moe_architecture.py:93-94), so padding tokens, routed and taking capacity
(ignore_padding_tokens=False, moe.gin:254), reach the router as zero vectors (uniform
probabilities: experts 0..k-1). The converter sets moe.zero_padding_inputs=True to route them the
same way; with it off (stmoe's own default, padding routed with its hidden state) the tight case
differs, which shows that the tight references exercise it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os

import jax
import numpy as np
import pytest

from stmoe import inference, partitioning
from stmoe.interop import t5x
from stmoe.models import EncoderDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "flaxformer_reference")
TOL = 1e-5
AMPLE, TIGHT = 4.0, 0.55  # EVAL_EXPERT_CAPACITY_FACTOR of the reference runs (README)
# Gin values of the reference runs that a t5x checkpoint does not store (README; st_moe_base.gin,
# switch_base.gin, tokens_choose_base.gin, moe.gin).
FLAGS = {
    "st_moe": ["--num_heads", "2", "--num_selected_experts", "2", "--group_size", "4096",
               "--train_capacity_factor", "1.25", "--eval_capacity_factor", str(AMPLE)],
    "switch": ["--num_heads", "2", "--num_selected_experts", "1", "--group_size", "8192",
               "--train_capacity_factor", "1.25", "--eval_capacity_factor", str(AMPLE),
               "--aux_loss_factor", "0.01", "--router_z_loss_factor", "0"],
}


def _convert_script():
    spec = importlib.util.spec_from_file_location("script_convert_checkpoint",
                                                  os.path.join(ROOT, "scripts", "convert_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def batch():
    with np.load(os.path.join(DATA, "batch.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{model name: stmoe run dir} after `convert_checkpoint.py --from t5x DIR --to stmoe OUT`."""
    script = _convert_script()
    out = {}
    for name, flags in FLAGS.items():
        run = tmp_path_factory.mktemp("flaxformer") / name
        with contextlib.redirect_stdout(io.StringIO()):
            status = script.main(["--from", "t5x", os.path.join(DATA, name), "--to", "stmoe", str(run),
                                  "--preset", "tiny", *flags])
        assert status == 0
        out[name] = str(run)
    return out


def stmoe_logits(loaded, batch, model: EncoderDecoder | None = None) -> np.ndarray:
    """Eval-mode logits [batch, dec_len, vocab] of the loaded run (or of `model` with its params)."""
    model = model or loaded.model

    def forward(params):
        return model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                           batch["decoder_target_tokens"], enable_dropout=False)
    return np.asarray(jax.jit(forward)(jax.device_get(loaded.params)))


def without_zero_padding(model: EncoderDecoder) -> EncoderDecoder:
    cfg = model.config
    return EncoderDecoder(cfg.replace(moe=cfg.moe.replace(zero_padding_inputs=False)))


def max_diff(got, name, case, batch) -> float:
    want = np.load(os.path.join(DATA, f"{name}_logits_{case}.npy"))
    assert got.shape == want.shape
    real = batch["decoder_target_tokens"] > 0
    return float(np.abs(got - want)[real].max())


def test_converted_configs_carry_flaxformer_routing(converted):
    st_moe = inference.load(converted["st_moe"]).config
    switch = inference.load(converted["switch"]).config
    for cfg in (st_moe, switch):
        m = cfg.moe
        assert (m.num_experts, m.normalize_gates, m.second_expert_policy, m.route_padding) == (4, False, "all", True)
        assert m.zero_padding_inputs
        assert (m.capacity_rounding, m.min_capacity, m.eval_capacity_factor) == ("round", 4, AMPLE)
        assert m.num_groups_multiple == 4 and not m.batch_prioritized
        assert m.decoder_priority == "rank_major"  # flaxformer serves first choices first in the decoder too
    assert (st_moe.moe.top_k, st_moe.mlp_activation, st_moe.mlp_gated, st_moe.tie_embeddings) == (2, "gelu", True, False)
    assert st_moe.sparse_dense and [i for i in range(4) if st_moe.is_sparse(i)] == [3]
    assert (switch.moe.top_k, switch.mlp_activation, switch.mlp_gated, switch.tie_embeddings) == (1, "relu", False, True)
    assert not switch.sparse_dense and [i for i in range(2) if switch.is_sparse(i)] == [1]


@pytest.mark.parametrize("name", ["st_moe", "switch"])
def test_ample_capacity_logits_equal_flaxformer(converted, batch, name):
    loaded = inference.load(converted[name])
    got = stmoe_logits(loaded, batch)
    assert max_diff(got, name, "ample", batch) < TOL
    assert np.std(got[batch["decoder_target_tokens"] > 0]) > 0.1  # not a vacuous comparison


@pytest.mark.parametrize("name", ["st_moe", "switch"])
def test_tight_capacity_logits_equal_flaxformer(converted, batch, name):
    """Eval capacity factor 0.55, 4 groups: encoder int(round(0.55 * 32 / 4)) = 4 slots (ceil would
    give 5), decoder round(0.55 * 24 / 4) = 3 raised to min_expert_capacity 4. Drops happen (the
    tight logits move by far more than TOL from the ample ones), and flaxformer's zero-vector padding
    takes other slots than padding routed with its hidden state does: the converted config mirrors
    the zeroing and gives flaxformer's logits; without it they differ."""
    loaded = inference.load(converted[name], eval_capacity_factor=TIGHT)
    tight = np.load(os.path.join(DATA, f"{name}_logits_tight.npy"))
    ample = np.load(os.path.join(DATA, f"{name}_logits_ample.npy"))
    real = batch["decoder_target_tokens"] > 0
    assert np.abs(tight - ample)[real].max() > 100 * TOL  # the tight case does drop tokens
    assert max_diff(stmoe_logits(loaded, batch), name, "tight", batch) < TOL
    unzeroed = stmoe_logits(loaded, batch, model=without_zero_padding(loaded.model))
    assert max_diff(unzeroed, name, "tight", batch) > 100 * TOL  # padding's routing matters here


def test_batch_prioritized_encoder_routing(converted, batch):
    """tokens_choose_base.gin's encoder batch-prioritized routing (decoder in token order)."""
    flat, _ = t5x.read_target(os.path.join(DATA, "st_moe"))
    cfg, _, _ = t5x.convert(flat, t5x.Options(num_heads=2, eval_capacity_factor=TIGHT, batch_prioritized_routing=True))
    loaded = inference.load(converted["st_moe"], eval_capacity_factor=TIGHT)
    cfg = partitioning.resolve_model(cfg, loaded.mesh)  # as inference.load builds the model
    assert cfg.moe == loaded.config.moe.replace(batch_prioritized=True)
    got = stmoe_logits(loaded, batch, model=EncoderDecoder(cfg))
    assert max_diff(got, "st_moe", "tight_bpr", batch) < TOL
    # Batch-prioritized routing changes which tokens are dropped here, so the case is not vacuous.
    assert max_diff(got, "st_moe", "tight", batch) > 10 * TOL


def test_switch_checkpoint_needs_an_explicit_top_k(tmp_path, capfd):
    """A checkpoint does not store the router's k: the Switch one (tied logits, no extra MLP, ungated
    experts) is refused without --num_selected_experts, in one line naming the flag, rather than built
    as a top-2 model; the ST-MoE one keeps the default k = 2."""
    flags = FLAGS["switch"][:2] + FLAGS["switch"][4:]  # without --num_selected_experts 1
    assert "--num_selected_experts" not in flags
    capfd.readouterr()
    status = _convert_script().main(["--from", "t5x", os.path.join(DATA, "switch"), "--to", "stmoe",
                                     str(tmp_path / "out"), "--preset", "tiny", *flags])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("convert_checkpoint.py: input error: this checkpoint looks like a Switch Transformer") \
        and "pass --num_selected_experts 1" in err[0], err[0]
    assert not (tmp_path / "out").exists()

    switch, _ = t5x.read_target(os.path.join(DATA, "switch"))
    with pytest.raises(t5x.ConversionError, match="looks like a Switch Transformer"):
        t5x.convert(switch, t5x.Options(num_heads=2))
    assert t5x.convert(switch, t5x.Options(num_heads=2, num_selected_experts=1))[0].moe.top_k == 1
    st_moe, _ = t5x.read_target(os.path.join(DATA, "st_moe"))
    assert t5x.convert(st_moe, t5x.Options(num_heads=2))[0].moe.top_k == 2
