r"""Span-corruption pretraining (ST-MoE recipe, Zoph et al. 2022, arXiv 2202.08906).

    python scripts/train.py                                   # = the line below
    python scripts/train.py --config configs/pretrain.py:tiny --workdir ./runs/quickstart
    python scripts/train.py --config configs/pretrain.py:st_moe_base --workdir gs://BUCKET/st_moe_base \
        --config.total_steps=100000 --config.mesh.expert=16

Presets (`get_config(arg)`, arg = preset name, default `tiny`):

  tiny          the quick start: 1.1M params, offline synthetic corpus (bytes), a few minutes on a
                laptop CPU; the held-out span-corruption loss ends well below the corpus's unigram
                entropy (about 3.25 nats per byte).
  st_moe_base   768 / 2048 / 12x64 / 12+12 / 16 experts (every 4th FFN), C4, T5 vocabulary.
  st_moe_l      1024 / 2816 / 16x64 / 24+24 / 32 experts.
  st_moe_32b    5120 / 20480 / 64x128 / 24+24 / 64 experts, sparse-dense.
  switch_base_8 Switch-Base, 8 experts, top-1, every other FFN.

The large presets set `mesh.expert = num_experts` (one expert per device, the paper's layout);
on fewer devices override it (`--config.mesh.expert=1` replicates the experts). Every field is
checked once at start (stmoe.config.RunConfig.validate): a bad value ends the run with exit status
2 and one line naming the field.
"""
from __future__ import annotations

import ml_collections

from configs import models
from stmoe.config import RunConfig, to_config_dict
from stmoe.data import preprocessors

PRESETS = ("tiny", "st_moe_base", "st_moe_l", "st_moe_32b", "switch_base_8")


def base_config() -> ml_collections.ConfigDict:
    """Every field of a training run at its stmoe.config.RunConfig default (the fields' meanings are
    documented there), with the tiny model."""
    return to_config_dict(RunConfig(model=models.model_config("tiny")))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"pretrain preset {preset!r} unknown; choose one of {list(PRESETS)}")
    c = base_config()
    if preset == "tiny":
        # Quick start: every other FFN sparse, 8 experts; an rsqrt schedule that stays on its plateau
        # for the whole 300 steps. LR 3e-2, not T5's 1e-2: over 3 seeds held-out 1.990 +- 0.016 vs
        # 2.145 +- 0.033, and checkpoints worth +24 exact-match points in fine-tuning (59.2 +- 5.2% vs
        # 35.3 +- 0.1% from scratch; docs/router_learning.md, "Seeds"; 6e-2 is worse again, 2.084).
        c.optim.learning_rate = 3e-2
        c.optim.warmup_steps = 1000
    else:
        c.model = models.get_config(preset)
        c.mesh.expert = c.model.moe.num_experts
        c.data.task = "c4_span_corruption"
        c.data.inputs_length = 512  # T5 / ST-MoE: 512 inputs, 114 targets
        c.data.targets_length = preprocessors.pre_corruption_length(512)[1]
        c.data.eval_split = "validation"
        c.batch_size = 256
        c.total_steps = 500_000
        c.checkpoint_every_steps = 5_000
        c.eval_every_steps = 5_000
        c.eval_steps = 20
        c.log_every_steps = 100
        c.optim.warmup_steps = 10_000
        if preset == "st_moe_32b":
            c.model.dtype = "bfloat16"
            c.batch_size = 2048  # ~1M tokens per batch (paper sec. 3)
            c.optim.b2 = 0.95
        if preset.startswith("switch"):
            c.optim.schedule = "rsqrt"
    c.lock()
    return c
