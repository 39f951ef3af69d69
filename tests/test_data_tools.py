"""Tokenizer interface, tokenizer training CLI and the embedded stdlib demo corpus."""

import json
import os
import subprocess
import sys

import pytest

from megatron_apex.data.demo_corpus import build_demo_corpus
from megatron_apex.data.tokenizers import (
    Tokenizer,
    TokenizerError,
    detect_tokenizer_kind,
    load_tokenizer,
)
from megatron_apex.data.train_tokenizer import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    result = _tool("make_demo_corpus.py", "--output-dir", directory, "--max-mb", 2)
    assert result.returncode == 0, result.stderr
    return directory


def test_demo_corpus_deterministic_and_non_empty(demo_dir, tmp_path):
    second = tmp_path / "again"
    result = _tool("make_demo_corpus.py", "--output-dir", second, "--max-mb", 2)
    assert result.returncode == 0, result.stderr
    for name in ("train.jsonl", "valid.jsonl"):
        first_bytes = (demo_dir / name).read_bytes()
        assert first_bytes and first_bytes == (second / name).read_bytes()
        records = [json.loads(line) for line in first_bytes.decode("utf-8").splitlines()]
        assert records and all(r["text"].strip() and r["source"].startswith("stdlib/") for r in records)
    train = {json.loads(l)["source"].split("#")[0] for l in (demo_dir / "train.jsonl").read_text().splitlines()}
    valid = {json.loads(l)["source"].split("#")[0] for l in (demo_dir / "valid.jsonl").read_text().splitlines()}
    assert not train & valid  # a file never straddles the split
    assert not any("/test/" in s or "site-packages" in s for s in train | valid)
    size = (demo_dir / "train.jsonl").stat().st_size + (demo_dir / "valid.jsonl").stat().st_size
    assert 1_500_000 < size < 3_500_000  # cap respected (JSON escaping adds some)


@pytest.mark.parametrize("max_bytes", [20_000, 300_000])
def test_demo_corpus_tiny_cap_keeps_valid_non_empty_and_smaller(tmp_path, max_bytes):
    counts = build_demo_corpus(str(tmp_path), max_bytes=max_bytes)
    assert counts["train"]["documents"] > 0 and counts["valid"]["documents"] > 0
    assert counts["valid"]["bytes"] < counts["train"]["bytes"]


@pytest.mark.parametrize("args, words", [(["--valid-percent", 0], "valid_percent=0.0: must lie in (0, 100)"),
                                         (["--valid-percent", 150], "valid_percent=150.0: must lie in (0, 100)"),
                                         (["--max-mb", 0], "max_bytes=0: must be positive")])
def test_demo_corpus_arguments_checked(tmp_path, args, words):
    result = _tool("make_demo_corpus.py", "--output-dir", tmp_path / "d", *args)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not (tmp_path / "d").exists()


def test_train_tokenizer_cli_vocab_and_special_ids(demo_dir, tmp_path):
    result = _tool("train_tokenizer.py", "--input", demo_dir / "train.jsonl", "--model-prefix", tmp_path / "tok",
                   "--vocab-size", 1000, "--max-chars", 400_000)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tok.model").is_file() and (tmp_path / "tok.vocab").is_file()
    tok = load_tokenizer("sentencepiece", str(tmp_path / "tok.model"))
    assert tok.vocab_size == 1000
    assert (tok._sp.unk_id(), tok.bos_id, tok.eod_id, tok.pad_id) == (0, 1, 2, None)
    assert tok._sp.IdToPiece(3) == "<0x00>"  # byte_fallback pieces follow the specials
    text = "def f(x):\n\treturn {'ü': 42}  # 漢字\n"
    assert tok.decode(tok.encode(text)) == text  # byte fallback + identity normalization: lossless


def test_train_tokenizer_skips_and_reports_unusable_lines(demo_dir, tmp_path):
    lines = (demo_dir / "valid.jsonl").read_bytes().splitlines()[:40]
    bad = [b'{"text": "one bad \\ud800 line"}', b"not json", b'{"body": "x"}', b"", b'{"text": 3}']
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines[:2] + bad + lines[2:]) + b"\n")
    result = _tool("train_tokenizer.py", "--input", tmp_path / "in.jsonl", "--model-prefix", tmp_path / "tok",
                   "--vocab-size", 600, "--soft-vocab-limit")
    assert result.returncode == 0, result.stderr
    for line, reason in [(3, "invalid_utf8"), (4, "invalid_json"), (5, "missing_key"), (7, "non_string")]:
        assert f"skipped {tmp_path / 'in.jsonl'}:{line}: {reason}" in result.stderr
    assert ("skipped 4 unusable input line(s) by reason: {'invalid_utf8': 1, 'invalid_json': 1, 'missing_key': 1, "
            "'non_string': 1}") in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "tok.model", "tok.vocab"]  # published by rename


@pytest.mark.parametrize("content, args, words", [
    ('{"text": "hello"}\n', ["--json-key", "body"], "no usable 'body' text in [{}] (skipped lines by reason: "
                                                    "{{'missing_key': 1}})"),
    ("", [], "no usable 'text' text in [{}] (no non-blank lines)"),
    ("plain text, not JSON\n", [], "no usable 'text' text in [{}] (skipped lines by reason: {{'invalid_json': 1}})"),
])
def test_train_tokenizer_without_usable_text_says_why(tmp_path, content, args, words):
    (tmp_path / "in.jsonl").write_text(content)
    result = _tool("train_tokenizer.py", "--input", tmp_path / "in.jsonl", "--model-prefix", tmp_path / "tok",
                   "--vocab-size", 300, *args)
    assert result.returncode == 2 and words.format(repr(str(tmp_path / "in.jsonl"))) in result.stderr, result.stderr
    assert "sentencepiece training failed" not in result.stderr


def test_train_tokenizer_cap_progress_and_soft_limit(demo_dir, tmp_path, caplog):
    import logging

    from megatron_apex.data.train_tokenizer import DEFAULT_MAX_SENTENCES, iter_training_sentences

    assert DEFAULT_MAX_SENTENCES == 10_000_000  # a default cap: the trainer holds every sentence in memory
    help_text = " ".join(_tool("train_tokenizer.py", "--help").stdout.split())
    assert f"default {DEFAULT_MAX_SENTENCES:,}; 0: no cap" in help_text
    with caplog.at_level(logging.INFO):
        capped = list(iter_training_sentences([str(demo_dir / "valid.jsonl")], max_sentences=250, progress_every=100))
        everything = list(iter_training_sentences([str(demo_dir / "valid.jsonl")], max_sentences=0))
    assert len(capped) == 250 and len(everything) > 250
    assert "read 100 sentences" in caplog.text and "read 200 sentences" in caplog.text
    assert "reached max_sentences=250: the rest of the input is not used" in caplog.text
    with caplog.at_level(logging.WARNING):
        path = train_sentencepiece([str(demo_dir / "valid.jsonl")], str(tmp_path / "soft"), 20000, max_sentences=500,
                                   hard_vocab_limit=False)
    pieces = load_tokenizer(None, path).vocab_size
    assert pieces < 20000 and f"has a vocabulary of {pieces}, not the 20000 asked for" in caplog.text


def test_train_sentencepiece_custom_ids_and_unigram(demo_dir, tmp_path):
    path = train_sentencepiece([str(demo_dir / "valid.jsonl")], str(tmp_path / "uni"), 600, model_type="unigram",
                               unk_id=3, bos_id=0, eos_id=1, pad_id=2, max_sentences=5000, hard_vocab_limit=False)
    tok = load_tokenizer("SentencePieceTokenizer", path)
    assert (tok._sp.unk_id(), tok.bos_id, tok.eod_id, tok.pad_id) == (3, 0, 1, 2)
    with pytest.raises(ValueError):
        train_sentencepiece([str(tmp_path / "missing.jsonl")], str(tmp_path / "x"), 300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, demo_dir):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("hf")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<eot>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = (demo_dir / "valid.jsonl").read_text().splitlines()[:20]
    tok.train_from_iterator([json.loads(l)["text"] for l in lines], trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_huggingface_tokenizer_interface(hf_dir):
    for kind, path in [("huggingface", str(hf_dir / "tokenizer.json")), ("HuggingFaceTokenizer", str(hf_dir)),
                       (None, str(hf_dir))]:
        tok = load_tokenizer(kind, path)
        assert isinstance(tok, Tokenizer) and tok.kind == "huggingface"
        assert tok.vocab_size == 400 and tok.eod_id == 1 and tok.bos_id == 0 and tok.pad_id is None
        texts = ["hello world", "  two  spaces\nnewline", "ünïcödé 🙂"]
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
        assert all(isinstance(i, int) for i in tok.encode(texts[0]))
        assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts
        ident = tok.identity()
        assert ident["kind"] == "huggingface" and ident["path"].endswith("tokenizer.json") and len(ident["sha256"]) == 64
    # tokenizer_config.json decides the EOD token when present
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eot>"}}))
    try:
        assert load_tokenizer("huggingface", str(hf_dir)).eod_id == 2
    finally:
        os.unlink(hf_dir / "tokenizer_config.json")


def test_sentencepiece_tokenizer_interface(demo_dir, tmp_path):
    path = train_sentencepiece([str(demo_dir / "valid.jsonl")], str(tmp_path / "sp"), 500, max_sentences=3000,
                               hard_vocab_limit=False)
    tok = load_tokenizer("sentencepiece", path)
    texts = ["hello world", "  two  spaces\nnewline", "ünïcödé 🙂"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert [a.tolist() for a in tok.encode_batch_arrays(texts)] == tok.encode_batch(texts)
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts
    assert tok.identity()["vocab_size"] == tok.vocab_size and tok.identity()["eod_id"] == 2


def test_detect_kind_and_errors(tmp_path):
    assert detect_tokenizer_kind("x/tokenizer.model") == "sentencepiece"
    assert detect_tokenizer_kind("x/tokenizer.json") == "huggingface"
    (tmp_path / "tokenizer.json").write_text("{}")
    assert detect_tokenizer_kind(str(tmp_path)) == "huggingface"
    with pytest.raises(TokenizerError):
        detect_tokenizer_kind("x/vocab.txt")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer("huggingface", str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        load_tokenizer("GPT2BPETokenizer", str(tmp_path / "tokenizer.json"))
