"""Every field of a run at its package default: what gin files (configs/gin/*.gin) bind over.

    python scripts/train.py --gin_file=configs/gin/tiny.gin     # = configs/pretrain.py:tiny
"""
from __future__ import annotations

import ml_collections

from configs import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = pretrain.base_config()
    config.lock()
    return config
