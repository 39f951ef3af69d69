"""Corpus inputs that must be read whole or refused clearly: directory discovery, compression formats,
bounded decompression, byte order marks, pathological lines, tokenizer files with their own settings,
dead worker processes, empty results and merge outputs."""

import bz2
import gzip
import json
import logging
import lzma
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from megatron_apex.data.indexed import IndexedDatasetError, merge_datasets
from megatron_apex.data.jsonl import expand_inputs, iter_blocks, iter_texts, parse_line
from megatron_apex.data.preprocess import PreprocessError, TooManyBadLinesError, _result, _workers, preprocess_jsonl
from megatron_apex.data.tokenizers import TokenizerError, load_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()


def _lines(n, start=0):
    return "".join(json.dumps({"text": f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]} {i}"}) + "\n"
                   for i in range(start, start + n))


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A word-level tokenizer.json: every document's token count is its number of words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = tmp_path_factory.mktemp("word")
    tok.save(str(directory / "tokenizer.json"))
    return str(directory / "tokenizer.json")


def test_directory_inputs_any_case_all_compressions_and_linked_directories(tmp_path, caplog):
    import zstandard

    real = tmp_path / "real_shards"
    real.mkdir()
    (real / "s1.jsonl").write_text(_lines(3, 100))
    top = tmp_path / "corpus"
    (top / "sub").mkdir(parents=True)
    (top / "a.jsonl").write_text(_lines(3, 0))
    (top / "b.ndjson.gz").write_bytes(gzip.compress(_lines(3, 10).encode()))
    (top / "sub" / "c.ndjson.zst").write_bytes(zstandard.ZstdCompressor().compress(_lines(3, 20).encode()))
    (top / "d.JSONL").write_text(_lines(3, 30))
    (top / "e.json.zstd").write_bytes(zstandard.ZstdCompressor().compress(_lines(3, 40).encode()))
    (top / "f.jsonl.bz2").write_bytes(bz2.compress(_lines(3, 50).encode()))
    (top / "g.jsonl.xz").write_bytes(lzma.compress(_lines(3, 60).encode()))
    (top / "notes.txt").write_text("not a corpus")
    os.symlink(real, top / "linked")
    os.symlink(top, top / "sub" / "loop")  # a link back into the tree is walked once
    with caplog.at_level(logging.WARNING):
        files = expand_inputs([str(top)])
    names = [os.path.relpath(f, top) for f in files]
    assert names == ["a.jsonl", "b.ndjson.gz", "d.JSONL", "e.json.zstd", "f.jsonl.bz2", "g.jsonl.xz",
                     os.path.join("linked", "s1.jsonl"), os.path.join("sub", "c.ndjson.zst")]
    assert "ignoring 1 file(s)" in caplog.text and "notes.txt" in caplog.text
    texts = list(iter_texts([str(top)]))
    assert sorted(int(t.split()[-1]) for t in texts) == sorted(
        list(range(0, 3)) + list(range(10, 13)) + list(range(20, 23)) + list(range(30, 33))
        + list(range(40, 43)) + list(range(50, 53)) + list(range(60, 63)) + list(range(100, 103)))


def test_zstd_blocks_stay_near_the_block_size_for_highly_compressible_input(tmp_path):
    import zstandard

    line = json.dumps({"text": "the same line again " * 10}) + "\n"
    data = (line * 100_000).encode()  # ~21 MB that compresses by thousands
    compressed = zstandard.ZstdCompressor(level=19).compress(data)
    assert len(data) > 1000 * len(compressed)
    path = tmp_path / "repeat.jsonl.zst"
    path.write_bytes(compressed)
    block = 256 << 10
    sizes = [len(b.data) for b in iter_blocks([str(path)], block)]
    assert sum(sizes) == len(data)
    assert len(sizes) > 40  # not one block holding the whole file
    assert max(sizes) <= 4 * block, max(sizes)


def test_zstd_long_window_frames_decode(tmp_path):
    import zstandard

    payload = _lines(2000).encode()
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28, enable_ldm=True,
                                                           write_content_size=False)  # as `zstd --long=28` in a pipe
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    compressed = stream.compress(payload) + stream.flush()
    with pytest.raises(zstandard.ZstdError, match="too much memory"):  # beyond zstd's default window limit
        zstandard.ZstdDecompressor().decompressobj().decompress(compressed)
    path = tmp_path / "long.jsonl.zst"
    path.write_bytes(compressed)
    assert b"".join(b.data for b in iter_blocks([str(path)], 1 << 16)) == payload


def test_byte_order_mark_and_deeply_nested_lines(tmp_path):
    path = tmp_path / "bom.jsonl"
    deep = '{"text": "ok", "m": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    path.write_bytes(b"\xef\xbb\xbf" + _lines(2).encode() + deep.encode() + _lines(1, 5).encode())
    skipped = {}
    texts = list(iter_texts([str(path)], skipped=skipped))
    assert [t.split()[-1] for t in texts] == ["0", "1", "5"]  # the first line is kept, BOM and all
    assert skipped == {"invalid_json": 1}
    assert parse_line(deep.encode())[1:] == ("invalid_json", "nested too deeply")


def test_huggingface_tokenizer_file_truncation_and_padding_are_ignored(tmp_path, word_tokenizer, caplog):
    from tokenizers import Tokenizer

    text = " ".join(WORDS * 3)
    for name, setup in (("trunc", lambda t: t.enable_truncation(max_length=4)),
                        ("pad", lambda t: t.enable_padding(pad_id=0, pad_token="<unk>", length=64))):
        tok = Tokenizer.from_file(word_tokenizer)
        setup(tok)
        (tmp_path / name).mkdir()
        tok.save(str(tmp_path / name / "tokenizer.json"))
        with caplog.at_level(logging.WARNING):
            loaded = load_tokenizer("huggingface", str(tmp_path / name))
        assert "ignoring the truncation/padding" in caplog.text
        assert len(loaded.encode(text)) == 24
        assert [len(ids) for ids in loaded.encode_batch([text, "alpha"])] == [24, 1]


def test_huggingface_end_of_document_token_missing_from_vocabulary(tmp_path, word_tokenizer, caplog):
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes(open(word_tokenizer, "rb").read())
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer("huggingface", str(directory))
    assert tok.eod_id == 1
    assert "'<|im_end|>' of tokenizer_config.json is not in the vocabulary" in caplog.text
    with pytest.raises(TokenizerError, match="'<eot>' is not in the vocabulary"):
        load_tokenizer("huggingface", str(directory), eod_token="<eot>")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_worker_is_an_error_not_a_hang():
    pool = multiprocessing.get_context("fork").Pool(1)
    try:
        start = time.monotonic()
        with pytest.raises(PreprocessError, match=r"worker process \d+ was killed by SIGKILL"):
            _result(pool, pool.apply_async(_die), _workers(pool), poll_s=0.1)
        assert time.monotonic() - start < 30
    finally:
        pool.terminate()


def test_no_usable_document_publishes_nothing(tmp_path, word_tokenizer):
    path = tmp_path / "allbad.jsonl"
    path.write_text('"bad"\n{"x": 1}\n{"text": ""}\n')
    with pytest.raises(TooManyBadLinesError, match=r"no usable document for key\(s\) \['text'\]"):
        preprocess_jsonl([str(path)], str(tmp_path / "out" / "d"), "huggingface", word_tokenizer,
                         max_bad_fraction=1.0)
    assert not list((tmp_path / "out").iterdir())


def test_outputs_that_cannot_be_created_leave_no_temporaries(tmp_path, word_tokenizer):
    path = tmp_path / "in.jsonl"
    path.write_text(_lines(5).replace('"text"', '"a"'))
    out = tmp_path / "out"
    with pytest.raises(PreprocessError, match="cannot create the outputs"):
        # the second key's prefix names a directory that does not exist
        preprocess_jsonl([str(path)], str(out / "x"), "huggingface", word_tokenizer, json_keys=["a", "m/x"])
    assert not list(out.iterdir())


def test_merge_creates_its_directory_and_names_an_impossible_output(tmp_path, word_tokenizer, megatron_reader):
    path = tmp_path / "in.jsonl"
    path.write_text(_lines(4))
    preprocess_jsonl([str(path)], str(tmp_path / "a"), "huggingface", word_tokenizer)
    prefix = str(tmp_path / "a_text_document")
    merged = tmp_path / "new" / "dir" / "ab"
    counts = merge_datasets([prefix, prefix], str(merged))
    assert counts["documents"] == 8
    docs = megatron_reader(str(merged))
    assert [d.tolist() for d in docs[:4]] == [d.tolist() for d in docs[4:]]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(IndexedDatasetError, match="cannot write the merged dataset"):
        merge_datasets([prefix], str(blocker / "ab"))


@pytest.fixture(scope="module")
def megatron_reader():
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    def read(prefix):
        dataset = IndexedDataset(prefix)
        docs = [np.array(dataset[i], copy=True) for i in range(len(dataset))]
        del dataset
        return docs

    return read
