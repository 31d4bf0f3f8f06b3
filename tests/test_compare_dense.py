"""stmoe.experiments.compare_dense (scripts/compare_dense.py): FLOP accounting by hand, the
dense-at-sparse-positions model option, the JSON / table of a 4-step run, resume, bad flags."""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import models as model_presets
from stmoe import models
from stmoe.config import ConfigError, ModelConfig
from stmoe.experiments import compare_dense


def _cfg(**fields) -> ModelConfig:
    """tiny with 2+2 layers (blocks 1 sparse), 8 experts, top-2: the script's layout."""
    cfg = model_presets.model_config("tiny")
    return cfg.replace(num_encoder_layers=2, num_decoder_layers=2, **fields).validate()


def _params(cfg: ModelConfig):
    tokens = jnp.ones((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: models.EncoderDecoder(cfg).init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                                                    enable_dropout=False))
    return jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(shapes["params"]))


def _count(tree) -> int:
    import math
    return sum(math.prod(s) for s in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, tuple)))


def test_flops_per_token_by_hand():
    # d_model 64, d_ff 128, GEGLU: one dense FFN = 2 FLOPs x 64 x 128 x 3 matrices = 49152 per token.
    # Router: 2 x 64 x 8 experts = 1024. Layout: block 0 dense, block 1 sparse, in encoder and decoder.
    moe_cfg = _cfg()
    assert compare_dense.flops_per_token(moe_cfg) == {"ffn": 2 * 49152 + 2 * (2 * 49152 + 1024),
                                                       "router": 2 * 1024}
    same = _cfg(sparse_layers=())
    assert compare_dense.flops_per_token(same) == {"ffn": 4 * 49152, "router": 0}
    # Matched width: 2 x 128 + round(1024 / (2 x 64 x 3)) = 256 + round(2.67) = 259.
    assert compare_dense.matched_dense_d_ff(moe_cfg) == 259
    matched = _cfg(sparse_positions_dense_d_ff=259)
    flops = compare_dense.flops_per_token(matched)
    assert flops == {"ffn": 2 * 49152 + 2 * (2 * 64 * 259 * 3), "router": 0}
    # The matched dense equals the MoE within half a unit of width (384 FLOPs) per sparse block.
    assert abs(flops["ffn"] - compare_dense.flops_per_token(moe_cfg)["ffn"]) <= 2 * 384 / 2


def test_flops_ungated_top1():
    # ReLU FFN: 2 matrices. Top-1 over 4 experts: 1 x expert + router 2 x 64 x 4 = 512; width 128 + round(512/256).
    cfg = _cfg(mlp_gated=False, mlp_activation="relu", moe=model_presets.model_config("tiny").moe.replace(
        num_experts=4, top_k=1))
    assert compare_dense.flops_per_token(cfg)["ffn"] == 2 * (2 * 64 * 128 * 2) + 2 * (2 * 64 * 128 * 2 + 512)
    assert compare_dense.matched_dense_d_ff(cfg) == 130


def test_dense_at_sparse_positions_option():
    moe_cfg = _cfg()
    dense = _params(_cfg(sparse_layers=()))
    wide = _params(_cfg(sparse_positions_dense_d_ff=259))
    moe = _params(moe_cfg)
    for stack in ("encoder", "decoder"):
        assert wide[stack]["layers_1"]["ffn"]["mlp"] == {"wi_0": (64, 259), "wi_1": (64, 259), "wo": (259, 64)}
        assert wide[stack]["layers_0"]["ffn"]["mlp"]["wi_0"] == (64, 128)  # dense positions keep d_ff
        assert "moe" in moe[stack]["layers_1"]["ffn"] and "moe" not in wide[stack]["layers_1"]["ffn"]
    # Two sparse positions, each (259 - 128) x 64 x 3 more weights than the same-d_ff dense model.
    assert _count(wide) - _count(dense) == 2 * (259 - 128) * 64 * 3
    # The MoE: 8 experts of 3 x 64 x 128 and a 64 x 8 router replace one 3 x 64 x 128 FFN, twice.
    assert _count(moe) - _count(dense) == 2 * ((8 - 1) * 3 * 64 * 128 + 64 * 8)
    assert not any(_cfg(sparse_positions_dense_d_ff=259).is_sparse(i) for i in range(2))
    with pytest.raises(ConfigError, match="model.sparse_positions_dense_d_ff"):
        _cfg(sparse_positions_dense_d_ff=0)
    with pytest.raises(ConfigError, match="model.sparse_positions_dense_d_ff"):
        _cfg(sparse_positions_dense_d_ff=64, sparse_dense=True)


def test_interpolate_and_train_seconds(tmp_path):
    assert compare_dense.interpolate([(1.0, 4.0), (3.0, 2.0)], 2.5) == 2.5  # 4 + (2 - 4) * 1.5 / 2
    assert compare_dense.interpolate([(1.0, 4.0), (3.0, 2.0)], 3.0) == 2.0
    assert math.isnan(compare_dense.interpolate([(1.0, 4.0), (3.0, 2.0)], 0.5))
    # Eval every 2 steps: step 1 (compile) and step 3 (after an evaluation) count as the median (0.2 s).
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"step": s, "seconds": t}) + "\n" for s, t in
                            [(2, 0.1), (3, 9.0), (4, 0.2), (5, 9.0), (6, 0.3)]))
    assert compare_dense.train_seconds(str(path), 6, 2) == pytest.approx([0.2, 0.3, 0.5, 0.7, 0.9, 1.2])


def test_four_step_run_json_table_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_dense, "EVAL_POINTS", 2)  # evaluations at steps 2 and 4
    out, json_path, png = tmp_path / "out", tmp_path / "r.json", tmp_path / "r.png"
    argv = ["compare_dense.py", "--steps", "4", "--out_dir", str(out), "--json", str(json_path), "--plot", str(png)]
    assert compare_dense.main(argv) == 0
    document = json.loads(json_path.read_text())
    rows = document["rows"]
    assert [r["model"] for r in rows] == list(compare_dense.MODELS)
    assert {r["dataset"] for r in rows} == {"offline_corpus"} and png.stat().st_size > 0
    for r in rows:
        assert r["steps"] == 4 and r["seeds"] == [0] and [p[0] for p in r["curves"]["0"]] == [2, 4]
        assert 0 < r["loss_at_steps_mean"] < 10 and r["loss_at_steps_std"] == 0.0
        # The budget is the fastest run's time: interpolated between that run's evaluations, inside the others'.
        assert r["wallclock_budget_s"] > 0 and r["wallclock_budget_s"] <= r["train_seconds_mean"]
        # Inside this run's evaluations: interpolated; before its first one (a run more than 2x slower on a
        # loaded machine): nan, not a made-up value.
        (_, t2, loss2, _), (_, t4, loss4, _) = r["curves"]["0"]
        if r["wallclock_budget_s"] >= t2:
            assert min(loss2, loss4) <= r["loss_at_wallclock_mean"] <= max(loss2, loss4)
        else:
            assert math.isnan(r["loss_at_wallclock_mean"])
    by_model = {r["model"]: r for r in rows}
    assert by_model["dense_same_d_ff"]["router_entropy_final"] is None
    matched_flops = by_model["dense_flop_matched"]["ffn_flops_per_token"]
    assert by_model["moe"]["ffn_flops_per_token"] == pytest.approx(matched_flops, abs=2 * 384)
    table = capsys.readouterr().out
    assert table.count("| offline_corpus |") == 3 and "@ step 4" in table
    # Resume: finished runs are read back, not retrained (their metrics files stay as they were).
    metrics = out / "offline_corpus" / "moe_seed0" / "metrics.jsonl"
    before = metrics.read_text()
    assert compare_dense.main(argv) == 0
    assert metrics.read_text() == before
    assert json.loads(json_path.read_text())["rows"][0]["loss_at_steps_mean"] == rows[0]["loss_at_steps_mean"]


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--seeds", "a,b"], ["--models", "moe,bogus"],
                                   ["--text_file", "/no/such/file"], ["--bogus"]])
def test_bad_flags_exit_2_one_line(flags, capsys):
    with pytest.raises(SystemExit) as e:
        compare_dense.main(["compare_dense.py", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("compare_dense.py: usage error")


def test_routing_group_and_capacity_knobs_reach_every_model():
    args = compare_dense.parse_args(["compare_dense.py", "--set", "model.moe.max_group_size=4096",
                                     "--set", "model.moe.train_capacity_factor=2.0"])
    configs = compare_dense.model_configs(args.setting, steps=4, seed=0, text_file=None)
    for name, c in configs.items():
        assert c.model.moe.max_group_size == 4096 and c.model.moe.group_size is None, name
        assert c.model.moe.train_capacity_factor == 2.0, name
    assert configs["moe"].optim.learning_rate == compare_dense.SETTING[compare_dense.F_LR]
