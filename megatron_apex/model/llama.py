"""LLaMA-family GPTModel from the config, through megatron-core layer specs.

RMSNorm, RoPE (configurable theta, no interleaving: the same rotate-half convention as Hugging
Face), SwiGLU MLP, grouped-query attention, no biases but an optional one on Q, K and V (Qwen2),
full causal or sliding-window attention (Mistral), optional tied embeddings, vocabulary padded to a
TP-friendly multiple. Two implementations behind one seam:

* ``local``: megatron-core's pure-PyTorch modules (ColumnParallelLinear, RowParallelLinear) with
  ``norm.RMSNorm`` (torch's RMSNorm, usable under sequence parallelism); core attention through torch
  SDPA (``attention.SDPAttention``) unless the unfused reference is asked for. Runs everywhere,
  including the CPU test suite.
* ``transformer_engine``: megatron-core's TE spec (fused norm+linear, TE attention), chosen only
  when asked for; imported lazily so nothing requires TE.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_apex.config import Config, ConfigError
from megatron_apex.model.norm import RMSNorm

logger = logging.getLogger(__name__)


def build_transformer_config(cfg: Config, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig:
    """megatron-core TransformerConfig for a LLaMA-family model under the configured layout."""
    m, p = cfg.model, cfg.parallel
    bf16 = params_dtype == torch.bfloat16
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        window_size=window_size(cfg),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        autocast_dtype=params_dtype,
        use_cpu_initialization=use_cpu,
        # megatron-core's own draw also sets the tensor-parallel attributes of each weight (needed by
        # the optimizer's norm and by our init); model.init.initialize_weights then redraws the values.
        perform_initialization=True,
        # Fused kernels need CUDA (and NVIDIA apex / TE); the unfused paths compute the same thing.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **recompute_settings(cfg),
        attention_softmax_in_fp32=True,
    )


def window_size(cfg: Config):
    """megatron-core's ``window_size`` of ``model.sliding_window`` W: (W - 1, 0), a query sees itself and the
    W - 1 keys before it (Hugging Face's ``kv_idx > q_idx - W``); None for full causal attention."""
    w = cfg.model.sliding_window
    return None if w is None else (w - 1, 0)


def recompute_settings(cfg: Config) -> dict:
    """megatron-core's recomputation settings: whole layers (every one, or the first N of each pipeline
    stage: the 'block' method), core attention only ('selective'), or none."""
    t = cfg.train
    if t.recompute_activations:
        return {"recompute_granularity": "full", "recompute_method": "block" if t.recompute_num_layers else "uniform",
                "recompute_num_layers": t.recompute_num_layers or 1}
    if t.recompute_core_attention:
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {}


def get_layer_spec(cfg: Config) -> ModuleSpec:
    """The layer spec: local (SDPA or unfused attention) or Transformer Engine."""
    if cfg.model.transformer_impl == "transformer_engine":
        try:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
            import transformer_engine  # noqa: F401
        except ImportError as exc:
            raise ConfigError("model.transformer_impl='transformer_engine' but Transformer Engine is not "
                              "installed (pip install 'megatron_apex[te]' on a CUDA machine)") from exc
        return get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    if cfg.model.attention_backend == "sdpa":
        from megatron_apex.model.attention import SDPAttention

        attn = spec.submodules.self_attention
        submodules = dataclasses.replace(attn.submodules, core_attention=SDPAttention)
        spec.submodules.self_attention = dataclasses.replace(attn, submodules=submodules)
    return spec


def build_model(cfg: Config, transformer_config: TransformerConfig, padded_vocab_size: int,
                pre_process: bool, post_process: bool) -> GPTModel:
    """One pipeline stage's chunk of the model (megatron-core decides which layers it holds)."""
    spec = get_layer_spec(cfg)
    if cfg.model.transformer_impl == "local":  # the final norm too (megatron-core would pick its own)
        spec = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(transformer_config),
                                          layer_norm=RMSNorm)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rotary_base),
        rope_scaling=cfg.model.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.model.rope_scaling_factor or 8.0,  # the second is read only with the first
    )
    return model


def count_parameters(cfg: Config, padded_vocab_size: int) -> dict:
    """Parameter counts of the whole (unsharded) model, from the shapes alone."""
    m = cfg.model
    h, f, d, L = m.hidden_size, m.ffn_hidden_size, m.head_dim, m.num_layers
    attn = h * (m.num_attention_heads + 2 * m.query_groups) * d + m.num_attention_heads * d * h
    if m.add_qkv_bias:  # one bias entry per row of the fused QKV projection
        attn += (m.num_attention_heads + 2 * m.query_groups) * d
    mlp = 3 * h * f
    norms = 2 * h
    per_layer = attn + mlp + norms
    embedding = padded_vocab_size * h
    output = 0 if m.tie_embeddings else padded_vocab_size * h
    total = L * per_layer + embedding + output + h
    return {"total": total, "per_layer": per_layer, "embedding": embedding, "output": output,
            "non_embedding": L * per_layer + h}


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), counting matmuls only.

    forward per layer: 2 * (QKV + O + 3 SwiGLU matmuls) weights + attention 2 * 2 * s * h_attn
    (QK^T and PV, causal halves not discounted, as in Megatron-LM's formula), plus the logits
    2 * h * V. Recomputation is not counted (MFU counts useful work).
    """
    m = cfg.model
    h, f, d, s, L = m.hidden_size, m.ffn_hidden_size, m.head_dim, cfg.data.seq_length, m.num_layers
    v = cfg.padded_vocab_size(cfg.model.vocab_size) if cfg.model.vocab_size else 0
    weights = h * (m.num_attention_heads + 2 * m.query_groups) * d + m.num_attention_heads * d * h + 3 * h * f
    attention = 2 * s * m.num_attention_heads * d
    forward = L * (2 * weights + 2 * attention) + 2 * h * v
    return 3.0 * forward
