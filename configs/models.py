"""Model presets (d_model / d_ff / heads x d_kv / layers enc+dec / experts).

    from configs import models; cfg = ModelConfig.from_dict(models.get_config("st_moe_l"))

Each preset is `stmoe.config.ModelConfig` with the fields that differ from its defaults;
`get_config('st_moe_l')` returns it as an ml_collections.ConfigDict (`configs/pretrain.py`
and `configs/finetune.py` embed it as `config.model`). Parameter counts (from
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

from stmoe.config import ModelConfig, MoeConfig, to_config_dict

T5_VOCAB_SIZE = 32128  # the public T5 SentencePiece vocabulary (32000 + 100 sentinels), padded


def _base(num_experts: int, **fields) -> ModelConfig:
    """ST-MoE-Base's backbone (T5.1.1 base: 768 / 2048 / 12x64 / 12+12, T5 vocabulary) with `fields` changed;
    every other field keeps its stmoe.config default (GEGLU, every 4th FFN sparse, top-2, ...)."""
    moe = MoeConfig(num_experts=num_experts, **fields.pop("moe", {}))
    return ModelConfig(vocab_size=T5_VOCAB_SIZE, d_model=768, d_ff=2048, num_heads=12, d_kv=64,
                       num_encoder_layers=12, num_decoder_layers=12, moe=moe).replace(**fields)


def _switch(num_experts: int) -> ModelConfig:
    return _base(num_experts, moe=dict(top_k=1), d_ff=3072, mlp_activation="relu", mlp_gated=False,
                 sparse_interval=2, sparse_offset=1, tie_embeddings=True)


PRESETS = {
    # The stmoe.config defaults (384 covers seqio.ByteVocabulary: 3 specials + 256 bytes + 100 sentinels),
    # with every other FFN sparse so that 4 layers hold 2 MoE layers.
    "tiny": lambda: ModelConfig(sparse_interval=2),
    "st_moe_base": lambda: _base(16),
    "st_moe_l": lambda: _base(32, d_model=1024, d_ff=2816, num_heads=16, num_encoder_layers=24,
                              num_decoder_layers=24),
    "st_moe_32b": lambda: _base(64, d_model=5120, d_ff=20480, num_heads=64, d_kv=128, num_encoder_layers=24,
                                num_decoder_layers=24, sparse_dense=True),
    "switch_base_8": lambda: _switch(8),
    "switch_base_16": lambda: _switch(16),
    "switch_base_128": lambda: _switch(128),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The preset as a ConfigDict (for `config.model` of configs/pretrain.py and --config overrides)."""
    return to_config_dict(model_config(arg))


def model_config(arg: str = "tiny") -> ModelConfig:
    """The preset as a validated `ModelConfig`."""
    if arg not in PRESETS:
        raise ValueError(f"model preset {arg!r} unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[arg]().validate()
