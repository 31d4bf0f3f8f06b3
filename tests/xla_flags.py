"""The XLA flags of every test process: pytest's own and every subprocess a test starts.

`--xla_backend_optimization_level=0`: LLVM compiles XLA:CPU's kernels without optimizing them.
The suite's programs are tiny and each is compiled once or twice, so compiling is most of the
suite's time; this flag takes about a quarter off it. Every comparison in the suite (bitwise
resumes, a subprocess against this process, 8 devices against 1) runs under the same flags on
both sides. Benchmarks and real runs never see it.
"""
OPTIMIZATION = "--xla_backend_optimization_level=0"


def with_devices(count: int) -> str:
    """XLA_FLAGS for a process that simulates `count` CPU devices."""
    return f"{OPTIMIZATION} --xla_force_host_platform_device_count={count}"
