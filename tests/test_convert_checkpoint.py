"""scripts/convert_checkpoint.py: HF -> stmoe -> fine-tune -> HF round trip, and bad inputs.

The round trip's golden numbers are transformers' own forward pass on the exported model,
compared with stmoe's logits from the fine-tuned run's params. Bad inputs run the script as a
subprocess: exit status 2, one line on stderr, no traceback.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from stmoe import inference
from test_t5x_conversion import HEADS, _script, flaxformer_params, write_t5x_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "convert_checkpoint.py")


def _main(argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = _script("convert_checkpoint").main(argv)
    return status, stdout.getvalue()


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(tree)).items()}


# --------------------------------------------------------------------------- HF round trip


@pytest.fixture(scope="module")
def hf_round_trip(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf_round_trip")
    torch.manual_seed(0)
    # 2 + 2 blocks, block 1 of each stack sparse; byte-vocabulary ids (< 359) for the tiny QA task.
    config = transformers.SwitchTransformersConfig(
        vocab_size=384, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2, num_decoder_layers=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=16,
        dropout_rate=0.0, router_jitter_noise=0.0, tie_word_embeddings=True)
    transformers.SwitchTransformersForConditionalGeneration(config).save_pretrained(root / "hf")

    status, report = _main(["--from", "hf", str(root / "hf"), "--to", "stmoe", str(root / "stmoe"),
                            "--preset", "tiny"])
    assert status == 0, report
    initial = _flat(inference.load(str(root / "stmoe")).params)

    finetune = _script("finetune")
    workdir = str(root / "finetuned")
    assert finetune.main(["finetune.py", "--config", str(root / "stmoe" / "config.py"), "--workdir", workdir,
                          "--config.total_steps=2", "--config.batch_size=8", "--config.data.inputs_length=64",
                          "--config.data.targets_length=16", "--config.checkpoint_every_steps=2",
                          "--config.eval_every_steps=100", "--config.eval_steps=0",
                          "--config.infer_eval.task="]) == 0
    status, back_report = _main(["--from", "stmoe", workdir, "--to", "hf", str(root / "hf_back")])
    assert status == 0, back_report
    return root, report, initial, workdir


def test_hf_convert_reports_counts(hf_round_trip):
    _, report, initial, _ = hf_round_trip
    # 2 x 1 + 2 x 2 attention blocks x 4 kernels; 2 dense blocks x 2 kernels; 2 sparse x 2 expert kernels;
    # 2 x 2 + 2 x 3 norms + 2 final; tied logits (no logits kernel).
    assert ("tensors mapped: embeddings 1, attention 24, dense mlp 4, experts 4, routers 2, norms 12, "
            "position bias 2, logits 0") in report
    assert len(initial) == 1 + 24 + 4 + 4 + 2 + 12 + 2


def test_finetuned_export_loads_in_transformers(hf_round_trip):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root, _, initial, workdir = hf_round_trip
    loaded = inference.load(workdir)
    tuned = _flat(loaded.params)
    assert any(not np.array_equal(tuned[k], initial[k]) for k in initial), "fine-tuning changed nothing"

    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        root / "hf_back", attn_implementation="eager", dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    enc = rng.integers(3, 300, (2, 12))
    target = rng.integers(3, 300, (2, 8))
    dec_in = np.concatenate([np.zeros((2, 1), np.int64), target[:, :-1]], axis=1)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(enc), attention_mask=torch.ones(2, 12, dtype=torch.long),
                  decoder_input_ids=torch.tensor(dec_in)).logits.numpy()
    apply = jax.jit(lambda p: loaded.model.apply({"params": p}, enc, dec_in, target, enable_dropout=False))
    got = np.asarray(apply(jax.device_get(loaded.params)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # And the exported weights are the fine-tuned ones, not the original HF ones.
    original = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(root / "hf").state_dict()
    exported = hf.state_dict()
    assert any(not torch.equal(original[k], exported[k]) for k in original if k in exported)


# ------------------------------------------------------------------------------ bad inputs


def _run_script(*args):
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.returncode, lines


def _assert_one_line(status, lines, needle):
    assert status == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith("convert_checkpoint.py: ") and needle in lines[0], lines


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    _assert_one_line(*_run_script("--from", "t5x", str(tmp_path / "src"), "--to", "stmoe", str(tmp_path / "out")),
                     "is not a t5x checkpoint")
    assert not (tmp_path / "out").exists()


def test_unknown_parameter_name(tmp_path):
    params = flaxformer_params()
    params["encoder/layers_0/mlp/adapter/kernel"] = np.zeros((4, 4), np.float32)
    write_t5x_checkpoint(str(tmp_path / "src"), params)
    _assert_one_line(*_run_script("--from", "t5x", str(tmp_path / "src"), "--to", "stmoe", str(tmp_path / "out"),
                                  "--num_heads", str(HEADS), "--preset", "tiny"),
                     "unknown parameter name 'encoder/layers_0/mlp/adapter/kernel'")
    assert not (tmp_path / "out").exists()


def test_shape_disagrees_with_config(tmp_path):
    params = flaxformer_params()
    wo = params["decoder/layers_3/mlp/expert/wo/kernel"]
    params["decoder/layers_3/mlp/expert/wo/kernel"] = np.zeros(wo.shape[:-1] + (wo.shape[-1] + 1,), np.float32)
    write_t5x_checkpoint(str(tmp_path / "src"), params)
    _assert_one_line(*_run_script("--from", "t5x", str(tmp_path / "src"), "--to", "stmoe", str(tmp_path / "out"),
                                  "--num_heads", str(HEADS), "--preset", "tiny"),
                     "decoder/layers_3/ffn/moe/expert_wo: checkpoint shape (4, 48, 33) disagrees with the config's "
                     "(4, 48, 32)")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_in_process(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    (tmp_path / "src").mkdir()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    cases = [
        (["--from", "t5x", str(tmp_path / "src"), "--to", "stmoe", str(tmp_path / "full")], "is not empty"),
        (["--from", "t5x", str(tmp_path / "src"), "--to", "hf", str(tmp_path / "o")], "supported are"),
        (["--from", "hf", str(tmp_path / "src"), "--to", "stmoe", str(tmp_path / "o")], "no config.json"),
        (["--from", "stmoe", str(tmp_path / "src"), "--to", "hf", str(tmp_path / "o")], "no config.json"),
        (["--from", "t5x", str(tmp_path / "nope"), "--to", "stmoe", str(tmp_path / "o")], "no such directory"),
        (["--from", "t5x", str(tmp_path / "src"), "--to", "stmoe", str(tmp_path / "o")], "not a t5x checkpoint"),
        (["--from", "hf", str(tmp_path / "hf"), "--to", "stmoe", str(tmp_path / "o"), "--preset", "huge"],
         "--preset 'huge'"),
        (["--from", "t5x", str(tmp_path / "src"), "--to", "stmoe", str(tmp_path / "o"), "--group_size", "0"],
         "--group_size"),
    ]
    for argv, needle in cases:
        status, _ = _main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert status == 2 and len(err) == 1 and needle in err[0], (argv, err)
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "o").exists()
