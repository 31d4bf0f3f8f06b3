"""The process and the machine it runs on: the repository root, a quiet TensorFlow, the malloc in use.

(Not named `platform`: that would shadow the standard library's module for code run from stmoe/.)
stmoe.cli re-exports these names (`cli.REPO_ROOT`, `cli.import_tensorflow_quietly`,
`cli.memory_allocator`) for the scripts and notebooks.
"""
from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_tensorflow_quietly() -> None:
    """seqio's TensorFlow prints C++ log lines on fd 2 at import (TF_CPP_MIN_LOG_LEVEL does not stop
    all of them); keep stderr for our own messages. Import errors still surface, after the restore."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if REPO_ROOT not in sys.path:  # `configs` next to the scripts, even without `pip install -e .`
        sys.path.insert(0, REPO_ROOT)
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
        tensorflow.config.set_visible_devices([], "GPU")  # the input pipeline never needs an accelerator
    except ImportError:
        pass  # reported properly by the import of stmoe.data
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def memory_allocator() -> str:
    """The malloc this process runs on: 'tcmalloc' or 'jemalloc' when one is preloaded, else 'glibc'.

    It matters to CPU timings: XLA:CPU allocates each execution's temporaries afresh (1.8 GB per
    train step of the peers model), and glibc hands allocations that large back to the kernel on
    free, so every step pays page faults that zero them again; tcmalloc keeps and reuses them
    (docs/performance.md).
    """
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "glibc")
