"""Pure mappings between Hugging Face LLaMA-family tensors/configs and megatron-core (local spec) ones.

Everything here is a function of tensors and dicts: no files, no process groups. The layouts are
documented in ``docs/formats.md`` ("Hugging Face LLaMA, Mistral and Qwen2"); in short (h = hidden, nh =
heads, ng = query groups, d = head dim, r = nh / ng, f = ffn size, V = vocab, Vp = padded vocab):

* ``linear_qkv.weight`` [(nh + 2 ng) d, h] is group-major: for each group g, its r query heads,
  then k_g, then v_g. This global order does not depend on the TP degree. Qwen2's ``linear_qkv.bias``
  [(nh + 2 ng) d] has the same order (its entries are the rows' bias).
* ``linear_fc1.weight`` [2f, h] = [gate; up] (SwiGLU, gate first).
* embedding / output layer [Vp, h]: HF's [V, h] plus zero rows up to the padded size.
* No RoPE permutation: megatron-core (``rotary_interleaved=False``) and HF both rotate halves.

Families (``FAMILIES``): LLaMA (``LlamaForCausalLM``), Mistral (the same blocks, optionally a sliding
window in every layer) and Qwen2/Qwen2.5 (the same blocks plus a bias on Q, K and V; a sliding window
only where every layer has one).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_apex.config import ModelConfig


class ConversionError(RuntimeError):
    """A checkpoint or model directory cannot be converted (the message says why and what to do)."""


class UnsupportedModelError(ConversionError):
    """The source model uses an architecture or feature this converter would not reproduce exactly."""


# ---------------------------------------------------------------------- tensors
def hf_to_mcore_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    num_query_groups: int, head_dim: int) -> torch.Tensor:
    """HF ``q_proj`` [nh d, h], ``k_proj``/``v_proj`` [ng d, h] -> fused ``linear_qkv`` [(nh + 2 ng) d, h]."""
    ng, d = num_query_groups, head_dim
    h = q.shape[-1]
    _expect(q, (num_heads * d, h), "q_proj")
    _expect(k, (ng * d, h), "k_proj")
    _expect(v, (ng * d, h), "v_proj")
    qkv = q.new_empty((num_heads + 2 * ng) * d, h)
    for part, t in zip(qkv_parts(qkv, num_heads, ng, d), (q, k, v)):
        part.copy_(t.reshape(part.shape))
    return qkv


def qkv_parts(qkv: torch.Tensor, num_heads: int, num_query_groups: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a contiguous fused ``linear_qkv`` [(nh + 2 ng) d, h] as (q [ng, r d, h], k [ng, d, h],
    v [ng, d, h]); each reshapes to its HF tensor ([nh d, h], [ng d, h], [ng d, h]). Writing into the
    views fills the fused tensor in place."""
    ng, d = num_query_groups, head_dim
    r = num_heads // ng
    h = qkv.shape[-1]
    _expect(qkv, ((num_heads + 2 * ng) * d, h), "linear_qkv")
    return torch.split(qkv.view(ng, (r + 2) * d, h), [r * d, d, d], dim=1)


def mcore_to_hf_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``linear_qkv`` [(nh + 2 ng) d, h] -> (q_proj [nh d, h], k_proj [ng d, h], v_proj [ng d, h])."""
    q, k, v = qkv_parts(qkv.contiguous(), num_heads, num_query_groups, head_dim)
    h = qkv.shape[-1]
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def qkv_bias_parts(bias: torch.Tensor, num_heads: int, num_query_groups: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a contiguous fused ``linear_qkv.bias`` [(nh + 2 ng) d] as (q [ng, r d], k [ng, d], v [ng, d]),
    in the weight's group-major order (:func:`qkv_parts` of the bias as a one-column matrix)."""
    _expect(bias, ((num_heads + 2 * num_query_groups) * head_dim,), "linear_qkv.bias")
    return tuple(part.squeeze(-1) for part in qkv_parts(bias.view(-1, 1), num_heads, num_query_groups, head_dim))


def mcore_to_hf_qkv_bias(bias: torch.Tensor, num_heads: int, num_query_groups: int,
                         head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``linear_qkv.bias`` [(nh + 2 ng) d] -> (q_proj.bias [nh d], k_proj.bias [ng d], v_proj.bias [ng d])."""
    return tuple(t.reshape(-1) for t in qkv_bias_parts(bias.contiguous(), num_heads, num_query_groups, head_dim))


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF ``gate_proj``, ``up_proj`` [f, h] -> ``linear_fc1`` [2f, h] = [gate; up]."""
    if gate.shape != up.shape:
        raise ConversionError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_fc1`` [2f, h] -> (gate_proj [f, h], up_proj [f, h])."""
    if fc1.shape[0] % 2:
        raise ConversionError(f"linear_fc1 has an odd number of rows {fc1.shape[0]}; expected [gate; up]")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def pad_vocab(weight: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """[V, h] -> [Vp, h] with zero rows appended (the padded tokens are never produced by a tokenizer)."""
    v = weight.shape[0]
    if v > padded_vocab_size:
        raise ConversionError(f"vocabulary {v} is larger than the padded size {padded_vocab_size}")
    if v == padded_vocab_size:
        return weight
    return torch.cat([weight, weight.new_zeros(padded_vocab_size - v, *weight.shape[1:])], dim=0)


def trim_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[Vp, h] -> [V, h] (a view: the padding rows are dropped)."""
    if weight.shape[0] < vocab_size:
        raise ConversionError(f"embedding has {weight.shape[0]} rows, fewer than vocab_size={vocab_size}")
    return weight[:vocab_size]


def _expect(t: torch.Tensor, shape: tuple, name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ConversionError(f"{name}: shape {tuple(t.shape)} does not match the config's {tuple(shape)}")


# ---------------------------------------------------------------------- names
def hf_layer_names(i: int, qkv_bias: bool = False) -> dict:
    """HF tensor names of decoder layer ``i``, keyed by role (with ``qkv_bias`` also q_bias, k_bias, v_bias)."""
    p = f"model.layers.{i}."
    names = {"input_norm": p + "input_layernorm.weight", "q": p + "self_attn.q_proj.weight",
             "k": p + "self_attn.k_proj.weight", "v": p + "self_attn.v_proj.weight",
             "o": p + "self_attn.o_proj.weight", "post_norm": p + "post_attention_layernorm.weight",
             "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight", "down": p + "mlp.down_proj.weight"}
    if qkv_bias:
        names.update({f"{role}_bias": p + f"self_attn.{role}_proj.bias" for role in ("q", "k", "v")})
    return names


def mcore_layer_names(i: int) -> dict:
    """megatron-core (local spec) parameter names of decoder layer ``i``, keyed by role."""
    p = f"decoder.layers.{i}."
    return {"input_norm": p + "input_layernorm.weight", "qkv": p + "self_attention.linear_qkv.weight",
            "qkv_bias": p + "self_attention.linear_qkv.bias",
            "o": p + "self_attention.linear_proj.weight", "post_norm": p + "pre_mlp_layernorm.weight",
            "fc1": p + "mlp.linear_fc1.weight", "down": p + "mlp.linear_fc2.weight"}


HF_EMBED, HF_NORM, HF_LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
MC_EMBED, MC_NORM, MC_OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
# Buffers some HF checkpoints carry that are not weights (recomputed from the config).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------- configs
# model_type -> the architecture transformers builds for it.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES.values())
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_REQUIRED = object()


def hf_number(hf: dict, key: str, kind: type = int, default=_REQUIRED):
    """``config.json``'s ``key`` as an int or float (``default`` when absent or null); a missing
    required field, or a value that is not a number of that kind, is refused naming the field."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConversionError(f"config.json lacks the required field {key!r}")
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (kind is int and value != int(value))):
        raise ConversionError(f"config.json: {key}={value!r} is not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def hf_rope_theta(hf: dict) -> float:
    """rope theta from a v4 (``rope_theta``) or v5 (``rope_parameters``) config."""
    return hf_number(hf if "rope_theta" in hf else (hf.get("rope_parameters") or {}), "rope_theta", float, 10000.0)


def hf_rope_parameters(hf: dict) -> dict:
    """The RoPE scaling parameters: ``rope_scaling`` (v4) or ``rope_parameters`` (v5); {} for none."""
    return hf.get("rope_scaling") or hf.get("rope_parameters") or {}


def hf_rope_type(hf: dict) -> Optional[str]:
    """The RoPE scaling type, or None for plain RoPE ('default' in transformers v5)."""
    params = hf_rope_parameters(hf)
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind in ("default", None) else kind


# Llama-3.x scaling as megatron-core computes it: only the factor is a parameter there.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_rope_scaling_factor(hf: dict) -> Optional[float]:
    """The Llama-3.x RoPE scaling factor (None for plain RoPE); other scalings, and Llama-3.x scaling
    with parameters megatron-core does not reproduce, are refused."""
    rope = hf_rope_type(hf)
    if rope is None:
        return None
    if rope != "llama3":
        raise UnsupportedModelError(f"rope_scaling type {rope!r} is not supported (plain RoPE and 'llama3' are); "
                                    "converting would silently change the model at long context")
    params = hf_rope_parameters(hf)
    factor = hf_number(params, "factor", float)
    if factor < 1.0:
        raise UnsupportedModelError(f"rope_scaling factor {factor}: llama3 scaling needs a factor >= 1")
    mismatched = {k: params.get(k) for k, v in LLAMA3_FIXED.items() if hf_number(params, k, float, None) != v}
    if mismatched:
        found = ", ".join(f"{k}={v!r}" for k, v in mismatched.items())
        expected = ", ".join(f"{k}={v}" for k, v in LLAMA3_FIXED.items())
        raise UnsupportedModelError(f"llama3 rope_scaling with {found}: only {expected} (every Llama-3.x release) "
                                    "is supported, megatron-core's RoPE scaling fixes them")
    return factor


def hf_rope_scaling(factor: Optional[float]) -> Optional[dict]:
    """The config.json ``rope_scaling`` of a model with the given Llama-3.x factor (None: plain RoPE)."""
    if factor is None:
        return None
    return {"rope_type": "llama3", "factor": float(factor), **LLAMA3_FIXED}


def hf_dtype(hf: dict) -> Optional[torch.dtype]:
    """The stored dtype named by the config (``torch_dtype`` in v4, ``dtype`` in v5), if any."""
    name = hf.get("torch_dtype") or hf.get("dtype")
    return _DTYPES.get(name) if isinstance(name, str) else None


def hf_family(hf: dict) -> str:
    """The family (``model_type``) of a config.json, refused unless one of :data:`FAMILIES` with architectures
    of those families."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type not in FAMILIES or (archs and not set(archs) <= set(SUPPORTED_ARCHITECTURES)):
        raise UnsupportedModelError(f"architecture {archs or model_type!r} (model_type={model_type!r}) is not "
                                    f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    # transformers builds the model of model_type; LLaMA and Mistral hold the same tensors, Qwen2 has biases
    same = {FAMILIES[model_type]} | (set() if model_type == "qwen2" else {FAMILIES["llama"], FAMILIES["mistral"]})
    if archs and not set(archs) <= same:
        raise UnsupportedModelError(f"config.json: architectures {archs} do not match model_type={model_type!r} "
                                    f"(transformers builds a {FAMILIES[model_type]}); correct one of them")
    return model_type


def hf_sliding_window(hf: dict, family: str) -> Optional[int]:
    """The attention window of every layer as transformers computes it for the family (None: full causal).

    Mistral: ``sliding_window`` (null for none), every layer. Qwen2: a window only with
    ``use_sliding_window``, in the layers from ``max_window_layers`` on (or as ``layer_types`` lists them); a
    window in some layers only is refused unless it covers ``max_position_embeddings``. LLaMA: transformers
    ignores the key; a window shorter than the context is refused here (see :func:`check_hf_config`)."""
    window = hf_number(hf, "sliding_window", int, None)
    if family == "mistral" or window is None:
        return window
    if family == "qwen2":
        layers = hf_number(hf, "num_hidden_layers")
        types = hf.get("layer_types")
        if types is None:
            first = hf_number(hf, "max_window_layers", int, 28)
            types = ["sliding_attention" if hf.get("use_sliding_window", False) and i >= first else "full_attention"
                     for i in range(layers)]
        if not isinstance(types, list) or len(types) != layers or not set(types) <= {"sliding_attention",
                                                                                      "full_attention"}:
            raise ConversionError(f"config.json: layer_types={types!r} is not a list of {layers} 'full_attention' "
                                  "or 'sliding_attention'")
        sliding = types.count("sliding_attention")
        if sliding == 0:
            return None
        if sliding < layers and window < hf_number(hf, "max_position_embeddings", int, 0):
            raise UnsupportedModelError(
                f"sliding_window={window} in {sliding} of {layers} layers (use_sliding_window with max_window_layers="
                f"{hf.get('max_window_layers')}, or layer_types): a window in some layers only is not supported (in "
                "every layer or in none is)")
        return window if sliding == layers else None
    return window


def check_hf_config(hf: dict, allow_sliding_window: bool = False) -> list:
    """Refuse features this converter cannot reproduce exactly; returns warnings for allowed ones."""
    family = hf_family(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"hidden_act={act!r}: only SwiGLU with silu is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UnsupportedModelError(f"{key}=true: biases are not supported (only Qwen2's bias on Q, K and V "
                                        "is; a LLaMA attention_bias also has one on the output projection)")
    hf_rope_scaling_factor(hf)
    theta = hf_rope_theta(hf)
    if theta != int(theta):
        raise UnsupportedModelError(f"rope_theta={theta} is not an integer; megatron-core's rotary_base is an int")
    warnings = []
    window = hf_sliding_window(hf, family)
    if family == "llama" and window is not None and window < hf_number(hf, "max_position_embeddings", int, 0):
        if not allow_sliding_window:
            raise UnsupportedModelError(
                f"sliding_window={window} (< max_position_embeddings={hf.get('max_position_embeddings')}) in a "
                "LLaMA config.json, whose model (LlamaForCausalLM) has no sliding window: set model_type 'mistral' "
                "and architectures ['MistralForCausalLM'] if the model was trained with one, or pass "
                "--allow-sliding-window to convert it with full causal attention, as transformers runs it")
        warnings.append(f"sliding_window={window} dropped: the converted model uses full causal attention, as "
                        "LlamaForCausalLM does")
    if hf.get("pretraining_tp", 1) not in (1, None):
        warnings.append(f"pretraining_tp={hf['pretraining_tp']} ignored (it only changes how HF splits matmuls)")
    return warnings


def hf_config_to_model_config(hf: dict, allow_sliding_window: bool = False) -> ModelConfig:
    """A HF LLaMA/Mistral/Qwen2 ``config.json`` dict -> our :class:`ModelConfig` (checks included)."""
    check_hf_config(hf, allow_sliding_window)
    family = hf_family(hf)
    heads = hf_number(hf, "num_attention_heads")
    hidden = hf_number(hf, "hidden_size")
    return ModelConfig(
        num_layers=hf_number(hf, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=hf_number(hf, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=hf_number(hf, "num_key_value_heads", int, heads),
        kv_channels=hf_number(hf, "head_dim", int, hidden // heads if heads else None),
        max_position_embeddings=hf_number(hf, "max_position_embeddings", int, 2048),
        vocab_size=hf_number(hf, "vocab_size"),
        rotary_base=hf_rope_theta(hf),
        rope_scaling_factor=hf_rope_scaling_factor(hf),
        norm_epsilon=hf_number(hf, "rms_norm_eps", float, 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        add_qkv_bias=family == "qwen2",
        sliding_window=None if family == "llama" else hf_sliding_window(hf, family),
        init_method_std=hf_number(hf, "initializer_range", float, 0.02),
    )


# Keys carried over from the imported config.json on export (ids, and keys that change nothing here).
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_window_layers")


def export_family(m: ModelConfig, family: Optional[str] = None) -> str:
    """The family a model is exported as: ``family`` when given (refused if its config.json cannot express
    the model), else Qwen2 for a QKV bias, Mistral for a sliding window, LLaMA otherwise."""
    if family is None:
        family = "qwen2" if m.add_qkv_bias else "mistral" if m.sliding_window is not None else "llama"
    if family not in FAMILIES:
        raise ConversionError(f"architecture {family!r}: expected one of {', '.join(FAMILIES)}")
    if m.add_qkv_bias != (family == "qwen2"):
        raise ConversionError(f"{FAMILIES[family]} {'has no' if m.add_qkv_bias else 'always has a'} bias on Q, K "
                              f"and V, the model (model.add_qkv_bias={m.add_qkv_bias}) "
                              f"{'has one' if m.add_qkv_bias else 'none'}; export it as "
                              f"{'qwen2' if m.add_qkv_bias else 'llama or mistral'}")
    if family == "llama" and m.sliding_window is not None:
        raise ConversionError(f"LlamaForCausalLM has no sliding window, the model has model.sliding_window="
                              f"{m.sliding_window}; export it as mistral (or qwen2 with a QKV bias)")
    return family


def model_config_to_hf_config(m: ModelConfig, vocab_size: int, dtype: torch.dtype, token_ids: dict,
                              family: str = "llama", extra: Optional[dict] = None) -> dict:
    """Our :class:`ModelConfig` -> the ``config.json`` dict of the family's ``*ForCausalLM`` (transformers-v4-style
    keys, which v5 also reads). ``token_ids`` holds the bos/eos/pad ids (the exporter decides them once, for
    config.json and generation_config.json alike); ``extra`` keys of the imported config.json that change
    nothing here (Qwen2's max_window_layers without a window) are carried over."""
    family = export_family(m, family)
    dtype_name = {v: k for k, v in _DTYPES.items()}[dtype]
    cfg = {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "vocab_size": int(vocab_size),
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.query_groups,
        "head_dim": m.head_dim,
        "max_position_embeddings": m.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_scaling": hf_rope_scaling(m.rope_scaling_factor),
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        "pad_token_id": token_ids.get("pad_token_id"),
    }
    if family == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    elif family == "mistral":
        cfg["sliding_window"] = m.sliding_window
    else:  # qwen2: a window in every layer (max_window_layers 0) or in none
        if m.head_dim == m.hidden_size // m.num_attention_heads:
            del cfg["head_dim"]  # not a Qwen2Config field (Qwen2 reads it when present, as other head sizes need)
        window = m.sliding_window is not None
        layers = (extra or {}).get("max_window_layers")
        cfg.update({"use_sliding_window": window, "sliding_window": m.sliding_window,
                    "max_window_layers": 0 if window else layers if isinstance(layers, int) else m.num_layers,
                    "layer_types": [("sliding" if window else "full") + "_attention"] * m.num_layers})
    return cfg


def check_layout(m: ModelConfig, tp: int, pp: int) -> None:
    """Refuse a target TP/PP layout the model cannot be split into, naming the offending size."""
    problems = []
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp {tp} / --pp {pp}: must be positive")
    if m.num_attention_heads % tp:
        problems.append(f"num_attention_heads={m.num_attention_heads} is not divisible by TP={tp}")
    if m.query_groups % tp:
        problems.append(f"num_key_value_heads (query groups)={m.query_groups} is not divisible by TP={tp}")
    if m.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={m.ffn_hidden_size} is not divisible by TP={tp}")
    if m.num_layers % pp:
        problems.append(f"num_hidden_layers={m.num_layers} is not divisible by PP={pp}")
    if problems:
        raise ConversionError(f"target layout TP={tp} PP={pp} is impossible for this model: " + "; ".join(problems))


def vocab_multiple(m: ModelConfig, tp: int) -> int:
    """The padding multiple for a target TP degree (as ``Config.padded_vocab_size`` computes it)."""
    return math.lcm(m.make_vocab_size_divisible_by, tp)
