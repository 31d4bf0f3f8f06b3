"""gin configs: every preset's gin file equals its ml_collections preset field by field; gin
bindings reach the same fields as --config overrides; bad bindings and files stop in one line;
a gin launch trains."""
from __future__ import annotations

import importlib.util
import os

import pytest

from configs import defaults, finetune, pretrain
from stmoe import cli, gin_config
from stmoe.config import get_field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN = os.path.join(ROOT, "configs", "gin")


def flat(config) -> dict:
    return {path: get_field(config, path) for path in cli.field_paths(config)}


def gin_preset(name: str):
    return gin_config.apply(defaults.get_config(), [os.path.join(GIN, f"{name}.gin")])


CASES = [(p, lambda p=p: pretrain.get_config(p)) for p in pretrain.PRESETS] + \
        [(f"finetune_{p}", lambda p=p: finetune.get_config(p)) for p in finetune.PRESETS]


@pytest.mark.parametrize("name,preset", CASES, ids=[c[0] for c in CASES])
def test_gin_file_equals_ml_collections_preset(name, preset):
    expected, got = flat(preset()), flat(gin_preset(name))
    assert got.keys() == expected.keys()
    differing = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]
                 or type(got[k]) is not type(expected[k])}
    assert not differing, differing  # {field: (gin, ml_collections)}


def test_every_config_section_has_one_gin_name():
    table = gin_config.sections(defaults.get_config())
    assert len(set(table.values())) == len(table)
    assert table["MoeConfig"] == "model.moe" and table["RUN"] == "" and table["OptimConfig"] == "optim"


def parse(*args: str):
    config, _ = cli.parse_config_flags(["train.py", *args], os.path.join(ROOT, "configs", "pretrain.py") + ":tiny")
    return config


def test_gin_bindings_equal_config_overrides():
    by_gin = parse(f"--gin_file={GIN}/st_moe_l.gin", "--gin.MoeConfig.num_experts=64", "--gin.RUN.total_steps=1000",
                   "--gin.ModelConfig.sparse_layers=(3, 7)", "--gin.MoeConfig.expert_capacity=96")
    by_flags = parse("--config", os.path.join(ROOT, "configs", "pretrain.py") + ":st_moe_l",
                     "--config.model.moe.num_experts=64", "--config.total_steps=1000",
                     "--config.model.sparse_layers=(3, 7)", "--config.model.moe.expert_capacity=96")
    assert flat(by_gin) == flat(by_flags)
    assert by_gin.optim.total_steps == 1000  # follows total_steps, as in configs/pretrain.py
    # --config.FIELD still applies after the gin files; a later gin binding wins over a file's.
    both = parse(f"--gin_file={GIN}/tiny.gin", "--config.batch_size=8", "--gin.RUN.batch_size=16")
    assert both.batch_size == 8


@pytest.mark.parametrize("args,message", [
    (["--gin.MoeConfig.num_expert=64"], "train.py: config error: Configurable 'MoeConfig' doesn't have a "
                                        "parameter named 'num_expert'. (In bindings string line 1)"),
    (["--gin.MoeConfg.num_experts=64"], "train.py: config error: No configurable matching 'MoeConfg'."),
    (["--gin_file=configs/gin/nope.gin"], "train.py: config error: --gin_file: no such gin file "
                                          "'configs/gin/nope.gin'"),
    (["--gin.RUN.batch_size='many'"], "train.py: config error: gin binding RUN.batch_size (config field "
                                      "'batch_size') takes a int, got 'many'"),
    (["--gin.RUN.batch_size"], "train.py: config error: --gin.RUN.batch_size: a gin binding needs a value"),
])
def test_bad_gin_input_is_one_line(capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "scripts", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    status = module.main(["train.py", *args, "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(message), lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,message", [
    ("import missing_mod\n", "train.py: config error: No module named 'missing_mod' (In file \"{gin}\", line 1)"),
    ("RUN.batch_size = 8\nMoeConfig.num_experts = four\n",
     "train.py: config error: Failed to parse token 'four' ({gin}, line 2; a string value needs quotes)"),
])
def test_bad_gin_file_names_file_and_line(capsys, monkeypatch, tmp_path, text, message):
    """A gin file gin cannot read: one line with the file and line (not Python's ast node repr)."""
    monkeypatch.chdir(ROOT)
    gin_file = tmp_path / "bad.gin"
    gin_file.write_text(text)
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "scripts", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    status = module.main(["train.py", f"--gin_file={gin_file}", "--workdir", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and lines == [message.format(gin=gin_file)], lines
    assert not (tmp_path / "run").exists()


def test_gin_launch_trains(capsys, monkeypatch, tmp_path):
    """The gin command line of docs/usage.md, shrunk: a tiny gin preset trains, and config.json records the
    bindings' values."""
    import json

    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "scripts", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    workdir = tmp_path / "run"
    status = module.main(["train.py", "--gin_file=configs/gin/tiny.gin", "--gin.RUN.total_steps=2",
                          "--gin.RUN.batch_size=8", "--gin.RUN.eval_steps=0", "--gin.RUN.log_every_steps=1",
                          "--gin.ModelConfig.num_encoder_layers=2", "--gin.ModelConfig.num_decoder_layers=2",
                          "--gin.MoeConfig.num_experts=4", "--gin.DataConfig.inputs_length=32",
                          "--gin.DataConfig.targets_length=8", "--workdir", str(workdir)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "Finished at step 2." in out
    written = json.loads((workdir / "config.json").read_text())
    assert written["model"]["moe"]["num_experts"] == 4 and written["total_steps"] == 2
