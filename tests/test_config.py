"""The config tree: every validation error names the field and the value; loading and overrides.

Fast, no processes. Each error test asserts the ``"field=value: problem"`` form of the message,
so a user reading it knows which key to change and what it held.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from megatron_apex.config import (
    Config, ConfigError, apply_overrides, config_from_dict, load_config, reference_markdown,
)
from megatron_apex.expansion import geometry
from megatron_apex.run import checked_config

# A valid base: mock data needs no files and no tokenizer.
BASE = ["data.mock=true", "model.vocab_size=256", "data.tokenizer_type=none"]


def _load(*overrides, world_size=None, path=None):
    return checked_config(path, [*BASE, *overrides], world_size=world_size)


def _error(*overrides, world_size=None) -> str:
    with pytest.raises(ConfigError) as info:
        _load(*overrides, world_size=world_size)
    return str(info.value)


def test_base_config_is_valid():
    cfg = _load(world_size=1)
    assert cfg.data.mock and cfg.model.vocab_size == 256


@pytest.mark.parametrize("overrides, world_size, field_value, words", [
    # non-finite numbers (they parse as floats; a run with one dies of NaN later)
    (["optimizer.lr=inf"], None, "optimizer.lr='inf'", "finite number"),
    (["optimizer.weight_decay=nan"], None, "optimizer.weight_decay='nan'", "finite number"),
    # heads not divisible by TP (query groups set divisible, so the heads check is the one hit)
    (["model.num_attention_heads=6", "model.hidden_size=96", "parallel.tensor_model_parallel_size=4",
      "model.num_query_groups=2"], None, "model.num_attention_heads=6", "tensor_model_parallel_size=4"),
    # query groups not divisible by TP (heads are)
    (["model.num_attention_heads=4", "model.num_query_groups=1", "parallel.tensor_model_parallel_size=2"],
     None, "model.num_query_groups=1", "tensor_model_parallel_size=2"),
    # layers not divisible by PP
    (["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"], None, "model.num_layers=3",
     "pipeline_model_parallel_size=2"),
    # global batch not divisible by micro-batch x DP: 8 % (2 x 3) != 0 at world size 3
    (["train.global_batch_size=8", "train.micro_batch_size=2"], 3, "train.global_batch_size=8", "2 x 3"),
    # global batch not divisible by micro-batch (no world size needed)
    (["train.global_batch_size=9", "train.micro_batch_size=2"], None, "train.global_batch_size=9",
     "micro_batch_size=2"),
    # sequence longer than the model's positions
    (["data.seq_length=512", "model.max_position_embeddings=256"], None, "data.seq_length=512",
     "max_position_embeddings=256"),
    # min_lr > lr
    (["optimizer.lr=1e-4", "optimizer.min_lr=1e-3"], None, "optimizer.min_lr=0.001", "optimizer.lr=0.0001"),
    # world size not divisible by TP x PP
    (["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], 6,
     "parallel='TP=2 x PP=2 x CP=1'", "world size 6"),
    # query groups must divide heads
    (["model.num_attention_heads=4", "model.num_query_groups=3"], None, "model.num_query_groups=3",
     "num_attention_heads=4"),
    # a positive field given 0
    (["model.num_layers=0"], None, "model.num_layers=0", "positive"),
    # a Llama-3.x RoPE scaling factor below 1 (it divides the low frequencies)
    (["model.rope_scaling_factor=0.5"], None, "model.rope_scaling_factor=0.5", "must be >= 1"),
    # APEX ratio outside (0, 0.5]
    (["apex.enabled=true", "apex.ratio=0.75"], None, "apex.ratio=0.75", "(0, 0.5]"),
    (["apex.enabled=true", "apex.ratio=0"], None, "apex.ratio=0.0", "(0, 0.5]"),
    # APEX boundaries outside the run
    (["apex.enabled=true", "train.train_steps=100", "apex.boundaries=[0, 50, 100]"], None,
     "apex.boundaries=[0, 50, 100]", "train.train_steps=100"),
    (["apex.enabled=true", "apex.boundaries=[0, 60, 30]"], None, "apex.boundaries=[0, 60, 30]",
     "strictly increasing"),
    # APEX moving-average decay outside (0, 1), negative Monarch block count
    (["apex.enabled=true", "apex.ema_decay=1"], None, "apex.ema_decay=1.0", "(0, 1)"),
    (["apex.enabled=true", "apex.ema_decay=0"], None, "apex.ema_decay=0.0", "(0, 1)"),
    (["apex.enabled=true", "apex.score_interval=0"], None, "apex.score_interval=0", ">= 1"),
    (["apex.enabled=true", "apex.monarch_blocks=-2"], None, "apex.monarch_blocks=-2", ">= 0"),
    # sequence parallelism needs TP > 1, and a sequence that splits evenly over the TP ranks
    (["parallel.sequence_parallel=true"], None, "parallel.sequence_parallel=True", "tensor_model_parallel_size > 1"),
    (["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=4", "model.num_attention_heads=8",
      "model.num_query_groups=4", "model.hidden_size=128", "data.seq_length=510", "model.max_position_embeddings=512"],
     None, "data.seq_length=510", "tensor_model_parallel_size x context_parallel_size=4"),
    # context parallelism: every rank holds two of 2 x CP equal chunks; the unfused attention has no CP path
    (["parallel.context_parallel_size=2", "data.seq_length=126", "model.max_position_embeddings=128"], None,
     "data.seq_length=126", "2 x parallel.context_parallel_size=4"),
    (["parallel.context_parallel_size=2", "model.attention_backend=unfused"], None,
     "parallel.context_parallel_size=2", "model.attention_backend='sdpa'"),
    # data: no mock and no path
    (["data.mock=false", "data.eod_id=0"], None, "data.data_path=[]", "data.mock=true"),
])
def test_validation_error_names_field_and_value(overrides, world_size, field_value, words):
    message = _error(*overrides, world_size=world_size)
    assert message.startswith(field_value + ":"), message
    assert words in message, message


def test_layout_errors_only_with_world_size():
    # The same config is fine until the world size is known (the layout check needs it).
    _load("train.global_batch_size=8", "train.micro_batch_size=2")
    assert "train.global_batch_size=8" in _error("train.global_batch_size=8", "train.micro_batch_size=2",
                                                 world_size=3)


@pytest.mark.parametrize("override, expected", [
    ("nosuch=1", "unknown key(s) nosuch in top level;"),
    ("model.nosuch=1", "unknown key(s) model.nosuch in section model;"),
    ("train.nosuch.deeper=1", "unknown key(s) train.nosuch in section train;"),
])
def test_unknown_keys(override, expected):
    message = _error(override)
    assert expected in message, message
    assert "known:" in message  # the message lists what would have been accepted


def test_unknown_key_in_section_lists_known_fields():
    message = _error("model.hiden_size=64")
    assert "model.hiden_size" in message and "hidden_size" in message.split("known:")[1]


@pytest.mark.parametrize("override, expected", [
    ("model.num_layers=abc", "model.num_layers='abc': expected an integer"),
    ("model.num_layers=1.5", "model.num_layers=1.5: expected an integer"),
    ("model.num_layers=true", "model.num_layers=True: expected an integer"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings='maybe': expected true or false"),
    ("optimizer.lr=fast", "optimizer.lr='fast': expected a number"),
    ("checkpoint.save=3", "checkpoint.save=3: expected a string"),
    ("data.data_path={a: 1}", "data.data_path={'a': 1}: expected a list"),
    ("train.precision=fp8", "train.precision='fp8': must be one of 'auto', 'fp32', 'bf16'"),
    ("model.transformer_impl=te", "model.transformer_impl='te': must be one of 'local', 'transformer_engine'"),
    ("apex.statistic=votes", "apex.statistic='votes': must be one of 'rank', 'norm', 'ema'"),
    # tools/preprocess_data.py's (Megatron-LM's) spelling: the config's is named
    ("data.tokenizer_type=SentencePieceTokenizer", "data.tokenizer_type='SentencePieceTokenizer': must be one of "
     "'auto', 'sentencepiece', 'huggingface', 'none' ('SentencePieceTokenizer' is the tools/preprocess_data.py "
     "--tokenizer-type spelling; in the config it is data.tokenizer_type=sentencepiece)"),
    ("data.tokenizer_type=hf", "data.tokenizer_type='hf': must be one of 'auto', 'sentencepiece', 'huggingface', "
     "'none' ('hf' is the tools/preprocess_data.py --tokenizer-type spelling; in the config it is "
     "data.tokenizer_type=huggingface)"),
    ("model=3", "model: expected a mapping, got 3"),
])
def test_bad_types_and_choices(override, expected):
    message = _error(override)
    assert message.startswith(expected), message


def test_override_parsing():
    # Values are YAML scalars; "none" stays a string here and becomes None in an Optional field.
    values = apply_overrides({}, ["a.b=1", "a.c=[x, y]", "a.d=none", "a.e=1.5", "a.f=true", "g=hello",
                                  "a.h=", "a.i=x=y"])
    assert values == {"a": {"b": 1, "c": ["x", "y"], "d": "none", "e": 1.5, "f": True, "h": "", "i": "x=y"},
                      "g": "hello"}


def test_override_errors():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["model.num_layers"])
    with pytest.raises(ConfigError, match="model is not a section"):
        apply_overrides({"model": 3}, ["model.num_layers=2"])


def test_override_values_reach_typed_fields():
    cfg = _load("model.num_query_groups=none", "data.data_path=[0.3, a, 0.7, b]", "optimizer.lr=1e-3",
                "model.tie_embeddings=yes", "checkpoint.keep_last=null", "data.valid_data_path=p,q")
    assert cfg.model.num_query_groups is None and cfg.model.query_groups == cfg.model.num_attention_heads
    assert cfg.data.data_path == [0.3, "a", 0.7, "b"]
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.tie_embeddings is True and cfg.checkpoint.keep_last is None
    assert cfg.data.valid_data_path == ["p", "q"]


def test_weighted_blend_must_alternate():
    message = _error("data.mock=false", "data.eod_id=0", "data.data_path=[0.5, a, 0.5]")
    assert message.startswith("data.data_path=[0.5, 'a', 0.5]:") and "alternate" in message


@pytest.mark.parametrize("path, expected", [
    # megatron-core refuses a weight of 0 (an AssertionError at start-up): say so here
    ("[0, a, 1, b]", "data.data_path=[0, 'a', 1, 'b']: weights must be positive numbers, got 0 (leave a dataset out"),
    ("[-1, a, 2, b]", "data.data_path=[-1, 'a', 2, 'b']: weights must be positive numbers, got -1"),
    ("[.nan, a, 1, b]", "data.data_path=[nan, 'a', 1, 'b']: weights must be positive numbers, got nan"),
    # the comma form parses its items as the bracket form does: the same rules
    ("-1,a,2,b", "data.data_path=[-1, 'a', 2, 'b']: weights must be positive numbers, got -1"),
    ("0.5,a,0,b", "data.data_path=[0.5, 'a', 0, 'b']: weights must be positive numbers, got 0"),
    ("0.5,a,x,b", "data.data_path=[0.5, 'a', 'x', 'b']: weights must be positive numbers, got 'x'"),
    ("0.5,a,0.5", "data.data_path=[0.5, 'a', 0.5]: a weighted blend must alternate weight, prefix"),
])
def test_blend_weights_positive_numbers_in_every_syntax(path, expected):
    message = _error("data.mock=false", "data.eod_id=0", f"data.data_path={path}")
    assert message.startswith(expected), message
    assert _error("data.mock=false", "data.eod_id=0", "data.data_path=[a]", f"data.valid_data_path={path}"
                  ).startswith(expected.replace("data.data_path", "data.valid_data_path"))


def test_blend_forms_parse_alike():
    from megatron_apex.config import parse_blend

    assert parse_blend("f", [0.3, "a", 0.7, "b"]) == parse_blend("f", ["0.3", "a", "0.7", "b"]) == (
        ["a", "b"], [0.3, 0.7])
    assert parse_blend("f", ["a", "b"]) == (["a", "b"], None)
    _load("data.mock=false", "data.eod_id=0", "data.data_path=0.3,a,0.7,b")


@pytest.mark.parametrize("overrides, expected", [
    (["data.split=0,100,0"], "data.split='0,100,0': gives training no share of data.data_path"),
    (["data.split=100,0,0", "train.eval_steps=2"],
     "data.split='100,0,0': gives validation no share, but train.eval_steps=2 asks for validation"),
    (["data.split=1e2,0,0"], "data.split='1e2,0,0': must be three non-negative numbers"),
    (["data.split=90,10"], "data.split='90,10': must be three non-negative numbers"),
    (["data.split=²,1,1"], "data.split='²,1,1': must be three non-negative numbers"),  # isdigit() but not ASCII
])
def test_split_needs_train_and_requested_valid_share(overrides, expected):
    message = _error("data.mock=false", "data.eod_id=0", "data.data_path=[a]", *overrides)
    assert message.startswith(expected), message


def test_split_shares_that_are_legitimate():
    data = ["data.mock=false", "data.eod_id=0", "data.data_path=[a]"]
    _load(*data, "data.split=100,0,0", "train.eval_steps=0")  # no validation asked for
    _load(*data, "data.split=100,0,0", "train.eval_steps=2", "data.valid_data_path=[v]")  # split unused for valid
    _load(*data, "data.split=0,100,0", "data.valid_data_path=[v]")  # split ignored entirely
    _load("data.split=0,1,0")  # mock data reads no split


def test_yaml_and_toml_load_the_same(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  num_layers: 6\n  hidden_size: 96\n  num_attention_heads: 6\n"
                         "optimizer:\n  lr: 1.0e-3\ndata:\n  mock: true\n  tokenizer_type: none\n"
                         "  data_path: [x]\n")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text("[model]\nnum_layers = 6\nhidden_size = 96\nnum_attention_heads = 6\n"
                         "[optimizer]\nlr = 1.0e-3\n[data]\nmock = true\ntokenizer_type = \"none\"\n"
                         "data_path = [\"x\"]\n")
    a = load_config(yaml_file, ["model.vocab_size=256"])
    b = load_config(toml_file, ["model.vocab_size=256"])
    assert a == b
    assert a.model.num_layers == 6 and a.model.head_dim == 16 and a.optimizer.lr == 1e-3
    assert a.data.data_path == ["x"]
    # Overrides win over the file.
    assert load_config(toml_file, ["model.vocab_size=256", "model.num_layers=3"]).model.num_layers == 3


def test_example_config_loads(tiny_config):
    cfg = load_config(tiny_config, BASE, world_size=2)
    assert cfg.model.num_layers == 4 and cfg.num_micro_batches(2) == 1


def test_missing_file_and_parse_error(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path / 'nope.yaml'} does not exist")):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nnum_layers = 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"cannot parse config file {bad}")):
        load_config(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"cannot parse config file {bad_yaml}")):
        load_config(bad_yaml)


def test_config_round_trips_through_a_dict():
    cfg = _load("model.num_layers=6", "apex.enabled=true", "apex.boundaries=[0, 20]")
    assert config_from_dict(cfg.to_dict()) == cfg


def test_derived_values():
    cfg = _load("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                "train.global_batch_size=16", "train.micro_batch_size=2", "model.vocab_size=1000",
                "model.make_vocab_size_divisible_by=128", world_size=8)
    assert cfg.data_parallel_size(8) == 2 and cfg.num_micro_batches(8) == 4
    assert cfg.padded_vocab_size() == 1024 and cfg.padded_vocab_size(1025) == 1152
    # The padding is the same at TP=1 and TP=2 (so checkpoints reshard freely).
    cfg1 = _load("model.vocab_size=1000")
    assert cfg1.padded_vocab_size() == cfg.padded_vocab_size()
    apex = _load("apex.enabled=true", "apex.stages=3", "train.train_steps=90")
    assert geometry.of(apex).boundaries == [0, 30, 60]


def _all_fields():
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            yield section.name, f


def test_reference_lists_every_field_with_its_help():
    text = reference_markdown()
    fields = list(_all_fields())
    assert len(fields) > 50
    for section, f in fields:
        assert f.metadata.get("help"), f"{section}.{f.name} has no documentation"
        row = next((line for line in text.splitlines() if line.startswith(f"| `{section}.{f.name}` |")), None)
        assert row is not None, f"{section}.{f.name} missing from the reference"
        assert f.metadata["help"] in row
    for section in dataclasses.fields(Config):
        assert f"### `{section.name}`" in text


@pytest.mark.parametrize("override, field_value, words", [
    # every numeric key is range-checked before start-up, and the message names the key that is wrong
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1", ">= 0"),
    ("optimizer.adam_eps=-1", "optimizer.adam_eps=-1.0", "positive"),
    ("optimizer.adam_eps=0", "optimizer.adam_eps=0.0", "positive"),
    ("data.num_workers=-1", "data.num_workers=-1", ">= 0"),
    ("model.make_vocab_size_divisible_by=0", "model.make_vocab_size_divisible_by=0", "positive"),
    ("checkpoint.save_interval=-1", "checkpoint.save_interval=-1", ">= 0"),
    ("train.exit_after_minutes=-1", "train.exit_after_minutes=-1.0", "positive"),
    ("train.exit_after_minutes=0", "train.exit_after_minutes=0.0", "positive"),
    ("optimizer.lr=0", "optimizer.lr=0.0", "positive"),  # not "optimizer.min_lr=...: must lie in [0, lr]"
    ("optimizer.min_lr=-1e-5", "optimizer.min_lr=-1e-05", "[0, optimizer.lr="),
    ("model.vocab_size=-3", "model.vocab_size=-3", "positive"),
    ("model.num_query_groups=0", "model.num_query_groups=0", "positive (or null)"),  # 0 is not null
    ("model.num_query_groups=-2", "model.num_query_groups=-2", "positive (or null)"),
    ("model.kv_channels=0", "model.kv_channels=0", "positive (or null)"),
    ("model.kv_channels=-4", "model.kv_channels=-4", "positive (or null)"),
    ("optimizer.lr_decay_steps=0", "optimizer.lr_decay_steps=0", "positive (or null)"),
    ("optimizer.lr_decay_steps=-5", "optimizer.lr_decay_steps=-5", "positive (or null)"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps=-1", ">= 0"),
    ("parallel.distributed_timeout_minutes=0", "parallel.distributed_timeout_minutes=0.0", "positive"),
    ("train.eval_steps=-1", "train.eval_steps=-1", ">= 0"),  # not "train.eval_interval=..."
    ("train.eval_interval=-1", "train.eval_interval=-1", ">= 0"),
    ("optimizer.adam_beta2=1", "optimizer.adam_beta2=1.0", "[0, 1)"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0", "positive (or null)"),
    # an unset shell variable in a launch script must not turn saving (or loading) off in silence
    ("checkpoint.load=", "checkpoint.load=''", "is empty"),
    ("checkpoint.finetune_from= ", "checkpoint.finetune_from=' '", "is empty"),
])
def test_numeric_ranges(override, field_value, words):
    message = _error(override, "checkpoint.save=/tmp/ckpt")
    assert message.startswith(field_value + ":"), message
    assert words in message, message


def test_empty_checkpoint_save_is_refused():
    assert _error("checkpoint.save=").startswith("checkpoint.save='': is empty (an unset shell variable?)")


def test_lr_decay_steps_count_the_warmup():
    # lr_decay_steps counts from step 0: at or below the warmup, lr would fall to min_lr in one step
    message = _error("optimizer.lr_warmup_steps=20", "optimizer.lr_decay_steps=20")
    assert message.startswith("optimizer.lr_decay_steps=20: must exceed optimizer.lr_warmup_steps=20"), message
    assert _load("optimizer.lr_warmup_steps=20", "optimizer.lr_decay_steps=21").optimizer.lr_decay_steps == 21


def test_exit_after_minutes_needs_a_checkpoint_directory():
    # exit code 75 means "resubmit to continue", which needs a checkpoint to continue from
    message = _error("train.exit_after_minutes=30")
    assert message.startswith("train.exit_after_minutes=30.0:") and "checkpoint.save" in message
    assert _load("train.exit_after_minutes=30", "checkpoint.save=/tmp/ckpt").train.exit_after_minutes == 30.0


def test_duplicate_yaml_keys_are_refused_with_the_lines(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("model:\n  num_layers: 6\ndata:\n  mock: true\nmodel:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(dup, BASE)
    assert str(info.value) == f"config file {dup}: duplicate key 'model' at line 5 (first at line 1)"
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  num_layers: 6\n  hidden_size: 64\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'num_layers' at line 4 \(first at line 2\)"):
        load_config(nested, BASE)
    # a YAML merge key may override what it merges, on purpose
    from megatron_apex.config import _read_file

    merged = tmp_path / "merged.yaml"
    merged.write_text("model:\n  <<: {num_layers: 6, hidden_size: 96}\n  num_layers: 3\n")
    assert _read_file(merged) == {"model": {"num_layers": 3, "hidden_size": 96}}


def test_comma_list_overrides_parse_items_like_the_bracket_form():
    cfg = _load("apex.enabled=true", "train.train_steps=10", "apex.boundaries=0,2")
    assert cfg.apex.boundaries == [0, 2]
    assert _load("apex.enabled=true", "train.train_steps=10", "apex.boundaries=[0, 2]").apex.boundaries == [0, 2]
    cfg = _load("data.valid_data_path=0.7,a/b,0.3,c")
    assert cfg.data.valid_data_path == [0.7, "a/b", 0.3, "c"]
    assert _error("data.data_path=[0.5, a").startswith("cannot parse data.data_path='[0.5, a':")


@pytest.mark.parametrize("content, words", [
    (b"- model\n- train\n", "its top level is a list, not a mapping of sections"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe", "not a text file"),
    (b"model:\n  num_layers: 2\x00\n", "not a text file"),
])
def test_config_file_that_is_not_a_mapping_of_sections(tmp_path, content, words):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(str(path), BASE)
