"""Hugging Face <-> megatron_apex conversion: pure mappings, round trips, logit parity, bad inputs.

Tiny random LLaMAs are built with transformers (hidden 64, vocab 1000: not a multiple of 128, so
vocabulary padding is exercised). Tolerance of the logit comparisons: fp32, max |diff| < 1e-4.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from megatron_apex.convert import mapping as M  # noqa: E402

transformers = pytest.importorskip("transformers")
ATOL = 1e-4
VOCAB = 1000


def make_hf(path, kv_heads=2, tie=False, layers=2, shard=None, bin_format=False, qk_scale=1.0, **extra):
    """``qk_scale`` multiplies the query and key projections: sharper attention, whose logits then depend
    visibly on the RoPE frequencies even at 128 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                      max_position_embeddings=128, rms_norm_eps=1e-5, **extra)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if "q_proj" in name or "k_proj" in name:
                p.mul_(qk_scale)
    kwargs = {"max_shard_size": shard} if shard else {}
    if bin_format:
        os.makedirs(path, exist_ok=True)
        cfg.save_pretrained(path)
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    else:
        model.save_pretrained(path, **kwargs)
    return str(path)


def hf_state(path) -> dict:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    return state


def rewrite_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


# ---------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("nh,ng", [(4, 4), (8, 2), (4, 1)])
def test_qkv_roundtrip_and_group_layout(nh, ng):
    d, h = 6, 10
    q, k, v = torch.randn(nh * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    qkv = M.hf_to_mcore_qkv(q, k, v, nh, ng, d)
    assert qkv.shape == ((nh + 2 * ng) * d, h)
    r = nh // ng
    # group 0 holds query heads 0..r-1, then k_0, then v_0
    assert torch.equal(qkv[:r * d], q[:r * d])
    assert torch.equal(qkv[r * d:(r + 1) * d], k[:d])
    assert torch.equal(qkv[(r + 1) * d:(r + 2) * d], v[:d])
    q2, k2, v2 = M.mcore_to_hf_qkv(qkv, nh, ng, d)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


def test_fc1_and_vocab_helpers():
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    fc1 = M.merge_fc1(gate, up)
    assert torch.equal(fc1[:5], gate) and torch.equal(fc1[5:], up)
    g2, u2 = M.split_fc1(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    w = torch.randn(1000, 4)
    padded = M.pad_vocab(w, 1024)
    assert padded.shape == (1024, 4) and torch.equal(padded[1000:], torch.zeros(24, 4))
    assert torch.equal(M.trim_vocab(padded, 1000), w)
    with pytest.raises(M.ConversionError, match="larger than the padded size"):
        M.pad_vocab(w, 512)


def test_config_mapping_roundtrip():
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
          "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
          "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    m = M.hf_config_to_model_config(hf)
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.query_groups, m.head_dim,
            m.vocab_size, m.rotary_base, m.norm_epsilon, m.tie_embeddings) == (
        22, 2048, 5632, 32, 4, 64, 32000, 10000.0, 1e-5, False)
    back = M.model_config_to_hf_config(m, 32000, torch.bfloat16, {"bos_token_id": 1, "eos_token_id": 2})
    for key, value in hf.items():
        assert back[key] == value, key
    # transformers v5 style rope_parameters are read too
    v5 = dict(hf, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    del v5["rope_theta"]
    assert M.hf_config_to_model_config(v5).rotary_base == 500000.0
    assert M.hf_config_to_model_config(v5).rope_scaling_factor is None


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def test_llama3_rope_scaling_maps_both_ways():
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": False, "hidden_act": "silu"}
    m = M.hf_config_to_model_config(hf)
    assert (m.rotary_base, m.rope_scaling_factor, m.max_position_embeddings) == (500000.0, 8.0, 131072)
    back = M.model_config_to_hf_config(m, 128256, torch.bfloat16, {})
    assert back["rope_scaling"] == LLAMA3_ROPE and back["rope_theta"] == 500000.0
    # transformers v5 writes the same under rope_parameters, with the theta inside
    v5 = dict(hf, rope_parameters={**LLAMA3_ROPE, "factor": 32.0, "rope_theta": 500000.0})
    del v5["rope_scaling"], v5["rope_theta"]
    assert (M.hf_config_to_model_config(v5).rope_scaling_factor, M.hf_config_to_model_config(v5).rotary_base) == (
        32.0, 500000.0)
    with pytest.raises(M.ConversionError, match=r"config.json: low_freq_factor='one' is not a number"):
        M.hf_config_to_model_config(dict(hf, rope_scaling={**LLAMA3_ROPE, "low_freq_factor": "one"}))


# ---------------------------------------------------------------------- round trips and parity
CASES = {
    "mha-untied": dict(kv_heads=4, tie=False),
    "gqa-tied": dict(kv_heads=2, tie=True),
    "gqa-untied-sharded": dict(kv_heads=2, tie=False, shard="60KB"),
    "gqa-bin": dict(kv_heads=2, tie=False, bin_format=True),
    "gqa-llama3-rope": dict(kv_heads=2, tie=False, qk_scale=30.0,
                            rope_parameters={**LLAMA3_ROPE, "rope_theta": 10000.0}),
}
SLOW_CASES = {"gqa-bin"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_import_export_roundtrip_and_logits(tmp_path, case):
    from megatron_apex.convert.exporter import export_hf_checkpoint
    from megatron_apex.convert.importer import import_hf_checkpoint
    from megatron_apex.convert.verify import compare_checkpoint_with_hf

    src = make_hf(tmp_path / "hf", **CASES[case])
    result = import_hf_checkpoint(src, str(tmp_path / "ckpt"), progress=False)
    assert result.padded_vocab_size == 1024
    seq = 128 if "rope" in case else 32  # scaled RoPE: the low frequencies need the longest sequences to show
    parity = compare_checkpoint_with_hf(str(tmp_path / "ckpt"), src, num_sequences=2, seq_length=seq)
    assert parity.max_abs_diff < ATOL and parity.kl < 1e-8, parity
    shard = "40KB" if case.endswith("sharded") else "5GB"
    out = export_hf_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), shard_size=shard, progress=False)
    a, b = hf_state(src) if not CASES[case].get("bin_format") else torch.load(
        os.path.join(src, "pytorch_model.bin")), hf_state(out.output)
    if CASES[case].get("tie"):
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    if case.endswith("sharded"):
        index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
        assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(b)
    from transformers import AutoConfig

    c1, c2 = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(out.output)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "hidden_act", "rope_parameters"):
        assert getattr(c1, key) == getattr(c2, key), key
    if "rope" in case:
        # The parity above is not vacuous: the same weights read as plain RoPE give other logits.
        rewrite_config(src, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        plain = compare_checkpoint_with_hf(str(tmp_path / "ckpt"), src, num_sequences=2, seq_length=seq)
        assert plain.max_abs_diff > 100 * ATOL, plain


@pytest.fixture(scope="module")
def imported_gqa(tmp_path_factory):
    from megatron_apex.convert.importer import import_hf_checkpoint
    from megatron_apex.convert.verify import hf_logits, random_tokens

    d = tmp_path_factory.mktemp("gqa")
    src = make_hf(d / "hf", kv_heads=2, tie=False, layers=4)
    import_hf_checkpoint(src, str(d / "ckpt"), tp=2, pp=2, progress=False)
    tokens = random_tokens(VOCAB, 2, 16, seed=1)
    return str(d / "ckpt"), tokens, hf_logits(src, tokens)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_load_matches_hf(imported_gqa, tp, pp):
    from convert_workers import load_and_forward
    from distributed_utils import run_distributed

    ckpt, tokens, reference = imported_gqa
    results = run_distributed(load_and_forward, tp * pp, ckpt, tokens, tp, pp)
    logits = [r for r in results if r is not None]
    assert len(logits) == 1
    assert (logits[0] - reference).abs().max() < ATOL


@pytest.mark.slow
def test_cli_import_export_verify(tmp_path, capsys):
    import convert_checkpoint

    src = make_hf(tmp_path / "hf", kv_heads=2)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"not really sentencepiece")
    assert convert_checkpoint.main(["import", "--hf-dir", src, "--output", ckpt, "--config-out",
                                    str(tmp_path / "m.yaml"), "--verify", "--no-progress"]) == 0
    assert convert_checkpoint.main(["export", "--checkpoint", os.path.join(ckpt, "iter_0000000"), "--output", out,
                                    "--dtype", "bf16", "--tokenizer", str(tok), "--verify", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.count("verify: OK") == 2 and "max |logit diff|" in text and "KL" in text
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    import yaml

    from megatron_apex.config import load_config

    section = yaml.safe_load(open(tmp_path / "m.yaml"))
    assert section["model"]["num_query_groups"] == 2 and section["model"]["vocab_size"] == VOCAB
    cfg = load_config(str(tmp_path / "m.yaml"), ["data.mock=true", "data.seq_length=64"])
    assert cfg.padded_vocab_size() == 1024


def test_import_verify_tolerance_follows_the_cast_that_happened(tmp_path, capsys, caplog):
    """verify is strict when the weights were stored in the dtype the files hold, whatever --dtype says,
    and loose only when they were rounded, as when config.json names bfloat16 over fp32 files."""
    import logging

    import convert_checkpoint

    src = make_hf(tmp_path / "hf", kv_heads=2)  # fp32 files
    assert convert_checkpoint.main(["import", "--hf-dir", src, "--output", str(tmp_path / "a"), "--dtype", "fp32",
                                    "--verify", "--no-progress"]) == 0
    assert "(tol 1e-03)" in capsys.readouterr().out
    rewrite_config(src, torch_dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        assert convert_checkpoint.main(["import", "--hf-dir", src, "--output", str(tmp_path / "b"), "--verify",
                                        "--no-progress"]) == 0
    assert "config.json names bfloat16, the weight files hold float32: storing bfloat16" in caplog.text
    out = capsys.readouterr().out
    assert "(tol 5e-01)" in out and "verify: OK" in out


# ---------------------------------------------------------------------- bad inputs
def _import(src, out, **kw):
    from megatron_apex.convert.importer import import_hf_checkpoint

    return import_hf_checkpoint(str(src), str(out), progress=False, **kw)


def test_missing_inputs(tmp_path):
    with pytest.raises(M.ConversionError, match="no such directory"):
        _import(tmp_path / "nope", tmp_path / "ck")
    src = make_hf(tmp_path / "hf")
    os.remove(os.path.join(src, "model.safetensors"))
    with pytest.raises(M.ConversionError, match="no weights found"):
        _import(src, tmp_path / "ck")
    os.remove(os.path.join(src, "config.json"))
    with pytest.raises(M.ConversionError, match="config.json"):
        _import(src, tmp_path / "ck")


def test_shape_mismatch_and_missing_or_unknown_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_hf(tmp_path / "hf")
    rewrite_config(src, intermediate_size=192)
    with pytest.raises(M.ConversionError, match=r"gate_proj.weight: shape \(160, 64\) does not match config.json's "
                                                r"\(192, 64\)"):
        _import(src, tmp_path / "ck")
    rewrite_config(src, intermediate_size=160)
    state = load_file(os.path.join(src, "model.safetensors"))
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(M.ConversionError) as err:
        _import(src, tmp_path / "ck")
    assert "missing: model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "does not know (they would be dropped): model.layers.0.self_attn.q_norm.weight" in str(err.value)


def test_impossible_layout(tmp_path):
    src = make_hf(tmp_path / "hf", kv_heads=2)
    with pytest.raises(M.ConversionError, match=r"TP=4 PP=1 is impossible.*num_key_value_heads \(query groups\)=2 "
                                                r"is not divisible by TP=4"):
        _import(src, tmp_path / "ck", tp=4)
    with pytest.raises(M.ConversionError, match="num_hidden_layers=2 is not divisible by PP=3"):
        _import(src, tmp_path / "ck", pp=3)


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 4096}},
     r"llama3 rope_scaling with original_max_position_embeddings=4096: only low_freq_factor=1.0, "
     r"high_freq_factor=4.0, original_max_position_embeddings=8192"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"llama3 rope_scaling with low_freq_factor=None"),
    ({"rope_scaling": {**LLAMA3_ROPE, "factor": 0.5}}, "llama3 scaling needs a factor >= 1"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_scaling type 'linear' is not supported"),
    ({"attention_bias": True}, "attention_bias=true: biases are not supported"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "is not supported; supported"),
    ({"model_type": "llama", "architectures": ["Qwen2ForCausalLM"]}, "do not match model_type=.llama."),
    ({"sliding_window": 64}, "pass --allow-sliding-window"),
])
def test_unsupported_features_are_refused(tmp_path, change, message):
    src = make_hf(tmp_path / "hf")
    rewrite_config(src, **change)
    with pytest.raises(M.UnsupportedModelError, match=message):
        _import(src, tmp_path / "ck")


def test_sliding_window_allowed_explicitly(tmp_path):
    src = make_hf(tmp_path / "hf")
    rewrite_config(src, sliding_window=64)
    result = _import(src, tmp_path / "ck", allow_sliding_window=True)
    assert any("full causal attention" in w for w in result.warnings)


def test_tie_mismatch(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_hf(tmp_path / "hf", tie=False)
    rewrite_config(src, tie_word_embeddings=True)  # lm_head differs from the embedding
    with pytest.raises(M.ConversionError, match="tie_word_embeddings=true but lm_head.weight differs"):
        _import(src, tmp_path / "ck")
    rewrite_config(src, tie_word_embeddings=False)
    state = load_file(os.path.join(src, "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(M.ConversionError, match="missing: lm_head.weight"):
        _import(src, tmp_path / "ck")


def test_cli_reports_errors(tmp_path, capsys):
    import convert_checkpoint

    src = make_hf(tmp_path / "hf", kv_heads=2)
    assert convert_checkpoint.main(["import", "--hf-dir", src, "--output", str(tmp_path / "ck"), "--tp", "4"]) == 2
    assert "not divisible by TP=4" in capsys.readouterr().err
    assert convert_checkpoint.main(["export", "--checkpoint", str(tmp_path / "none"), "--output",
                                    str(tmp_path / "o")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_apex_hook_leaves_checkpoints_without_active_operators_alone():
    from megatron_apex.convert.exporter import _fuse_expansion_if_present

    model = object()  # never touched: nothing to fuse
    assert _fuse_expansion_if_present(model, {}, "unused", None) is model
    assert _fuse_expansion_if_present(model, {"apex": {"stage": 3, "finished": True}}, "unused", None) is model


def test_safetensors_writer_is_readable_without_transformers(tmp_path):
    from safetensors import safe_open

    from megatron_apex.convert.hf_io import SafetensorsShardWriter, parse_size

    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2GiB") == 2 * 2 ** 30 and parse_size("100") == 100
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2).half()}
    specs = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsShardWriter(str(tmp_path), specs, max_shard_bytes=60)
    for n, t in tensors.items():
        writer.add(n, t)
    writer.close()
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    for n, t in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][n]), "pt") as f:
            assert torch.equal(f.get_tensor(n), t)


def test_hf_source_reads_straight_into_a_destination(tmp_path):
    from megatron_apex.convert.hf_io import HFTensorSource, SafetensorsShardWriter

    t = torch.randn(4, 3)
    writer = SafetensorsShardWriter(str(tmp_path), [("w", (4, 3), torch.float32)], max_shard_bytes=10 ** 9)
    writer.add("w", t)
    writer.close()
    source = HFTensorSource(str(tmp_path))
    padded = torch.full((6, 3), 7.0)
    source.read_into("w", padded[:4])  # the rows of a larger tensor, as the padded embedding is filled
    assert torch.equal(padded[:4], t) and torch.equal(padded[4:], torch.full((2, 3), 7.0))
    half = torch.empty(4, 3, dtype=torch.bfloat16)
    source.read_into("w", half)  # another dtype: cast on the way in
    assert torch.equal(half, t.to(torch.bfloat16))
    with pytest.raises(M.ConversionError, match="'w': shape"):
        source.read_into("w", torch.empty(3, 4))


def test_checkpoint_saves_and_loads_swiglu_halves_without_copies():
    """The fc1 halves are handed to the torch_dist writer as slices with storages of their own (so it
    does not clone them), and loaded halves that are the model's own slices are not concatenated."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    from megatron_apex.compat.dist_checkpoint import merge_in_place, share_cpu_slices

    w = torch.randn(8, 3)
    sd = {"fc1": apply_swiglu_sharded_factory(ShardedTensor.from_rank_offsets("fc1", w), ())}
    share_cpu_slices(sd)
    for half, expected, offset in zip(sd["fc1"], w.chunk(2), (0, 12)):
        t = half.data
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size() == 48
        assert t.data_ptr() == w.data_ptr() + offset * 4 and torch.equal(t, expected)

    factory = apply_swiglu_sharded_factory(ShardedTensor.from_rank_offsets("fc1", w), ())
    merge_in_place({"model": {"fc1": factory}})
    assert factory.merge_fn([h.data for h in factory.build()]) is w  # loaded in place: nothing to merge
    merged = factory.merge_fn([h.data.clone() for h in factory.build()])  # elsewhere: the factory's own merge
    assert merged is not w and torch.equal(merged, w)


# ---------------------------------------------------------------------- outputs, environments, malformed inputs
@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(HF directory, imported checkpoint root) of a tiny GQA LLaMA, shared by the tests below (read only)."""
    from megatron_apex.convert.importer import import_hf_checkpoint

    d = tmp_path_factory.mktemp("imported")
    src = make_hf(d / "hf", kv_heads=2)
    import_hf_checkpoint(src, str(d / "ckpt"), progress=False)
    return src, str(d / "ckpt")


def _edit_common(root, edit) -> None:
    """Rewrite the common state (config, ...) of a checkpoint's iter_0000000 in place with ``edit(common)``."""
    from megatron_apex.training.integrity import update_manifest

    path = os.path.join(root, "iter_0000000", "common.pt")
    common = torch.load(path, weights_only=False)
    edit(common)
    torch.save(common, path)
    update_manifest(os.path.dirname(path), ["common.pt"])  # rewritten on purpose: its record follows


def _copy(src, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _export(checkpoint, out, **kw):
    from megatron_apex.convert.exporter import export_hf_checkpoint

    return export_hf_checkpoint(str(checkpoint), str(out), progress=False, **kw)


def _listing(path) -> dict:
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_converter_is_one_process_inside_a_launcher_environment(imported, tmp_path):
    """A slurm allocation (and a stray torchrun environment) around the converter must not make it wait for
    ranks that never come: it runs as one process whatever the launcher variables say."""
    import subprocess

    _, ckpt = imported
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "localhost", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "export",
                           "--checkpoint", ckpt, "--output", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_export_refuses_a_non_empty_output_and_force_replaces_it_whole(imported, tmp_path):
    _, ckpt = imported
    out = tmp_path / "out"
    _export(ckpt, out, shard_size="60KB")
    sharded = _listing(out)
    assert "model.safetensors.index.json" in sharded
    with pytest.raises(M.ConversionError, match=r"already holds .*config.json.*pass --force"):
        _export(ckpt, out, dtype=torch.float16)
    assert _listing(out) == sharded
    _export(ckpt, out, dtype=torch.float16, force=True)  # one file now: no stale shards or index beside it
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing left beside it
    with pytest.raises(M.ConversionError, match="holds the input"):
        _export(os.path.join(ckpt, "iter_0000000"), ckpt, force=True)


def test_interrupted_export_leaves_the_output_as_it_was(imported, tmp_path, monkeypatch):
    import megatron_apex.convert.exporter as exporter

    _, ckpt = imported
    out = tmp_path / "out"
    _export(ckpt, out)
    before = _listing(out)
    produce = exporter.iter_hf_tensors

    def interrupted(*args, **kwargs):  # Ctrl-C after five tensors have been written
        for i, item in enumerate(produce(*args, **kwargs)):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(exporter, "iter_hf_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _export(ckpt, out, dtype=torch.bfloat16, force=True)
    assert _listing(out) == before
    with pytest.raises(KeyboardInterrupt):
        _export(ckpt, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no half-written model, visible or hidden


def test_weights_are_read_from_the_files_transformers_reads(tmp_path):
    """A directory with model.safetensors and a (stale) sharded set: both readers take model.safetensors."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from megatron_apex.convert.hf_io import HFTensorSource

    src = make_hf(tmp_path / "hf", shard="60KB")
    assert not os.path.exists(os.path.join(src, "model.safetensors"))
    single = make_hf(tmp_path / "single")
    state = {k: v * 2 for k, v in load_file(os.path.join(single, "model.safetensors")).items()}
    save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(single)
    name = "model.layers.1.mlp.up_proj.weight"
    ours = HFTensorSource(src).get(name)
    theirs = AutoModelForCausalLM.from_pretrained(src).state_dict()[name]
    assert torch.equal(ours, state[name]) and torch.equal(theirs, state[name])


def test_import_refuses_an_existing_checkpoint_root(imported, tmp_path):
    from megatron_apex.training.checkpoint import TRACKER, read_latest

    src, _ = imported
    root = tmp_path / "run"
    (root / "iter_0000100").mkdir(parents=True)
    (root / "iter_0000100" / "metadata.json").write_text("{}")  # what marks a finished save
    (root / TRACKER).write_text("100\n")
    with pytest.raises(M.ConversionError, match=r"already holds a checkpoint .*iter_0000100.*--force"):
        _import(src, root)
    assert read_latest(str(root)) == 100 and (root / "iter_0000100").is_dir()
    _import(src, root, force=True)
    assert read_latest(str(root)) == 0 and sorted(os.listdir(root)) == ["iter_0000000", TRACKER]


def test_export_and_verify_with_vocab_size_from_the_command_line(imported, tmp_path, capsys):
    """A run whose config has no vocab_size and whose tokenizer is not on this machine: --vocab-size
    serves the export and its --verify."""
    import convert_checkpoint

    _, ckpt = imported

    def sentencepiece_run(common):
        common["config"]["model"]["vocab_size"] = None
        common["config"]["data"].update(tokenizer_type="sentencepiece", tokenizer_model=str(tmp_path / "gone.model"))

    ckpt = _copy(ckpt, tmp_path / "novocab")
    _edit_common(ckpt, sentencepiece_run)
    args = ["export", "--checkpoint", ckpt, "--no-progress", "--verify"]
    assert convert_checkpoint.main(args + ["--output", str(tmp_path / "a")]) == 2
    assert "pass --vocab-size" in capsys.readouterr().err
    assert convert_checkpoint.main(args + ["--output", str(tmp_path / "b"), "--vocab-size", str(VOCAB)]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_exported_token_ids_agree_without_an_import(imported, tmp_path):
    """A run that was not imported (no hf_import), trained with data.eod_id=0: config.json and
    generation_config.json give the same ids, eos = the run's end-of-document token."""
    _, ckpt = imported

    def trained_from_scratch(common):
        del common["hf_import"]
        common["config"]["data"]["eod_id"] = 0

    ckpt = _copy(ckpt, tmp_path / "scratch")
    _edit_common(ckpt, trained_from_scratch)
    out = _export(ckpt, tmp_path / "out").output
    config = json.load(open(os.path.join(out, "config.json")))
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 0)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 0)


def test_tokenizer_is_checked_before_the_export_runs(imported, tmp_path, monkeypatch):
    import megatron_apex.convert.exporter as exporter

    def load_model(*args):
        raise AssertionError("the model was loaded before --tokenizer was checked")

    monkeypatch.setattr(exporter, "load_model", load_model)
    with pytest.raises(M.ConversionError, match="--tokenizer .*nope.model: no such file"):
        _export(imported[1], tmp_path / "out", tokenizer=str(tmp_path / "nope.model"))
    assert os.listdir(tmp_path) == []


def _corrupt_generation_config(hf, ckpt):
    with open(os.path.join(hf, "generation_config.json"), "w") as f:
        f.write('{"bos_token_id": 1,\n "x": "a\tb"}')  # a raw tab inside a string


def _corrupt_index(hf, ckpt):
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        f.write("{bad")


def _index_points_at_the_wrong_shard(hf, ckpt):
    path = os.path.join(hf, "model.safetensors.index.json")
    index = json.load(open(path))
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f != shards[0] and n.endswith("up_proj.weight"))
    index["weight_map"][name] = shards[0]
    json.dump(index, open(path, "w"))


def _malformed_hidden_size(hf, ckpt):
    rewrite_config(hf, hidden_size="64x")


def _nan_norm_epsilon(hf, ckpt):
    rewrite_config(hf, rms_norm_eps=float("nan"))  # Python's json writes and reads NaN


def _no_metadata(hf, ckpt):
    os.remove(os.path.join(ckpt, "iter_0000000", ".metadata"))


def _lost_shard(hf, ckpt):
    os.remove(os.path.join(ckpt, "iter_0000000", "__0_1.distcp"))


def _truncated_shard(hf, ckpt):
    os.truncate(os.path.join(ckpt, "iter_0000000", "__0_0.distcp"), 100)


@pytest.mark.parametrize("damage,command,message", [
    (_corrupt_generation_config, "import", r"hf/generation_config.json: not valid JSON \(Invalid control character"),
    (_corrupt_index, "import", r"hf/model.safetensors.index.json: not valid JSON"),
    (_index_points_at_the_wrong_shard, "import",
     r"hf/model.safetensors.index.json maps tensor 'model.layers.\d.mlp.up_proj.weight' to "
     r"model-00001-of-\d{5}.safetensors, which does not hold it"),
    (_malformed_hidden_size, "import", r"config.json: hidden_size='64x' is not an integer"),
    (_nan_norm_epsilon, "import", r"config.json: rms_norm_eps=nan is not a number"),
    (_no_metadata, "export", r"ckpt/iter_0000000: .metadata is missing"),
    (_lost_shard, "export", r"ckpt/iter_0000000/__0_1.distcp: missing"),
    (_truncated_shard, "export", r"ckpt/iter_0000000/__0_0.distcp: 100 bytes where .metadata needs \d+: truncated"),
])
def test_malformed_inputs_are_refused_by_name(imported, tmp_path, capsys, damage, command, message):
    import re

    import convert_checkpoint

    src, ckpt = imported
    hf = make_hf(tmp_path / "hf", shard="60KB") if damage in (_corrupt_index, _index_points_at_the_wrong_shard) \
        else _copy(src, tmp_path / "hf")
    ckpt = _copy(ckpt, tmp_path / "ckpt")
    damage(hf, ckpt)
    args = ["--hf-dir", hf] if command == "import" else ["--checkpoint", ckpt]
    assert convert_checkpoint.main([command, *args, "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]  # no output, not even an empty directory


def test_unwritable_config_out_is_refused_before_the_import(imported, tmp_path, capsys):
    import convert_checkpoint

    rc = convert_checkpoint.main(["import", "--hf-dir", imported[0], "--output", str(tmp_path / "ck"),
                                  "--config-out", str(tmp_path / "nope" / "model.yaml"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--config-out {tmp_path}/nope/model.yaml: the directory {tmp_path}/nope does not exist" in err
    assert os.listdir(tmp_path) == []  # refused before the checkpoint was written


def test_effective_rank_compare_refuses_models_of_other_shapes(imported, tmp_path):
    import subprocess

    _, ckpt = imported
    _import(make_hf(tmp_path / "mha", kv_heads=4), tmp_path / "mha_ckpt")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "effective_rank.py"), "--checkpoint", ckpt,
                           "--compare", str(tmp_path / "mha_ckpt")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "different shapes (query_groups 2 vs 4)" in proc.stderr and "Traceback" not in proc.stderr


def test_converter_hides_megatron_cores_fallback_warnings(imported, tmp_path):
    """megatron-core's import-time "Transformer Engine and Apex are not installed" / "Apex is not installed.
    Falling back to Torch Norm" warnings are noise here, as for `megatron-apex train`, which hides them."""
    import subprocess

    _, ckpt = imported
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update({"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "export",
                           "--checkpoint", ckpt, "--output", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not installed" not in proc.stderr, proc.stderr[-3000:]
