"""Data tools: tokenizers, JSONL -> Megatron ``.bin/.idx`` preprocessing, tokenizer training and
the embedded demo corpus.

Submodules are imported lazily by their users on purpose: the preprocessing workers and the CLIs
must start fast and must not import torch or megatron-core (several seconds per process).
"""
