"""Every field of a run at its package default (stmoe.config.RunConfig()): what gin files
(configs/gin/*.gin) bind over.

    python scripts/train.py --gin_file=configs/gin/tiny.gin     # = configs/pretrain.py:tiny
"""
from __future__ import annotations

import ml_collections

from stmoe.config import RunConfig, to_config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = to_config_dict(RunConfig())
    config.lock()
    return config
