"""Hugging Face LLaMA/Mistral/Qwen2 <-> megatron_apex checkpoint conversion (see tools/convert_checkpoint.py).

Pure mappings live in :mod:`.mapping`; file access in :mod:`.hf_io`; the two directions in
:mod:`.importer` and :mod:`.exporter`; logit parity in :mod:`.verify`.
"""

from megatron_apex.convert.mapping import (  # noqa: F401
    FAMILIES, ConversionError, UnsupportedModelError, export_family, hf_config_to_model_config, hf_to_mcore_qkv,
    mcore_to_hf_qkv, mcore_to_hf_qkv_bias, merge_fc1, model_config_to_hf_config, pad_vocab, qkv_bias_parts, split_fc1,
    trim_vocab)
