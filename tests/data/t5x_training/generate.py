"""Regenerates tests/data/t5x_training/ by training with t5x's own MoE trainer.

Runs ONLY in the separate environment that tests/data/t5x_training/README.md describes (jax 0.4.26,
flax 0.8.2, t5x / flaxformer sources of April 2024 on PYTHONPATH); the repository's tests only read
what it writes. One command (README, "Regenerating"):

    python tests/data/t5x_training/generate.py [--out tests/data/t5x_training]

For each model (st_moe, switch) it parses flaxformer's gin files into t5x's MoeEncoderDecoderModel
(t5x/contrib/moe/models.py) with the bindings of MODELS below, initializes the train state with
t5x's TrainStateInitializer.from_scratch from a fixed PRNG key, builds t5x's MoeTrainer
(t5x/contrib/moe/trainer.py) with a constant learning rate, and runs STEPS train steps through the
trainer's own partitioned train step (the function t5x's BaseTrainer.train calls each step,
t5x/trainer.py:548, 564), one different batch per step. It writes, per model:
  params_step{0,1,5,20}.npz  flaxformer parameter names ('/'-joined, unscanned) -> float32 array
  metrics.json               every scalar metric the trainer returned, for steps 1..STEPS
  adafactor_state.json       per parameter: the shapes of Adafactor's v_row / v_col / v and the
                             factor rule t5x derived from the logical axes (which params are factored)
and, shared, batches.npz: [STEPS, batch, length] int32 arrays, batch s feeding step s + 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

STEPS = 20
SNAPSHOT_STEPS = (1, 5, 20)
LEARNING_RATE = 1e-2
BATCH, ENCODER_LENGTH, DECODER_LENGTH, VOCAB = 8, 16, 12, 64
BATCH_SEED = 1
ROUTER_INIT_STDDEV = 2e-2  # the gin's value (moe.gin router_init/linen.initializers.normal.stddev)

# Bindings on top of flaxformer's gins (README, "Models"). Everything else is the gins' value.
COMMON = {
    "NUM_HEADS": 2, "HEAD_DIM": 8, "EMBED_DIM": 16, "MLP_DIM": 32, "NUM_EMBEDDINGS": VOCAB,
    "NUM_EXPERTS": 4, "NUM_MODEL_PARTITIONS": 1,
    "ACTIVATION_DTYPE": "'float32'", "MOE_TRUNCATED_DTYPE": "'float32'",
    "DROPOUT_RATE": 0.0, "JITTER_NOISE": 0.0, "VOCABULARY": None,
    "router_init/linen.initializers.normal.stddev": ROUTER_INIT_STDDEV,
}
MODELS = {
    "st_moe": {
        "gin": "flaxformer/t5x/configs/moe/models/st_moe_base.gin",
        "seed": 17,
        "bindings": {**COMMON, "NUM_ENCODER_LAYERS": 4, "NUM_DECODER_LAYERS": 4,
                     "NUM_ENCODER_SPARSE_LAYERS": 1, "NUM_DECODER_SPARSE_LAYERS": 1},
    },
    "switch": {
        "gin": "flaxformer/t5x/configs/moe/models/switch_base.gin",
        "seed": 23,
        # min_dim_size_to_factor 16 (default 128) so that the tiny 2-D kernels (attention
        # [d_model, heads * d_kv], embedding, MLPs) get factored second moments here; with the
        # default only the expert kernels are factored (their rule has a BATCH axis, which
        # skips the size check: t5x/adafactor.py:384-395; only the heuristic checks it, :397-412).
        "bindings": {**COMMON, "NUM_ENCODER_LAYERS": 2, "NUM_DECODER_LAYERS": 2,
                     "NUM_ENCODER_SPARSE_LAYERS": 1, "NUM_DECODER_SPARSE_LAYERS": 1,
                     "adafactor.Adafactor.min_dim_size_to_factor": 16},
    },
}


def make_batches(seed: int = BATCH_SEED) -> dict[str, np.ndarray]:
    """STEPS padded batches like tests/data/flaxformer_reference/batch.npz (random ids in [2, VOCAB),
    each sequence ends in EOS (1) and is padded with 0; loss weights = targets > 0), except that the
    decoder inputs are the PADDED targets shifted right with 0 first, as seqio's
    EncDecFeatureConverter makes them (seqio 0.0.19 feature_converters.py:679 pads, then :631
    shifts, utils.py:1274): a short target's EOS reappears as the input of its first padded
    position, which flaxformer's decoder mask then counts as real (dense_attention.py:2360-2375).
    Returns [STEPS, ...] int32."""
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                           "decoder_loss_weights")}
    for _ in range(STEPS):
        enc = np.zeros((BATCH, ENCODER_LENGTH), np.int32)
        tgt = np.zeros((BATCH, DECODER_LENGTH), np.int32)
        enc_lengths = rng.integers(4, ENCODER_LENGTH + 1, size=BATCH)
        tgt_lengths = rng.integers(3, DECODER_LENGTH + 1, size=BATCH)
        enc_lengths[0], tgt_lengths[0] = ENCODER_LENGTH, DECODER_LENGTH  # one unpadded row each batch
        for row in range(BATCH):
            n, m = enc_lengths[row], tgt_lengths[row]
            enc[row, :n - 1] = rng.integers(2, VOCAB, size=n - 1)
            enc[row, n - 1] = 1
            tgt[row, :m - 1] = rng.integers(2, VOCAB, size=m - 1)
            tgt[row, m - 1] = 1
        dec_in = np.zeros_like(tgt)
        dec_in[:, 1:] = tgt[:, :-1]
        out["encoder_input_tokens"].append(enc)
        out["decoder_target_tokens"].append(tgt)
        out["decoder_input_tokens"].append(dec_in)
        out["decoder_loss_weights"].append((tgt > 0).astype(np.int32))
    return {k: np.stack(v) for k, v in out.items()}


def configured_model(model=None):
    """What the gin's MODEL macro builds (bound by `build`)."""
    return model


def build(name: str):
    """(model, TrainStateInitializer, train_state, partitioner) for MODELS[name], parsed from the gins."""
    import gin
    import flaxformer
    import jax
    from t5x import utils
    from t5x.contrib.moe import partitioning as moe_partitioning

    spec = MODELS[name]
    gin.clear_config()
    gin.add_config_file_search_path(os.path.dirname(os.path.dirname(flaxformer.__file__)))

    # As t5x's run gins reach their script's function (t5x/configs/runs/pretrain.gin:22).
    bindings = [f"{k} = {v}" for k, v in spec["bindings"].items()] + ["script.configured_model.model = %MODEL"]
    preamble = ["from __gin__ import dynamic_registration", "import __main__ as script",
                "from t5x import adafactor", "from flax import linen"]
    gin.parse_config_files_and_bindings([spec["gin"]], preamble + bindings, finalize_config=False)
    model = gin.get_configurable(configured_model)()
    partitioner = moe_partitioning.MoePjitPartitioner(num_expert_partitions=1, num_partitions=1)
    shapes = {"encoder_input_tokens": (BATCH, ENCODER_LENGTH), "decoder_input_tokens": (BATCH, DECODER_LENGTH),
              "decoder_target_tokens": (BATCH, DECODER_LENGTH), "decoder_loss_weights": (BATCH, DECODER_LENGTH)}
    types = {k: np.int32 for k in shapes}
    initializer = utils.TrainStateInitializer(optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
                                              input_shapes=shapes, input_types=types, partitioner=partitioner)
    train_state = initializer.from_scratch(jax.random.PRNGKey(spec["seed"]))
    return model, initializer, train_state, partitioner, gin.config_str()


def flat_params(params) -> dict[str, np.ndarray]:
    from flax import traverse_util
    from flax.core import unfreeze
    return {"/".join(k): np.asarray(v, np.float32)
            for k, v in traverse_util.flatten_dict(unfreeze(params)).items()}


def scalar_metrics(metrics) -> dict[str, float]:
    out = {}
    for key, metric in sorted(metrics.items()):
        if key.startswith("timing/"):  # wall-clock metrics (t5x/metrics.py Time), set by BaseTrainer.train
            continue
        value = np.asarray(metric.compute() if hasattr(metric, "compute") else metric)
        if value.size == 1:
            out[key] = float(value.reshape(()))
    return out


def adafactor_layout(train_state, optimizer_def) -> dict[str, dict]:
    from flax import traverse_util
    from flax.core import unfreeze
    states = unfreeze(train_state.state_dict()["state"]["param_states"])
    flat = traverse_util.flatten_dict(states)
    rules = optimizer_def.hyper_params.factor_map or {}
    out: dict[str, dict] = {}
    for path, value in flat.items():
        name, field = "/".join(path[:-1]), path[-1]
        entry = out.setdefault(name, {"rule": [str(getattr(r, "name", r)) for r in rules.get(name, ())]})
        entry[field] = list(np.shape(value))
    return out


def run(name: str, batches: dict[str, np.ndarray], out_dir: str) -> None:
    import jax
    from t5x.contrib.moe import trainer as moe_trainer

    model, initializer, train_state, partitioner, config_str = build(name)
    trainer = moe_trainer.MoeTrainer(
        model=model, train_state=train_state, partitioner=partitioner, eval_names=[], summary_dir=None,
        train_state_axes=initializer.train_state_axes, rng=jax.random.PRNGKey(0),
        learning_rate_fn=lambda step: LEARNING_RATE, num_microbatches=None, num_expert_partitions=1)
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, "params_step0.npz"), **flat_params(train_state.params))
    with open(os.path.join(out_dir, "adafactor_state.json"), "w") as f:
        json.dump(adafactor_layout(train_state, model.optimizer_def), f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "gin_config.txt"), "w") as f:
        f.write(config_str)
    history = []
    state = train_state
    for step in range(STEPS):
        batch = {k: v[step] for k, v in batches.items()}
        state, metrics = trainer._partitioned_train_step(state, batch)  # BaseTrainer.train's step (t5x/trainer.py:564)
        history.append({"step": step + 1, **scalar_metrics(metrics)})
        if step + 1 in SNAPSHOT_STEPS:
            np.savez_compressed(os.path.join(out_dir, f"params_step{step + 1}.npz"), **flat_params(state.params))
        print(f"{name} step {step + 1}: loss {history[-1]['loss']:.6f}", file=sys.stderr)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(history, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    import jax
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # t5x warns once per 1-D/2-D param that its factor rule is ignored
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_platforms", "cpu")
    batches = make_batches()
    np.savez_compressed(os.path.join(args.out, "batches.npz"), **batches)
    for name in args.models.split(","):
        run(name, batches, os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
