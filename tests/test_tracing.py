"""Token tracing (stmoe/tracing.py, scripts/trace_tokens.py) and the routing health flags (stmoe/reporting.py).

- health flags on synthetic metric values: each threshold fires on its own, healthy values raise
  none, the printed report names the thresholds; routing_report of a JSONL file carries them;
- on a tiny checkpoint (module-scoped: 3 train steps of a d_model-32 model, 8 simulated devices):
  entropies within [0, ln E]; token and sentinel counts equal numpy counts of the rows; each
  layer's top-1 entropy (all tokens and sentinels) and top-token counts equal numpy values from the
  argmax of the router logits, captured independently with flax's capture_intermediates on the
  Router module; dropped first choices equal inference.routing_stats (the sown metrics); domain matrix
  rows sum to 1, one per domain; every expert with tokens lists its top tokens; pair matrix sums
  to 1 with a zero diagonal;
- on hand-built routing of 6 tokens (no model): every per-layer statistic, the domain matrix (first
  choice, not second), the (first, second) pair matrix (not transposed), mutual information and
  the sentinel boundary equal hand-computed values;
- the script: writes report.md, trace.json and the PNGs; bad inputs exit 2 with one stderr line;
- the capture under nn.scan gives the unscanned layer names, each layer's choices matching its sown counts.
"""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from stmoe import inference, metrics, partitioning, reporting, routing, tracing, trainer
from stmoe.config import ModelConfig
from stmoe.data import corpus
from stmoe.models import EncoderDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODER_LAYER = "encoder/layers_1/ffn"
ROWS = 16


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ health flags


def _healthy(num_experts=8):
    stats = {"dropped_fraction_rank1": 0.002, "dropped_fraction_rank2": 0.3, "dropped_tokens": 0.001,
             "load_cv": 0.2, "router_entropy": 0.6 * math.log(num_experts), "router_confidence": 0.5}
    stats.update({f"expert_{e}_tokens": 100.0 + e for e in range(num_experts)})
    return stats


@pytest.mark.parametrize("change, check", [
    ({"dropped_fraction_rank1": 0.011}, "dropped"),
    ({"load_cv": 0.51}, "load_cv"),
    ({"router_entropy": 0.99 * math.log(8)}, "router_undecided"),
    ({"router_entropy": 0.09 * math.log(8)}, "router_saturated"),
    # 2 of 8 experts take everything: load entropy ln 2 = 0.33 ln 8 < 0.5 ln 8
    ({**{f"expert_{e}_tokens": 0.0 for e in range(8)}, "expert_0_tokens": 50.0, "expert_5_tokens": 50.0},
     "collapse"),
])
def test_each_health_threshold_fires_alone(change, check):
    layers = {"encoder/layers_1/ffn": _healthy(), "decoder/layers_1/ffn": {**_healthy(), **change}}
    flags = reporting.health_flags(layers)
    assert [(f.layer, f.check) for f in flags] == [("decoder/layers_1/ffn", check)]
    assert flags[0].advice == reporting.ADVICE[check]


def test_healthy_layers_raise_no_flag_and_the_report_prints_thresholds(tmp_path):
    layers = {"encoder/layers_1/ffn": _healthy(), "all": {"dropped_fraction_rank1": 0.5}}
    assert reporting.health_flags(layers) == []  # the 'all' row of routing_stats is not a layer
    text = reporting.format_health([], layers)
    assert "no layer flagged" in text and "first-choice dropped > 1%" in text and "0.98 ln E" in text
    # Without expert counts (inference.routing_stats) the entropy checks need num_experts.
    saturated = {"l": {"router_entropy": 0.01}}
    assert reporting.health_flags(saturated) == []
    assert [f.check for f in reporting.health_flags(saturated, num_experts=8)] == ["router_saturated"]
    # routing_report: the last record's table, then the health block with the flagged layer.
    record = {"step": 5, **{f"eval/moe/decoder/layers_1/ffn/{k}": v for k, v in _healthy().items()}}
    record["eval/moe/decoder/layers_1/ffn/load_cv"] = 0.9
    (tmp_path / "m.jsonl").write_text(json.dumps(record) + "\n")
    report, _ = reporting.routing_report(str(tmp_path / "m.jsonl"), "eval")
    assert "Routing health (1 MoE layers checked)" in report
    assert "FLAG decoder/layers_1/ffn: load CV 0.900 (> 0.5)" in report
    assert "try (load_cv): raise the balance coefficient" in report


def test_load_entropy_matches_hand_values():
    assert reporting.load_entropy(np.array([5, 5, 0, 0])) == pytest.approx(math.log(2))
    assert reporting.load_entropy(np.ones(8)) == pytest.approx(math.log(8))
    assert reporting.load_entropy(np.array([3, 0, 0])) == 0.0


# ------------------------------------------------------------------------------ tiny checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, loaded model, inputs, targets, trace result) of a 3-step tiny run."""
    c = pretrain.get_config("tiny")
    c.model.d_model, c.model.d_ff, c.model.num_heads, c.model.d_kv = 32, 64, 2, 16
    c.model.num_encoder_layers = c.model.num_decoder_layers = 2
    c.data.inputs_length, c.data.targets_length = 32, 12
    c.batch_size, c.total_steps, c.checkpoint_every_steps, c.eval_steps = 8, 3, 3, 0
    c.data.pack = False  # packing only costs pipeline build time here
    workdir = str(tmp_path_factory.mktemp("tracing_run"))
    trainer.train_and_evaluate(c, workdir)
    loaded = inference.load(workdir)
    task = tracing.resolve_task(loaded)
    inputs, targets = tracing.task_examples(loaded, task, "validation", ROWS)
    domain_rows = tracing.domain_examples(loaded, task, "validation", rows_per_domain=ROWS // 4)
    result = tracing.trace(loaded, inputs, targets, domain_rows=domain_rows, domain_names=corpus.DOMAINS,
                           batch_size=ROWS)
    return workdir, loaded, inputs, targets, domain_rows, result


def test_entropies_and_counts(run):
    _, loaded, inputs, targets, _, result = run
    ln_e = math.log(loaded.config.moe.num_experts)
    assert result["ln_num_experts"] == pytest.approx(ln_e)
    assert list(result["layers"]) == ["encoder/layers_1/ffn", "decoder/layers_1/ffn"]
    sentinel = lambda t: t >= loaded.vocabulary.vocab_size - loaded.vocabulary.extra_ids
    decoder_inputs = np.pad(targets[:, :-1], [(0, 0), (1, 0)])
    for layer, s in result["layers"].items():
        assert 0.0 <= s["entropy_all"] <= ln_e + 1e-9
        assert 0.0 <= s["entropy_sentinel"] <= ln_e + 1e-9
        if layer.startswith("encoder"):
            assert s["tokens"] == int((inputs > 0).sum())
            assert s["sentinel_tokens"] == int(sentinel(inputs).sum()) > 0
        else:
            assert s["tokens"] == int((targets > 0).sum())  # position 0 (<start>) counts: its target is real
            assert s["sentinel_tokens"] == int((sentinel(decoder_inputs) & (targets > 0)).sum()) > 0
        assert sum(s["top1_share_all"]) == pytest.approx(1.0)


def test_entropies_match_numpy_argmax_of_router_logits(run):
    """Golden values: argmax of each Router module's logits (flax capture_intermediates, no sown
    routing involved), entropies computed here in numpy over the real tokens: the encoder's input
    tokens, the decoder's input tokens (targets shifted right) where the target is real."""
    _, loaded, inputs, targets, _, result = run

    @jax.jit
    def router_logits(params, inputs, decoder_inputs, targets):
        _, captured = loaded.model.apply(
            {"params": params}, inputs, decoder_inputs, targets, enable_dropout=False,
            mutable=["intermediates"], capture_intermediates=lambda module, _: isinstance(module, routing.Router))
        return {stack: captured["intermediates"][stack]["layers_1"]["ffn"]["moe"]["router"]["__call__"][0]
                for stack in ("encoder", "decoder")}

    decoder_inputs = np.pad(targets[:, :-1], [(0, 0), (1, 0)])
    with partitioning.activate(loaded.mesh):
        logits = router_logits(loaded.params, *map(jnp.asarray, (inputs, decoder_inputs, targets)))

    def entropy(choices):
        p = np.bincount(choices, minlength=loaded.config.moe.num_experts) / choices.size
        return -np.sum(p[p > 0] * np.log(p[p > 0]))

    for stack, tokens, real in (("encoder", inputs, inputs > 0), ("decoder", decoder_inputs, targets > 0)):
        top1 = np.asarray(logits[stack]).argmax(-1).reshape(tokens.shape)  # one group per sequence
        sentinel = real & (tokens >= loaded.vocabulary.vocab_size - loaded.vocabulary.extra_ids)
        s = result["layers"][f"{stack}/layers_1/ffn"]
        assert s["entropy_all"] == pytest.approx(entropy(top1[real]), abs=1e-9)
        assert s["entropy_sentinel"] == pytest.approx(entropy(top1[sentinel]), abs=1e-9)
        assert s["top1_share_all"] == pytest.approx((np.bincount(top1[real], minlength=8) / real.sum()).tolist())
        # ... and expert e's top tokens are the most frequent tokens among those whose argmax is e.
        for e in (0, 7):
            ids, counts = np.unique(tokens[real & (top1 == e)], return_counts=True)
            assert [t["count"] for t in s["top_tokens"][str(e)]] == sorted(counts, reverse=True)[:10]


def test_dropped_share_matches_sown_metrics(run):
    _, loaded, inputs, targets, _, result = run
    stats = inference.routing_stats(loaded, inputs, targets, batch_size=ROWS)  # one batch: same token weights
    for layer, s in result["layers"].items():
        for name in ("dropped_fraction_rank1", "dropped_fraction_rank2", "dropped_tokens"):
            assert s["health"][name] == pytest.approx(stats[layer][name], abs=1e-6), (layer, name)
        assert s["health"]["router_entropy"] == pytest.approx(stats[layer]["router_entropy"], rel=1e-5)


def test_domain_matrix_top_tokens_and_pairs(run):
    _, loaded, _, _, domain_rows, result = run
    num_experts = loaded.config.moe.num_experts
    assert result["domains"] == list(corpus.DOMAINS)
    for layer, s in result["layers"].items():
        matrix = np.asarray(s["domain_matrix"])
        assert matrix.shape == (len(corpus.DOMAINS), num_experts)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-9)
        side = domain_rows[0] if layer.startswith("encoder") else domain_rows[1]
        assert s["domain_tokens"] == [int((side[domain_rows[2] == d] > 0).sum()) for d in range(4)]
        for e in range(num_experts):
            tops = s["top_tokens"][str(e)]
            assert bool(tops) == (s["top1_share_all"][e] > 0)
            assert [t["count"] for t in tops] == sorted((t["count"] for t in tops), reverse=True)
            assert all(isinstance(t["text"], str) and t["text"] for t in tops)
        pairs = np.asarray(s["first_second"]["pairs"])
        assert pairs.sum() == pytest.approx(1.0) and np.all(np.diag(pairs) == 0)
        f = s["first_second"]
        assert f["second_wanted"] == 1.0  # deterministic passes: every second choice asks for a slot
        assert 0.0 <= f["second_kept"] <= f["second_wanted"]
        assert f["second_kept"] == pytest.approx(1.0 - s["health"]["dropped_fraction_rank2"])
        assert 0.0 <= f["mutual_information"] <= f["entropy_second"] + 1e-9


def _hand_routing(vocabulary):
    """Six real tokens, E = 4 experts, top-2, two domains of three tokens (hand-built, no model).

    token   id    domain  first second  wanted  kept
      0     10      0       0     1      T T    T T
      1     N       0       0     1      T T    T F
      2     10      0       0     2      T F    F F
      3     S0      1       1     0      T T    T T
      4     10      1       2     3      T T    T F
      5     S1      1       2     3      T T    T T
    S0, S1: the vocabulary's highest and lowest extra id (sentinels); N: the id just below S1 (not one).
    """
    s0, s1 = vocabulary.vocab_size - 1, vocabulary.vocab_size - vocabulary.extra_ids
    return {
        "tokens": np.array([10, s1 - 1, 10, s0, 10, s1]),
        "expert_index": np.array([[0, 1], [0, 1], [0, 2], [1, 0], [2, 3], [2, 3]], np.int32),
        "wanted": np.array([[1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [1, 1]], bool),
        "kept": np.array([[1, 1], [1, 0], [0, 0], [1, 1], [1, 0], [1, 1]], bool),
        "domains": np.array([0, 0, 0, 1, 1, 1]),
    }


def test_layer_summary_and_domain_matrix_match_hand_values():
    """Every statistic of one layer's trace on the hand-built routing above; golden values by hand."""
    from stmoe.data import vocab
    v = vocab.get_vocabulary(None)
    a = _hand_routing(v)
    ln2, ln3 = math.log(2), math.log(3)
    # router = [token-weighted entropy sum, confidence sum, tokens] as _run accumulates them.
    s = tracing._layer_summary(a, 4, v, False, [3.0, 1.5, 6.0])
    assert (s["tokens"], s["sentinel_tokens"]) == (6, 2)
    # First choices 0,0,0,1,2,2: p = (1/2, 1/6, 1/3, 0); H = 1/2 ln 2 + 1/6 ln 6 + 1/3 ln 3 = 2/3 ln 2 + 1/2 ln 3.
    assert s["top1_share_all"] == pytest.approx([1 / 2, 1 / 6, 1 / 3, 0])
    assert s["entropy_all"] == pytest.approx(2 / 3 * ln2 + 1 / 2 * ln3, abs=1e-12)
    assert s["entropy_sentinel"] == pytest.approx(ln2, abs=1e-12)  # sentinels' first choices 1 and 2
    assert s["top1_share_sentinel"] == pytest.approx([0, 1 / 2, 1 / 2, 0])
    # Top tokens by first choice: expert 0 takes ids 10, N, 10; expert 2 takes 10 and S1; expert 3 none.
    tops = {e: [(t["id"], t["count"]) for t in s["top_tokens"][str(e)]] for e in range(4)}
    s1 = v.vocab_size - v.extra_ids
    assert tops[0] == [(10, 2), (s1 - 1, 1)] and tops[1] == [(v.vocab_size - 1, 1)] and tops[3] == []
    assert sorted(tops[2]) == [(10, 1), (s1, 1)]

    h = s["health"]
    # rank 1 dropped: token 2; rank 2 wanted and dropped: tokens 1 and 4 (token 2's is not wanted);
    # no expert at all: token 2.
    assert h["dropped_fraction_rank1"] == pytest.approx(1 / 6)
    assert h["dropped_fraction_rank2"] == pytest.approx(2 / 6)
    assert h["dropped_tokens"] == pytest.approx(1 / 6)
    # Kept assignments per expert: e0 tokens 0, 1, 3 (second); e1 tokens 0 (second), 3; e2 tokens 4, 5;
    # e3 token 5 (second) -> load (3, 2, 2, 1), mean 2, std sqrt((1 + 0 + 0 + 1) / 4) = 1 / sqrt(2).
    assert [h[f"expert_{e}_tokens"] for e in range(4)] == [3.0, 2.0, 2.0, 1.0]
    assert h["load_cv"] == pytest.approx(1 / (2 * math.sqrt(2)))
    assert (h["router_entropy"], h["router_confidence"]) == (0.5, 0.25)

    f = s["first_second"]
    assert (f["first_kept"], f["second_wanted"], f["second_kept"]) == pytest.approx((5 / 6, 5 / 6, 3 / 6))
    # (first, second) pairs: (0,1) x2, (0,2), (1,0), (2,3) x2 of 6 tokens; not symmetric.
    want_pairs = np.zeros((4, 4))
    want_pairs[0, 1], want_pairs[0, 2], want_pairs[1, 0], want_pairs[2, 3] = 2 / 6, 1 / 6, 1 / 6, 2 / 6
    np.testing.assert_allclose(np.asarray(f["pairs"]), want_pairs, atol=1e-12,
                               err_msg="pairs[i, j] = share of tokens with first choice i, second choice j")
    # Second choices 1,1,2,0,3,3: p = (1/6, 1/3, 1/6, 1/3); H(second) = 1/3 ln 6 + 2/3 ln 3.
    assert f["entropy_second"] == pytest.approx(ln3 / 3 + ln2 / 3 + 2 / 3 * ln3, abs=1e-12)
    # The second choice fixes the first here, so I(first; second) = H(first) = 2/3 ln 2 + 1/2 ln 3
    # (= H(second) - H(second | first) = H(second) - 1/2 (ln 3 - 2/3 ln 2), first = 0 giving 1, 1, 2).
    assert f["mutual_information"] == pytest.approx(2 / 3 * ln2 + 1 / 2 * ln3, abs=1e-12)
    top_pairs = [(p["first"], p["second"], p["share"]) for p in f["top_pairs"]]
    assert [share for *_, share in top_pairs] == pytest.approx([1 / 3, 1 / 3, 1 / 6, 1 / 6])
    assert sorted(top_pairs) == pytest.approx(sorted([(0, 1, 1 / 3), (2, 3, 1 / 3), (0, 2, 1 / 6), (1, 0, 1 / 6)]))

    matrix, counts = tracing.domain_matrix(a, 2, 4)
    # Domain 0's first choices 0, 0, 0; domain 1's 1, 2, 2 (the second choices would give 1, 1, 2 and 0, 3, 3).
    np.testing.assert_allclose(np.asarray(matrix), [[1, 0, 0, 0], [0, 1 / 3, 2 / 3, 0]], atol=1e-12,
                               err_msg="domain_matrix[d, e] = share of domain d's tokens whose FIRST choice is e")
    assert counts == [3, 3]
    # The two domains use disjoint experts: the top-1 expert names the domain, I = H(domain) = ln 2.
    assert tracing.domain_information(matrix, counts) == pytest.approx(ln2, abs=1e-12)
    # Unequal domains: A (1 token) -> e0; B (3 tokens) -> e0 once, e1 twice. Joint (A,e0) 1/4,
    # (B,e0) 1/4, (B,e1) 1/2; p(A) 1/4, p(B) 3/4, p(e0) = p(e1) = 1/2:
    # I = 1/4 ln 2 + 1/4 ln(2/3) + 1/2 ln(4/3).
    assert tracing.domain_information([[1, 0], [1 / 3, 2 / 3]], [1, 3]) == pytest.approx(
        ln2 / 4 + math.log(2 / 3) / 4 + math.log(4 / 3) / 2, abs=1e-12)


def test_mutual_information_and_top1_entropy_hand_values():
    # Independent first and second choice: I = 0. Second choice a function of the first, uniform
    # over 2 values: I = H(second) = ln 2.
    assert tracing.mutual_information(np.full((2, 2), 0.25)) == pytest.approx(0.0, abs=1e-12)
    assert tracing.mutual_information(np.array([[0.0, 0.5], [0.5, 0.0]])) == pytest.approx(math.log(2))
    # Joint [[1/2, 1/4], [0, 1/4]]: px = (3/4, 1/4), py = (1/2, 1/2);
    # I = sum p ln(p / (px py)) = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2.
    joint = np.array([[0.5, 0.25], [0.0, 0.25]])
    want = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    assert tracing.mutual_information(joint) == pytest.approx(want, abs=1e-12)
    assert tracing.mutual_information(2 * joint) == pytest.approx(want, abs=1e-12)  # normalizes counts
    assert math.isnan(tracing.mutual_information(np.zeros((3, 3))))
    # top1_entropy: choices 0, 0, 1, 3 of 4 experts: p = (1/2, 1/4, 0, 1/4), H = 1/2 ln 2 + 1/2 ln 4 = 3/2 ln 2.
    assert tracing.top1_entropy(np.array([0, 0, 1, 3]), 4) == pytest.approx(1.5 * math.log(2), abs=1e-12)
    assert math.isnan(tracing.top1_entropy(np.zeros(0, np.int64), 4))


def test_token_text():
    from stmoe.data import vocab
    v = vocab.get_vocabulary(None)
    assert [tracing.token_text(v, t) for t in (3 + ord("a"), 3 + ord(" "), 3 + ord("\n"), 1, v.vocab_size - 1)] \
        == ["a", "\u2423", "\\n", "</s>", "<extra_id_0>"]
    assert tracing.token_text(v, 0, decoder=True) == "<start>"


def test_script_writes_outputs_and_rejects_bad_inputs(run, tmp_path, capsys):
    workdir = run[0]
    script = _script("trace_tokens")
    out = tmp_path / "trace"
    # --batch_size ROWS: the fixture's shapes, so the capture pass is not compiled again.
    assert script.main(["--checkpoint", workdir, "--num_batches", "1", "--batch_size", str(ROWS),
                        "--out", str(out)]) == 0
    for name in ("report.md", "trace.json", "entropy.png", "domain_routing.png", "expert_pairs.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "trace.json").read_text())
    assert saved["rows"] == ROWS and saved["domain_rows"] == ROWS and saved["meta"]["step"] == 3
    report = (out / "report.md").read_text()
    assert "## encoder/layers_1/ffn" in report and "Routing health" in report and "![domain_routing]" in report
    assert "encoder/layers_1/ffn" in capsys.readouterr().out

    for args, message in ((["--num_batches", "0"], "--num_batches must be >= 1"),
                          (["--task", "no_such_task"], "no_such_task"),
                          (["--split", "nope"], "--split 'nope'")):
        assert script.main(["--checkpoint", workdir, "--out", str(tmp_path / "x")] + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("trace_tokens.py: input error:") and message in err[0], err
    assert script.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_capture_under_scan_keeps_layer_names_and_order():
    """nn.scan stacks the sown routing on a leading layer axis; collect_routing splits it into the
    unscanned names. Each layer's captured choices reproduce the expert counts that the same layer
    sowed into 'moe' (metrics.routing_metrics), so layers are not swapped. One compile."""
    cfg = ModelConfig.from_dict(dict(vocab_size=64, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                                     num_encoder_layers=4, num_decoder_layers=2, sparse_interval=2,
                                     scan_layers=True, moe=dict(num_experts=4, eval_capacity_factor=0.5)))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 1, 64)
    model = EncoderDecoder(cfg)

    @jax.jit
    def capture(tokens):
        params = model.init(jax.random.key(0), tokens, tokens, tokens, enable_dropout=False)["params"]
        _, v = model.apply({"params": params}, tokens, tokens, tokens, enable_dropout=False,
                           mutable=["moe", "intermediates"])
        return v

    variables = capture(tokens)
    captured = tracing.collect_routing(variables["intermediates"])
    sown = metrics.expand_scanned(metrics.collect_layers(variables["moe"]))
    assert sorted(captured) == sorted(sown) == ["decoder/layers_1/ffn", "encoder/layers_1/ffn", "encoder/layers_3/ffn"]
    for layer, values in captured.items():
        assert values["expert_index"].shape == (2, 8, 2)
        index, kept = np.asarray(values["expert_index"]), np.asarray(values["kept"])
        counts = np.bincount(index[kept], minlength=4)
        np.testing.assert_array_equal(counts, np.asarray(sown[layer].expert_counts))
    # capacity max(4, ceil(0.5 * 8 / 4)) = 4 slots for 16 choices: some dropped, so counts differ by layer
    assert len({tuple(np.asarray(s.expert_counts)) for s in sown.values()}) > 1
