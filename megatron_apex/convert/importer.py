"""Hugging Face LLaMA/Mistral/Qwen2 directory -> megatron_apex weights-only checkpoint.

Streaming: the megatron model is allocated once (uninitialised) and filled layer by layer, each HF
tensor read straight into its place in the model's parameters, so peak memory stays near one copy
of the model (the checkpoint save then writes the parameters without staging copies). The
checkpoint is written at TP=1/PP=1; torch_dist stores global tensors, so it loads under any
layout. The target layout (``tp``, ``pp``) is checked up front and recorded in the checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_apex.config import Config
from megatron_apex.convert import mapping as M
from megatron_apex.convert.hf_io import HFTensorSource, read_hf_config, read_json, staged_output
from megatron_apex.convert.runtime import build_cpu_model, single_process

logger = logging.getLogger(__name__)


@dataclass
class ImportResult:
    checkpoint: str                     # the iter_* directory written
    config: Config                      # the run config saved in the checkpoint (TP=1/PP=1)
    padded_vocab_size: int
    warnings: list = field(default_factory=list)
    ignored: list = field(default_factory=list)   # HF buffers skipped on purpose (rotary inv_freq)
    dtype: Optional[torch.dtype] = None            # the dtype the weights are stored in...
    source_dtype: Optional[torch.dtype] = None     # ...and the one the Hugging Face files hold


def build_import_config(hf: dict, tp: int = 1, pp: int = 1, dtype: Optional[torch.dtype] = None,
                        allow_sliding_window: bool = False) -> Config:
    """The run config of an imported model: its model section from ``config.json``, data set to
    'none' (the checkpoint is weights only), precision from ``dtype``."""
    m = M.hf_config_to_model_config(hf, allow_sliding_window)
    M.check_layout(m, tp, pp)
    m.make_vocab_size_divisible_by = M.vocab_multiple(m, tp)
    cfg = Config(model=m)
    cfg.data.tokenizer_type = "none"
    cfg.data.mock = True
    eos = hf.get("eos_token_id")
    cfg.data.eod_id = eos if isinstance(eos, int) else 0
    cfg.data.seq_length = min(cfg.data.seq_length, m.max_position_embeddings)
    cfg.train.precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    return cfg.validate()


def expected_hf_names(m) -> list:
    """Every HF tensor name the model needs, in file order (lm_head only when untied)."""
    names = [M.HF_EMBED]
    for i in range(m.num_layers):
        names += list(M.hf_layer_names(i, m.add_qkv_bias).values())
    names.append(M.HF_NORM)
    if not m.tie_embeddings:
        names.append(M.HF_LM_HEAD)
    return names


def check_hf_tensors(source: HFTensorSource, m) -> list:
    """Missing and unknown tensors and shape mismatches, all reported at once; returns ignored names."""
    h, f, d, ng, nh = m.hidden_size, m.ffn_hidden_size, m.head_dim, m.query_groups, m.num_attention_heads
    shapes = {M.HF_EMBED: (m.vocab_size, h), M.HF_NORM: (h,), M.HF_LM_HEAD: (m.vocab_size, h)}
    for i in range(m.num_layers):
        n = M.hf_layer_names(i, m.add_qkv_bias)
        shapes.update({n["input_norm"]: (h,), n["post_norm"]: (h,), n["q"]: (nh * d, h), n["k"]: (ng * d, h),
                       n["v"]: (ng * d, h), n["o"]: (h, nh * d), n["gate"]: (f, h), n["up"]: (f, h),
                       n["down"]: (h, f)})
        if m.add_qkv_bias:
            shapes.update({n["q_bias"]: (nh * d,), n["k_bias"]: (ng * d,), n["v_bias"]: (ng * d,)})
    expected = expected_hf_names(m)
    present = set(source.names())
    missing = [n for n in expected if n not in present]
    ignored = sorted(n for n in present if n.endswith(M.HF_IGNORED_SUFFIXES))
    # A tied model may still ship lm_head (some exporters write it); it must then equal the embedding.
    allowed = set(expected) | set(ignored) | ({M.HF_LM_HEAD} if m.tie_embeddings else set())
    unknown = sorted(present - allowed)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) this converter does not know (they would be dropped): "
                        f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}")
    for name in (n for n in expected if n in present):
        got = source.shape(name)
        if got != shapes[name]:
            problems.append(f"{name}: shape {got} does not match config.json's {shapes[name]}")
            if len(problems) > 10:
                break
    if problems:
        raise M.ConversionError(f"{source.hf_dir}: weights do not match config.json: " + "; ".join(problems))
    return ignored


def copy_hf_into_model(model, source: HFTensorSource, m, padded_vocab: int, progress: bool = True) -> None:
    """Fill every parameter of a TP=1/PP=1 model from the HF tensors, one layer at a time.

    Each HF tensor is read straight into its place in the model's parameter (the rows of the padded
    embedding, the gate/up halves of fc1); q/k/v go through one small temporary each, copied into
    the group-major slots of the fused QKV (and their biases into the fused bias's). No converted copy of a
    parameter is built on the side."""
    from tqdm import tqdm

    params = dict(model.named_parameters())
    seen = set()
    nh, ng, d, h, f = m.num_attention_heads, m.query_groups, m.head_dim, m.hidden_size, m.ffn_hidden_size

    def param(name: str, shape: tuple) -> torch.Tensor:
        p = params[name]
        if tuple(p.shape) != tuple(shape):
            raise M.ConversionError(f"{name}: converted shape {tuple(shape)} != model's {tuple(p.shape)}")
        seen.add(name)
        return p.data

    def fill(name: str, hf_name: str) -> None:
        source.read_into(hf_name, param(name, source.shape(hf_name)))

    def fill_vocab(name: str, hf_name: str) -> None:  # [V, h] into the first V rows of [Vp, h], zeros below
        v = source.shape(hf_name)[0]
        if v > padded_vocab:
            raise M.ConversionError(f"vocabulary {v} is larger than the padded size {padded_vocab}")
        w = param(name, (padded_vocab, h))
        source.read_into(hf_name, w[:v])
        w[v:].zero_()

    with torch.no_grad():
        if (m.tie_embeddings and M.HF_LM_HEAD in source
                and not torch.equal(source.get(M.HF_LM_HEAD), source.get(M.HF_EMBED))):
            raise M.ConversionError("tie_word_embeddings=true but lm_head.weight differs from "
                                    "model.embed_tokens.weight; the tie setting does not match the weights")
        fill_vocab(M.MC_EMBED, M.HF_EMBED)
        for i in tqdm(range(m.num_layers), desc="import layers", disable=not progress):
            hn, mn = M.hf_layer_names(i, m.add_qkv_bias), M.mcore_layer_names(i)
            fill(mn["input_norm"], hn["input_norm"])
            qkv = param(mn["qkv"], ((nh + 2 * ng) * d, h))
            for part, role in zip(M.qkv_parts(qkv, nh, ng, d), ("q", "k", "v")):
                part.copy_(source.get(hn[role]).reshape(part.shape))
            if m.add_qkv_bias:
                bias = param(mn["qkv_bias"], ((nh + 2 * ng) * d,))
                for part, role in zip(M.qkv_bias_parts(bias, nh, ng, d), ("q_bias", "k_bias", "v_bias")):
                    part.copy_(source.get(hn[role]).reshape(part.shape))
            fill(mn["o"], hn["o"])
            fill(mn["post_norm"], hn["post_norm"])
            gate, up = M.split_fc1(param(mn["fc1"], (2 * f, h)))
            source.read_into(hn["gate"], gate)
            source.read_into(hn["up"], up)
            fill(mn["down"], hn["down"])
        fill(M.MC_NORM, M.HF_NORM)
        if not m.tie_embeddings:
            fill_vocab(M.MC_OUTPUT, M.HF_LM_HEAD)
    left = sorted(set(params) - seen)
    if left:
        raise M.ConversionError(f"model parameters not filled from the HF weights: {', '.join(left)}")


def import_hf_checkpoint(hf_dir: str, output: str, tp: int = 1, pp: int = 1, dtype: Optional[torch.dtype] = None,
                         allow_sliding_window: bool = False, progress: bool = True,
                         force: bool = False) -> ImportResult:
    """Convert ``hf_dir`` into a weights-only checkpoint under ``output`` (root with tracker, step 0).

    ``dtype`` is the stored weight dtype; None keeps the one ``config.json`` names (fp32 if none). The
    checkpoint is written beside ``output`` and renamed into place once complete. A non-empty
    ``output`` (a run's checkpoint root, whose tracker the import would move back to step 0) is
    refused unless ``force``, which replaces it."""
    from megatron_apex.training.checkpoint import iter_dir, save_checkpoint

    hf = read_hf_config(hf_dir)
    warnings = M.check_hf_config(hf, allow_sliding_window)
    for w in warnings:
        logger.warning("%s", w)
    named = M.hf_dtype(hf)
    explicit, dtype = dtype is not None, dtype or named or torch.float32
    cfg = build_import_config(hf, tp, pp, dtype, allow_sliding_window)
    m = cfg.model
    source = HFTensorSource(hf_dir)
    ignored = check_hf_tensors(source, m)
    source_dtype = source.dtype("model.embed_tokens.weight")
    if not explicit and source_dtype != dtype:
        logger.warning("config.json names %s, the weight files hold %s: storing %s (--dtype keeps another)",
                       str(named or torch.float32).replace("torch.", ""), str(source_dtype).replace("torch.", ""),
                       str(dtype).replace("torch.", ""))
    if ignored:
        logger.info("skipping %d non-weight buffer(s): %s", len(ignored), ", ".join(ignored[:3]))
    padded = cfg.padded_vocab_size(m.vocab_size)
    generation_path = os.path.join(hf_dir, "generation_config.json")
    generation = read_json(generation_path) if os.path.isfile(generation_path) else None
    hf_meta = {"source": os.path.abspath(hf_dir), "target_layout": {"tp": tp, "pp": pp}, "family": M.hf_family(hf),
               "config": {k: hf.get(k) for k in M.PASSTHROUGH_KEYS if k in hf},
               "generation_config": generation, "warnings": warnings}
    with staged_output(output, force, hf_dir) as stage, single_process(cfg) as ctx:
        model = build_cpu_model(cfg, dtype, padded)
        copy_hf_into_model(model, source, m, padded, progress)
        source.close()
        save_checkpoint(stage, 0, model, None, cfg, ctx, padded, consumed_samples=0,
                        extra_common={"hf_import": hf_meta})
        del model
    path = iter_dir(output, 0)
    logger.info("imported %s -> %s (%d layers, vocab %d padded to %d, %s, target TP=%d PP=%d)", hf_dir, path,
                m.num_layers, m.vocab_size, padded, str(dtype).replace("torch.", ""), tp, pp)
    return ImportResult(path, cfg, padded, warnings, ignored, dtype, source_dtype)


def model_yaml(cfg: Config, tp: int = 1, pp: int = 1) -> str:
    """The ``model:`` (and, for a non-trivial target layout, ``parallel:``) sections as YAML."""
    import dataclasses

    import yaml

    section = {k: v for k, v in dataclasses.asdict(cfg.model).items()
               if k not in ("transformer_impl", "attention_backend", "init_method_std")}
    doc = {"model": section}
    if tp != 1 or pp != 1:
        doc["parallel"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    return yaml.safe_dump(doc, sort_keys=False)
