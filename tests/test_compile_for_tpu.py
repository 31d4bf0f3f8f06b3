"""The train step compiled for TPU slices by XLA's TPU compiler (libtpu, no TPU needed): stmoe.aot.

Two compiles of a small tiny (2 + 2 layers, short sequences): v4:2x2x2 (8 chips, 2 hosts) with
one expert per chip, and v5e:2x4 with the experts over 4 chips and 2-way data parallelism. Both
must fit, move tokens by all-to-all on the expert axis (2 forward + 2 backward per MoE layer) and
gather no expert weight. The HLO parsing (replica groups -> mesh axes, the expert-weight detector,
loop trip counts) is checked on small hand-written modules whose answers are known.
"""
import importlib.util
import json
import os
import sys

import pytest

from stmoe import aot
from stmoe.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[test]' brings it)")

SMALL = {"model.num_encoder_layers": 2, "model.num_decoder_layers": 2, "batch_size": 16,
         "data.inputs_length": 32, "data.targets_length": 8}


def small_tiny(**fields):
    from configs import pretrain
    config = pretrain.get_config("tiny")
    with config.unlocked():
        for path, value in {**SMALL, **fields}.items():
            node = config
            *parents, leaf = path.split(".")
            for name in parents:
                node = node[name]
            node[leaf] = value
    return config


@pytest.fixture(scope="module")
def v4_report():
    return aot.compile_for_topology(small_tiny(**{"mesh.expert": 8}), "v4:2x2x2")


@pytest.fixture(scope="module")
def v5e_report():
    return aot.compile_for_topology(small_tiny(**{"mesh.data": 2, "mesh.expert": 4}), "v5e:2x4")


@needs_libtpu
def test_v4_one_expert_per_chip(v4_report):
    r = v4_report
    assert (r["devices"], r["hosts"], r["chip"]) == (8, 2, "v4")
    assert r["mesh"] == {"data": 1, "expert": 8, "model": 1}
    # Resolved for "tpu", not for this CPU (whose grouped kernel is the tiled loop).
    assert (r["dispatch"], r["expert_execution"], r["grouped_kernel"]) == ("gather", "batched", "ragged_dot")
    assert r["memory"]["fits_with_headroom"] and 0 < r["memory"]["peak"] < aot.CHIPS["v4"].hbm_bytes
    c = r["collectives"]
    assert c["moe_layers"] == 2 and c["all_to_all_per_moe_layer"] == 4
    assert c["count_by_kind_and_axes"]["all-to-all"] == {"expert": 8}
    assert "all-gather" not in c["count_by_kind"] and r["expert_weight_all_gathers"] == []
    roof = r["roofline"]
    assert roof["step_s"] == max(roof["compute_s"], roof["hbm_s"], roof["ici_s"]) > 0
    assert 0 < roof["mfu"] <= 1


@needs_libtpu
def test_v5e_experts_over_four_chips_data_over_two(v5e_report):
    r = v5e_report
    assert (r["devices"], r["chip"], r["mesh"]) == (8, "v5e", {"data": 2, "expert": 4, "model": 1})
    assert r["memory"]["fits_with_headroom"]
    c = r["collectives"]
    # Tokens move between the experts of one data replica only; nothing crosses `data` but gradients.
    assert c["count_by_kind_and_axes"]["all-to-all"] == {"expert": 8}
    assert c["all_to_all_per_moe_layer"] == 4
    assert set(c["count_by_kind_and_axes"]["all-reduce"]) <= {"data", "data+expert"}
    assert "data" in c["count_by_kind_and_axes"]["all-reduce"]  # expert weights: replicas over `data` only
    assert r["expert_weight_all_gathers"] == []


@needs_libtpu
def test_decode_step_gathers_the_expert_weights():
    """A cached decoding step routes groups of one token through grouped matmuls (ragged_dot), which
    have no all-to-all path: GSPMD gathers every expert weight of the decoder instead, at every
    step. This pins down that known cost (docs/tpu.md), and shows the detector firing on a real
    executable: the decoder's one MoE layer, 8 experts of [64, 128] / [128, 64], over all 8 chips."""
    r = aot.compile_for_topology(small_tiny(**{"mesh.data": 2, "mesh.expert": 4}), "v5e:2x4", mode="decode")
    assert r["mode"] == "decode" and r["memory"]["fits_with_headroom"]
    assert r["collectives"]["moe_layers"] == 1 and r["collectives"]["all_to_all_on_expert_axis"] == 0
    gathered = {tuple(g["result"]) for g in r["expert_weight_all_gathers"]}
    assert gathered == {(8, 64, 128), (8, 128, 64)}
    assert r["flops"]["model_per_chip"] > 0 and r["roofline"]["step_s"] > 0


# ----------------------------------------------------------------- the HLO parsing, on known answers

MESH = {"data": 2, "expert": 4, "model": 1}


@pytest.mark.parametrize("attributes, groups, axes", [
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", [[0, 1, 2, 3], [4, 5, 6, 7]], ("expert",)),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", [[0, 4], [1, 5], [2, 6], [3, 7]], ("data",)),
    ("replica_groups=mesh['axis_0'=8] {'axis_0'}", [list(range(8))], ("data", "expert")),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]], ("data",)),
    ("replica_groups=[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]], ("expert",)),
    ("replica_groups={{0,2},{1,3},{4,6},{5,7}}", [[0, 2], [1, 3], [4, 6], [5, 7]], ("expert",)),
])
def test_replica_groups_to_mesh_axes(attributes, groups, axes):
    assert aot.replica_groups(attributes, 8) == groups
    assert aot.axes_of(groups, MESH) == axes


LOOP_MODULE = """HloModule m

%body (p: (s32[], f32[4,8,16])) -> (s32[], f32[4,8,16]) {
  %p = (s32[], f32[4,8,16]) parameter(0)
  %x = f32[4,8,16]{2,1,0} get-tuple-element(%p), index=1
  %a2a = f32[4,8,16]{2,1,0} all-to-all(%x), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8,16]) tuple(%i, %a2a)
}

%cond (q: (s32[], f32[4,8,16])) -> pred[] {
  %q = (s32[], f32[4,8,16]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (w: f32[1,16,32]) -> f32[4,16,32] {
  %w = f32[1,16,32]{2,1,0} parameter(0)
  %ag = f32[4,16,32]{2,1,0} all-gather(%w), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %init = (s32[], f32[4,8,16]) parameter(1)
  %loop = (s32[], f32[4,8,16]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  ROOT %out = f32[4,16,32]{2,1,0} copy(%ag)
}
"""


def test_loop_bodies_count_their_trip_count_and_expert_gathers_are_flagged():
    # Experts [4, 16, 32] over `expert`: the all-gather of a [1, 16, 32] shard along dim 0 is one.
    r = aot.analyze_hlo(LOOP_MODULE, MESH, expert_shapes=[(4, 16, 32)], expert_dims=[0], num_moe_layers=3)
    c = r["collectives"]
    assert c["count_by_kind_and_axes"] == {"all-gather": {"expert": 1}, "all-to-all": {"expert": 6}}
    assert c["all_to_all_per_moe_layer"] == 2
    assert r["while_loops"] == [["loop", 6]]
    # Per execution: all-to-all sends 3/4 of its 2048 bytes, 6 times; the all-gather 3 shards of 2048 bytes.
    assert c["bytes_per_chip_by_kind"] == {"all-to-all": 6 * 2048 * 3 / 4, "all-gather": 3 * 2048}
    assert [g["result"] for g in r["expert_weight_all_gathers"]] == [[4, 16, 32]]
    # The same gather of a tensor that is not an expert weight (another shape) is not flagged.
    other = aot.analyze_hlo(LOOP_MODULE, MESH, expert_shapes=[(4, 16, 64)], expert_dims=[0])
    assert other["expert_weight_all_gathers"] == []


def test_trip_count_from_the_loop_condition_when_xla_prints_none():
    # XLA:TPU prints no known_trip_count: the count is the condition's bound minus the counter's start.
    module = LOOP_MODULE.replace(', backend_config={"known_trip_count":{"n":"6"}}', "")
    module = module.replace("  ROOT %c = pred[] constant(true)",
                            "  %n = s32[] constant(7)\n  %k = s32[] get-tuple-element(%q), index=0\n"
                            "  ROOT %c = pred[] compare(%k, %n), direction=LT")
    module = module.replace("  %init = (s32[], f32[4,8,16]) parameter(1)",
                            "  %one = s32[] constant(1)\n  %start = s32[] copy(%one)\n"
                            "  %buffer = f32[4,8,16]{2,1,0} parameter(1)\n"
                            "  %init = (s32[], f32[4,8,16]) tuple(%start, %buffer)")
    r = aot.analyze_hlo(module, MESH)
    assert r["while_loops"] == [["loop", 6]] and r["unknown_trip_counts"] == []
    assert r["collectives"]["count_by_kind_and_axes"]["all-to-all"] == {"expert": 6}


# ----------------------------------------------------------------- bad input: one line, status 2


def run_script(*args):
    """scripts/compile_for_tpu.py's main in this process (as the other scripts' tests run theirs)."""
    import importlib
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        script = importlib.import_module("compile_for_tpu")
    finally:
        sys.path.pop(0)
    return script.main(["compile_for_tpu.py", *args])


@needs_libtpu
@pytest.mark.parametrize("args, message", [
    (["--topology", "v9:2x2"], "--topology 'v9:2x2': expected GENERATION:SHAPE"),
    (["--topology", "v4:3x3x3"], "--topology 'v4:3x3x3': INVALID_ARGUMENT"),
    (["--topology", "v4:2x2x2", "--config.mesh.model=3"], "config error: mesh.data"),
])
def test_bad_topology_or_mesh_is_one_line_and_status_2(args, message, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert run_script(*args, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err, err
    assert not out.exists()


def test_missing_libtpu_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(aot.AotError, match="libtpu is not installed"):
        aot.topology_devices("v4:2x2x2")


@needs_libtpu
def test_mesh_that_does_not_fit_the_slice_names_the_field():
    with pytest.raises(ConfigError, match="mesh"):
        aot.compile_for_topology(small_tiny(**{"mesh.expert": 8}), "v4:2x2x1")  # 4 chips


@needs_libtpu
def test_report_json_round_trips(v4_report):
    assert json.loads(json.dumps(v4_report, default=str))["collectives"]["moe_layers"] == 2
