"""Model presets (d_model / d_ff / heads x d_kv / layers enc+dec / experts).

    from configs import models; cfg = ModelConfig.from_dict(models.get_config("st_moe_l"))

`get_config('st_moe_l')` returns an ml_collections.ConfigDict whose fields are
exactly `stmoe.config.ModelConfig`'s (with `moe` nested); `configs/pretrain.py`
and `configs/finetune.py` embed it as `config.model`. Parameter counts (from
`jax.eval_shape`, tests/test_models.py):

  tiny          1.13M    CPU seconds per step; tests and the quick start (every other FFN sparse)
  st_moe_base   672M     768 / 2048 / 12x64 / 12+12 / 16 experts, every 4th FFN sparse
  st_moe_l      4.00B    1024 / 2816 / 16x64 / 24+24 / 32 experts, every 4th
  st_moe_32b    269.1B   5120 / 20480 / 64x128 / 24+24 / 64 experts, every 4th, sparse-dense
  switch_base_N 619M / 1.07B / 7.42B for N = 8 / 16 / 128 (the public checkpoints' sizes):
                768 / 3072 ReLU / 12x64 / 12+12 / N experts, top-1, every other FFN, tied embeddings

The paper quotes 4.1B for ST-MoE-L; with the T5 vocabulary (32128, untied) the architecture it
describes has 4.00B, of which 3.32B are expert weights.
"""
import ml_collections
from ml_collections import config_dict

from stmoe.config import ModelConfig

T5_VOCAB_SIZE = 32128  # the public T5 SentencePiece vocabulary (32000 + 100 sentinels), padded


def _moe(**overrides) -> ml_collections.ConfigDict:
    moe = ml_collections.ConfigDict(dict(
        num_experts=8,               # experts per MoE layer
        router_type="tokens_choose",  # or "experts_choose" (encoder-only)
        # None = router_type; must be "tokens_choose" in a sparse decoder. Typed placeholders (None with a
        # type) keep every None field settable: --config.model.moe.decoder_router_type=tokens_choose.
        decoder_router_type=config_dict.placeholder(str),
        top_k=2,                     # 2: ST-MoE, 1: Switch
        second_expert_policy="random",  # ST-MoE App. G; "all" = deterministic (t5x release)
        second_expert_threshold=0.2,
        normalize_gates=True,        # top-k gates sum to 1
        train_capacity_factor=1.25,  # ST-MoE: 1.25 train / 2.0 eval
        eval_capacity_factor=2.0,
        min_capacity=4,
        expert_capacity=config_dict.placeholder(int),  # an integer overrides the factors (HF Switch)
        group_size=config_dict.placeholder(int),  # tokens per routing group; None = per sequence
        capacity_rounding="ceil",    # "round": flaxformer's int(round(cf * group / E)) (converted t5x models)
        max_group_size=config_dict.placeholder(int),  # flaxformer's batch-wide groups (converted t5x models)
        num_groups_multiple=1,       # flaxformer: group count a multiple of experts x expert replicas
        batch_prioritized=False,     # encoder: slots by router confidence (V-MoE); decoders keep token order
        route_padding=False,         # HF routes padding; ST-MoE does not
        zero_padding_inputs=False,   # flaxformer: padding reaches the router as zeros (converted t5x models)
        dropped_token_passthrough=False,  # HF Switch's treatment of dropped tokens
        aux_loss_type="switch_top1",  # "switch_all_k" (flaxformer) or "cv2"; its weight: config.loss
        jitter_noise=0.0,            # off: ST-MoE found it hurts quality (Table 3)
        router_init_std=2e-2,
        expert_dropout_rate=0.0,     # fine-tuning sets its own (sec. 4.3)
        dispatch="gather",           # "einsum" = GShard one-hot reference; "dropless" = no capacity, grouped
                                     # matmuls (moe.grouped_kernel); "auto" = per backend (stmoe/dispatch.py)
        router_dtype="float32",      # "selective precision" (ST-MoE sec. 3.2); "bfloat16": the unstable variant
        expert_execution="auto",     # "sequential" | "batched" | "auto" = per backend and mesh (dispatch.py)
        grouped_kernel="auto",       # dropless matmuls: "tiled" (CPU) | "ragged_dot" (GPU/TPU) | "auto" = per backend
    ))
    moe.update(overrides)
    return moe


def _model(moe: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict(dict(
        vocab_size=T5_VOCAB_SIZE,
        d_model=768, d_ff=2048, num_heads=12, d_kv=64,
        num_encoder_layers=12, num_decoder_layers=12,
        mlp_activation="gelu", mlp_gated=True,  # GEGLU (T5.1.1)
        dropout_rate=0.0,            # pretraining: none; fine-tuning: 0.1
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        tie_embeddings=False,
        layer_norm_epsilon=1e-6,
        layer_norm_scale=True,       # RMSNorm's learned scale; False: none (ST-MoE Table 3 ablation)
        dtype="float32",             # activations / experts; "bfloat16" on accelerators
        sparse_interval=4,           # block i is sparse when i % interval == offset
        sparse_offset=config_dict.placeholder(int),  # None = interval - 1 (ST-MoE); HF Switch uses 1
        # explicit tuple overrides the interval; () = a dense model (--config.model.sparse_layers='()')
        sparse_layers=config_dict.placeholder(tuple),
        sparse_dense=False,          # extra dense FFN after each sparse one (ST-MoE-32B)
        # an int: a dense FFN this wide at each sparse position instead of experts (FLOP-matched dense baseline)
        sparse_positions_dense_d_ff=config_dict.placeholder(int),
        scan_layers=False,           # nn.scan over (interval-1 dense + 1 sparse) units: compile time flat in depth
        remat="none",                # "full" / "save_dots": recompute blocks in the backward pass to save memory
    ))
    model.update(fields)
    model.moe = moe
    return model


def _switch(num_experts: int) -> ml_collections.ConfigDict:
    return _model(_moe(num_experts=num_experts, top_k=1), d_ff=3072, mlp_activation="relu", mlp_gated=False,
                  sparse_interval=2, sparse_offset=1, tie_embeddings=True)


PRESETS = {
    # 384 covers seqio.ByteVocabulary (3 specials + 256 bytes + 100 sentinels).
    "tiny": lambda: _model(_moe(num_experts=8), vocab_size=384, d_model=64, d_ff=128, num_heads=4, d_kv=16,
                           num_encoder_layers=4, num_decoder_layers=4, sparse_interval=2),
    "st_moe_base": lambda: _model(_moe(num_experts=16)),
    "st_moe_l": lambda: _model(_moe(num_experts=32), d_model=1024, d_ff=2816, num_heads=16,
                               num_encoder_layers=24, num_decoder_layers=24),
    "st_moe_32b": lambda: _model(_moe(num_experts=64), d_model=5120, d_ff=20480, num_heads=64, d_kv=128,
                                 num_encoder_layers=24, num_decoder_layers=24, sparse_dense=True),
    "switch_base_8": lambda: _switch(8),
    "switch_base_16": lambda: _switch(16),
    "switch_base_128": lambda: _switch(128),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"model preset {arg!r} unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[arg]()


def model_config(arg: str = "tiny") -> ModelConfig:
    """The preset as a validated `ModelConfig`."""
    return ModelConfig.from_dict(get_config(arg)).validate()
