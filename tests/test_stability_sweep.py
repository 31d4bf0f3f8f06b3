"""stmoe.experiments.stability_sweep (scripts/stability_sweep.py): the stability criterion on
hand-made loss curves, the table's quality (mean and ddof-1 std over stable seeds) on hand-made
results, the bf16_router variant's router (its config and its logits vs numpy), and a real 2 x 1
sweep."""
import json
import math
import os

import jax.numpy as jnp
import pytest

from stmoe.data import preprocessors
from stmoe.experiments import stability_sweep as sweep

DECREASING = [6.0 - 0.1 * i for i in range(30)]  # 6.0 ... 3.1, never above its running minimum


@pytest.mark.parametrize("losses,skips,diverged,stable,step", [
    (DECREASING, 0, False, True, None),
    # Step 26 after steps 1..25 (running minimum 3.6): 6.0 > 1.5 x 3.6 = 5.4 is a spike, 5.25 is not.
    (DECREASING[:25] + [6.0] + DECREASING[25:], 0, False, False, 26),
    (DECREASING[:25] + [5.25] + DECREASING[25:], 0, False, True, None),
    (DECREASING[:10] + [9.0] + DECREASING[10:], 0, False, True, None),  # a spike inside the 20-step warm-up
    (DECREASING[:7] + [math.nan] + DECREASING[7:], 0, False, False, 8),
    (DECREASING[:7] + [math.inf], 0, True, False, 8),
    (DECREASING, 2, False, False, None),  # skipped non-finite steps (losses logged finite around them)
    (DECREASING[:12], 0, True, False, 13),  # stopped by the trainer after step 12
])
def test_classify_hand_made_curves(losses, skips, diverged, stable, step):
    verdict = sweep.classify(losses, skips, diverged=diverged, spike_factor=1.5, warmup=20)
    assert verdict["stable"] is stable, verdict
    assert verdict["step"] == step
    assert bool(verdict["reason"]) is not stable


def test_classify_threshold_is_strict_and_uses_the_running_minimum():
    # Running minimum 2.0 reached at step 3; at step 22 exactly 3.0 (= 1.5 x 2.0) is stable, 3.01 is not.
    losses = [4.0, 3.0, 2.0] + [2.5] * 18
    assert sweep.classify(losses + [3.0], warmup=20, spike_factor=1.5)["stable"]
    verdict = sweep.classify(losses + [3.01], warmup=20, spike_factor=1.5)
    assert not verdict["stable"] and verdict["step"] == 22


def test_setting_targets_length_fits_its_inputs_length():
    assert sweep.SETTING["data.targets_length"] == preprocessors.pre_corruption_length(
        sweep.SETTING["data.inputs_length"])[1]


def _result(variant, seed, stable, neg_log_perplexity):
    return {"variant": variant, "seed": seed, "stable": stable, "reason": "" if stable else "loss spike at step 30",
            "step": None if stable else 30, "steps_run": 50, "nonfinite_skips": 0,
            "eval_cross_entropy": -neg_log_perplexity, "neg_log_perplexity": neg_log_perplexity,
            "final_train_loss": 3.0, "min_train_loss": 2.9, "wall_s": 1.0}


def test_summarize_and_markdown_quality_over_the_stable_seeds_only():
    results = [_result("baseline", 0, True, -3.0), _result("baseline", 1, False, -2.0),
               _result("baseline", 2, True, -3.5), _result("dropout", 0, True, -4.0)]
    baseline, dropout = sweep.summarize(results, ["baseline", "dropout"])
    assert (baseline["seeds"], baseline["stable"]) == (3, 2) and baseline["fraction_stable"] == pytest.approx(2 / 3)
    # Stable seeds' qualities -3.0 and -3.5 (the unstable seed's -2.0 is left out): mean -3.25, sample
    # std (ddof=1) sqrt(2 * 0.25^2 / 1) = 0.25 sqrt(2) = 0.354 (the population std would be 0.25).
    assert baseline["quality_mean"] == pytest.approx(-3.25)
    assert baseline["quality_std"] == pytest.approx(0.25 * math.sqrt(2))
    assert dropout["quality_mean"] == -4.0 and dropout["quality_std"] is None  # one seed: no std
    table = sweep.markdown([baseline, dropout], sweep.SETTING, 50)
    assert "| baseline | (the setting) | 2/3 | -3.250 +/- 0.354 | seed 1: loss spike at step 30 |" in table
    assert "| dropout | model.dropout_rate=0.1 | 1/1 | -4.000 | - |" in table


def _variant_model(variant):
    from stmoe import config as config_lib
    return config_lib.run_config(sweep.make_config(sweep.run_overrides(variant, 0, 3, {}))).validate().model


def _router_logits(model_cfg, x, kernel):
    """The logits of the model's own Router inside a MoeLayer built from `model_cfg` (flax
    capture_intermediates), for inputs x [batch, length, d_model] and a given router kernel."""
    import flax.linen as nn
    import jax

    from stmoe import routing
    from stmoe.moe import MoeLayer

    layer = MoeLayer(model_cfg)
    mask = jnp.ones(x.shape[:2], jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: layer.init({"params": jax.random.key(0)}, x, mask))["params"])
    params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)  # only the router matters
    params["router"]["kernel"] = kernel
    _, variables = jax.jit(lambda p: layer.apply(
        {"params": p}, x, mask, True, mutable=["moe", "intermediates"],
        capture_intermediates=lambda module, _: isinstance(module, routing.Router)))(params)
    return variables["intermediates"]["router"]["__call__"][0]


def test_bf16_router_variant_runs_its_router_in_bfloat16_and_only_it():
    """Table 4's row: the bf16_router variant's config has router dtype bfloat16 (every other
    variant float32), and the router it builds gives bfloat16 logits that equal numpy's rounded
    bfloat16 matmul and differ from the float32 router's on the same inputs and kernel."""
    import ml_dtypes
    import numpy as np

    for variant in sweep.VARIANTS:
        got, want = _variant_model(variant).moe.router_dtype, "bfloat16" if variant == "bf16_router" else "float32"
        assert got == want, f"variant {variant}: model.moe.router_dtype {got!r}, want {want!r}"
    bf16_cfg, f32_cfg = _variant_model("bf16_router"), _variant_model("baseline")
    assert bf16_cfg.dtype == f32_cfg.dtype == "bfloat16"  # the setting's activations; only the router differs
    rng = np.random.default_rng(0)
    d_model, experts = bf16_cfg.d_model, bf16_cfg.moe.num_experts
    x = jnp.asarray(rng.standard_normal((2, 8, d_model)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((d_model, experts)) * 0.5, jnp.float32)
    got16, got32 = _router_logits(bf16_cfg, x, kernel), _router_logits(f32_cfg, x, kernel)
    assert (got16.dtype, got32.dtype) == (jnp.bfloat16, jnp.float32)
    bf16 = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)
    x64 = np.asarray(x, np.float64).reshape(-1, d_model)  # one group per sequence: [2, 8] -> 16 rows in order
    got16, got32 = np.asarray(got16, np.float64).reshape(-1, experts), np.asarray(got32, np.float64).reshape(-1, experts)
    # float32 router: the float32 matmul of the (already bfloat16) activations.
    np.testing.assert_allclose(got32, x64 @ np.asarray(kernel, np.float64), rtol=1e-5, atol=1e-5)
    # bfloat16 router: kernel rounded to bfloat16, the sum rounded to bfloat16 (one ulp: 2^-7 relative).
    expected = bf16(x64 @ bf16(kernel))
    np.testing.assert_allclose(got16, expected, rtol=2 ** -7, atol=2 ** -7)
    assert np.max(np.abs(got16 - got32)) > 1e-3, "bf16_router's logits equal the float32 router's"


INPUTS = 32
TINY = [f"--config.{k}={v}" for k, v in {
    "model.d_model": 16, "model.d_ff": 32, "model.num_heads": 2, "model.d_kv": 8,
    "model.num_encoder_layers": 2, "model.num_decoder_layers": 2, "model.moe.num_experts": 4,
    "data.inputs_length": INPUTS, "data.targets_length": preprocessors.pre_corruption_length(INPUTS)[1],
    "batch_size": 8, "eval_steps": 1, "num_devices": 1}.items()]


def test_sweep_writes_one_row_per_variant_and_reads_finished_runs_back(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["stability_sweep.py", "--variants", "baseline,no_rmsnorm_scale", "--seeds", "1", "--steps", "3",
            "--out_dir", str(out), *TINY]
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[2/2] no_rmsnorm_scale seed 0:" in printed and "ETA" in printed
    with open(out / "stability_sweep.json") as f:
        result = json.load(f)
    assert [row["variant"] for row in result["rows"]] == ["baseline", "no_rmsnorm_scale"]
    assert result["criterion"] == sweep.criterion_text()
    assert result["setting"]["model.d_model"] == 16  # a --config flag joins the setting
    assert result["setting"]["optim.learning_rate"] == sweep.SETTING["optim.learning_rate"]
    for row in result["rows"]:
        assert row["seeds"] == 1 and len(row["runs"]) == 1
        run = row["runs"][0]
        assert run["steps_run"] == 3 and run["eval_cross_entropy"] > 0
        assert row["fraction_stable"] == row["stable"] == int(run["stable"])
        if run["stable"]:
            assert row["quality_mean"] == pytest.approx(-run["eval_cross_entropy"])
    no_scale = json.load(open(out / "no_rmsnorm_scale" / "seed_0" / "sweep_result.json"))
    assert no_scale["overrides"]["model.layer_norm_scale"] is False
    with open(out / "no_rmsnorm_scale" / "seed_0" / "config.json") as f:
        assert json.load(f)["model"]["layer_norm_scale"] is False  # the trainer ran the variant
    table = (out / "stability_sweep.md").read_text()
    assert table.startswith("| Variant |") and table.count("\n| ") == 2 and "Criterion:" in table  # two rows
    assert table in printed

    # Again: both runs are read back, nothing is retrained.
    stamp = os.path.getmtime(out / "baseline" / "seed_0" / "sweep_result.json")
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("read back") == 2
    assert os.path.getmtime(out / "baseline" / "seed_0" / "sweep_result.json") == stamp


@pytest.mark.parametrize("argv,message", [
    (["--variants", "baseline,nope"], "--variants: unknown ['nope']"),
    (["--seeds", "0"], "--seeds"),
    (["--config.model.d_modl=3"], "did you mean 'model.d_model'"),
    (["--config.batch_size=oops"], "batch_size"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys, tmp_path):
    try:
        status = sweep.main(["stability_sweep.py", "--out_dir", str(tmp_path), *argv])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and message in err, err


def test_report_only_tables_the_finished_runs_and_reclassifies_them(tmp_path, capsys):
    # A finished run as a previous sweep left it (hand-made curve: a spike to 7.0 over a best of 3.0).
    losses = [6.0, 4.0, 3.0] + [3.2] * 20 + [7.0, 3.3]
    workdir = tmp_path / "baseline" / "seed_0"
    workdir.mkdir(parents=True)
    overrides = sweep.run_overrides("baseline", 0, len(losses), {})
    (workdir / "sweep_result.json").write_text(json.dumps({
        "variant": "baseline", "seed": 0, "steps": len(losses), "overrides": overrides, "stable": True,
        "reason": "", "step": None, "steps_run": len(losses), "nonfinite_skips": 0, "trainer_stopped": "",
        "eval_cross_entropy": 3.25, "neg_log_perplexity": -3.25, "final_train_loss": 3.3,
        "min_train_loss": 3.0, "train_losses": losses, "wall_s": 1.0}))
    argv = ["stability_sweep.py", "--variants", "baseline,no_geglu", "--seeds", "2", "--steps", str(len(losses)),
            "--out_dir", str(tmp_path), "--report_only"]
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.count("read back") == 1
    rows = json.load(open(tmp_path / "stability_sweep.json"))["rows"]
    assert [(r["variant"], r["seeds"], r["stable"]) for r in rows] == [("baseline", 1, 0), ("no_geglu", 0, 0)]
    assert rows[0]["runs"][0]["step"] == 24 and "7.000 > 1.5 x min 3.000" in rows[0]["runs"][0]["reason"]
    assert rows[0]["quality_mean"] is None and rows[1]["fraction_stable"] is None
    assert not (tmp_path / "baseline" / "seed_1").exists()  # nothing trained
