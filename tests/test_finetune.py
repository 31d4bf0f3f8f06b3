"""Fine-tuning, evaluation and inference on 8 simulated CPU devices.

One module-scoped pretraining run (`pretrained`: 2 steps of a d_model-32 model) provides the
checkpoint everything else starts from:
- every `freeze` preset: frozen params bit-identical after two train steps, the others changed,
  and no optimizer state for the frozen ones (train_step called directly);
- fine-tuning through the trainer from that checkpoint with freeze='moe': the MoE params equal the
  checkpoint's bit for bit afterwards (so they were loaded, and stayed frozen), and the periodic
  decoding evaluation (seqio Evaluator) reports exact match and the dropped-token share;
- scripts/infer.py: a lower --eval_capacity_factor reports more dropped tokens, same outputs count;
- scripts/evaluate.py writes metrics.json;
- bad inputs to finetune.py / infer.py / evaluate.py: one stderr line, exit status 2.
"""
import glob
import importlib.util
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune, pretrain
from stmoe import checkpoints, optim, steps, trainer
from stmoe.config import FREEZE_PRESETS, ModelConfig
from stmoe.models import EncoderDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MODEL = dict(d_model=32, d_ff=64, num_heads=2, d_kv=16)


def _small(config):
    for key, value in SMALL_MODEL.items():
        config.model[key] = value
    config.model.num_encoder_layers = config.model.num_decoder_layers = 2
    return config


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    c = _small(pretrain.get_config("tiny"))
    c.data.inputs_length, c.data.targets_length = 32, 12
    c.batch_size, c.total_steps, c.checkpoint_every_steps, c.eval_steps = 8, 2, 2, 0
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    result = trainer.train_and_evaluate(c, workdir)
    return workdir, jax.device_get(result.state.params)


def _logged_exact_match(log_dir, task):
    """(100 x share of logged predictions equal to their target, rows): recomputed here from the decoded
    strings that seqio's JSONLogger writes to <task>-<step>.jsonl, independently of the metric code."""
    (path,) = glob.glob(os.path.join(log_dir, f"{task}-[0-9]*.jsonl"))
    rows = [json.loads(line) for line in open(path)]
    hits = [str(r["prediction"]).strip() == str(r["target"]).strip() for r in rows]
    return 100.0 * float(np.mean(hits)), len(rows)


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------ freeze presets


@pytest.fixture(scope="module")
def small_model_gradients():
    """(params, boxed params, grad_fn): the small model's initial params (and in their nn.Partitioned
    boxes, what the optimizer is built from, as steps.state_layout does) and one jitted gradient function of the
    training loss (cross-entropy + MoE losses, dropout on), shared by every freeze preset."""
    cfg = ModelConfig.from_dict(_small(pretrain.get_config("tiny")).model.to_dict())
    model = EncoderDecoder(cfg)
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 200, (4, 8))
    batch = {"encoder_input_tokens": rng.integers(2, 200, (4, 16)), "decoder_target_tokens": targets,
             "decoder_input_tokens": np.pad(targets[:, :-1], [(0, 0), (1, 0)]),
             "decoder_loss_weights": np.ones((4, 8), np.float32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    boxed = model.init(jax.random.key(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                       batch["decoder_target_tokens"])["params"]
    params = nn.unbox(boxed)

    def loss(params, step):
        ce, moe, _ = steps.forward(params, batch, jax.random.fold_in(jax.random.key(1), step), model=model,
                                      output_z_coef=0.0, enable_dropout=True)
        return ce["cross_entropy"] / jnp.sum(batch["decoder_loss_weights"]) + moe["aux_loss"] + moe["router_z_loss"]

    return params, boxed, jax.jit(jax.grad(loss))


@pytest.mark.parametrize("freeze", sorted(FREEZE_PRESETS))
def test_freeze_preset_keeps_frozen_params_bit_identical(freeze, small_model_gradients):
    params, boxed, grad_fn = small_model_gradients
    ocfg = optim.OptimConfig(optimizer="adafactor", schedule="constant", learning_rate=1e-2,
                             freeze_patterns=FREEZE_PRESETS[freeze])
    tx = optim.make_optimizer(ocfg, boxed)
    update = jax.jit(tx.update)
    new_params, opt_state = params, tx.init(params)
    for step in range(2):  # two fine-tuning steps through the full optimizer chain
        updates, opt_state = update(grad_fn(new_params, step), opt_state, new_params)
        new_params = optax.apply_updates(new_params, updates)
    new = trainer.TrainState(step=jnp.int32(2), params=new_params, opt_state=opt_state)

    patterns = [re.compile(p) for p in FREEZE_PRESETS[freeze]]
    before, after = _flat(params), _flat(jax.device_get(new.params))
    frozen = {name for name in before if any(p.search(name) for p in patterns)}
    # The paper's subsets, independently of the regexes: which names each preset must update.
    updated_by_name = {
        "none": lambda n: True,
        "moe": lambda n: "/moe/" not in n,
        "non_moe": lambda n: "/moe/" in n,
        "attention": lambda n: "attention/" in n,
        "non_moe_ffn_only": lambda n: "/ffn/mlp/" in n or "/ffn/extra_mlp/" in n,
    }[freeze]
    assert frozen == {n for n in before if not updated_by_name(n)}
    assert len(frozen) < len(before)
    for name in before:
        same = np.array_equal(np.asarray(before[name]).view(np.uint32), np.asarray(after[name]).view(np.uint32))
        assert same == (name in frozen), (freeze, name)
    # Frozen params have no optimizer state: no state array sits under a frozen param's path.
    state_paths = [p for p, leaf in _flat(new.opt_state).items() if hasattr(leaf, "shape") and leaf.size > 1]
    for name in frozen:
        assert not any(p.endswith(name) or f"{name}/" in p for p in state_paths), (freeze, name)
    unfrozen_state = optim.make_optimizer(ocfg.replace(freeze_patterns=()), boxed).init(params)
    state_size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert (state_size(new.opt_state) < state_size(unfrozen_state)) == (freeze != "none")


# ---------------------------------------------------------------------- fine-tuning end to end


def _finetune_config(init_checkpoint):
    c = _small(finetune.get_config("tiny"))
    c.init_checkpoint = init_checkpoint
    c.data.inputs_length, c.data.targets_length = 64, 16
    c.batch_size, c.total_steps, c.checkpoint_every_steps, c.eval_every_steps, c.eval_steps = 8, 2, 2, 2, 0
    c.infer_eval.num_examples, c.infer_eval.batch_size = 16, 16
    return c


def test_finetune_from_checkpoint_freezes_moe_and_evaluates_by_decoding(pretrained, tmp_path):
    workdir, pretrained_params = pretrained
    c = _finetune_config(workdir)
    c.freeze = "moe"
    result = trainer.train_and_evaluate(c, str(tmp_path))
    before, after = _flat(pretrained_params), _flat(jax.device_get(result.state.params))
    moe_names = [n for n in before if "/moe/" in n]
    assert moe_names
    for name in before:
        assert np.array_equal(before[name], after[name]) == (name in moe_names), name
    task, qa = next((k, v) for k, v in result.infer_eval_metrics.items() if k.startswith("stmoe_synthetic_qa"))
    assert (qa["exact_match"], c.infer_eval.num_examples) == _logged_exact_match(tmp_path / "infer_eval", task)
    assert 0.0 <= qa["moe/dropped_tokens"] <= 1.0
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any(any(k.startswith("infer_eval/") and k.endswith("/exact_match") for k in r) for r in logged)
    assert any(name.endswith("-metrics.jsonl") for name in os.listdir(tmp_path / "infer_eval"))


def _stderr_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_finetune_script_rejects_bad_checkpoints_and_tasks(pretrained, tmp_path, capsys):
    workdir, _ = pretrained
    script = _script("finetune")
    base = ["finetune.py", "--workdir", str(tmp_path / "ft")]
    assert script.main(base + ["--init_checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _stderr_line(capsys)
    # The default tiny preset is d_model 64; the checkpoint is d_model 32: the shapes are listed.
    assert script.main(base + ["--init_checkpoint", workdir]) == 2
    line = _stderr_line(capsys)
    assert "does not match the model config" in line and "checkpoint (32,) vs config (64,)" in line
    assert script.main(base + ["--init_checkpoint", workdir, "--config.data.task=no_such_task"]) == 2
    assert "data.task" in _stderr_line(capsys)


# ------------------------------------------------------------------------- inference scripts


def test_infer_capacity_factor_changes_dropped_fraction(pretrained, tmp_path, capsys):
    workdir, _ = pretrained
    infer = _script("infer")
    lines = [f"question {i}: what is the colour of the {w} river today?" for i, w in enumerate("abcdefgh")]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    dropped = {}
    for factor in (0.5, 8.0):
        out, stats = tmp_path / f"out_{factor}.txt", tmp_path / f"stats_{factor}.json"
        assert infer.main(["--checkpoint", workdir, "--input", str(tmp_path / "in.txt"), "--output", str(out),
                           "--eval_capacity_factor", str(factor), "--stats_json", str(stats),
                           "--max_decode_length", "8"]) == 0
        assert len(out.read_text().splitlines()) == len(lines)
        report = json.loads(stats.read_text())
        assert report["eval_capacity_factor"] == factor
        assert isinstance(report["health"], list)
        # The 'dropped' flag follows each layer's first-choice drop share (threshold 1%).
        assert {f["layer"] for f in report["health"] if f["check"] == "dropped"} == {
            layer for layer, v in report["layers"].items() if layer != "all" and v["dropped_fraction_rank1"] > 0.01}
        dropped[factor] = report["layers"]["all"]["dropped_tokens"]
        assert f"eval capacity factor {factor}" in capsys.readouterr().err
    # capacity ceil(0.5 * 2 * tokens / 8 experts) (min 4) cannot hold every choice; 8.0 holds all.
    assert dropped[8.0] == 0.0 and dropped[0.5] > 0.0

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("question: x?\tanswer\nquestion: y?\tother answer\n")
    scored = tmp_path / "scores.txt"
    assert infer.main(["--checkpoint", workdir, "--mode", "score", "--input", str(pairs),
                       "--output", str(scored)]) == 0
    values = [float(line.split("\t")[0]) for line in scored.read_text().splitlines()]
    counts = [int(line.split("\t")[1]) for line in scored.read_text().splitlines()]
    # Independently: the checkpoint's teacher-forced logits, float64 log-softmax, summed over the
    # target's tokens (vocabulary ids + EOS, cut to targets_length; decoder inputs = targets shifted
    # right behind a 0).
    from stmoe import inference
    loaded = inference.load(workdir)
    cut = lambda text, length: list(loaded.vocabulary.encode(text))[:length - 1] + [1]  # a cut row keeps EOS (1)
    rows = [(cut(a, loaded.inputs_length), cut(b, loaded.targets_length))
            for a, b in (("question: x?", "answer"), ("question: y?", "other answer"))]
    enc = np.zeros((2, loaded.inputs_length), np.int32)
    target = np.zeros((2, loaded.targets_length), np.int32)
    for i, (a, b) in enumerate(rows):
        enc[i, :len(a)], target[i, :len(b)] = a, b
    dec_in = np.pad(target[:, :-1], [(0, 0), (1, 0)])
    params = nn.meta.unbox(jax.device_get(loaded.params))
    logits = np.asarray(jax.jit(lambda p: loaded.model.apply({"params": p}, enc, dec_in, target, enable_dropout=False))(
        params), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want = [logp[i, np.arange(len(b)), b].sum() for i, (_, b) in enumerate(rows)]
    assert counts == [len(b) for _, b in rows]
    np.testing.assert_allclose(values, want, rtol=1e-5, atol=2e-6)


def test_infer_and_evaluate_bad_inputs_exit_2(pretrained, tmp_path, capsys):
    workdir, _ = pretrained
    infer, evaluate = _script("infer"), _script("evaluate")
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert infer.main(["--checkpoint", workdir, "--input", str(tmp_path / "empty.txt")]) == 2
    assert "is empty" in _stderr_line(capsys)
    (tmp_path / "one.txt").write_text("hello\n")
    assert infer.main(["--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path / "one.txt")]) == 2
    assert "does not exist" in _stderr_line(capsys)
    assert infer.main(["--checkpoint", workdir, "--mode", "score", "--input", str(tmp_path / "one.txt")]) == 2
    assert "input<TAB>target" in _stderr_line(capsys)
    assert evaluate.main(["--checkpoint", workdir, "--task", "no_such_task"]) == 2
    assert "no_such_task" in _stderr_line(capsys)


def test_evaluate_script_writes_metrics(pretrained, tmp_path, capsys):
    workdir, _ = pretrained
    evaluate = _script("evaluate")
    assert evaluate.main(["--checkpoint", workdir, "--task", "stmoe_synthetic_qa", "--num_examples", "8",
                          "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["step"] == 2 and summary["eval_capacity_factor"] == 2.0
    (task, metrics), = summary["tasks"].items()
    assert task.startswith("stmoe_synthetic_qa")
    assert (metrics["exact_match"], 8) == _logged_exact_match(tmp_path, task)
    assert "exact_match" in capsys.readouterr().out
    assert checkpoints.state_dir(workdir).endswith(os.path.join("checkpoints", "2", "state"))
