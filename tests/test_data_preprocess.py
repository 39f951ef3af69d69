"""JSONL -> .bin/.idx preprocessing: round trips through megatron-core's IndexedDataset, bad input
accounting, crash safety, merge and inspect."""

import gzip
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_apex.data.preprocess import PreprocessError, TooManyBadLinesError, preprocess_jsonl
from megatron_apex.data.tokenizers import load_tokenizer
from megatron_apex.data.train_tokenizer import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "tools", "preprocess_data.py")

DOCS = [
    "Hello world.",
    "  leading spaces and\ttabs\nand a second line\n",
    "def f(x):\n    return x * 2  # code\n",
    "Unicode: héllo wörld, 漢字, emoji 🙂 and digits 12345.",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "x",
    "trailing newline\n\n",
]


def _corpus_texts(n=200):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    rng = np.random.default_rng(0)
    texts = list(DOCS)
    for i in range(n):
        k = int(rng.integers(3, 60))
        texts.append(" ".join(words[j] for j in rng.integers(0, len(words), k)) + f" {i}.\n")
    return texts


def _write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def megatron_reader():
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    def read(prefix):
        assert IndexedDataset.exists(prefix)
        dataset = IndexedDataset(prefix)
        docs = [np.array(dataset[i], copy=True) for i in range(len(dataset))]  # copy: the mmap dies with dataset
        del dataset
        return docs

    return read


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp")
    corpus = directory / "corpus.jsonl"
    _write_jsonl(corpus, [{"text": t} for t in _corpus_texts(300)])
    return train_sentencepiece([str(corpus)], str(directory / "tok"), 400, hard_vocab_limit=False)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus_texts(300), trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    return str(directory / "tokenizer.json")


@pytest.fixture(params=["sentencepiece", "huggingface"])
def tokenizer_spec(request, sp_model, hf_tokenizer):
    return (request.param, sp_model if request.param == "sentencepiece" else hf_tokenizer)


def _sidecar(prefix):
    with open(prefix + ".json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("append_eod,prepend_bos", [(False, False), (True, False), (True, True)])
def test_round_trip_both_tokenizers(tmp_path, tokenizer_spec, megatron_reader, append_eod, prepend_bos):
    kind, path = tokenizer_spec
    texts = _corpus_texts(50)
    _write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    out = preprocess_jsonl([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), kind, path,
                           append_eod=append_eod, progress="none", prepend_bos=prepend_bos)
    prefix = str(tmp_path / "out_text_document")
    tok = load_tokenizer(kind, path)
    docs = megatron_reader(prefix)
    assert len(docs) == len(texts)
    total = 0
    for ids, text in zip(docs, texts):
        assert ids.dtype == np.uint16
        if append_eod:
            assert ids[-1] == tok.eod_id
            ids = ids[:-1]
        if prepend_bos:
            assert tok.bos_id is not None and ids[0] == tok.bos_id
            ids = ids[1:]
        assert tok.decode(ids.tolist()) == text
        assert ids.tolist() == tok.encode(text)
        total += len(ids) + append_eod + prepend_bos
    side = _sidecar(prefix)
    assert side == out["text"]
    assert side["documents"] == len(texts) and side["tokens"] == total
    assert side["skipped_total"] == 0 and side["append_eod"] is append_eod and side["prepend_bos"] is prepend_bos
    assert side["tokenizer"]["kind"] == kind and side["tokenizer"]["vocab_size"] == tok.vocab_size
    assert side["tokenizer"]["sha256"] == hashlib.sha256(open(tok.path, "rb").read()).hexdigest()


def test_workers2_same_bytes_compressed_directory_input(tmp_path, sp_model, megatron_reader):
    texts = _corpus_texts(400)
    data = tmp_path / "data"
    data.mkdir()
    import zstandard

    parts = [texts[:150], texts[150:300], texts[300:]]
    _write_jsonl(data / "a.jsonl.gz", [{"text": t} for t in parts[0]], opener=gzip.open)
    with open(data / "b.jsonl.zst", "wb") as raw:
        raw.write(zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"text": t}) + "\n" for t in parts[1]).encode()))
    _write_jsonl(data / "c.jsonl", [{"text": t} for t in parts[2]])
    (data / "ignored.txt").write_text("not jsonl")
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        result = _run_cli("--input", data, "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
                          "--tokenizer-model", sp_model, "--append-eod", "--workers", workers,
                          "--block-size-mb", 0.002)
        assert result.returncode == 0, result.stderr
        outputs.append(prefix)
    for suffix in (".bin", ".idx"):
        a = open(f"{outputs[0]}_text_document{suffix}", "rb").read()
        b = open(f"{outputs[1]}_text_document{suffix}", "rb").read()
        assert a == b
    tok = load_tokenizer("sentencepiece", sp_model)
    docs = megatron_reader(f"{outputs[1]}_text_document")
    assert [tok.decode(d[:-1].tolist()) for d in docs] == texts


def test_workers2_huggingface_and_progress_bar(tmp_path, hf_tokenizer, megatron_reader):
    texts = _corpus_texts(150)
    _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    outputs = []
    for workers, progress in ((1, "log"), (2, "bar")):
        prefix = tmp_path / f"w{workers}"
        result = _run_cli("--input", tmp_path / "in.jsonl", "--output-prefix", prefix, "--tokenizer-type",
                          "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer, "--workers", workers,
                          "--block-size-mb", 0.001, "--progress", progress, "--log-interval", 50)
        assert result.returncode == 0, result.stderr
        outputs.append(open(f"{prefix}_text_document.bin", "rb").read())
        if progress == "log":
            assert result.stderr.count(" processed ") >= 2 and "tokens/s" in result.stderr
        else:
            assert "preprocess:" in result.stderr and "tok_s" in result.stderr  # tqdm bar
    assert outputs[0] == outputs[1]
    tok = load_tokenizer("huggingface", hf_tokenizer)
    assert [tok.decode(d.tolist()) for d in megatron_reader(str(tmp_path / "w2_text_document"))] == texts


def test_prepend_bos_from_the_command_line_and_a_tokenizer_without_one(tmp_path, hf_tokenizer, megatron_reader):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = _corpus_texts(40)
    _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    result = _run_cli("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "b", "--tokenizer-model",
                      hf_tokenizer, "--workers", 2, "--block-size-mb", 0.001, "--prepend-bos", "--append-eod")
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer("huggingface", hf_tokenizer)
    docs = megatron_reader(str(tmp_path / "b_text_document"))
    assert [(d[0], d[-1]) for d in docs] == [(tok.bos_id, tok.eod_id)] * len(texts)
    assert [tok.decode(d[1:-1].tolist()) for d in docs] == texts
    # a tokenizer with an end-of-document token only: refused before anything is written
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                                 show_progress=False))
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(PreprocessError, match=r"prepend_bos \(--prepend-bos\): the tokenizer .*tokenizer.json has "
                                              r"no beginning-of-document token"):
        preprocess_jsonl([str(tmp_path / "in.jsonl")], str(tmp_path / "n"), "huggingface",
                         str(tmp_path / "tokenizer.json"), prepend_bos=True, progress="none")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("n")]


def test_multiple_keys_and_dedup(tmp_path, hf_tokenizer, megatron_reader):
    records = [{"text": t, "title": f"title {i}"} for i, t in enumerate(_corpus_texts(20))]
    records.append(dict(records[0]))  # exact duplicate of both keys
    records.append({"text": records[1]["text"], "title": "new title"})  # duplicate text only
    _write_jsonl(tmp_path / "in.jsonl", records)
    out = preprocess_jsonl([str(tmp_path / "in.jsonl")], str(tmp_path / "o"), "HuggingFaceTokenizer", hf_tokenizer,
                           json_keys=["text", "title"], dedup=True, progress="none")
    tok = load_tokenizer("huggingface", hf_tokenizer)
    texts = [tok.decode(d.tolist()) for d in megatron_reader(str(tmp_path / "o_text_document"))]
    titles = [tok.decode(d.tolist()) for d in megatron_reader(str(tmp_path / "o_title_document"))]
    assert texts == [r["text"] for r in records[:-2]]
    assert titles == [r["title"] for r in records[:-2]] + ["new title"]
    assert out["text"]["skipped"] == {"duplicate": 2} and out["title"]["skipped"] == {"duplicate": 1}


def _bad_corpus(path, n_good):
    lines = [
        json.dumps({"text": "good first"}).encode(),
        b'{"text": "unterminated"',                      # 2 invalid_json
        b'{"text": "bad \xff\xfe bytes"}',                # 3 invalid_utf8
        json.dumps({"other": "x"}).encode(),             # 4 missing_key
        json.dumps({"text": 5}).encode(),                # 5 non_string
        json.dumps({"text": ""}).encode(),               # 6 empty
        b"[1, 2, 3]",                                    # 7 not_an_object
        b"",                                             # 8 blank line (not bad)
        b'{"text": "lone \\ud800 surrogate"}',           # 9 invalid_utf8 (cannot be encoded)
        json.dumps({"text": "   \n "}).encode(),         # 10 empty (whitespace only)
    ]
    lines += [json.dumps({"text": f"good line {i}"}).encode() for i in range(n_good)]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_lines_counted_and_reported(tmp_path, tokenizer_spec):
    kind, path = tokenizer_spec
    _bad_corpus(tmp_path / "bad.jsonl", 100)
    result = _run_cli("--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer-type", kind,
                      "--tokenizer-model", path, "--max-bad-fraction", 0.2)
    assert result.returncode == 0, result.stderr
    side = _sidecar(str(tmp_path / "o_text_document"))
    assert side["skipped"] == {"invalid_json": 1, "invalid_utf8": 2, "missing_key": 1, "non_string": 1,
                               "empty": 2, "not_an_object": 1}
    assert side["documents"] == 101 and side["blank_lines"] == 1 and side["records"] == 109
    for line, reason in [(2, "invalid_json"), (3, "invalid_utf8"), (4, "missing_key"), (5, "non_string"),
                         (6, "empty"), (7, "not_an_object"), (9, "invalid_utf8"), (10, "empty")]:
        assert f"bad.jsonl:{line}" in result.stderr and reason in result.stderr
    assert {e["where"].rsplit(":", 1)[1] for e in side["bad_examples"]} == {"2", "3", "4", "5", "6", "7", "9", "10"}


def test_max_bad_fraction_fails_without_output(tmp_path, sp_model):
    _bad_corpus(tmp_path / "bad.jsonl", 10)
    result = _run_cli("--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "o",
                      "--tokenizer-model", sp_model)
    assert result.returncode == 3
    assert "max-bad-fraction" in result.stderr and "no output was written" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    with pytest.raises(TooManyBadLinesError):
        preprocess_jsonl([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), None, sp_model, progress="none")


@pytest.mark.parametrize("value", ["-1", "nan", "2"])
def test_max_bad_fraction_outside_zero_one_is_refused(tmp_path, sp_model, value):
    _bad_corpus(tmp_path / "bad.jsonl", 10)
    result = _run_cli("--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "o",
                      "--tokenizer-model", sp_model, "--max-bad-fraction", value)
    assert result.returncode == 2 and f"--max-bad-fraction {float(value)}: must lie in [0, 1]" in result.stderr
    assert "Traceback" not in result.stderr and sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_a_full_disk_is_one_line_and_publishes_nothing(tmp_path, sp_model):
    """Writing fails part-way (a file size limit stands in for a full disk: no root needed): one line naming
    the output, exit 2, nothing left behind."""
    import resource
    import signal as signal_mod

    _write_jsonl(tmp_path / "in.jsonl", [{"text": f"document {i} " * 200} for i in range(2000)])

    def limit():
        signal_mod.signal(signal_mod.SIGXFSZ, signal_mod.SIG_IGN)  # write() then fails with EFBIG, as with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, CLI, "--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o",
                             "--tokenizer-model", sp_model, "--workers", "1"], capture_output=True, text=True,
                            timeout=120, env=env, preexec_fn=limit)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1 and "File too large" in errors[0] and "nothing was published" in errors[0], result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_fail_fast_on_missing_input_bad_tokenizer_unwritable_output(tmp_path, sp_model):
    good = tmp_path / "in.jsonl"
    _write_jsonl(good, [{"text": "hello"}])
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["--input", tmp_path / "missing.jsonl", "--tokenizer-model", sp_model, "--output-prefix", tmp_path / "o"],
         "does not exist"),
        (["--input", good, "--tokenizer-model", garbage, "--output-prefix", tmp_path / "o"], "cannot load"),
        (["--input", good, "--tokenizer-model", tmp_path / "nope.model", "--output-prefix", tmp_path / "o"],
         "does not exist"),
        (["--input", good, "--tokenizer-model", sp_model, "--output-prefix", blocker / "sub" / "o"], "not writable"),
    ]
    before = sorted(os.listdir(tmp_path))
    for args, message in cases:
        result = _run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, result.stderr
        assert "preprocessing" not in result.stderr  # failed before any work started
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(PreprocessError):
        preprocess_jsonl([str(tmp_path / "missing.jsonl")], str(tmp_path / "o"), None, sp_model)


def test_sigkill_leaves_no_finished_looking_output(tmp_path, sp_model):
    line = (json.dumps({"text": " ".join(["some words to tokenize"] * 40)}) + "\n").encode()
    (tmp_path / "big.jsonl").write_bytes(line * 60000)  # ~58 MB: many seconds of work
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, CLI, "--input", str(tmp_path / "big.jsonl"), "--output-prefix", str(tmp_path / "o"),
         "--tokenizer-model", sp_model, "--log-interval", "1000", "--block-size-mb", "0.25", "--progress", "log"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = proc.stderr.readline()
            if "processed" in text or not text:
                break
        assert "processed" in text, "no progress line seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    names = os.listdir(tmp_path)
    assert "o_text_document.idx" not in names and "o_text_document.bin" not in names
    assert "o_text_document.json" not in names
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert not IndexedDataset.exists(str(tmp_path / "o_text_document"))
    assert any(".tmp" in name for name in names)  # the killed run's temporaries ...
    _write_jsonl(tmp_path / "small.jsonl", [{"text": "a fresh run"}])
    result = _run_cli("--input", tmp_path / "small.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer-model",
                      sp_model)
    assert result.returncode == 0, result.stderr
    names = os.listdir(tmp_path)
    assert not any(".tmp" in name for name in names)  # ... are reclaimed by the next run for that prefix
    assert IndexedDataset.exists(str(tmp_path / "o_text_document"))


def test_merge_and_inspect(tmp_path, sp_model, megatron_reader):
    texts = _corpus_texts(60)
    halves = [texts[:30], texts[30:]]
    prefixes = []
    for i, half in enumerate(halves):
        _write_jsonl(tmp_path / f"p{i}.jsonl", [{"text": t} for t in half])
        preprocess_jsonl([str(tmp_path / f"p{i}.jsonl")], str(tmp_path / f"p{i}"), "sentencepiece", sp_model,
                         append_eod=True, progress="none")
        prefixes.append(str(tmp_path / f"p{i}_text_document"))
    result = _run_cli("--merge", *prefixes, "--output-prefix", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer("sentencepiece", sp_model)
    merged = megatron_reader(str(tmp_path / "merged"))
    assert [tok.decode(d[:-1].tolist()) for d in merged] == texts
    parts = megatron_reader(prefixes[0]) + megatron_reader(prefixes[1])
    with open(tmp_path / "merged.json", encoding="utf-8") as handle:
        merged_sidecar = json.load(handle)
    assert merged_sidecar["documents"] == len(texts) and merged_sidecar["tokens"] == sum(len(d) for d in parts)
    assert merged_sidecar["tokenizer"]["sha256"] == _sidecar(prefixes[0])["tokenizer"]["sha256"]
    assert all(np.array_equal(a, b) for a, b in zip(merged, parts))

    result = _run_cli("--inspect", prefixes[0], "--num-samples", 2)
    assert result.returncode == 0, result.stderr
    assert "documents  30" in result.stdout
    assert f"tokens     {sum(len(d) for d in megatron_reader(prefixes[0]))}" in result.stdout
    assert json.dumps(texts[0], ensure_ascii=False)[:-1] in result.stdout  # decoded first sample
    result = _run_cli("--inspect", tmp_path / "merged", "--tokenizer-model", sp_model)
    assert result.returncode == 0 and f"documents  {len(texts)}" in result.stdout
    assert "delimiters start with BOS: no; end with EOD: yes" in result.stdout
    # inputs delimited differently: merged with a warning, and --inspect says "mixed"
    preprocess_jsonl([str(tmp_path / "p1.jsonl")], str(tmp_path / "b1"), "sentencepiece", sp_model,
                     append_eod=True, prepend_bos=True, progress="none")
    result = _run_cli("--merge", prefixes[0], tmp_path / "b1_text_document", "--output-prefix", tmp_path / "mixed")
    assert result.returncode == 0 and "differ in whether they begin with BOS" in result.stderr, result.stderr
    result = _run_cli("--inspect", tmp_path / "mixed")
    assert "delimiters start with BOS: mixed; end with EOD: yes" in result.stdout, result.stdout
    # One input without a sidecar (made elsewhere): the merge records no tokenizer, in either order, so that
    # training checks the merged ids instead of trusting the other input's tokenizer.
    os.remove(prefixes[1] + ".json")
    for order in (prefixes, prefixes[::-1]):
        result = _run_cli("--merge", *order, "--output-prefix", tmp_path / "m2")
        assert result.returncode == 0, result.stderr
        assert f"{prefixes[1]} record(s) no tokenizer" in result.stderr
        assert _sidecar(str(tmp_path / "m2"))["tokenizer"] is None


# ---------------------------------------------------------------------- damaged datasets: inspect, merge
def _damaged_copies(tmp_path, prefix):
    """Copies of ``prefix`` damaged the ways a dataset gets damaged, with the words the error must hold."""
    data = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}
    cases = {
        "truncbin": ({".bin": data[".bin"][: len(data[".bin"]) // 2]}, "{p}.bin: {size} bytes, but {p}.idx lists"),
        "truncidx": ({".idx": data[".idx"][:100]}, "{p}.idx: 100 bytes, but its header"),
        "dtype9": ({".idx": data[".idx"][:17] + b"\x09" + data[".idx"][18:]}, "{p}.idx: unknown dtype code 9"),
        "longbin": ({".bin": data[".bin"] + b"\0\0"}, "{p}.bin: {size} bytes, but {p}.idx lists"),
    }
    out = {}
    for name, (changed, words) in cases.items():
        target = str(tmp_path / name)
        for ext, content in {**data, **changed}.items():
            open(target + ext, "wb").write(content)
        out[target] = words.format(p=target, size=os.path.getsize(target + ".bin"))
    return out


def test_inspect_and_merge_refuse_damaged_datasets(tmp_path, sp_model):
    from megatron_apex.data.indexed import IndexedDatasetError, merge_datasets
    from megatron_apex.data.preprocess import inspect_dataset

    _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _corpus_texts(40)])
    preprocess_jsonl([str(tmp_path / "in.jsonl")], str(tmp_path / "good"), None, sp_model, progress="none")
    good = str(tmp_path / "good_text_document")
    damaged = _damaged_copies(tmp_path, good)
    for prefix, words in damaged.items():
        with pytest.raises(IndexedDatasetError) as info:
            inspect_dataset(prefix)
        assert words in str(info.value)
        with pytest.raises(IndexedDatasetError) as info:
            merge_datasets([good, prefix], str(tmp_path / "merged"))
        assert words in str(info.value)
        assert not any(n.startswith("merged") for n in os.listdir(tmp_path))  # nothing published
    truncbin, dtype9 = str(tmp_path / "truncbin"), str(tmp_path / "dtype9")
    for args, prefix in ([("--inspect", truncbin), truncbin], [("--inspect", dtype9), dtype9],
                         [("--merge", good, truncbin, "--output-prefix", tmp_path / "merged"), truncbin]):
        result = _run_cli(*args)
        assert result.returncode == 2 and f"error: {damaged[prefix]}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert inspect_dataset(good)["documents"] == len(_corpus_texts(40))


def test_inspect_merged_dataset_of_two_tokenizers(tmp_path, sp_model, hf_tokenizer):
    # refused (exit 2, nothing written) naming both tokenizers, unless --allow-mixed-tokenizers
    prefixes = []
    for name, tok in (("s", sp_model), ("h", hf_tokenizer)):
        _write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in _corpus_texts(5)])
        preprocess_jsonl([str(tmp_path / f"{name}.jsonl")], str(tmp_path / name), None, tok, progress="none")
        prefixes.append(str(tmp_path / f"{name}_text_document"))
    refused = _run_cli("--merge", *prefixes, "--output-prefix", tmp_path / "m")
    assert refused.returncode == 2, refused.stderr
    assert "cannot merge datasets made with different tokenizers" in refused.stderr
    assert f"{prefixes[0]} was made with the tokenizer {sp_model!r}" in refused.stderr
    assert f"{prefixes[1]} with the tokenizer {hf_tokenizer!r}" in refused.stderr, refused.stderr
    assert "--allow-mixed-tokenizers" in refused.stderr
    assert not list(tmp_path.glob("m.*"))
    # with the flag: merged, and the merged sidecar records no tokenizer; inspect must say so instead of failing
    assert _run_cli("--merge", *prefixes, "--output-prefix", tmp_path / "m",
                    "--allow-mixed-tokenizers").returncode == 0
    assert _sidecar(str(tmp_path / "m"))["tokenizer"] is None
    result = _run_cli("--inspect", tmp_path / "m")
    assert result.returncode == 0 and "tokenizer  not recorded" in result.stdout, result.stderr


def test_progress_log_every_30_seconds_as_well(monkeypatch, caplog):
    # long documents: 100,000 of them can take many minutes; a line every ~30 s of wall time as well
    from megatron_apex.data import preprocess

    clock = [1000.0]
    monkeypatch.setattr(preprocess.time, "monotonic", lambda: clock[0])
    progress = preprocess._Progress(10 << 20, 100000, "log")
    with caplog.at_level(logging.INFO, logger="megatron_apex.data.preprocess"):
        for docs, seconds in [(10, 5), (20, 31), (30, 40), (40, 62), (100000, 63), (100010, 64)]:
            clock[0] = 1000.0 + seconds
            progress.update(docs, docs * 1000, docs * 100, 10 << 20)
    logged = [int(r.getMessage().split()[1]) for r in caplog.records if r.getMessage().startswith("processed")]
    assert logged == [20, 40, 100000]  # 30 s after the start, 30 s after that, then the documents interval


# ---------------------------------------------------------------------- compressed inputs
def test_truncated_or_fake_compressed_input_is_an_error_naming_the_file(tmp_path, sp_model):
    import zstandard

    payload = "".join(json.dumps({"text": t}) + "\n" for t in _corpus_texts(2000)).encode()
    frames = zstandard.ZstdCompressor().compress(payload[:50000]) + zstandard.ZstdCompressor().compress(payload[50000:])
    (tmp_path / "multi.jsonl.zst").write_bytes(frames)
    (tmp_path / "trunc.jsonl.zst").write_bytes(frames[: len(frames) // 2])
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(payload)[:5000])
    (tmp_path / "fake.jsonl.gz").write_bytes(b'{"text": "not gzip"}\n')
    (tmp_path / "fake.jsonl.zst").write_bytes(b'{"text": "not zstd"}\n')
    result = _run_cli("--input", tmp_path / "multi.jsonl.zst", "--output-prefix", tmp_path / "ok", "--tokenizer-model",
                      sp_model, "--block-size-mb", 0.01)
    assert result.returncode == 0, result.stderr
    assert _sidecar(str(tmp_path / "ok_text_document"))["documents"] == payload.count(b"\n")  # every frame read
    for name, words in [("trunc.jsonl.zst", "truncated zstd input"), ("trunc.jsonl.gz", "cannot decompress"),
                        ("fake.jsonl.gz", "not a gzip file"), ("fake.jsonl.zst", "cannot decompress")]:
        result = _run_cli("--input", tmp_path / name, "--output-prefix", tmp_path / "o", "--tokenizer-model", sp_model)
        assert result.returncode == 2, (name, result.stderr)
        assert f"error: {tmp_path / name}: {words}" in result.stderr and "Traceback" not in result.stderr
        assert not any(n.startswith("o_") for n in os.listdir(tmp_path))  # nothing published


def test_same_file_given_twice_is_read_once(tmp_path, sp_model):
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(data / "a.jsonl", [{"text": t} for t in _corpus_texts(10)])
    _write_jsonl(data / "b.jsonl", [{"text": "b"}])
    os.symlink(data / "a.jsonl", tmp_path / "link.jsonl")
    result = _run_cli("--input", data, data / "a.jsonl", tmp_path / "link.jsonl", "--output-prefix", tmp_path / "o",
                      "--tokenizer-model", sp_model)
    assert result.returncode == 0, result.stderr
    assert _sidecar(str(tmp_path / "o_text_document"))["documents"] == len(_corpus_texts(10)) + 1
    assert f"input {data / 'a.jsonl'} is the same file as {data / 'a.jsonl'}: reading it once" in result.stderr
    assert f"input {tmp_path / 'link.jsonl'} is the same file as" in result.stderr


# ---------------------------------------------------------------------- token ids and the dataset dtype
def _gap_tokenizer(directory):
    """A word-level tokenizer.json with 3 entries but ids up to 69999 (a vocabulary with holes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"w0": 0, "</s>": 1, "w69999": 69999}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    return str(directory / "tokenizer.json")


def test_ids_beyond_uint16_are_never_wrapped(tmp_path, megatron_reader, monkeypatch):
    import megatron_apex.data.preprocess as preprocess

    path = _gap_tokenizer(tmp_path)
    assert load_tokenizer(None, path).vocab_size == 70000  # the id space, not the 3 entries
    _write_jsonl(tmp_path / "in.jsonl", [{"text": "w0 w0"}, {"text": "w69999 w0"}])
    side = preprocess_jsonl([str(tmp_path / "in.jsonl")], str(tmp_path / "o"), None, path, progress="none")["text"]
    assert side["dtype"] == "int32"
    assert [d.tolist() for d in megatron_reader(str(tmp_path / "o_text_document"))] == [[0, 0], [69999, 0]]
    # whatever dtype is chosen, an id it cannot hold is refused (file:line), never wrapped
    monkeypatch.setattr(preprocess, "optimal_dtype", lambda vocab_size: np.dtype(np.uint16))
    with pytest.raises(PreprocessError, match=r"in.jsonl:2: \[text\] token id 69999 does not fit the dataset dtype "
                                              "uint16"):
        preprocess_jsonl([str(tmp_path / "in.jsonl")], str(tmp_path / "u"), None, path, progress="none")
    assert not any(n.startswith("u_") for n in os.listdir(tmp_path))


# ---------------------------------------------------------------------- arguments and signals
@pytest.mark.parametrize("value", ["0", "-1", "0.0000001"])
def test_block_size_must_be_positive(tmp_path, sp_model, value):
    _write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    result = _run_cli("--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer-model",
                      sp_model, "--block-size-mb", value)
    assert result.returncode == 2 and f"--block-size-mb {float(value)}: must be > 0" in result.stderr, result.stderr


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, sp_model):
    _write_jsonl(tmp_path / "old.jsonl", [{"text": "an earlier output"}])
    assert _run_cli("--input", tmp_path / "old.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer-model",
                    sp_model).returncode == 0
    before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path) if n.startswith("o_")}
    line = (json.dumps({"text": " ".join(["some words to tokenize"] * 40)}) + "\n").encode()
    (tmp_path / "big.jsonl").write_bytes(line * 30000)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, CLI, "--input", str(tmp_path / "big.jsonl"), "--output-prefix", str(tmp_path / "o"),
         "--tokenizer-model", sp_model, "--log-interval", "1000", "--block-size-mb", "0.25", "--progress", "log",
         "--workers", "2"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for text in proc.stderr:
            if "processed" in text:
                break
        assert "processed" in text, "no progress line seen"
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert "terminated (SIGTERM); no output was published" in rest and "Traceback" not in rest
    names = os.listdir(tmp_path)
    assert not any(".tmp" in n for n in names), names  # temporaries removed
    assert {n: open(tmp_path / n, "rb").read() for n in names if n.startswith("o_")} == before  # old output kept
