r"""Fine-tune a pretrained checkpoint (ST-MoE sec. 4): configs/finetune.py presets, then the trainer.

    python scripts/train.py                                    # pretrain the quick start first
    python scripts/finetune.py --config configs/finetune.py:tiny \
        --init_checkpoint ./runs/quickstart --workdir ./runs/finetune_qa
    python scripts/finetune.py --config configs/finetune.py:st_moe_base --init_checkpoint gs://B/st_moe_base \
        --workdir gs://B/st_moe_base_superglue --config.freeze=moe --config.data.task=super_glue_rte

`--init_checkpoint` is a pretraining run's workdir, its checkpoints dir (newest step) or one step's
dir; it overrides `config.init_checkpoint`. Only the model parameters are read unless
`--config.reset_optimizer_state=False`. Before any data or device work the checkpoint is checked
against the config: a missing checkpoint, or parameters whose names or shapes differ (the message
lists them), a bad config field or an unknown task end the run with one line on stderr and exit
status 2. Rerunning the same command resumes the fine-tuning run from its own newest checkpoint.
Exit status: as scripts/train.py (0 finished, 2 bad input, 3 diverged, 130 / 143 stopped by SIGINT /
SIGTERM after saving).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe import cli  # noqa: E402

DEFAULT_CONFIG = os.path.join(cli.REPO_ROOT, "configs", "finetune.py") + ":tiny"
DEFAULT_WORKDIR = "./runs/finetune_qa"


def _define_flags(flag_values):
    from absl import flags
    return {
        "workdir": flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "Checkpoints, TensorBoard logs, metrics.",
                                       flag_values=flag_values),
        "init_checkpoint": flags.DEFINE_string(
            "init_checkpoint", None, "Pretrained run (workdir, checkpoints dir or step dir); default: "
            "config.init_checkpoint.", flag_values=flag_values),
    }


def check_init_checkpoint(config) -> None:
    """Raises FileNotFoundError / IncompatibleCheckpointError (shapes listed) before any heavy work:
    the config's parameter shapes come from jax.eval_shape, the checkpoint's from orbax metadata."""
    import jax
    import flax.linen as nn

    from stmoe import checkpoints
    from stmoe.config import ModelConfig
    from stmoe.models import EncoderDecoder

    model = EncoderDecoder(ModelConfig.from_dict(config.model.to_dict()))
    tokens = {"encoder_input_tokens": jax.ShapeDtypeStruct((1, config.data.inputs_length), "int32"),
              "decoder_input_tokens": jax.ShapeDtypeStruct((1, config.data.targets_length), "int32"),
              "decoder_target_tokens": jax.ShapeDtypeStruct((1, config.data.targets_length), "int32")}
    abstract = jax.eval_shape(lambda inputs: nn.unbox(model.init(jax.random.key(0), **inputs)["params"]), tokens)
    checkpoints.check_compatible(config.init_checkpoint, abstract, model_config=config.model.to_dict())


def main(argv: list[str]) -> int:
    try:
        config, flags = cli.script_config(argv, DEFAULT_CONFIG, _define_flags, program="finetune.py", doc=__doc__)
    except cli.ExitStatus as done:
        return done.status

    from stmoe import checkpoints, trainer
    from stmoe.config import ConfigError

    if flags["init_checkpoint"] is not None:
        with config.unlocked():
            config.init_checkpoint = flags["init_checkpoint"]
    if not config.init_checkpoint:
        return cli.fail("finetune.py", "checkpoint", "no --init_checkpoint (a pretraining run's workdir) given")
    try:
        trainer.prepare(config)
    except ConfigError as e:
        return cli.fail("finetune.py", "config", e)
    try:  # a resumed run reads its own checkpoint, not init_checkpoint
        own_checkpoint = bool(checkpoints.state_dir(os.path.join(flags["workdir"], "checkpoints")))
    except FileNotFoundError:
        own_checkpoint = False
    if not own_checkpoint:
        try:
            check_init_checkpoint(config)
        except (FileNotFoundError, checkpoints.IncompatibleCheckpointError) as e:
            return cli.fail("finetune.py", "checkpoint", f"--init_checkpoint: {cli.one_line(e)}")
    return cli.run_training("finetune.py", config, flags["workdir"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
