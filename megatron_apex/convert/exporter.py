"""megatron_apex checkpoint (any TP/PP, root or iter_* directory) -> Hugging Face LlamaForCausalLM,
MistralForCausalLM or Qwen2ForCausalLM (the family the model was imported from, else the one its
features need: a QKV bias is Qwen2, a sliding window Mistral).

The checkpoint is loaded once, in place, into a TP=1/PP=1 CPU model in its stored dtype; HF tensors
are then produced layer by layer and written straight into safetensors shards whose headers were
planned from the shapes, so peak memory stays near one copy of the model (plus the one-tensor read
buffer of torch.distributed.checkpoint). Needs no ``transformers``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_apex.config import Config, config_from_dict
from megatron_apex.convert import mapping as M
from megatron_apex.convert.hf_io import (SafetensorsShardWriter, copy_tokenizer, parse_size, staged_output,
                                         tokenizer_files, write_json)
from megatron_apex.convert.runtime import (build_cpu_model, checkpoint_dtype, single_layout,
                                           single_process)

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportResult:
    output: str
    files: list
    vocab_size: int
    dtype: torch.dtype


def fuse_expansion(weights: dict, common: dict, path: str, cfg: Config) -> bool:
    """Fold the operators of a checkpoint saved in the middle of an APEX stage into ``weights``
    (global TP=1 tensors keyed ``decoder.layers.{i}.…``, replaced in the dict); returns whether there
    were any. The per-rank operator state is joined and fused at TP=1 (``megatron_apex.expansion.export``).
    Whatever reads such a checkpoint as a plain model (the export, the effective-rank analysis) goes
    through here: its base weights alone are not the model the run was training."""
    from megatron_apex.expansion.export import fuse_global_weights, has_active_operators, load_rank_states

    if not has_active_operators(common):
        return False
    fuse_global_weights(weights, cfg, load_rank_states(path, common))
    return True


def _fuse_expansion_if_present(model, common: dict, path: str, cfg: Config):
    """:func:`fuse_expansion` on a TP=1 model's parameters (in place).

    Exporting only the base weights of a mid-stage checkpoint would silently change the model."""
    from megatron_apex.expansion.export import has_active_operators

    if not has_active_operators(common):
        return model
    params = dict(model.named_parameters())
    weights = {name: p.data for name, p in params.items()}
    fuse_expansion(weights, common, path, cfg)
    with torch.no_grad():
        for name, tensor in weights.items():
            if tensor is not params[name].data:
                params[name].copy_(tensor)
    return model


def resolve_export_config(checkpoint: str, vocab_size: Optional[int] = None) -> tuple:
    """(iter directory, common state, TP=1/PP=1 config, true vocab size, padded vocab size)."""
    from megatron_apex.training.checkpoint import read_common, resolve_checkpoint_dir

    if not os.path.exists(checkpoint):
        raise M.ConversionError(f"{checkpoint}: no such checkpoint directory")
    path = resolve_checkpoint_dir(checkpoint, checksums=True)  # every file as saved, before anything is read
    common = read_common(path)
    cfg: Config = single_layout(config_from_dict(common["config"]))
    padded = int(common["model_signature"]["padded_vocab_size"])
    vocab = vocab_size or cfg.model.vocab_size
    if vocab is None:
        try:
            from megatron_apex.data.datasets import resolve_vocab

            vocab = resolve_vocab(cfg)[0]
        except Exception as exc:  # the tokenizer of the run may not exist on this machine
            raise M.ConversionError(f"{path}: the config has no model.vocab_size and the run's tokenizer "
                                    f"({cfg.data.tokenizer_model}) cannot be read ({exc}); pass --vocab-size") from None
    if not 0 < vocab <= padded:
        raise M.ConversionError(f"vocab size {vocab} does not fit the checkpoint's padded vocabulary {padded}")
    cfg.model.vocab_size = vocab
    return path, common, cfg, vocab, padded


def load_model(path: str, common: dict, cfg: Config, padded: int, dtype: torch.dtype, ctx):
    """The checkpoint's weights in a TP=1/PP=1 CPU model (inside :func:`single_process`)."""
    from megatron_apex.training.checkpoint import load_checkpoint

    model = build_cpu_model(cfg, dtype, padded)
    load_checkpoint(path, model, None, cfg, ctx, padded, load_optimizer=False, load_rng=False)
    return _fuse_expansion_if_present(model, common, path, cfg)


def hf_tensor_specs(m, vocab: int, dtype: torch.dtype) -> list:
    """[(HF name, shape, dtype)] in the order they are written."""
    h, f, d, ng, nh = m.hidden_size, m.ffn_hidden_size, m.head_dim, m.query_groups, m.num_attention_heads
    specs = [(M.HF_EMBED, (vocab, h), dtype)]
    for i in range(m.num_layers):
        n = M.hf_layer_names(i, m.add_qkv_bias)
        specs += [(n["input_norm"], (h,), dtype), (n["q"], (nh * d, h), dtype), (n["k"], (ng * d, h), dtype),
                  (n["v"], (ng * d, h), dtype)]
        if m.add_qkv_bias:
            specs += [(n["q_bias"], (nh * d,), dtype), (n["k_bias"], (ng * d,), dtype), (n["v_bias"], (ng * d,), dtype)]
        specs += [(n["o"], (h, nh * d), dtype), (n["post_norm"], (h,), dtype),
                  (n["gate"], (f, h), dtype), (n["up"], (f, h), dtype), (n["down"], (h, f), dtype)]
    specs.append((M.HF_NORM, (h,), dtype))
    if not m.tie_embeddings:
        specs.append((M.HF_LM_HEAD, (vocab, h), dtype))
    return specs


def iter_hf_tensors(model, m, vocab: int, dtype: torch.dtype, progress: bool = True):
    """Yield (HF name, tensor) from a TP=1/PP=1 model, layer by layer, in :func:`hf_tensor_specs` order."""
    from tqdm import tqdm

    params = dict(model.named_parameters())
    nh, ng, d = m.num_attention_heads, m.query_groups, m.head_dim

    def get(name: str) -> torch.Tensor:
        return params[name].detach().to(dtype)

    yield M.HF_EMBED, M.trim_vocab(get(M.MC_EMBED), vocab)
    for i in tqdm(range(m.num_layers), desc="export layers", disable=not progress):
        hn, mn = M.hf_layer_names(i, m.add_qkv_bias), M.mcore_layer_names(i)
        yield hn["input_norm"], get(mn["input_norm"])
        q, k, v = M.mcore_to_hf_qkv(get(mn["qkv"]), nh, ng, d)
        yield hn["q"], q
        yield hn["k"], k
        yield hn["v"], v
        if m.add_qkv_bias:
            for role, t in zip(("q_bias", "k_bias", "v_bias"), M.mcore_to_hf_qkv_bias(get(mn["qkv_bias"]), nh, ng, d)):
                yield hn[role], t
        yield hn["o"], get(mn["o"])
        yield hn["post_norm"], get(mn["post_norm"])
        gate, up = M.split_fc1(get(mn["fc1"]))
        yield hn["gate"], gate
        yield hn["up"], up
        yield hn["down"], get(mn["down"])
    yield M.HF_NORM, get(M.MC_NORM)
    if not m.tie_embeddings:
        yield M.HF_LM_HEAD, M.trim_vocab(get(M.MC_OUTPUT), vocab)


def export_hf_checkpoint(checkpoint: str, output: str, dtype: Optional[torch.dtype] = None,
                         shard_size: str | int = "5GB", tokenizer: Optional[str] = None,
                         vocab_size: Optional[int] = None, progress: bool = True, force: bool = False,
                         architecture: Optional[str] = None) -> ExportResult:
    """Write ``output``/config.json, generation_config.json, safetensors shards (+ index) and tokenizer
    files. ``dtype`` None keeps the checkpoint's stored dtype. ``architecture`` (a family: llama, mistral,
    qwen2) None: the family the checkpoint was imported from, else the one the model's features need
    (:func:`megatron_apex.convert.mapping.export_family`); one that cannot express the model is refused
    before anything is written.

    Everything is written into a new directory beside ``output`` that is renamed to ``output`` once
    complete, so an interrupted export leaves no directory that looks like a model. A non-empty
    ``output`` is refused unless ``force``, which replaces it."""
    tokenizer_sources = tokenizer_files(tokenizer) if tokenizer else []  # a typo fails now, not after the export
    max_bytes = shard_size if isinstance(shard_size, int) else parse_size(shard_size)
    path, common, cfg, vocab, padded = resolve_export_config(checkpoint, vocab_size)
    stored = checkpoint_dtype(path)
    dtype = dtype or stored
    m = cfg.model
    hf_meta = common.get("hf_import") or {}
    family = M.export_family(m, architecture or hf_meta.get("family"))
    ids = token_ids(hf_meta, cfg, family)
    with staged_output(output, force, checkpoint) as stage:
        with single_process(cfg) as ctx:
            model = load_model(path, common, cfg, padded, stored, ctx)
            writer = SafetensorsShardWriter(stage, hf_tensor_specs(m, vocab, dtype), max_bytes)
            for name, tensor in iter_hf_tensors(model, m, vocab, dtype, progress):
                writer.add(name, tensor)
                del tensor
            writer.close()
            del model
        write_json(os.path.join(stage, "config.json"),
                   M.model_config_to_hf_config(m, vocab, dtype, ids, family, hf_meta.get("config")))
        write_json(os.path.join(stage, "generation_config.json"), _generation_config(hf_meta, ids))
        files = list(writer.file_names) + (["model.safetensors.index.json"] if len(writer.file_names) > 1 else [])
        files += ["config.json", "generation_config.json"] + copy_tokenizer(tokenizer_sources, stage)
    logger.info("exported %s -> %s (%d file(s), vocab %d, %s)", path, output, len(writer.file_names), vocab,
                str(dtype).replace("torch.", ""))
    return ExportResult(output, files, vocab, dtype)


def token_ids(hf_meta: dict, cfg: Config, family: str = "llama") -> dict:
    """bos/eos/pad ids of the exported model, for config.json and generation_config.json alike: those of
    the imported ``config.json``, else eos = the run's ``data.eod_id`` (LLaMA's and Mistral's bos 1 / eos 2
    without one; Qwen2 has no BOS)."""
    ids = {k: v for k, v in (hf_meta.get("config") or {}).items() if k.endswith("_token_id")}
    ids.setdefault("bos_token_id", None if family == "qwen2" else 1)
    ids.setdefault("eos_token_id", cfg.data.eod_id if cfg.data.eod_id is not None else 2)
    return ids


def _generation_config(hf_meta: dict, ids: dict) -> dict:
    """The imported generation_config.json as it was, else the bos/eos ids of config.json."""
    gen = dict(hf_meta.get("generation_config") or {})
    gen.pop("transformers_version", None)
    return gen or {k: ids[k] for k in ("bos_token_id", "eos_token_id") if ids[k] is not None}
