"""ml_collections configs: model presets, pretraining and fine-tuning (importable as `configs.*`)."""
