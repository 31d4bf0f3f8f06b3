"""Every invalid config fails at start with a one-line message naming the field.

The cases call `trainer.prepare` (RunConfig.validate + data.resolve_tasks) in-process (8 simulated devices); one test runs
scripts/train.py in a subprocess to prove the exit status 2 and the single stderr line.
"""
import os
import subprocess
import sys

import pytest

import xla_flags
from configs import finetune, pretrain
from stmoe import trainer
from stmoe.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        node = node[name]
    with node.unlocked():
        node[leaf] = value


CASES = [
    # (field to set, value, field named in the message)
    ("bogus_field", 1, "bogus_field"),
    ("data.inputs_len", 64, "data.inputs_len"),
    ("model.moe.num_expert", 4, "model.moe.num_expert"),
    ("optim.learning_rat", 1e-3, "optim.learning_rat"),
    ("model.moe.top_k", 9, "model.moe.top_k"),  # > num_experts (8)
    ("model.moe.train_capacity_factor", 0.0, "model.moe.train_capacity_factor"),
    ("model.moe.eval_capacity_factor", -1.0, "model.moe.eval_capacity_factor"),
    ("model.moe.decoder_priority", "token_major", "model.moe.decoder_priority"),
    ("model.sparse_interval", 0, "model.sparse_interval"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps"),
    ("eval_every_steps", 0, "eval_every_steps"),
    ("log_every_steps", 0, "log_every_steps"),
    ("mesh.data", 3, "mesh"),  # 3 * 1 * 1 != 8 devices
    ("batch_size", 12, "batch_size"),  # not divisible by the data-parallel size 8
    ("microbatches", 3, "microbatches"),  # does not divide batch_size 32
    ("microbatches", 8, "microbatches"),  # microbatch of 4 < data-parallel size 8
    ("data.inputs_length", 2, "data.inputs_length"),  # too short for span corruption
    ("data.targets_length", 10, "data.targets_length"),  # 128 inputs need 29 targets
    ("optim.learning_rate", 0.0, "optim.learning_rate"),
    ("freeze", "encoder", "freeze"),
    ("num_devices", 9, "num_devices"),
    ("data.task", "no_such_task", "data.task"),
]


@pytest.mark.parametrize("dotted,value,field", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_invalid_field_is_named(dotted, value, field):
    config = pretrain.get_config("tiny")
    _set(config, dotted, value)
    with pytest.raises(ConfigError) as info:
        trainer.prepare(config)
    message = str(info.value)
    assert message.startswith(field), message
    assert "\n" not in message


# Optimizer settings that would make every update non-finite (each named in the message).
OPTIM_CASES = [
    ({"optimizer": "adamw", "eps": 0.0}, "optim.eps: must be > 0 for optimizer 'adamw'"),
    ({"learning_rate": float("inf")}, "optim.learning_rate: must be finite, got inf"),
    ({"learning_rate": float("nan")}, "optim.learning_rate: must be finite, got nan"),
    ({"optimizer": "adamw", "eps": float("inf")}, "optim.eps: must be finite"),
    ({"b2": float("nan")}, "optim.b2: must be finite"),
    ({"weight_decay": float("inf")}, "optim.weight_decay: must be finite"),
    ({"grad_clip_norm": float("inf")}, "optim.grad_clip_norm: must be finite"),
    ({"router_lr_multiplier": float("inf")}, "optim.router_lr_multiplier: must be finite"),
    ({"adafactor_clipping_threshold": float("inf")}, "optim.adafactor_clipping_threshold: must be finite"),
]


@pytest.mark.parametrize("fields,message", OPTIM_CASES, ids=[str(c[0]) for c in OPTIM_CASES])
def test_nonfinite_or_zero_eps_optimizer_settings_are_named(fields, message):
    config = pretrain.get_config("tiny")
    for name, value in fields.items():
        _set(config, f"optim.{name}", value)
    with pytest.raises(ConfigError) as info:
        trainer.prepare(config)
    assert str(info.value).startswith(message), str(info.value)


def test_eps_zero_is_accepted_for_adafactor():  # Adafactor does not read optim.eps
    config = pretrain.get_config("tiny")
    _set(config, "optim.eps", 0.0)
    trainer.prepare(config)


@pytest.mark.parametrize("module,preset", [(pretrain, p) for p in ("tiny", "switch_base_8")]
                         + [(finetune, "tiny")])
def test_presets_validate(module, preset):
    config = module.get_config(preset)
    config.mesh.expert = 1  # the large presets ask for one expert per device
    run, _ = trainer.prepare(config)
    assert run.model.moe.num_experts == config.model.moe.num_experts


def test_all_presets_build_and_unknown_preset_fails():
    for module in (pretrain, finetune):
        for preset in module.PRESETS:
            module.get_config(preset)
        with pytest.raises(ValueError, match="unknown"):
            module.get_config("nope")


def test_finetune_uses_smaller_batch_and_constant_lr():
    pre, fine = pretrain.get_config("st_moe_base"), finetune.get_config("st_moe_base")
    assert fine.batch_size < pre.batch_size
    assert fine.optim.schedule == "constant" and fine.optim.learning_rate == 1e-3
    assert fine.model.dropout_rate == 0.1 and fine.model.moe.expert_dropout_rate > 0.1


def test_script_exits_2_with_one_line(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(1), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--workdir", str(tmp_path),
         "--config.model.moe.top_k=9"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "model.moe.top_k" in lines[0] and "num_experts" in lines[0]
    assert not os.path.exists(tmp_path / "checkpoints")


TYPE_CASES = [
    # (dotted field, value as a hand-edited config.json may hold it, the one-line error)
    ("model.d_model", "64", "model.d_model: must be an int, got '64'"),
    ("model.moe.num_experts", 8.0, "model.moe.num_experts: must be an int, got 8.0"),
    ("optim.learning_rate", "1e-3", "optim.learning_rate: must be a float, got '1e-3'"),
    ("model.tie_embeddings", 1, "model.tie_embeddings: must be a bool, got 1"),
    ("model.sparse_layers", ["1", "3"], "model.sparse_layers: must be a tuple of int values or None, got ['1', '3']"),
    ("model.moe.expert_capacity", "96", "model.moe.expert_capacity: must be an int or None, got '96'"),
    ("data.task", None, "data.task: must be a str, got None"),
    ("model.moe", [], "model.moe: must be a mapping of fields, got list"),
]


@pytest.mark.parametrize("dotted,value,message", TYPE_CASES, ids=[c[0] for c in TYPE_CASES])
def test_from_dict_checks_types_and_names_the_field(dotted, value, message):
    import json

    from stmoe.config import RunConfig

    values = json.loads(json.dumps(RunConfig().to_dict()))  # as config.json holds it
    *parents, leaf = dotted.split(".")
    node = values
    for name in parents:
        node = node[name]
    node[leaf] = value
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(values)
    assert str(info.value) == message


def test_from_dict_reads_json_values_back():
    """What config.json makes of the fields (lists for tuples; an int written for a float) reads back
    as the same config."""
    import json

    from stmoe.config import RunConfig

    run = RunConfig().replace(model=RunConfig().model.replace(sparse_layers=(1, 3)))
    values = json.loads(json.dumps(run.to_dict()))
    values["optim"]["learning_rate"] = 1
    back = RunConfig.from_dict(values)
    assert back.model.sparse_layers == (1, 3) and back.optim.learning_rate == 1.0
    assert isinstance(back.optim.learning_rate, float)
    assert back.replace(optim=run.optim) == run
