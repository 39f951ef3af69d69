"""Training-side datasets: weighted blends, the index cache key, and the start-up checks of every
dataset (.bin/.idx consistency, the tokenizer recorded in the sidecar, documents in every part read).

Fast: tiny corpora tokenized with a word-level Hugging Face tokenizer (built, not trained) and
datasets built in this process (one gloo rank), no training.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from megatron_apex.config import ConfigError, load_config
from megatron_apex.convert.runtime import single_process
from megatron_apex.data.datasets import build_datasets, resolve_vocab
from megatron_apex.data.preprocess import preprocess_jsonl

WORDS = [f"w{i}" for i in range(60)]


def _word_tokenizer(path, words=WORDS, specials=("<unk>", "</s>")):
    """A word-level tokenizer.json: specials first, then ``words``; ids follow that order."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    return _word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _dataset(directory, name, tokenizer, n_docs, seed=0):
    """Preprocess ``n_docs`` random-word documents into ``directory/{name}_text_document``."""
    rng = np.random.default_rng(seed)
    jsonl = directory / f"{name}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as handle:
        for _ in range(n_docs):
            text = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(20, 120))))
            handle.write(json.dumps({"text": text}) + "\n")
    preprocess_jsonl([str(jsonl)], str(directory / name), None, tokenizer, append_eod=True, progress="none")
    return str(directory / f"{name}_text_document")


@pytest.fixture(scope="module")
def blend_data(tmp_path_factory, word_tok):
    directory = tmp_path_factory.mktemp("blend")
    return _dataset(directory, "a", word_tok, 40, seed=1), _dataset(directory, "b", word_tok, 30, seed=2)


def _config(tiny_config, tokenizer, tmp_path, *overrides):
    return load_config(tiny_config, [f"data.tokenizer_model={tokenizer}", "data.seq_length=32",
                                     f"data.data_cache_path={tmp_path / 'cache'}", *overrides])


def _build(cfg, train_samples=16, valid_samples=0):
    vocab, eod = resolve_vocab(cfg)
    with single_process(cfg):
        return build_datasets(cfg, vocab, eod, train_samples, valid_samples)


# ---------------------------------------------------------------------- finding 1: weighted blends
@pytest.mark.parametrize("form", ["list", "comma"])
@pytest.mark.parametrize("split, valid_samples", [("98,2,0", 0), ("50,50,0", 8), ("100,0,0", 0), ("969,30,1", 8)])
def test_weighted_blend_builds(tiny_config, word_tok, blend_data, tmp_path, form, split, valid_samples):
    a, b = blend_data
    path = f"[0.3, {a}, 0.7, {b}]" if form == "list" else f"0.3,{a},0.7,{b}"
    cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path={path}", f"data.split={split}",
                  f"train.eval_steps={1 if valid_samples else 0}")
    train, valid = _build(cfg, 40, valid_samples)
    assert type(train).__name__ == "BlendedDataset" and len(train) >= 40
    assert train.weights == pytest.approx([0.3, 0.7])
    shares = np.bincount(np.asarray(train.dataset_index[:40]), minlength=2) / 40
    assert shares == pytest.approx([0.3, 0.7], abs=0.05)
    assert train[0]["tokens"].shape == (32,)
    if valid_samples:
        assert len(valid) >= valid_samples and valid.weights == pytest.approx([0.3, 0.7])
    else:
        assert valid is None


@pytest.mark.parametrize("valid_samples", [0, 8])
def test_weighted_validation_blend_builds(tiny_config, word_tok, blend_data, tmp_path, valid_samples):
    a, b = blend_data
    cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[2, {a}, 1, {b}]",
                  f"data.valid_data_path=[1, {b}, 3, {a}]", f"train.eval_steps={1 if valid_samples else 0}")
    train, valid = _build(cfg, 24, valid_samples)
    assert len(train) >= 24 and train.weights == pytest.approx([2 / 3, 1 / 3])
    assert (valid is None) if not valid_samples else (len(valid) >= valid_samples)


def test_split_part_without_documents_is_refused(tiny_config, word_tok, blend_data, tmp_path):
    # 40 documents and 1% for valid: no valid document; megatron-core would loop forever on it
    a, b = blend_data
    cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[{a}, {b}]", "data.split=99,1,0",
                  "train.eval_steps=1")
    with pytest.raises(ConfigError, match=rf"data.data_path: {a} has 40 documents, and data.split='99,1,0' "
                                          "leaves none of them for valid"):
        _build(cfg, 16, 8)
    _build(cfg, 16, 0)  # without validation the valid part is not read (nor built)


def test_dry_run_refuses_a_split_part_without_documents(tiny_config, word_tok, blend_data, capsys):
    # the dry run passed what the real run then refused (rc 2): it makes the same check
    from megatron_apex.cli import main

    a, b = blend_data
    args = ["train", tiny_config, f"data.tokenizer_model={word_tok}", f"data.data_path=[{a}, {b}]",
            "data.split=99,1,0", "--dry-run"]
    assert main(args + ["train.eval_steps=1"]) == 2
    err = capsys.readouterr().err
    assert (f"configuration error: data.data_path: {a} has 40 documents, and data.split='99,1,0' leaves none of "
            "them for valid") in err
    assert main(args + ["train.eval_steps=0"]) == 0  # no validation: the valid part is not read
    assert main(["train", tiny_config, f"data.tokenizer_model={word_tok}", f"data.data_path=[{a}, {b}]",
                 "data.split=50,50,0", "train.eval_steps=1", "--dry-run"]) == 0


# ---------------------------------------------------------------------- finding 2: index cache key
@pytest.mark.parametrize("sizes", [(12, 45), (45, 12)])
def test_rewritten_prefix_does_not_reuse_stale_indices(tiny_config, word_tok, tmp_path, sizes):
    """Preprocess two corpora into one prefix; the second build must index the second corpus."""
    data = tmp_path / "data"
    data.mkdir()
    for seed, n_docs in enumerate(sizes):
        prefix = _dataset(data, "c", word_tok, n_docs, seed=seed)
        cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[{prefix}]", "data.split=100,0,0",
                      "train.eval_steps=0")
        train, _ = _build(cfg, 64)
        assert sorted(set(train.document_index.tolist())) == list(range(n_docs))
        assert train[len(train) - 1]["tokens"].shape == (32,)  # the reverse direction used to IndexError
    assert len(list((tmp_path / "cache").glob("*-description.txt"))) == 2  # one cache set per corpus


def test_building_the_index_cache_is_logged(tiny_config, word_tok, tmp_path, caplog):
    # megatron-core's own line is below the run's log level; a large corpus takes minutes here
    prefix = _dataset(tmp_path, "e", word_tok, 12)
    cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[{prefix}]", "data.split=100,0,0",
                  "train.eval_steps=0")
    with caplog.at_level(logging.INFO, logger="megatron_apex"):
        _build(cfg, 8)
    assert (f"{prefix}: building the train sample indices (8 samples of 32 tokens; megatron-core GPTDataset), "
            f"cached in {tmp_path / 'cache'}") in caplog.text
    assert f"{prefix}: built the train sample indices in " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megatron_apex"):
        _build(cfg, 8)  # cached: nothing built, nothing said
    assert "sample indices" not in caplog.text


def test_epochs_of_a_small_corpus_are_logged(tiny_config, word_tok, blend_data, tmp_path, caplog):
    # a tiny corpus repeats silently for many epochs: the run says how many
    a, b = blend_data
    cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[1, {a}, 3, {b}]", "data.split=100,0,0",
                  "train.eval_steps=0")
    with caplog.at_level(logging.INFO, logger="megatron_apex"):
        train, _ = _build(cfg, 2000)
    from megatron_apex.data.indexed import IndexedDatasetReader

    for prefix, weight in [(a, 0.25), (b, 0.75)]:
        per_epoch = (IndexedDatasetReader(prefix).token_count - 1) // 32  # split 100,0,0: every token
        line = (f"the run reads {weight * 2000 / per_epoch:.1f} epochs of {prefix} (its training split holds "
                f"{per_epoch} samples of 32 tokens)")
        assert line in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megatron_apex"):
        _build(cfg, 8)  # less than one epoch: nothing said
    assert "epochs of" not in caplog.text


def test_default_cache_directory_is_named_after_the_prefix(tiny_config, word_tok, tmp_path):
    # what the data.data_cache_path reference says: {prefix}/cache/, next to the .bin
    prefix = _dataset(tmp_path, "d", word_tok, 10)
    cfg = load_config(tiny_config, [f"data.tokenizer_model={word_tok}", "data.seq_length=32",
                                    f"data.data_path=[{prefix}]", "data.split=100,0,0", "train.eval_steps=0"])
    _build(cfg, 8)
    assert list((tmp_path / "d_text_document" / "cache").iterdir())


# ---------------------------------------------------------------------- finding 7: consistency at start-up
def _copy(prefix, to):
    for ext in (".bin", ".idx", ".json"):
        with open(prefix + ext, "rb") as src, open(to + ext, "wb") as dst:
            dst.write(src.read())
    return to


def test_damaged_or_mismatched_pair_refused_before_training(tiny_config, word_tok, blend_data, tmp_path):
    a, b = blend_data
    truncated = _copy(a, str(tmp_path / "trunc"))
    os.truncate(truncated + ".bin", os.path.getsize(truncated + ".bin") // 2)
    short_idx = _copy(a, str(tmp_path / "shortidx"))
    os.truncate(short_idx + ".idx", 100)
    mismatched = _copy(a, str(tmp_path / "mm"))
    with open(b + ".idx", "rb") as src, open(mismatched + ".idx", "wb") as dst:
        dst.write(src.read())
    for prefix, words in [(truncated, f"{truncated}.bin: .* bytes, but {truncated}.idx lists .* tokens"),
                          (short_idx, f"{short_idx}.idx: 100 bytes, but its header"),
                          (mismatched, f"{mismatched}.bin: .*do not belong together")]:
        cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[1, {b}, 1, {prefix}]")
        with pytest.raises(ConfigError, match="data.data_path: " + words):
            _build(cfg)
    cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[{tmp_path / 'missing'}]")
    with pytest.raises(ConfigError, match=r"missing.bin and .*missing.idx missing \(give the prefix, without "
                                          r"\.bin/\.idx\)$"):
        _build(cfg)


def test_output_prefix_instead_of_the_dataset_prefix_names_the_dataset(tiny_config, word_tok, blend_data, tmp_path):
    # the classic Megatron mistake: data.data_path=[data/train] for data/train_text_document.{bin,idx}
    dataset = _copy(blend_data[0], str(tmp_path / "train_text_document"))
    cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[{tmp_path / 'train'}]")
    with pytest.raises(ConfigError) as info:
        _build(cfg)
    message = str(info.value)
    assert message.startswith(f"data.data_path: no indexed dataset at {str(tmp_path / 'train')!r}")
    assert f"but {dataset}.{{bin,idx}} exists" in message and f"the dataset prefix is {dataset!r}" in message
    cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[{dataset}.bin]")
    with pytest.raises(ConfigError, match=rf"; {dataset}.{{bin,idx}} exists: the prefix is '{dataset}'"):
        _build(cfg)


def test_config_error_at_start_up_exits_2(tiny_config, word_tok, blend_data, tmp_path, capfd):
    from megatron_apex.cli import main

    truncated = _copy(blend_data[0], str(tmp_path / "trunc"))
    os.truncate(truncated + ".bin", 1000)
    code = main(["train", tiny_config, f"data.tokenizer_model={word_tok}", f"data.data_path=[{truncated}]",
                 "checkpoint.save=null"])
    err = capfd.readouterr().err
    assert code == 2
    assert f"configuration error: data.data_path: {truncated}.bin: 1000 bytes" in err and "Traceback" not in err


# ---------------------------------------------------------------------- finding 8: tokenizer identity
def test_dataset_of_another_tokenizer_refused(tiny_config, word_tok, blend_data, tmp_path, caplog):
    a, _ = blend_data
    bigger = _word_tokenizer(tmp_path / "big" / "tokenizer.json", WORDS + ["extra"])
    cfg = _config(tiny_config, bigger, tmp_path, f"data.data_path=[{a}]")
    with pytest.raises(ConfigError) as info:
        _build(cfg)
    message = str(info.value)
    assert message.startswith(f"data.data_path: {a} was made with the tokenizer {word_tok!r} (vocab_size 62")
    assert f"data.tokenizer_model={bigger!r} has vocab_size 63" in message
    # same size, another end-of-document id
    swapped = _word_tokenizer(tmp_path / "eod" / "tokenizer.json", specials=("</s>", "<unk>"))
    with pytest.raises(ConfigError, match=rf"{a} was made .*\(eod_id 1, per .*\), but training uses eod_id 0"):
        _build(_config(tiny_config, swapped, tmp_path, f"data.data_path=[{a}]"))
    # same vocabulary size and end-of-document id, another file: a warning
    other = _word_tokenizer(tmp_path / "other" / "tokenizer.json", [w + "x" for w in WORDS])
    with caplog.at_level(logging.WARNING):
        _build(_config(tiny_config, other, tmp_path, f"data.data_path=[{a}]"))
    assert f"{a}: made with the tokenizer {word_tok}" in caplog.text and "sha256" in caplog.text
    # no tokenizer: the model's vocabulary must hold the dataset's ids
    cfg = _config(tiny_config, word_tok, tmp_path, f"data.data_path=[{a}]", "data.tokenizer_type=none",
                  "model.vocab_size=40", "data.eod_id=1")
    with pytest.raises(ConfigError, match=r"\(vocab_size 62, .*\), but model.vocab_size=40 cannot hold its ids"):
        _build(cfg)


def test_dataset_without_sidecar_passes(tiny_config, tiny_data, tmp_path, caplog):
    # made by megatron-core's own builder: no sidecar, nothing to compare
    from helpers import tiny_overrides

    cfg = load_config(tiny_config, tiny_overrides(tiny_data, **{"data.data_cache_path": tmp_path / "cache",
                                                                "data.split": "100,0,0"}))
    with caplog.at_level(logging.INFO):
        train, _ = _build(cfg, 8)
    assert len(train) >= 8 and "no tokenizer recorded" in caplog.text


def _tiny_copy(tiny_data, to, sidecar=None):
    """A copy of the tiny dataset (ids up to 255, no sidecar), with ``sidecar`` written when given."""
    for ext in (".bin", ".idx"):
        with open(tiny_data + ext, "rb") as src, open(to + ext, "wb") as dst:
            dst.write(src.read())
    if sidecar is not None:
        with open(to + ".json", "w", encoding="utf-8") as handle:
            json.dump(sidecar, handle)
    return to


def test_unrecorded_tokenizer_ids_beyond_the_padded_vocabulary_refused(tiny_config, tiny_data, tmp_path, caplog,
                                                                         capfd):
    # no sidecar (Megatron-LM's own tool), or a merge of datasets of different tokenizers ("tokenizer": null):
    # an id >= the padded vocabulary used to crash step 1 inside F.embedding (IndexError / device-side assert)
    from helpers import tiny_overrides

    bare = _tiny_copy(tiny_data, str(tmp_path / "bare_text_document"))
    merged = _tiny_copy(tiny_data, str(tmp_path / "merged"), {"tokenizer": None, "merged_from": [
        {"tokenizer": {"path": "a.model"}}, {"tokenizer": {"path": "b.model"}}]})
    partial = _tiny_copy(tiny_data, str(tmp_path / "partial"), {"tokenizer": None, "merged_from": [
        {"tokenizer": {"path": "a.model"}}, None]})
    largest = max(int(np.fromfile(bare + ".bin", dtype=np.uint16).max()), 0)
    assert largest == 255
    for prefix, why in [(bare, f"no sidecar {bare}.json"),
                        (merged, f"its sidecar {merged}.json records no single tokenizer: a merge of datasets "
                                 "made with different tokenizers"),
                        (partial, f"its sidecar {partial}.json records no tokenizer: a merge including datasets "
                                  "without a recorded tokenizer")]:
        cfg = load_config(tiny_config, tiny_overrides(prefix, **{"data.data_cache_path": tmp_path / "cache",
                                                                 "data.split": "100,0,0", "model.vocab_size": 100}))
        with pytest.raises(ConfigError) as info:
            _build(cfg, 8)
        message = str(info.value)
        assert message.startswith(f"data.data_path: {prefix} holds token id 255, but the padded vocabulary has "
                                  "128 ids (0..127; model.vocab_size 100)"), message
        assert why in message
    # ids beyond the vocabulary but within its padding: a warning, the run goes on
    cfg = load_config(tiny_config, tiny_overrides(merged, **{"data.data_cache_path": tmp_path / "cache",
                                                             "data.split": "100,0,0", "model.vocab_size": 200}))
    with caplog.at_level(logging.INFO):
        _build(cfg, 8)
    assert f"{merged}: holds token id 255, beyond the vocabulary of 200" in caplog.text
    assert f"no sidecar {merged}.json" not in caplog.text
    # the command line: exit 2 with the one line, before any model is built
    from megatron_apex.cli import main

    capfd.readouterr()
    code = main(["train", tiny_config, *tiny_overrides(bare, **{"model.vocab_size": 100,
                                                                "data.data_cache_path": tmp_path / "cache"}),
                 "checkpoint.save=null"])
    err = capfd.readouterr().err
    assert code == 2 and f"configuration error: data.data_path: {bare} holds token id 255" in err
    assert "Traceback" not in err


def test_unrecorded_tokenizer_scan_is_made_by_rank_0_alone(tiny_config, tiny_data, tmp_path):
    """In a run of several ranks the .bin is read once, by rank 0, and every rank refuses the data."""
    from distributed_utils import run_distributed
    from training_workers import setup_error_and_scans
    from helpers import tiny_overrides

    bare = _tiny_copy(tiny_data, str(tmp_path / "bare_text_document"))
    over = tiny_overrides(bare, **{"model.vocab_size": 100, "data.data_cache_path": tmp_path / "cache"})
    results = run_distributed(setup_error_and_scans, 2, tiny_config, over, timeout=240)
    assert [r["scans"] for r in sorted(results, key=lambda r: r["rank"])] == [1, 0]
    assert all(r["error"] and r["error"].startswith(f"data.data_path: {bare} holds token id 255") for r in results)


# ---------------------------------------------------------------------- finding 12: tokenizer kind
def test_tokenizer_json_with_the_default_type(tiny_config, word_tok, blend_data, tmp_path):
    cfg = load_config(None, ["data.mock=true", f"data.tokenizer_model={word_tok}"])
    assert cfg.data.tokenizer_type == "auto" and resolve_vocab(cfg) == (62, 1)
    cfg = _config(tiny_config, word_tok, tmp_path, "data.tokenizer_type=sentencepiece",
                  f"data.data_path=[{blend_data[0]}]")
    with pytest.raises(ConfigError, match=rf"data.tokenizer_model={word_tok!r} \(data.tokenizer_type="
                                          "'sentencepiece'\\): cannot load sentencepiece model"):
        resolve_vocab(cfg)


def test_dry_run_with_a_wrong_tokenizer_kind_exits_2(tiny_config, word_tok, blend_data, capsys):
    from megatron_apex.cli import main

    code = main(["train", tiny_config, f"data.tokenizer_model={word_tok}", "data.tokenizer_type=sentencepiece",
                 f"data.data_path=[{blend_data[0]}]", "--dry-run"])
    assert code == 2 and "configuration error: data.tokenizer_model=" in capsys.readouterr().err
