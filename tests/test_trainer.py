"""End-to-end tests of stmoe.trainer on 8 simulated CPU devices (tests/conftest.py).

One module-scoped reference run (`base_run`: 6 steps, 2 microbatches, dropout on, one expert
per device) is shared; the other tests copy its workdir or re-run its config:
- resume after SIGTERM is bitwise exact;
- its checkpoint (8 devices, expert axis 8) restores on 1 device and on a (2, 2, 2) mesh, and
  training continues;
- a damaged newest checkpoint makes the next start warn and resume from the previous one;
- a non-finite gradient is skipped, counted, and the next step trains (train_step called directly).

Restoring on one device: the config option `num_devices=1` builds the mesh over the first device
only, in this process. A subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=1
would test the same restore code path (the abstract state's shardings decide where arrays go)
at the cost of a second interpreter, TensorFlow import and compile.
"""
import functools
import glob
import json
import os
import shutil
import signal

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from stmoe import losses, optim, steps, trainer
from stmoe.config import LossConfig, ModelConfig, MoeConfig
from stmoe.data import preprocessors
from stmoe.models import EncoderDecoder

STEPS = 6  # the reference run; checkpoints every 2 steps (2, 4, 6)
STOP_AT = 3  # SIGTERM after this step: not a checkpoint step, so the preemption save is exercised
INPUTS = 32


def tiny_config():
    """d_model 32, 2+2 layers, 8 experts (one MoE layer per stack), 16 sequences of 32 / 12 tokens."""
    c = pretrain.get_config("tiny")
    c.model.d_model, c.model.d_ff, c.model.num_heads, c.model.d_kv = 32, 64, 2, 16
    c.model.num_encoder_layers = c.model.num_decoder_layers = 2
    c.model.dropout_rate = 0.1  # dropout rngs must be reproduced exactly on resume
    c.model.moe.num_experts = 8
    c.mesh.expert = 8
    c.data.inputs_length = INPUTS
    c.data.targets_length = preprocessors.pre_corruption_length(INPUTS)[1]
    c.batch_size = 16
    c.microbatches = 2
    c.total_steps = STEPS
    c.checkpoint_every_steps = 2
    c.keep_checkpoints = 5
    c.eval_every_steps = STEPS
    c.eval_steps = 1
    c.log_every_steps = 2
    c.optim.warmup_steps = 100
    return c


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every train_and_evaluate jits its steps afresh; identical programs hit this cache."""
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", previous)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("base"))
    result = trainer.train_and_evaluate(tiny_config(), workdir)
    params = jax.device_get(result.state.params)
    return workdir, result, params


def test_end_to_end_metrics_checkpoints_and_report(base_run):
    workdir, result, _ = base_run
    assert result.step == STEPS and not result.preempted
    assert result.train_step_traces == 1  # no recompiles across steps
    assert np.isfinite(result.train_metrics["cross_entropy"])
    assert sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*"))) \
        == [2, 4, 6]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if "train/cross_entropy" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    last = train[-1]
    for key in ("train/tokens_per_sec", "train/learning_rate", "train/grad_norm", "train/param_norm",
                "train/update_norm", "train/aux_loss", "train/router_z_loss", "train/nonfinite_skips",
                "train/moe/encoder/layers_1/ffn/load_cv", "train/moe/decoder/layers_1/ffn/router_entropy",
                "train/moe/encoder/layers_1/ffn/dropped_fraction_rank2",
                "train/moe/decoder/layers_1/ffn/expert_7_tokens"):
        assert key in last and np.isfinite(last[key]), key
    assert any("eval/cross_entropy" in r for r in records)
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert os.path.getsize(os.path.join(workdir, "expert_load.png")) > 0


def test_eval_cross_entropy_matches_numpy_on_the_final_params(base_run):
    """The held-out cross-entropy the run reports (eval at its last step, 8 devices) against a float64
    log-softmax of one unsharded forward of the final params on the same eval batch."""
    from stmoe import data as stmoe_data

    _, result, params = base_run
    config = tiny_config()
    run, tasks = trainer.prepare(config)
    lengths = {"inputs": config.data.inputs_length, "targets": config.data.targets_length}
    batches = stmoe_data.get_batch_iterator(tasks.eval, config.data.eval_split, lengths,
                                            config.batch_size // config.microbatches, seed=config.data.seed,
                                            pack=config.data.pack, shuffle=False, repeat=False)
    batch = next(iter(batches))  # eval_steps = 1
    batches.close()
    keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "encoder_segment_ids",
            "decoder_segment_ids", "encoder_positions", "decoder_positions")
    model = EncoderDecoder(run.model)
    logits = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, **b, enable_dropout=False))(
        nn.meta.unbox(params), {k: batch[k] for k in keys if k in batch}), np.float64)
    targets, weights = np.asarray(batch["decoder_target_tokens"]), np.asarray(batch["decoder_loss_weights"])
    top = logits.max(-1)
    log_z = top + np.log(np.exp(logits - top[..., None]).sum(-1))
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    assert weights.sum() > 0
    np.testing.assert_allclose(result.eval_metrics["cross_entropy"], (nll * weights).sum() / weights.sum(), rtol=1e-5)


def test_resume_after_sigterm_is_bitwise_exact(base_run, tmp_path):
    _, _, reference = base_run

    def preempt(step, state):
        del state
        if step == STOP_AT:
            os.kill(os.getpid(), signal.SIGTERM)

    first = trainer.train_and_evaluate(tiny_config(), str(tmp_path), hooks=[preempt])
    assert first.preempted and first.step == STOP_AT and first.stop_signal == signal.SIGTERM
    assert os.path.isdir(tmp_path / "checkpoints" / str(STOP_AT))  # saved by the preemption path
    second = trainer.train_and_evaluate(tiny_config(), str(tmp_path))
    assert second.step == STEPS and not second.preempted
    _leaves_equal(jax.device_get(second.state.params), reference)


def test_restore_on_one_device_and_another_mesh(base_run, tmp_path):
    """8 devices (expert axis 8) -> 1 device: exact restore, one more step; -> (2, 2, 2): exact restore."""
    workdir, _, reference = base_run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    config = tiny_config()
    config.num_devices = 1
    config.mesh.expert = 1
    config.eval_steps = 0
    restored = trainer.train_and_evaluate(config, str(tmp_path))  # total_steps reached: restore only
    assert restored.step == STEPS
    assert {d.id for x in jax.tree.leaves(restored.state.params) for d in x.devices()} == {0}
    _leaves_equal(jax.device_get(restored.state.params), reference)

    config.total_steps = STEPS + 1  # training continues on 1 device and saves step 7 from there
    one = trainer.train_and_evaluate(config, str(tmp_path))
    assert one.step == STEPS + 1 and np.isfinite(one.train_metrics["cross_entropy"])
    assert os.path.isdir(tmp_path / "checkpoints" / str(STEPS + 1))

    config = tiny_config()
    config.mesh.data, config.mesh.expert, config.mesh.model = 2, 2, 2
    config.total_steps = STEPS + 1
    other = trainer.train_and_evaluate(config, str(tmp_path))  # 1 device -> (data 2, expert 2, model 2)
    assert other.step == STEPS + 1
    assert len({d.id for x in jax.tree.leaves(other.state.params) for d in x.devices()}) == 8
    _leaves_equal(jax.device_get(other.state.params), jax.device_get(one.state.params))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see test_checkpoints.py
def test_damaged_newest_checkpoint_falls_back_to_previous(base_run, tmp_path, capsys):
    workdir, _, reference = base_run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    for path in glob.glob(str(tmp_path / "checkpoints" / str(STEPS) / "state" / "**" / "manifest.ocdbt"),
                          recursive=True):
        with open(path, "wb") as f:
            f.write(b"\x00garbage")
    result = trainer.train_and_evaluate(tiny_config(), str(tmp_path))
    err = capsys.readouterr().err
    assert f"could not restore step {STEPS}" in err
    assert result.step == STEPS
    _leaves_equal(jax.device_get(result.state.params), reference)  # steps 5-6 redone exactly
    assert os.path.isdir(tmp_path / "checkpoints" / f"{STEPS}.damaged")


def test_nonfinite_gradient_is_skipped_and_counted():
    model_cfg = ModelConfig(vocab_size=128, d_model=32, d_ff=64, num_heads=2, d_kv=16, num_encoder_layers=1,
                            num_decoder_layers=1, sparse_interval=1, moe=MoeConfig(num_experts=4)).validate()
    model = EncoderDecoder(model_cfg)
    rng = np.random.default_rng(0)
    targets = rng.integers(1, 128, (4, 8)).astype(np.int32)
    batch = {"encoder_input_tokens": rng.integers(1, 128, (4, 16)).astype(np.int32),
             "decoder_target_tokens": targets,
             "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
             "decoder_loss_weights": np.ones((4, 8), np.float32)}
    params = nn.unbox(model.init(jax.random.key(0), batch["encoder_input_tokens"],
                                 batch["decoder_input_tokens"], targets, enable_dropout=False)["params"])
    optim_cfg = optim.OptimConfig(optimizer="adamw", learning_rate=1e-3, schedule="constant")
    optimizer = optim.make_optimizer(optim_cfg, params)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    bound = functools.partial(
        steps.train_step, model=model, optimizer=optimizer,
        learning_rate_fn=optim.learning_rate_schedule(optim_cfg), loss_cfg=LossConfig(),
        balance_coef_fn=losses.balance_coef_schedule(LossConfig()), microbatches=1, seed=0)

    @chex.assert_max_traces(n=1)
    def step(state, batch):
        return bound(state, batch)

    step_fn = jax.jit(step)

    state, m1 = step_fn(state, batch)
    assert float(m1["nonfinite_skips"]) == 0
    before = jax.device_get(state.params)
    poisoned = dict(batch, decoder_loss_weights=np.where(np.arange(8) == 3, np.nan, 1.0).astype(np.float32)
                    * np.ones((4, 1), np.float32))
    state, m2 = step_fn(state, poisoned)
    assert not np.isfinite(float(m2["grad_norm"]))
    assert float(m2["nonfinite_skips"]) == 1 and int(state.step) == 2
    _leaves_equal(jax.device_get(state.params), before)  # the update was skipped
    state, m3 = step_fn(state, batch)  # training continues (same compiled step: max 1 trace)
    assert float(m3["nonfinite_skips"]) == 1 and np.isfinite(float(m3["loss"]))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                        jax.tree.leaves(before))]
    assert any(changed)


def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """From step 5 on every gradient is NaN (the balance-loss coefficient is NaN): after
    max_consecutive_nonfinite=3 skipped steps (5, 6, 7) train.py stops with exit status 3 and one
    line; the checkpoints (2, 4, 6) hold finite parameters, and step 6's equal step 4's (skipped)."""
    import importlib.util

    import orbax.checkpoint as ocp

    from stmoe import checkpoints, cli

    real = losses.balance_coef_schedule
    monkeypatch.setattr(losses, "balance_coef_schedule", lambda *a, **k: (
        lambda step: jnp.where(step >= 4, jnp.nan, real(*a, **k)(step))))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(root, "scripts", "train.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    overrides = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_heads=2",
                 "--config.model.num_encoder_layers=2", "--config.model.num_decoder_layers=2",
                 f"--config.data.inputs_length={INPUTS}",
                 f"--config.data.targets_length={preprocessors.pre_corruption_length(INPUTS)[1]}",
                 "--config.batch_size=8", "--config.total_steps=20", "--config.checkpoint_every_steps=2",
                 "--config.keep_checkpoints=10", "--config.eval_steps=0", "--config.log_every_steps=1",
                 "--config.optim.max_consecutive_nonfinite=3"]
    capsys.readouterr()
    status = script.main(["train.py", "--workdir", str(tmp_path)] + overrides)
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert status == cli.TRAINING_DIVERGED == 3
    assert len(err) == 1, err
    assert "3 steps in a row, 5 to 7, had non-finite gradients" in err[0]
    assert "last good checkpoint: step 6" in err[0] and "aux_loss_coef" in err[0] and "grad_norm" in err[0]

    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    assert ckpt.all_steps() == [2, 4, 6]  # nothing saved at the stop
    ckpt.close()
    params = {}
    for step in (4, 6):
        with ocp.PyTreeCheckpointer() as reader:
            params[step] = jax.device_get(reader.restore(checkpoints.state_dir(
                str(tmp_path / "checkpoints" / str(step))))["params"])
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params[step]))
    _leaves_equal(params[6], params[4])  # steps 5 and 6 were skipped, not applied
