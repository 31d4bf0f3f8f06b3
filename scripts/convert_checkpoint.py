r"""Convert checkpoints: t5x (flaxformer) -> stmoe, Hugging Face Switch -> stmoe, stmoe -> Hugging Face.

    gcloud storage cp -r gs://B/st_moe_base/checkpoint_1000000 ./st_moe_base      # a local copy
    python scripts/convert_checkpoint.py --from t5x ./st_moe_base --to stmoe runs/st_moe_base \
        --num_heads 12                                   # t5x stores attention kernels as [d, heads * d_kv]
    python scripts/finetune.py --config runs/st_moe_base/config.py --workdir runs/st_moe_base_rte
    python scripts/convert_checkpoint.py --from hf ./switch-base-8 --to stmoe runs/switch_base_8 --preset switch_base_8
    python scripts/convert_checkpoint.py --from stmoe runs/switch_base_8_ft --to hf ./switch-base-8-ft

An stmoe output directory is what scripts/finetune.py (--init_checkpoint OUT) and scripts/infer.py
(--checkpoint OUT) read: OUT/checkpoints/0/state (the params, orbax), OUT/config.json (the run config:
the converted model, everything else from configs/finetune.py's --preset) and OUT/config.py, a config
file for finetune.py that returns that run config (`--config OUT/config.py[:PRESET[,TASK]]`).

t5x: DIR is a t5x model dir (newest checkpoint_<step>), a step dir or its orbax `state` dir; only the
parameters are read (stmoe/interop/t5x.py documents the layout and the routing semantics the config
reproduces). What the checkpoint does not store (gin values) comes from the flags, defaulting to the
ST-MoE-Base gins. The script prints what it mapped (counts per kind) and the routing fields it set.

A directory that is not a checkpoint, an unknown parameter name, a shape that disagrees with the
config, an existing non-empty OUT, a bad flag, or a t5x checkpoint that looks like Switch (tied
logits, no extra MLP, ungated experts: top-1) without --num_selected_experts: one line on stderr
and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stmoe import cli  # noqa: E402

PROGRAM = "convert_checkpoint.py"
CONVERSIONS = (("t5x", "stmoe"), ("hf", "stmoe"), ("stmoe", "hf"))
KINDS = ("embeddings", "attention", "dense mlp", "experts", "routers", "norms", "position bias", "logits")

CONFIG_PY = '''"""Fine-tuning config of the checkpoint converted into this directory by scripts/convert_checkpoint.py.

    python scripts/finetune.py --config {out}/config.py --workdir ./runs/my_finetune
    python scripts/finetune.py --config {out}/config.py:st_moe_base,super_glue_rte --workdir ./runs/rte

The model is config.json's (converted from {source}); task, batch, learning rate, steps and dropout
come from configs/finetune.py's preset {preset!r}, or the PRESET[,TASK] after the colon.
"""
import json
import os

import ml_collections

from configs import finetune

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    c = finetune.get_config(arg or {preset!r})
    with open(os.path.join(HERE, "config.json")) as f:
        run = json.load(f)
    model = run["model"]
    c.unlock()
    c.loss.balance_coef = run["loss"]["balance_coef"]  # the converted model's loss weights
    c.loss.router_z_coef = run["loss"]["router_z_coef"]
    model["dropout_rate"] = c.model.dropout_rate  # training settings of the preset
    model["moe"]["expert_dropout_rate"] = c.model.moe.expert_dropout_rate
    c.model = ml_collections.ConfigDict(model)
    if c.mesh.expert > 1 and model["moe"]["num_experts"] % c.mesh.expert:
        c.mesh.expert = 1
    c.init_checkpoint = HERE
    c.lock()
    return c
'''


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "DIR"), required=True,
                        help="t5x | hf | stmoe, and the checkpoint directory")
    parser.add_argument("--to", dest="target", nargs=2, metavar=("FORMAT", "OUT"), required=True,
                        help="stmoe | hf, and a new (or empty) output directory")
    parser.add_argument("--preset", default="st_moe_base",
                        help="configs/finetune.py preset for the stmoe run config (task, vocabulary, batch, LR)")
    t5x = parser.add_argument_group("t5x gin values the checkpoint does not store (defaults: ST-MoE-Base)")
    t5x.add_argument("--num_heads", type=int, default=None, help="NUM_HEADS (needed for [d, heads*d_kv] kernels)")
    t5x.add_argument("--num_selected_experts", type=int, default=None,
                     help="NUM_SELECTED_EXPERTS (Switch: 1); default 2, but a checkpoint that looks like Switch "
                          "(tied logits, no extra MLP, ungated experts) is refused without it")
    t5x.add_argument("--train_capacity_factor", type=float, default=1.25, help="TRAIN_EXPERT_CAPACITY_FACTOR")
    t5x.add_argument("--eval_capacity_factor", type=float, default=2.0, help="EVAL_EXPERT_CAPACITY_FACTOR")
    t5x.add_argument("--min_expert_capacity", type=int, default=4, help="MoeLayer.min_expert_capacity")
    t5x.add_argument("--group_size", type=int, default=4096, help="GROUP_SIZE (MoeLayer.max_group_size)")
    t5x.add_argument("--num_expert_replicas", type=int, default=1,
                     help="devices / (NUM_EXPERT_PARTITIONS x model partitions) of the run to mirror")
    t5x.add_argument("--batch_prioritized_routing", action="store_true",
                     help="sparse_encoder router batch_prioritized_routing (tokens_choose_*.gin: True)")
    t5x.add_argument("--aux_loss_factor", type=float, default=0.01, help="AUX_LOSS_FACTOR")
    t5x.add_argument("--router_z_loss_factor", type=float, default=1e-4, help="ROUTER_Z_LOSS_FACTOR")
    t5x.add_argument("--mlp_activation", choices=("gelu", "relu", "silu"), default=None,
                     help="default: gelu if the MLPs are gated (wi_0/wi_1), relu if not")
    t5x.add_argument("--relative_attention_max_distance", type=int, default=128)
    return parser.parse_args(argv)


def _validate(args) -> None:
    """Everything that can be checked before JAX (and seqio's TensorFlow) is imported."""
    from stmoe.interop import t5x

    pair = (args.source[0], args.target[0])
    if pair not in CONVERSIONS:
        raise cli.UsageError(f"--from {pair[0]} --to {pair[1]}: supported are "
                             + ", ".join(f"{a} -> {b}" for a, b in CONVERSIONS))
    if not os.path.isdir(args.source[1]):
        raise cli.UsageError(f"--from {args.source[1]}: no such directory")
    out = args.target[1]
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise cli.UsageError(f"--to {out}: exists and is not empty; nothing was written")
    for name in ("num_selected_experts", "min_expert_capacity", "group_size", "num_expert_replicas",
                 "relative_attention_max_distance"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise cli.UsageError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.num_heads is not None and args.num_heads < 1:
        raise cli.UsageError(f"--num_heads: must be >= 1, got {args.num_heads}")
    source = args.source[1]
    if args.source[0] == "t5x":
        try:
            t5x.find_checkpoint(source)
        except t5x.ConversionError as e:
            raise cli.UsageError(str(e)) from e
    elif not os.path.isfile(os.path.join(source, "config.json")):
        kind = "a Hugging Face checkpoint" if args.source[0] == "hf" else "an stmoe run (scripts/train.py writes it)"
        raise cli.UsageError(f"--from {args.source[0]} {source}: no config.json (not {kind})")


def _preset(name: str):
    """configs/finetune.py's preset `name` (importing it imports seqio and TensorFlow, quietly)."""
    cli.import_tensorflow_quietly()
    from configs import finetune

    if name not in finetune.PRESETS:
        raise cli.UsageError(f"--preset {name!r}: one of {list(finetune.PRESETS)}")
    return finetune.get_config(name)


def kind_of(path: str) -> str:
    """The report's kind of one of our '/'-paths."""
    if path.startswith("token_embedder/"):
        return "embeddings"
    if path.endswith("logits_dense"):
        return "logits"
    if "relative_position_bias" in path:
        return "position bias"
    if "/router/" in path:
        return "routers"
    if "/expert_" in path:
        return "experts"
    if "_norm/" in path:
        return "norms"
    if "attention/" in path:
        return "attention"
    return "dense mlp"


def _report(counts: dict[str, int], source: str, target: str) -> None:
    total = sum(counts.values())
    print(f"{PROGRAM}: {source} -> {target}: {total} tensors mapped: "
          + ", ".join(f"{kind} {counts.get(kind, 0)}" for kind in KINDS), flush=True)


def write_stmoe_run(out: str, model_cfg, loss_cfg, params, preset: str, source: str) -> None:
    """OUT/checkpoints/0/state (params), OUT/config.json (run config: the preset's, with the converted
    model and the source's loss coefficients), OUT/config.py (finetune config)."""
    import ml_collections

    from stmoe import checkpoints

    run = _preset(preset)
    run.unlock()
    run.model = ml_collections.ConfigDict(model_cfg.to_dict())
    run.loss.balance_coef, run.loss.router_z_coef = loss_cfg.balance_coef, loss_cfg.router_z_coef
    if run.mesh.expert > 1 and model_cfg.moe.num_experts % run.mesh.expert:
        run.mesh.expert = 1
    out = os.path.abspath(out)
    run.init_checkpoint = out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(run.to_json_best_effort(indent=2))
    with open(os.path.join(out, "config.py"), "w") as f:
        f.write(CONFIG_PY.format(out=out, source=source, preset=preset))
    with checkpoints.Checkpointer(os.path.join(out, "checkpoints"), async_save=False) as checkpointer:
        checkpointer.save(0, {"params": params}, {}, force=True, wait=True)


def _from_t5x(args) -> None:
    import jax.numpy as jnp

    from stmoe.interop import t5x

    options = t5x.Options(
        num_heads=args.num_heads, num_selected_experts=args.num_selected_experts,
        train_capacity_factor=args.train_capacity_factor, eval_capacity_factor=args.eval_capacity_factor,
        min_expert_capacity=args.min_expert_capacity, group_size=args.group_size,
        num_expert_replicas=args.num_expert_replicas, batch_prioritized_routing=args.batch_prioritized_routing,
        aux_loss_factor=args.aux_loss_factor, router_z_loss_factor=args.router_z_loss_factor,
        mlp_activation=args.mlp_activation, relative_attention_max_distance=args.relative_attention_max_distance)
    flat, directory = t5x.read_target(args.source[1])
    cfg, mapped, counts = t5x.convert(flat, options)
    preset_model = _preset(args.preset).model  # dropout is a fine-tuning setting: the preset's
    cfg = cfg.replace(dropout_rate=preset_model.dropout_rate,
                      moe=cfg.moe.replace(expert_dropout_rate=preset_model.moe.expert_dropout_rate))
    params = t5x.to_params({p: jnp.asarray(v) for p, v in mapped.items()})
    loss = t5x.loss_config(options)
    write_stmoe_run(args.target[1], cfg, loss, params, args.preset, f"t5x {directory}")
    _report(counts, f"t5x {directory}", args.target[1])
    print(f"{PROGRAM}: model d_model={cfg.d_model} d_ff={cfg.d_ff} heads={cfg.num_heads}x{cfg.d_kv} layers "
          f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers}, {cfg.moe.num_experts} experts, sparse blocks "
          f"{[i for i in range(max(cfg.num_encoder_layers, cfg.num_decoder_layers)) if cfg.is_sparse(i)]}, "
          f"sparse_dense={cfg.sparse_dense}", flush=True)
    for line in t5x.semantics(cfg, loss):
        print(f"{PROGRAM}:   {line}", flush=True)


def _from_hf(args) -> None:
    import flax

    from stmoe.interop import hf_switch

    _preset(args.preset)  # fail on a bad preset before reading any weights
    model, params = hf_switch.load_pretrained(args.source[1])
    flat = flax.traverse_util.flatten_dict(params)
    counts: dict[str, int] = {}
    for path in flat:
        kind = kind_of("/".join(path))
        counts[kind] = counts.get(kind, 0) + 1
    with open(os.path.join(args.source[1], "config.json")) as f:
        loss = hf_switch.loss_from_hf(json.load(f))
    write_stmoe_run(args.target[1], model.config, loss, params, args.preset, f"hf {os.path.abspath(args.source[1])}")
    _report(counts, f"hf {args.source[1]}", args.target[1])


def _to_hf(args) -> None:
    cli.import_tensorflow_quietly()
    import flax
    import jax

    from stmoe import checkpoints, inference
    from stmoe.interop import hf_switch
    from stmoe.models import EncoderDecoder

    run_config, _ = inference.find_run_config(args.source[1])
    cfg, loss = run_config.model.validate(), run_config.loss.validate()
    hf_switch.config_to_hf(cfg, loss)  # refuses (ConfigError) what HF cannot express, before any array is read
    model = EncoderDecoder(cfg)
    tokens = jax.ShapeDtypeStruct((1, 2), "int32")
    abstract = jax.eval_shape(lambda t: flax.linen.unbox(model.init(jax.random.key(0), t, t, t,
                                                                    enable_dropout=False)["params"]), tokens)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
    params = checkpoints.restore_params(args.source[1], abstract)
    hf_switch.export(model, params, args.target[1], loss)
    counts: dict[str, int] = {}
    for path in flax.traverse_util.flatten_dict(params):
        kind = kind_of("/".join(path))
        counts[kind] = counts.get(kind, 0) + 1
    _report(counts, f"stmoe {checkpoints.state_dir(args.source[1])}", args.target[1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        _validate(args)
    except cli.UsageError as e:
        return cli.fail(PROGRAM, "usage", e)

    from stmoe import checkpoints
    from stmoe.config import ConfigError
    from stmoe.interop.t5x import ConversionError

    convert = {("t5x", "stmoe"): _from_t5x, ("hf", "stmoe"): _from_hf, ("stmoe", "hf"): _to_hf}
    try:
        convert[(args.source[0], args.target[0])](args)
    except (cli.UsageError, ConversionError, ConfigError, FileNotFoundError, KeyError, ValueError,
            checkpoints.IncompatibleCheckpointError) as e:
        message = str(e).strip("'\"") if isinstance(e, KeyError) else cli.one_line(e)
        return cli.fail(PROGRAM, "input", message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
