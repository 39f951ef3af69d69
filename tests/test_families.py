"""Qwen2/Qwen2.5 and Mistral beside LLaMA: config mapping, import/export round trips at TP 1 and 2, logit
parity with transformers' own models, the families' tokenizers, and a tiny model of each family trained
with APEX and exported back.

Models are tiny and random, built from transformers' own config classes (tests/families.py); Qwen2's Q/K/V
biases and every norm get random values, so a dropped or misplaced one shows in the logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from families import QWEN25, VOCAB, hf_state, make_family, make_tokenizer, write_jsonl
from megatron_apex.convert import mapping as M

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4

# case -> (family, make_family arguments, verify sequence length)
CASES = {
    "qwen2-untied": ("qwen2", dict(tie=False), 32),
    "qwen25-tied": ("qwen2", QWEN25, 32),
    "mistral-no-window": ("mistral", dict(sliding_window=None, head_dim=24), 32),  # head_dim != hidden / heads
    "mistral-window-covers": ("mistral", dict(sliding_window=128), 32),
    "mistral-window-8": ("mistral", dict(sliding_window=8), 32),  # shorter than the sequence: a real window
}
CONFIG_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "rope_parameters",
               "sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def _import(src, out, **kw):
    from megatron_apex.convert.importer import import_hf_checkpoint

    return import_hf_checkpoint(str(src), str(out), progress=False, **kw)


def _export(ckpt, out, **kw):
    from megatron_apex.convert.exporter import export_hf_checkpoint

    return export_hf_checkpoint(str(ckpt), str(out), progress=False, **kw)


def _assert_same_weights(src, out, tied):
    a, b = hf_state(src), hf_state(out)
    if tied:
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    return a


def _assert_same_config(src, out):
    from transformers import AutoConfig

    c1, c2 = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(out)
    assert type(c1) is type(c2)
    for key in CONFIG_KEYS:
        assert getattr(c1, key, None) == getattr(c2, key, None), key


# ---------------------------------------------------------------------- config mapping
QWEN25_1P5B = {  # Qwen2.5-1.5B's config.json as published (transformers-v4 keys)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 28, "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}


def test_qwen25_config_maps_and_exports_as_qwen2():
    m = M.hf_config_to_model_config(QWEN25_1P5B)
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.query_groups, m.head_dim,
            m.vocab_size, m.rotary_base, m.norm_epsilon, m.tie_embeddings, m.add_qkv_bias, m.sliding_window) == (
        28, 1536, 8960, 12, 2, 128, 151936, 1e6, 1e-6, True, True, None)
    back = M.model_config_to_hf_config(m, 151936, torch.bfloat16, {"bos_token_id": 151643, "eos_token_id": 151643},
                                       "qwen2", {"max_window_layers": 28})
    for key, value in QWEN25_1P5B.items():
        if key != "sliding_window":  # unused without use_sliding_window; written as null
            assert back[key] == value, key
    assert back["sliding_window"] is None and back["layer_types"] == ["full_attention"] * 28


def test_sliding_windows_by_family():
    mistral = {**QWEN25_1P5B, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
               "tie_word_embeddings": False, "sliding_window": 4096, "max_position_embeddings": 32768}
    for key in ("use_sliding_window", "max_window_layers"):
        del mistral[key]
    assert M.hf_config_to_model_config(mistral).sliding_window == 4096  # every layer, as MistralForCausalLM
    assert M.hf_config_to_model_config({**mistral, "sliding_window": None}).sliding_window is None
    assert not M.hf_config_to_model_config(mistral).add_qkv_bias
    # Qwen2: a window in every layer converts; in some layers only it is refused, naming the fields
    every = {**QWEN25_1P5B, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 0}
    assert M.hf_config_to_model_config(every).sliding_window == 4096
    with pytest.raises(M.UnsupportedModelError, match=r"sliding_window=4096 in 7 of 28 layers \(use_sliding_window "
                                                      r"with max_window_layers=21"):
        M.hf_config_to_model_config({**every, "max_window_layers": 21})
    # ... unless the window covers the context: then no layer's attention differs from full attention
    assert M.hf_config_to_model_config({**every, "max_window_layers": 21, "sliding_window": 131072}).sliding_window \
        is None
    with pytest.raises(M.ConversionError, match="layer_types=.* is not a list of 28"):
        M.hf_config_to_model_config({**every, "layer_types": ["sliding_attention"] * 3})


def test_export_family_refuses_what_its_config_cannot_express():
    qwen = M.hf_config_to_model_config(QWEN25_1P5B)
    assert M.export_family(qwen) == "qwen2"
    with pytest.raises(M.ConversionError, match=r"LlamaForCausalLM has no bias on Q, K and V.*export it as qwen2"):
        M.export_family(qwen, "llama")
    with pytest.raises(M.ConversionError, match="MistralForCausalLM has no bias"):
        M.export_family(qwen, "mistral")
    qwen.add_qkv_bias, qwen.sliding_window = False, 64
    assert M.export_family(qwen) == "mistral"
    with pytest.raises(M.ConversionError, match="LlamaForCausalLM has no sliding window"):
        M.export_family(qwen, "llama")
    with pytest.raises(M.ConversionError, match="Qwen2ForCausalLM always has a bias"):
        M.export_family(qwen, "qwen2")


# ---------------------------------------------------------------------- round trips and parity (TP 1)
@pytest.mark.parametrize("case", list(CASES))
def test_family_roundtrip_and_logits(tmp_path, case):
    from transformers import AutoModelForCausalLM

    from megatron_apex.convert.verify import compare_checkpoint_with_hf

    family, kwargs, seq = CASES[case]
    src = make_family(tmp_path / "hf", family, **kwargs)
    result = _import(src, tmp_path / "ckpt")
    m = result.config.model
    assert m.add_qkv_bias == (family == "qwen2") and result.padded_vocab_size == 1024
    parity = compare_checkpoint_with_hf(str(tmp_path / "ckpt"), src, num_sequences=2, seq_length=seq)
    assert parity.max_abs_diff < ATOL and parity.kl < 1e-8, parity
    out = _export(tmp_path / "ckpt", tmp_path / "out").output
    state = _assert_same_weights(src, out, m.tie_embeddings)
    _assert_same_config(src, out)
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == M.FAMILIES[family]
    again = compare_checkpoint_with_hf(str(tmp_path / "ckpt"), out, num_sequences=2, seq_length=seq)
    assert again.max_abs_diff < ATOL and again.kl < 1e-8, again
    if family == "qwen2":  # not vacuous: the biases are there, and they matter
        assert any(n.endswith("self_attn.v_proj.bias") for n in state)
        zero = {n: (torch.zeros_like(t) if n.endswith("_proj.bias") else t) for n, t in state.items()}
        from safetensors.torch import save_file

        save_file(zero, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
        assert compare_checkpoint_with_hf(str(tmp_path / "ckpt"), src, 2, seq).max_abs_diff > 100 * ATOL
    if case == "mistral-window-8":  # not vacuous: the same weights with full attention give other logits
        cfg = json.load(open(os.path.join(src, "config.json")))
        json.dump({**cfg, "sliding_window": None}, open(os.path.join(src, "config.json"), "w"))
        assert compare_checkpoint_with_hf(str(tmp_path / "ckpt"), src, 2, seq).max_abs_diff > 100 * ATOL


# ---------------------------------------------------------------------- TP 2 / PP 2
@pytest.mark.slow
@pytest.mark.parametrize("case,tp,pp", [("qwen25-tied", 2, 1), ("qwen2-untied", 1, 2), ("mistral-window-8", 2, 1)])
def test_family_parallel_load_save_roundtrip(tmp_path, case, tp, pp):
    """Imported for TP x PP, loaded under it (logits as transformers'), saved by those ranks and exported:
    the very tensors the Hugging Face model started with."""
    from convert_workers import load_forward_and_save
    from distributed_utils import run_distributed
    from megatron_apex.convert.verify import hf_logits, random_tokens

    family, kwargs, seq = CASES[case]
    src = make_family(tmp_path / "hf", family, layers=4, **kwargs)
    result = _import(src, tmp_path / "ckpt", tp=tp, pp=pp)
    tokens = random_tokens(VOCAB, 2, seq, seed=1)
    reference = hf_logits(src, tokens)
    results = run_distributed(load_forward_and_save, tp * pp, str(tmp_path / "ckpt"), tokens, tp, pp,
                              str(tmp_path / "saved"))
    logits = [r for r in results if r is not None]
    assert len(logits) == 1 and (logits[0] - reference).abs().max() < ATOL
    from megatron_apex.training.checkpoint import read_common, resolve_checkpoint_dir

    assert read_common(resolve_checkpoint_dir(str(tmp_path / "saved")))["layout"]["tp"] == tp
    out = _export(tmp_path / "saved", tmp_path / "out").output
    _assert_same_weights(src, out, result.config.model.tie_embeddings)
    _assert_same_config(src, out)


@pytest.mark.slow
@pytest.mark.parametrize("family,kwargs", [("qwen2", QWEN25), ("mistral", dict(sliding_window=8))],
                         ids=["qwen25", "mistral"])
def test_cli_import_export_verify_families(tmp_path, capsys, family, kwargs):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_checkpoint

    src = make_family(tmp_path / "hf", family, **kwargs)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert convert_checkpoint.main(["import", "--hf-dir", src, "--output", ckpt, "--tp", "2", "--config-out",
                                    str(tmp_path / "m.yaml"), "--verify", "--verify-length", "32",
                                    "--no-progress"]) == 0
    assert convert_checkpoint.main(["export", "--checkpoint", ckpt, "--output", out, "--verify", "--verify-length",
                                    "32", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("verify: OK") == 2
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [M.FAMILIES[family]]
    import yaml

    model = yaml.safe_load(open(tmp_path / "m.yaml"))["model"]
    # Qwen2.5 names a window without use_sliding_window: none; Mistral's is every layer's
    assert (model["add_qkv_bias"], model["sliding_window"]) == ((True, None) if family == "qwen2" else (False, 8))
    assert convert_checkpoint.main(["export", "--checkpoint", ckpt, "--output", str(tmp_path / "llama"),
                                    "--architecture", "llama", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM has no" in err and not os.path.exists(tmp_path / "llama")


# ---------------------------------------------------------------------- tokenizers
def test_family_tokenizers_follow_their_bos_eos_conventions(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from megatron_apex.data.tokenizers import load_tokenizer

    qwen = load_tokenizer("auto", make_tokenizer(tmp_path / "qwen", "qwen2"))
    mistral = load_tokenizer("auto", make_tokenizer(tmp_path / "mistral", "mistral"))
    assert (qwen.bos_id, qwen.eod_id) == (None, 0)  # <|endoftext|>, no BOS
    assert (mistral.bos_id, mistral.eod_id) == (1, 2)  # <s>, </s>
    text = "the model reads tokens, and learns."
    for tok, d in ((qwen, "qwen"), (mistral, "mistral")):
        theirs = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / d / "tokenizer.json"))
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False) and len(tok.encode(text)) > 3
        assert tok.decode(tok.encode(text)) == text
    # bos_token null is Qwen2's "no BOS", even with a <s> in the vocabulary
    config = tmp_path / "qwen" / "tokenizer_config.json"
    tok_json = json.load(open(tmp_path / "qwen" / "tokenizer.json"))
    tok_json["model"]["vocab"]["<s>"] = max(tok_json["model"]["vocab"].values()) + 1
    json.dump(tok_json, open(tmp_path / "qwen" / "tokenizer.json", "w"))
    assert load_tokenizer("auto", str(tmp_path / "qwen")).bos_id is None
    json.dump({**json.load(open(config)), "bos_token": "<s>"}, open(config, "w"))
    assert load_tokenizer("auto", str(tmp_path / "qwen")).bos_id == tok_json["model"]["vocab"]["<s>"]


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_family_preprocessing(tmp_path, family):
    """Qwen2 documents: text then <|endoftext|>, and --prepend-bos refused (it has no BOS); Mistral documents:
    <s> text </s>."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = make_tokenizer(tmp_path / "tok", family)
    data = write_jsonl(tmp_path / "docs.jsonl", n=20)
    tool = os.path.join(ROOT, "tools", "preprocess_data.py")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    bos = ["--prepend-bos"] if family == "mistral" else []
    args = [sys.executable, tool, "--input", data, "--output-prefix", str(tmp_path / "ds"), "--tokenizer-model",
            os.path.join(tok, "tokenizer.json"), "--append-eod", "--quiet"]
    proc = subprocess.run(args + bos, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = IndexedDataset(str(tmp_path / "ds_text_document"))
    assert len(docs) == 20
    first, last = (int(docs[0][0]), int(docs[0][-1]))
    assert (first == 1) == (family == "mistral") and last == (2 if family == "mistral" else 0)
    assert all(int(np.sum(docs[i] == (2 if family == "mistral" else 0))) == 1 for i in range(len(docs)))
    if family == "qwen2":
        proc = subprocess.run(args + ["--prepend-bos", "--output-prefix", str(tmp_path / "bos")], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode != 0 and "has no beginning-of-document token" in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------------- end to end
E2E = {  # family -> make_family arguments: Qwen2.5's settings under GQA; Mistral with a window shorter than
    # the training sequences
    "qwen2": dict(QWEN25, heads=16, kv_heads=8, eos_token_id=0, bos_token_id=0),
    "mistral": dict(sliding_window=16, heads=8, kv_heads=8, bos_token_id=1, eos_token_id=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(E2E))
def test_family_trains_with_apex_and_exports(tmp_path, family):
    """A tiny model of the family, imported from transformers, trains at TP=2 on data preprocessed with the
    family's tokenizer, with APEX through two stage boundaries; the export loads in transformers (model and
    tokenizer) and its logits match the trained checkpoint's."""
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apex_workers import apex_train_worker
    from distributed_utils import run_distributed
    from megatron_apex.convert.verify import compare_checkpoint_with_hf

    tok = make_tokenizer(tmp_path / "tok", family)
    data = write_jsonl(tmp_path / "docs.jsonl", n=300)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", data,
                           "--output-prefix", str(tmp_path / "ds"), "--tokenizer-model", tok, "--append-eod", "--quiet"]
                          + (["--prepend-bos"] if family == "mistral" else []),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    src = make_family(tmp_path / "hf", family, vocab=330, layers=2, hidden=64, ffn=128, **E2E[family])
    result = _import(src, tmp_path / "ckpt", tp=2)
    model = dataclasses.asdict(result.config.model)  # the imported model's section, as --config-out writes it
    over = [f"model.{k}={'null' if v is None else v}" for k, v in model.items()]
    over += [f"data.data_path=[{tmp_path / 'ds_text_document'}]", f"data.tokenizer_model={tok}", "data.seq_length=32",
             "data.split=98,2,0", "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_steps=5",
             "train.log_interval=1", "optimizer.lr=0.003", "optimizer.lr_warmup_steps=1",
             "parallel.tensor_model_parallel_size=2", f"checkpoint.finetune_from={tmp_path / 'ckpt'}",
             f"checkpoint.save={tmp_path / 'run'}", "apex.enabled=true", "apex.boundaries=[1, 3]",
             "apex.ratio=0.25", "apex.partitions=2", "apex.init_scoring_samples=8", "apex.lr_scale=20.0"]
    results = run_distributed(apex_train_worker, 2, None, over)
    run = results[0]
    assert run["finished"] and [b["step"] for b in run["record"]] == [1, 3]
    assert all(layer["attn"] is not None and layer["ffn"] is not None
               for b in run["record"] for layer in b["layers"].values())
    out = _export(tmp_path / "run", tmp_path / "out", tokenizer=tok).output
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == M.FAMILIES[family]
    parity = compare_checkpoint_with_hf(str(tmp_path / "run"), out, num_sequences=2, seq_length=32)
    assert parity.max_abs_diff < ATOL and parity.kl < 1e-8, parity
    trained, start = hf_state(out), hf_state(src)
    assert not torch.equal(trained["model.layers.0.self_attn.v_proj.weight"],
                           start["model.layers.0.self_attn.v_proj.weight"])
    if family == "qwen2":  # the biases trained (and were carried through the boundaries' moves and fuses)
        assert not torch.equal(trained["model.layers.0.self_attn.v_proj.bias"],
                               start["model.layers.0.self_attn.v_proj.bias"])
    hf_tok = AutoTokenizer.from_pretrained(out)
    from megatron_apex.data.tokenizers import load_tokenizer

    ours = load_tokenizer("auto", tok)
    assert hf_tok.encode("the model reads tokens", add_special_tokens=False) == ours.encode("the model reads tokens")
    assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] == ours.eod_id
