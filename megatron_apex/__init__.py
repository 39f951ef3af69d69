"""megatron-apex: LLaMA-family pre-training on megatron-core with APEX parameter expansion.

The package is a library: it parses no arguments and holds no global state of its own.
Command-line entry points live in :mod:`megatron_apex.cli` and ``tools/``.
"""

__version__ = "0.1.0"
