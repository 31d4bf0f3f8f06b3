"""Two processes on one machine (jax.distributed on localhost, gloo CPU collectives, 4 simulated
devices each) run a few train steps with the expert axis spanning both processes; the losses
match the single-process run. Each process feeds only its own rows (data_shard_info)."""
import json
import os
import socket
import subprocess
import sys

import pytest

import sharded_step as ss
import xla_flags
from stmoe.partitioning import MeshConfig

WORKER = os.path.join(os.path.dirname(__file__), "sharded_step.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    port = _free_port()
    procs = []
    for index in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(index), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.OPTIMIZATION)
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path / f"out{index}.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    # While the workers compile, compute the single-process reference (shared with test_partitioning).
    expected = ss.run_steps(ss.get_setup(MeshConfig(1, 1, 1), 8, 1), ss.MULTIPROCESS_STEPS)
    outputs = []
    for proc in procs:
        try:
            log, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("two-process run timed out")
        outputs.append(log)
    for index, (proc, log) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {index} failed:\n{log[-4000:]}"

    results = [json.loads((tmp_path / f"out{index}.json").read_text()) for index in range(2)]
    for index, result in enumerate(results):
        assert result["process_index"] == index and result["process_count"] == 2
        assert result["local_devices"] == 4 and result["devices"] == 8
        assert result["losses"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
