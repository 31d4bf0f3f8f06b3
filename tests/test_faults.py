"""Faults, restarts and mismatched checkpoints, on the user's paths (8 simulated CPU devices).

One module-scoped reference run (`reference`: tests/fault_worker.py's config, 6 steps, checkpoints
at 2, 4, 6) is shared: every restart below must end bitwise equal to it.
- the data position is a count of sequences: a restart at half the batch size continues the
  stream exactly (rows compared), and one with another shard count continues it without repeats;
- damaged newest checkpoints (a truncated file, a missing directory) are skipped, named with the
  reason, and training resumes from the newest good one;
- SIGKILL in the middle of an asynchronous save (a subprocess): the next start skips the
  unfinished step and resumes from the last complete one, bitwise;
- an unwritable workdir stops train.py with one line before any step; a full disk at a save
  stops it with one line naming the step, and the previous checkpoint restores;
- a checkpoint of another model stops train.py / finetune.py / infer.py / evaluate.py with one
  line listing what differs; a scanned checkpoint loads into an unscanned model (and back) with
  the same logits;
- finite gradients whose update is not finite (an infinite learning rate, a subprocess): the steps
  are skipped, exit status 3, every leaf of every saved step finite; adamw with eps=0 is refused;
- one run per workdir: a lock of a live process refuses train.py in one line, a dead one's is
  taken over; SIGINT / SIGTERM (sent by the worker to itself) save and exit 130 / 143.
"""
import errno
import glob
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fault_worker as fw
from configs import finetune, pretrain
from stmoe import checkpoints, inference, partitioning, trainer
from stmoe.config import ModelConfig
from stmoe.data import pipeline
from stmoe.models import EncoderDecoder, unscan_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # test_checkpoints.py


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_stderr_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err
    return err[-1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A persistent compilation cache shared by this module's runs and the killed subprocess."""
    previous = jax.config.jax_compilation_cache_dir
    path = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield path
    jax.config.update("jax_compilation_cache_dir", previous)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    del cache_dir
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = trainer.train_and_evaluate(fw.tiny_config(), workdir)
    assert result.step == fw.STEPS
    return workdir, jax.device_get(result.state.params)


def _copy(workdir, tmp_path, keep_steps=None):
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    if keep_steps is not None:
        for path in glob.glob(str(tmp_path / "checkpoints" / "*")):
            if int(os.path.basename(path)) not in keep_steps:
                shutil.rmtree(path)
    return str(tmp_path)


def _data_state(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "data", "metadata")) as f:
        return json.load(f)


# ------------------------------------------------------------------ 1. data position across layouts

TASK = "stmoe_synthetic_span_corruption"
LENGTHS = {"inputs": 32, "targets": 12}


def _rows(batches):
    return np.concatenate([b["encoder_input_tokens"] for b in batches])


def test_half_batch_resume_continues_the_row_stream_exactly():
    """3 batches of 4, then batches of 2 from the saved state = rows 12.. of one uninterrupted stream."""
    it = pipeline.get_batch_iterator(TASK, "train", LENGTHS, 4, seed=1)
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    assert state["sequences"] == 12
    uninterrupted = _rows([next(it) for _ in range(2)])  # the same pipeline goes on: rows 12..19
    it.close()
    resumed = pipeline.get_batch_iterator(TASK, "train", LENGTHS, 2, seed=1)
    note = resumed.set_state(state)
    assert "continuing exactly at batch 2" in note
    np.testing.assert_array_equal(_rows([next(resumed) for _ in range(4)]), uninterrupted)
    assert resumed.get_state()["sequences"] == 20
    resumed.close()
    assert not any((_rows(first)[:, None] == uninterrupted[None]).all(-1).any(0))  # no row seen twice


def _qa_rows(it, batches):
    out = [tuple(r) for b in [next(it) for _ in range(batches)] for r in b["encoder_input_tokens"]]
    it.close()
    return out


def _qa(batch, shard_index=0, num_shards=1):
    return pipeline.get_batch_iterator("stmoe_synthetic_qa", "validation", {"inputs": 160, "targets": 8}, batch,
                                       shard_index=shard_index, num_shards=num_shards, pack=False, shuffle=False,
                                       repeat=False)


@pytest.mark.parametrize("old_shards,new_shards", [(2, 1), (1, 2)])
def test_other_shard_count_continues_without_repeats(old_shards, new_shards):
    """The offline corpus shards by index; unshuffled, the new shards start right after what was seen."""
    full = _qa_rows(_qa(8), 4)  # examples 0..31 in index order, all distinct
    assert len(set(full)) == 32
    seen, states = [], []
    for index in range(old_shards):
        it = _qa(8 // old_shards, index, old_shards)
        seen += _qa_rows(it, 2)
        states.append(it.get_state())
    assert sorted(seen) == sorted(full[:16])
    assert all(s["sequences"] == 16 for s in states)
    after = []
    for index in range(new_shards):
        it = _qa(8 // new_shards, index, new_shards)
        note = it.set_state(states[0])  # any shard's state: the count is global
        assert "approximate" in note and f"x {old_shards} shard(s)" in note
        after += _qa_rows(it, 2)
    assert sorted(after) == sorted(full[16:32])


def test_state_without_sequence_count_and_another_stream():
    it = _qa(4)
    legacy = {"step": 2, "spec": {**it.get_state()["spec"], "batch_size": 8}}  # before "sequences" existed
    assert "16 sequences" in it.set_state(legacy)
    assert _qa_rows(it, 1) == _qa_rows(_qa(16), 2)[16:20]
    other = {**it.get_state(), "spec": {**it.get_state()["spec"], "inputs_length": 64}}
    with pytest.raises(pipeline.StreamMismatchError, match="inputs_length 64 .saved. vs 160 .now."):
        it.set_state(other)


def test_trainer_resumes_at_half_the_batch(reference, tmp_path, capsys):
    workdir = _copy(reference[0], tmp_path)
    result = trainer.train_and_evaluate(fw.tiny_config(batch_size=fw.BATCH // 2, total_steps=fw.STEPS + 2), workdir)
    out = capsys.readouterr().out
    assert result.step == fw.STEPS + 2 and np.isfinite(result.train_metrics["cross_entropy"])
    assert "continuing exactly at batch 8 x 1 shard(s)" in out
    assert _data_state(workdir, fw.STEPS + 2)["sequences"] == fw.STEPS * fw.BATCH + 2 * fw.BATCH // 2


def test_changed_input_stream_or_model_stops_train_py_with_one_line(reference, tmp_path, capsys):
    workdir = _copy(reference[0], tmp_path, keep_steps={2})
    config_json = (tmp_path / "config.json").read_text()
    script = _script("train")
    assert script.main(["train.py", "--workdir", workdir] + fw.flags(data__inputs_length=64,
                                                                     data__targets_length=16)) == 2
    line = _last_stderr_line(capsys)
    assert line.startswith("train.py: config error: data: ") and "inputs_length 32 (saved) vs 64 (now)" in line
    assert script.main(["train.py", "--workdir", workdir] + fw.flags(model__d_ff=128)) == 2
    line = _last_stderr_line(capsys)
    assert line.startswith("train.py: checkpoint error: ") and "model.d_ff: checkpoint's run 64 vs config 128" in line
    assert (tmp_path / "config.json").read_text() == config_json  # the run's record is not overwritten
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert not os.path.exists(tmp_path / checkpoints.LOCK_FILE)  # released after the refused restore


# ------------------------------------------------------------------ 2. damaged newest checkpoints


def test_damaged_newest_steps_are_skipped_and_named(reference, tmp_path, capsys):
    """Step 6: every data file cut to half its size; step 4: its state/ directory gone -> from step 2."""
    workdir = _copy(reference[0], tmp_path)
    for path in glob.glob(str(tmp_path / "checkpoints" / "6" / "state" / "**" / "d" / "*"), recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "state")
    result = trainer.train_and_evaluate(fw.tiny_config(), workdir)
    out = capsys.readouterr().out
    assert "skipped checkpoint step 6: damaged (file " in out and "is truncated" in out
    assert "skipped checkpoint step 4: damaged (its state/ directory is missing)" in out
    assert "starting at step 2 from its own checkpoint at step 2" in out
    _leaves_equal(jax.device_get(result.state.params), reference[1])  # steps 3-6 redone exactly
    assert os.path.isdir(tmp_path / "checkpoints" / "6.damaged") and os.path.isdir(tmp_path / "checkpoints" / "4.damaged")


def _truncate_step(workdir, step):
    for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)


def test_every_checkpoint_damaged_is_one_line(reference, tmp_path, capsys):
    workdir = _copy(reference[0], tmp_path)
    for step in (2, 4, 6):
        _truncate_step(workdir, step)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    assert _script("train").main(["train.py", "--workdir", workdir] + fw.flags()) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"train.py: checkpoint error: no checkpoint step in {workdir}/checkpoints could be "
                             "restored: step 6: file ") and "step 2: file " in err[0], err[0]
    assert f"move {workdir}/checkpoints aside (or use another --workdir)" in err[0]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before  # nothing set aside or deleted


def test_other_optimizer_over_own_checkpoints_is_one_line(reference, tmp_path, capfd):
    """Resuming an Adafactor run with --config.optim.optimizer=adamw: refused before anything is
    written, naming both optimizers and the way to a fresh optimizer state; without the run's
    config.json the restore itself says that the optimizer differs (not that the steps are damaged)."""
    workdir = _copy(reference[0], tmp_path)
    before = {p: os.path.getmtime(p) for p in glob.glob(f"{workdir}/**", recursive=True)}
    assert _script("train").main(["train.py", "--workdir", workdir] + fw.flags(optim__optimizer="adamw")) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("train.py: config error: optim.optimizer: 'adamw', but the checkpoints in ") and \
        "were written with 'adafactor'" in err[0] and f"--config.init_checkpoint={workdir} --workdir " in err[0], err
    assert {p: os.path.getmtime(p) for p in glob.glob(f"{workdir}/**", recursive=True)} == before

    os.remove(os.path.join(workdir, "config.json"))
    assert _script("train").main(["train.py", "--workdir", workdir] + fw.flags(optim__optimizer="adamw")) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "hold another train state than this config builds" in err[0] and \
        "optim.*" in err[0] and "--config.init_checkpoint=WORKDIR" in err[0], err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6"]  # not set aside as damaged


def test_damaged_newest_step_falls_back_for_inference_and_finetuning(reference, tmp_path, capfd):
    """infer.py and finetune.py's --init_checkpoint read the newest step that reads, and say in one line
    which one they skipped (as training does)."""
    workdir = _copy(reference[0], tmp_path / "run")
    _truncate_step(workdir, 6)
    (tmp_path / "in.txt").write_text("question: what?\n")
    capfd.readouterr()
    assert _script("infer").main(["--checkpoint", workdir, "--input", str(tmp_path / "in.txt"),
                                  "--max_decode_length", "4"]) == 0
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert err[0].startswith(f"WARNING: checkpoint step 6 in {workdir}/checkpoints is damaged (") and \
        err[0].endswith("; using step 4"), err
    assert len(err) == 2 and err[1].startswith("infer.py: 1 rows;"), err  # and the usual routing line

    loaded = inference.load(workdir)
    assert loaded.checkpoint.endswith(os.path.join("checkpoints", "4", "state"))
    step4 = inference.load(os.path.join(workdir, "checkpoints", "4"))
    _leaves_equal(jax.device_get(loaded.params), jax.device_get(step4.params))

    config = finetune.get_config("tiny")
    for name, value in fw.OVERRIDES.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    config.init_checkpoint = workdir
    _script("finetune").check_init_checkpoint(config)  # the metadata check: step 4's
    model = EncoderDecoder(ModelConfig.from_dict(config.model.to_dict()))
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1, expert=1, model=1), jax.devices())
    shapes = {"encoder_input_tokens": (2, fw.INPUTS), "decoder_input_tokens": (2, 12), "decoder_target_tokens": (2, 12)}
    abstract, shardings = partitioning.abstract_params_and_shardings(model, mesh, shapes, jax.random.key(0))
    capfd.readouterr()
    params = checkpoints.restore_params(workdir, partitioning.with_shardings(abstract, shardings))
    assert "WARNING: checkpoint step 6" in capfd.readouterr().err
    _leaves_equal(jax.device_get(params), jax.device_get(step4.params))

    for step in (2, 4):  # none left: one line, no warning per step before it
        _truncate_step(workdir, step)
    assert _script("infer").main(["--checkpoint", workdir, "--input", str(tmp_path / "in.txt")]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"infer.py: input error: no checkpoint step in {workdir}/checkpoints "
                                               "could be read: step 6: "), err


@pytest.mark.parametrize("damage", ["truncated", "string_for_an_int"])
def test_unreadable_config_json_is_one_line(reference, tmp_path, capfd, damage):
    workdir = _copy(reference[0], tmp_path / "run")
    path = os.path.join(workdir, "config.json")
    text = open(path).read()
    if damage == "truncated":
        text = text[:len(text) // 2]
    else:
        text = text.replace('"d_model": 32', '"d_model": "32"', 1)
    with open(path, "w") as f:
        f.write(text)
    (tmp_path / "in.txt").write_text("question: what?\n")
    capfd.readouterr()
    assert _script("infer").main(["--checkpoint", workdir, "--input", str(tmp_path / "in.txt")]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"infer.py: input error: {path}"), err
    assert ("is not valid JSON" if damage == "truncated" else "model.d_model: must be an int, got '32'") in err[0]


# ------------------------------------------------------------------ 3. SIGKILL during an async save


def test_sigkill_during_async_save_resumes_from_last_complete_step(reference, tmp_path, cache_dir, capsys):
    """The worker resumes a copy of the reference at step 2 and is killed inside the save of step 4."""
    workdir, marker = _copy(reference[0], tmp_path / "run", keep_steps={2}), str(tmp_path / "saving")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(WORKER), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, WORKER, "kill_in_save", workdir, "4", marker, cache_dir], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Block on the worker's output until it says it is inside the save (its rename then hangs for
    # good), or ends; the timer only turns a hung worker into a failure.
    guard = threading.Timer(600, proc.kill)
    guard.start()
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith(fw.SAVING):
            break
    guard.cancel()
    if not output or not output[-1].startswith(fw.SAVING):
        proc.kill()
        pytest.fail(f"the worker never reached the save of step 4:\n{''.join(output)[-3000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    entries = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert "2" in entries and "4" not in entries and "4.orbax-checkpoint-tmp" in entries, entries

    result = trainer.train_and_evaluate(fw.tiny_config(), workdir)
    out = capsys.readouterr().out
    assert "skipped checkpoint step 4: its save never completed" in out
    assert "starting at step 2 from its own checkpoint at step 2" in out
    _leaves_equal(jax.device_get(result.state.params), reference[1])
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))


# ------------------------------------------------------------------ 4. unwritable workdir, full disk


@pytest.mark.parametrize("where", ["under_a_file", "checkpoints_is_a_file", "proc"])
def test_unwritable_workdir_fails_before_any_step(where, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("not a directory")
    if where == "under_a_file":
        workdir = str(tmp_path / "a_file" / "run")
    elif where == "checkpoints_is_a_file":
        workdir = str(tmp_path / "run")
        os.makedirs(workdir)
        (tmp_path / "run" / "checkpoints").write_text("in the way")
    else:
        workdir = "/proc/stmoe_run"  # even root cannot create files here
    def must_not_run(*args, **kwargs):
        raise AssertionError("reached the data pipeline or the model before the workdir check")

    monkeypatch.setattr(trainer, "_input_streams", must_not_run)  # no data pipeline ...
    monkeypatch.setattr(partitioning, "make_mesh", must_not_run)  # ... no mesh, so no compile
    assert _script("train").main(["train.py", "--workdir", workdir] + fw.flags()) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("train.py: workdir error: cannot write to "), err
    if where != "proc":
        assert not os.path.exists(os.path.join(workdir, "tensorboard"))


def test_full_disk_at_a_save_stops_with_one_line_and_keeps_the_previous(reference, tmp_path, capsys, caplog,
                                                                       monkeypatch):
    """The one error line ends stderr, after the progress lines only: orbax's tracebacks of the failed
    save (one per thread) are not logged."""
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def full_disk_at_step_6(self):
        if self.get_final().name == "6":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk_at_step_6)
    workdir = _copy(reference[0], tmp_path, keep_steps={2, 4})  # resumes at 4, the save of 6 fails
    assert _script("train").main(["train.py", "--workdir", workdir] + fw.flags()) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line.split(",")[0] for line in err[:-1]] == ["train: step 6/6 (100%)"], err
    assert [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR] == []
    line = err[-1]
    assert line.startswith("train.py: checkpoint error: could not save checkpoint step 6 to ") and \
        "No space left on device" in line and "the newest complete checkpoint, step 4, is intact" in line, line
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6.orbax-checkpoint-tmp"]

    result = trainer.train_and_evaluate(fw.tiny_config(), workdir)  # the disk has room again
    assert "starting at step 4 from its own checkpoint at step 4" in capsys.readouterr().out
    _leaves_equal(jax.device_get(result.state.params), reference[1])


# ------------------------------------------------------------------ 5. other model, other layout

SCAN_MODEL = dict(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_encoder_layers=4, num_decoder_layers=4,
                  sparse_interval=2)  # 2 scanned units of (dense, sparse) per stack


def _model_config(scan):
    c = pretrain.get_config("tiny")
    for key, value in SCAN_MODEL.items():
        c.model[key] = value
    c.model.moe.num_experts = 4
    c.model.scan_layers = scan
    c.data.inputs_length, c.data.targets_length = 32, 12
    return c


def _batch():
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 300, (8, 12)).astype(np.int32)
    return {"encoder_input_tokens": rng.integers(2, 300, (8, 32)).astype(np.int32),
            "decoder_input_tokens": np.pad(targets[:, :-1], [(0, 0), (1, 0)]), "decoder_target_tokens": targets}


def _logits(model, params, mesh=None):
    fn = jax.jit(lambda p, b: model.apply({"params": p}, **b, enable_dropout=False))
    if mesh is None:
        return np.asarray(fn(params, _batch()))
    with partitioning.activate(mesh):
        return np.asarray(fn(params, _batch()))


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """{scan: (run dir with config.json + checkpoints/1, params, logits)} for a scanned and an unscanned
    model of the same architecture; the unscanned params are the scanned ones converted."""
    runs = {}
    scanned_model = EncoderDecoder(ModelConfig.from_dict(_model_config(True).model.to_dict()))
    params = nn.unbox(jax.jit(lambda r: scanned_model.init(r, **_batch(), enable_dropout=False))(
        jax.random.key(0))["params"])
    for scan, tree in ((True, params), (False, unscan_params(params, ModelConfig(sparse_interval=2)))):
        run = tmp_path_factory.mktemp(f"scan_{scan}")
        config = _model_config(scan)
        (run / "config.json").write_text(config.to_json_best_effort())
        with checkpoints.Checkpointer(str(run / "checkpoints"), async_save=False) as ckpt:
            ckpt.save(1, {"step": jnp.int32(1), "params": tree}, {})
        runs[scan] = (str(run), jax.device_get(tree))
    return runs, _logits(scanned_model, params)


def _abstract(scan):
    model = EncoderDecoder(ModelConfig.from_dict(_model_config(scan).model.to_dict()))
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, expert=4, model=1), jax.devices())
    shapes = {k: v.shape for k, v in _batch().items()}
    abstract, shardings = partitioning.abstract_params_and_shardings(model, mesh, shapes, jax.random.key(1))
    return model, mesh, partitioning.with_shardings(abstract, shardings)


@pytest.mark.parametrize("saved_scan", [True, False])
def test_other_layer_layout_is_converted_on_restore(layout_runs, saved_scan):
    """Fine-tuning's restore_params: scanned -> unscanned model and back; same logits as the scanned model."""
    runs, expected = layout_runs
    model, mesh, abstract = _abstract(not saved_scan)
    params = checkpoints.restore_params(runs[saved_scan][0], abstract)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract), strict=True):
        assert got.shape == want.shape and got.sharding == want.sharding
    _leaves_equal(jax.device_get(params), runs[not saved_scan][1])  # the layout the config asks for
    np.testing.assert_allclose(_logits(model, params, mesh), expected, rtol=1e-5, atol=1e-5)


def test_scanned_run_loads_for_inference_and_finetuning(layout_runs, tmp_path, capsys):
    runs, expected = layout_runs
    loaded = inference.load(runs[True][0])  # config.json says scan_layers=True; decoding needs unscanned
    assert not loaded.model.config.scan_layers
    np.testing.assert_allclose(_logits(loaded.model, loaded.params, loaded.mesh), expected, rtol=1e-5, atol=1e-5)

    ft = _script("finetune")
    flags = [f"--config.model.{k}={v}" for k, v in SCAN_MODEL.items()] + ["--config.model.moe.num_experts=4"]
    config = finetune.get_config("tiny")
    for k, v in {**SCAN_MODEL, "scan_layers": False}.items():
        config.model[k] = v
    config.model.moe.num_experts, config.init_checkpoint = 4, runs[True][0]
    ft.check_init_checkpoint(config)  # scanned checkpoint, unscanned config: accepted (converted)
    # ... but its optimizer state cannot be converted: one line, before any step.
    argv = ["finetune.py", "--workdir", str(tmp_path / "ft"), "--init_checkpoint", runs[True][0],
            "--config.reset_optimizer_state=False", "--config.eval_steps=0", "--config.infer_eval.task="] + flags
    assert ft.main(argv) == 2
    line = _last_stderr_line(capsys)
    assert line.startswith("finetune.py: checkpoint error: init_checkpoint: ") and "scanned layers" in line \
        and "reset_optimizer_state=True" in line, line


def test_checkpoint_of_another_preset_is_refused_in_one_line(layout_runs, tmp_path, capsys):
    """finetune.py: the checkpoint's run config.json names the fields; infer.py / evaluate.py: a run dir
    whose config.json (the tiny preset, d_model 64) is not the one that wrote its checkpoint."""
    runs, _ = layout_runs
    assert _script("finetune").main(["finetune.py", "--workdir", str(tmp_path / "ft"),
                                     "--init_checkpoint", runs[False][0]]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("finetune.py: checkpoint error: --init_checkpoint: ") and \
        "model.d_model: checkpoint's run 32 vs config 64" in err[0] and "parameters differ" in err[0]

    shutil.copytree(runs[False][0], tmp_path / "mixed")
    (tmp_path / "mixed" / "config.json").write_text(pretrain.get_config("tiny").to_json_best_effort())
    (tmp_path / "in.txt").write_text("question: what?\n")
    for name, argv in (("infer", ["--input", str(tmp_path / "in.txt")]), ("evaluate", [])):
        assert _script(name).main(["--checkpoint", str(tmp_path / "mixed")] + argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1, err
        assert err[0].startswith(f"{name}.py: input error: checkpoint ") and "does not match the model config" in err[0] \
            and "parameters differ" in err[0] and "vs config (64, 4, 16)" in err[0], err[0]


# ------------------------------------------------------------------ 6. non-finite update from finite gradients


def _worker(mode_args, cache_dir, cwd=ROOT, timeout=600):
    """tests/fault_worker.py MODE ... as a subprocess: (exit status, stdout, stderr lines)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(WORKER), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, WORKER, *mode_args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, [line for line in proc.stderr.splitlines() if line.strip()]


def _saved_state(workdir, step):
    """Every array of a saved step, as numpy (read back on the devices it was saved from)."""
    import warnings

    import orbax.checkpoint as ocp
    with ocp.PyTreeCheckpointer() as reader, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sharding info not provided")  # the same 8 devices
        return jax.device_get(reader.restore(checkpoints.state_dir(os.path.join(workdir, "checkpoints", str(step)))))


def test_infinite_learning_rate_update_is_skipped_and_every_saved_leaf_is_finite(tmp_path, cache_dir):
    """The learning rate is +inf from step 4 on (a fault in the schedule; the config refuses inf): the
    gradients stay finite and the new params would be +-inf / NaN. Steps 4 and 5 are skipped, the run
    stops with exit status 3 and one line, and every leaf (params and optimizer state) of every saved
    step is finite; the step the message calls the last good checkpoint exists and equals step 3."""
    workdir = str(tmp_path / "run")
    args = ["--workdir", workdir] + fw.flags(total_steps=8, checkpoint_every_steps=1, keep_checkpoints=10,
                                             optim__max_consecutive_nonfinite=2)
    status, _, stderr = _worker(["infinite_lr", "3", cache_dir, *args], cache_dir)
    err = [line for line in stderr if line.startswith("train.py:")]  # the others: progress, absl's save notes
    assert status == 3, stderr
    assert len(err) == 1, stderr
    assert err[0].startswith("train.py: training error: training diverged: 2 steps in a row, 4 to 5, had "
                             "non-finite gradients or updates"), err[0]
    assert "non-finite at step 5: learning_rate;" in err[0] and "no non-finite update was applied or saved" in err[0]
    last_good = int(err[0].split("last good checkpoint: step ")[1].split()[0])
    steps = sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())
    assert steps == [1, 2, 3, 4] and last_good == steps[-1], (steps, err[0])
    saved = {step: _saved_state(workdir, step) for step in steps}
    for step, state in saved.items():
        leaves = [x for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.inexact)]
        assert leaves and all(np.all(np.isfinite(x)) for x in leaves), f"step {step} holds a non-finite leaf"
    _leaves_equal(saved[4]["params"], saved[3]["params"])  # step 4 was skipped, not applied
    skips = [x for path, x in jax.tree_util.tree_flatten_with_path(saved[4]["opt_state"])[0]
             if "total_notfinite" in jax.tree_util.keystr(path)]
    assert [int(x) for x in skips] == [1]
    assert not os.path.exists(os.path.join(workdir, checkpoints.LOCK_FILE))  # released on the error path


def test_save_refuses_a_nonfinite_state_even_when_the_step_lets_it_through(tmp_path, capsys, monkeypatch):
    """The save's own check, with the step's guard replaced by optax.apply_if_finite (gradients only,
    the guard before this fix): the infinite learning rate's NaN update of step 4 is applied, and the
    save of step 4 refuses it (exit status 3, step 3 the last good checkpoint, all saved leaves
    finite). With that check off too, NaN checkpoints are written (the failure this prevents); a
    rerun on them stops at start, naming the checkpoint, instead of training from NaN."""
    from stmoe import optim
    schedule = optim.learning_rate_schedule
    monkeypatch.setattr(optim, "learning_rate_schedule", lambda cfg: (
        lambda count: jnp.where(count >= 3, jnp.inf, schedule(cfg)(count))))
    monkeypatch.setattr(optim, "skip_nonfinite_steps", lambda inner: optax.apply_if_finite(inner, 2**31 - 1))
    train = _script("train").main
    flags = fw.flags(total_steps=5, checkpoint_every_steps=1, keep_checkpoints=10, optim__max_consecutive_nonfinite=2)
    capsys.readouterr()
    assert train(["train.py", "--workdir", str(tmp_path / "a")] + flags) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py:")]
    assert len(err) == 1 and "the state after step 4 holds non-finite values" in err[0], err
    assert "last good checkpoint: step 3 in " in err[0], err[0]
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["1", "2", "3"]
    assert not os.path.exists(tmp_path / "a" / checkpoints.LOCK_FILE)  # released on the error path
    for step in (1, 2, 3):
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_saved_state(str(tmp_path / "a"), step))
                   if np.issubdtype(np.asarray(x).dtype, np.inexact))

    monkeypatch.setattr(optim, "all_finite", lambda tree: jnp.array(True))  # no check anywhere: the old trainer
    assert train(["train.py", "--workdir", str(tmp_path / "b")] + flags) == 0
    assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_saved_state(str(tmp_path / "b"), 5)["params"]))
    monkeypatch.undo()
    capsys.readouterr()
    assert train(["train.py", "--workdir", str(tmp_path / "b")] + fw.flags(total_steps=6)) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py:")]
    assert len(err) == 1 and err[0].startswith("train.py: training error: training diverged: the starting state "
                                               "(its own checkpoint at step 5) holds non-finite values"), err


def test_adamw_with_eps_zero_is_refused_before_anything_is_written(tmp_path):
    """The user's command (adamw, eps=0: 0 / 0 for every parameter whose gradient has been 0)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--workdir", str(workdir),
                           "--config.optim.optimizer=adamw", "--config.optim.eps=0", "--config.total_steps=3",
                           "--config.batch_size=8", "--config.checkpoint_every_steps=1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("train.py: config error: optim.eps: must be > 0 for optimizer 'adamw'"), err[0]
    assert os.listdir(workdir) == []


# ------------------------------------------------------------------ 7. one run per workdir


def _write_lock(workdir, pid, host=None):
    import socket
    os.makedirs(workdir, exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-01-01 00:00:00 UTC"}
    with open(os.path.join(workdir, checkpoints.LOCK_FILE), "w") as f:
        json.dump(holder, f)


def _files(path):
    out = {}
    for folder, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), path)] = f.read()
    return out


def test_second_run_on_a_workdir_in_use_is_refused_in_one_line(reference, tmp_path):
    """A lock naming a live process on this host (this test's own): train.py stops before any step,
    names that pid, and changes nothing in the workdir (the lock included)."""
    workdir = _copy(reference[0], tmp_path)
    _write_lock(workdir, os.getpid())
    before = _files(workdir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--workdir", workdir]
                          + fw.flags(total_steps=fw.STEPS + 2), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith(f"train.py: workdir error: workdir {workdir} is in use by another run: pid "
                             f"{os.getpid()} on this host"), err[0]
    assert _files(workdir) == before


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(reference, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process
    workdir = _copy(reference[0], tmp_path)
    _write_lock(workdir, dead.pid)
    result = trainer.train_and_evaluate(fw.tiny_config(), workdir)  # total_steps reached: restore only
    out = capsys.readouterr().out
    assert result.step == fw.STEPS
    notes = [line for line in out.splitlines() if "stale lock" in line]
    assert notes == [f"stmoe: took over the stale lock {os.path.join(workdir, checkpoints.LOCK_FILE)} of pid "
                     f"{dead.pid} (since 2026-01-01 00:00:00 UTC), which is no longer running"], out
    assert not os.path.exists(os.path.join(workdir, checkpoints.LOCK_FILE))


def test_workdir_lock_refuses_other_hosts_and_unreadable_locks_and_releases_only_its_own(tmp_path):
    _write_lock(str(tmp_path / "a"), 1, host="another-host")  # its liveness cannot be checked from here
    with pytest.raises(checkpoints.WorkdirInUseError, match="pid 1 on host another-host"):
        checkpoints.WorkdirLock(str(tmp_path / "a")).acquire()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / checkpoints.LOCK_FILE).write_text("")
    with pytest.raises(checkpoints.WorkdirInUseError, match="cannot be read"):
        checkpoints.WorkdirLock(str(tmp_path / "b")).acquire()

    lock = checkpoints.WorkdirLock(str(tmp_path / "c"))
    os.makedirs(lock.workdir)
    assert lock.acquire() is None
    holder = json.loads(open(lock.path).read())
    assert holder["pid"] == os.getpid()
    with pytest.raises(checkpoints.WorkdirInUseError, match=f"pid {os.getpid()} on this host"):
        checkpoints.WorkdirLock(lock.workdir).acquire()  # a second run in this very process
    lock.release()
    assert not os.path.exists(lock.path)
    assert lock.acquire() is None
    _write_lock(lock.workdir, os.getpid())  # replaced meanwhile (deleted by hand, another run): not ours to delete
    lock.release()
    assert os.path.exists(lock.path)
    assert "no lock taken on gs://bucket/run" in checkpoints.WorkdirLock("gs://bucket/run").acquire()


# ------------------------------------------------------------------ 8. a signal stops the run unfinished


@pytest.mark.parametrize("signame,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_saves_then_exits_with_128_plus_the_signal(tmp_path, cache_dir, signame, status):
    """The worker sends itself the signal right after step 3 (not a checkpoint step): train.py saves
    step 3 and exits 130 / 143, not 0, so `train.py && evaluate.py` stops; the lock is released."""
    workdir = str(tmp_path / "run")
    code, out, err = _worker(["signal", signame, "3", cache_dir, "--workdir", workdir, *fw.flags()], cache_dir)
    assert code == status, (out[-2000:], err)
    assert f"stmoe: stopped by {signame} at step 3; checkpoint saved" in out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
    assert not os.path.exists(os.path.join(workdir, checkpoints.LOCK_FILE))
