"""Every test sees 8 simulated CPU devices and XLA's flags of tests/xla_flags.py; this must run before
JAX is imported."""
import os

import xla_flags  # tests/xla_flags.py

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags.with_devices(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (pulled in by seqio) must not grab threads or print banners during tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


# The README runs the suite on 2 xdist workers, one test file at a time per worker (`-n 2 --dist loadfile
# --no-loadscope-reorder`: module fixtures such as a shared training run are built once, and the notebooks
# run in order). Files are handed out in collection order; these, the longest (subprocesses, training
# runs), go first so that none of them is left running alone at the end. A plain serial run keeps the
# usual order.
LONGEST_FIRST = ("test_notebooks.py", "test_faults.py", "test_user_paths.py", "test_finetune.py",
                 "test_trainer.py", "test_partitioning.py", "test_multiprocess.py", "test_stability_sweep.py",
                 "test_compare_dense.py")


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # not an xdist worker
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
