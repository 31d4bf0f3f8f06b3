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
checked once at start (stmoe.trainer.validate_config): a bad value ends the run with exit status
2 and one line naming the field.
"""
from __future__ import annotations

import ml_collections

from configs import models
from stmoe.data import preprocessors

PRESETS = ("tiny", "st_moe_base", "st_moe_l", "st_moe_32b", "switch_base_8")


def base_config() -> ml_collections.ConfigDict:
    """Every field of a training run, with its default (the tiny quick start)."""
    c = ml_collections.ConfigDict()
    c.model = models.get_config("tiny")  # a configs.models preset; fields of stmoe.config.ModelConfig

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 = the remaining devices
    c.mesh.expert = 1  # expert-parallel axis size (must divide model.moe.num_experts)
    c.mesh.model = 1  # tensor-parallel axis size (mlp / heads / vocab)
    c.num_devices = -1  # use only the first N devices (-1 = all); e.g. 1 to resume a pod run locally

    c.data = ml_collections.ConfigDict()
    c.data.task = "stmoe_synthetic_span_corruption"  # seqio task/mixture family (stmoe.data.tasks)
    c.data.eval_task = ""  # held-out task; "" = data.task
    c.data.eval_split = "validation"  # held-out split of the eval task
    c.data.vocab_path = ""  # SentencePiece model; "" = the task family's default (bytes for synthetic)
    c.data.inputs_length = 128  # encoder tokens per example (packed)
    # decoder tokens; span corruption needs pre_corruption_length(inputs_length)[1]
    c.data.targets_length = preprocessors.pre_corruption_length(128)[1]
    c.data.pack = True  # pack several examples per row (segment ids keep them apart)
    c.data.seed = 0  # shuffling and span-corruption masks
    c.data.text_files = ""  # glob of local text files (one document per line): overrides data.task
    # Held-out loss on text_files: these files, or ("") the held_out_percent of text_files' documents
    # whose hash bucket (stmoe.data.tasks.held_out_bucket) is lowest; training never sees them.
    c.data.eval_text_files = ""
    c.data.held_out_percent = 5

    c.batch_size = 32  # global batch (sequences per step), over all devices and microbatches
    c.microbatches = 1  # gradient accumulation: the batch is split into this many microbatches

    c.total_steps = 300  # optimizer steps of the run (resumes count from the checkpoint's step)

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adafactor"  # 'adafactor' (paper) or 'adamw'
    c.optim.learning_rate = 1e-2  # peak learning rate
    c.optim.schedule = "rsqrt"  # 'rsqrt' (T5), 'warmup_cosine', 'warmup_linear', 'constant'
    c.optim.warmup_steps = 10_000  # warmup (rsqrt: length of the constant plateau)
    c.optim.total_steps = c.get_ref("total_steps")  # end of the decay; follows total_steps
    c.optim.end_learning_rate_fraction = 0.0  # final LR / peak for decaying schedules
    c.optim.b1 = 0.9  # AdamW first-moment decay
    c.optim.b2 = 0.999  # AdamW second-moment decay
    c.optim.eps = 1e-8  # AdamW epsilon
    c.optim.weight_decay = 0.0  # decoupled, LR-scaled; never on norm scales
    c.optim.adafactor_decay_rate = 0.8  # Adafactor second-moment decay exponent (paper)
    c.optim.adafactor_clipping_threshold = 1.0  # Adafactor update clipping (paper); 0 = off
    c.optim.grad_clip_norm = 1.0  # global-norm gradient clipping; 0 = off
    c.optim.router_lr_multiplier = 1.0  # LR multiplier for router weights
    c.optim.freeze_patterns = ()  # extra regexes of frozen parameter paths (see also `freeze`)
    c.optim.skip_nonfinite = True  # skip (and count) steps with Inf/NaN gradients
    c.optim.max_consecutive_nonfinite = 10  # after this many skips in a row, apply anyway

    # The objective's weights (stmoe.config.LossConfig; stmoe/losses.py applies them).
    c.loss = ml_collections.ConfigDict()
    c.loss.balance_coef = 1e-2  # c_B, the load-balancing loss (ST-MoE: 1e-2)
    c.loss.router_z_coef = 1e-3  # c_z, the router z-loss (ST-MoE sec. 3.1)
    c.loss.output_z_coef = 1e-4  # z-loss on the output softmax normalizer (Mesh TF T5); 0 = off
    c.loss.balance_schedule = "constant"  # 'constant' or 'linear_decay' of c_B
    c.loss.balance_warmup_multiplier = 1.0  # linear_decay: c_B starts at this multiple
    c.loss.balance_decay_steps = 1  # linear_decay: steps to reach c_B

    c.checkpoint_every_steps = 100  # async checkpoint cadence (also saved at the end and on SIGTERM)
    c.keep_checkpoints = 3  # newest checkpoints kept
    c.eval_every_steps = 100  # held-out evaluation cadence (also at the end)
    c.eval_steps = 8  # held-out batches per evaluation
    c.log_every_steps = 20  # metrics to TensorBoard / metrics.jsonl cadence
    c.seed = 0  # parameter init and dropout / routing rngs (fold_in(seed, step): resume is exact)

    c.resume_from = ""  # another run's checkpoint dir: full state + data position (if workdir has none)
    c.init_checkpoint = ""  # pretrained checkpoint dir (or its step dir): params only (fine-tuning)
    c.reset_optimizer_state = True  # with init_checkpoint: fresh optimizer state (False: keep it)
    c.freeze = "none"  # parameters NOT updated: 'none', 'moe', 'non_moe', 'attention', 'non_moe_ffn_only'
    #                    (table in stmoe/trainer.py FREEZE_PRESETS; frozen params get no optimizer state)

    # Task metrics by decoding (seqio Evaluator, stmoe/evaluation.py), every eval_every_steps.
    c.infer_eval = ml_collections.ConfigDict()
    c.infer_eval.task = ""  # seqio task/mixture family with metric fns (e.g. exact match); "" = off
    c.infer_eval.split = "validation"
    c.infer_eval.num_examples = 256  # per task; -1 = the whole split
    c.infer_eval.batch_size = 64  # decoding batch (rounded up to the data-parallel size)
    c.infer_eval.decoding = "greedy"  # or 'beam'
    c.infer_eval.beam_size = 4
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"pretrain preset {preset!r} unknown; choose one of {list(PRESETS)}")
    c = base_config()
    if preset == "tiny":
        # Quick start: every other FFN sparse, 8 experts; LR 1e-2 rsqrt plateau for the whole run.
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
