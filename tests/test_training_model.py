"""The model: SDPA attention against megatron-core's reference, parameter counts, layout-independent
initialisation, the dry run, and non-finite loss handling.

Single-process tests build the model in this process (world size 1, one thread); the TP/PP
initialisation check spawns ranks and is marked slow.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from distributed_utils import run_distributed
from training_workers import gathered_initial_weights, trainer_in_process
from helpers import tiny_overrides
from megatron_apex.config import load_config
from megatron_apex.training.trainer import Callback, TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK = ["data.mock=true", "model.vocab_size=256", "data.tokenizer_type=none"]


@pytest.fixture(scope="module")
def world1(tiny_config):
    """torch.distributed and megatron-core's parallel state at world size 1, in this process."""
    from megatron_apex.distributed import LaunchEnv, destroy_distributed, initialize_distributed

    from distributed_utils import free_port

    torch.set_num_threads(1)
    cfg = load_config(tiny_config, MOCK, world_size=1)
    ctx = initialize_distributed(cfg, LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    yield ctx
    destroy_distributed()


def _tconfig(cfg):
    from megatron_apex.model.llama import build_transformer_config

    return build_transformer_config(cfg, torch.float32, use_cpu=True)


@pytest.mark.parametrize("heads, groups", [(4, None), (8, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_sdpa_attention_equals_megatron_unfused(world1, tiny_config, heads, groups):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_apex.model.attention import SDPAttention

    cfg = load_config(tiny_config, [*MOCK, f"model.num_attention_heads={heads}",
                                    f"model.num_query_groups={groups if groups else 'none'}"])
    tconfig = _tconfig(cfg)
    sdpa = SDPAttention(tconfig, 1, AttnMaskType.causal, "self")
    unfused = DotProductAttention(tconfig, 1, AttnMaskType.causal, "self")
    s, b, d, ng = 24, 3, cfg.model.head_dim, cfg.model.query_groups
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, d, generator=g)  # [s, b, np, hn]
    k = torch.randn(s, b, ng, d, generator=g)     # [s, b, ng, hn]
    v = torch.randn(s, b, ng, d, generator=g)
    out_sdpa = sdpa(q, k, v, None)
    out_ref = unfused(q, k, v, None)
    assert out_sdpa.shape == out_ref.shape == (s, b, heads * d)  # [s, b, np*hn]
    assert torch.allclose(out_sdpa, out_ref, atol=1e-5, rtol=0), (out_sdpa - out_ref).abs().max()
    # Causality: the first position's output depends only on the first key/value.
    k2, v2 = k.clone(), v.clone()
    k2[1:], v2[1:] = 0.0, 0.0
    assert torch.allclose(sdpa(q, k2, v2, None)[0], out_sdpa[0], atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_document_masks_compute_each_document_as_if_alone(world1, tiny_config, tiny_data, backend):
    """data.reset_attention_mask: in a packed sample, every document's logits are those of the document
    computed alone (with reset_position_ids, from position 0); without the mask the later documents
    attend to the earlier ones and differ. The masks and positions are the data loader's own."""
    from helpers import tiny_overrides

    from megatron_apex.data.datasets import build_datasets, resolve_vocab
    from megatron_apex.model.init import initialize_weights
    from megatron_apex.model.llama import build_model

    over = tiny_overrides(tiny_data, **{"data.reset_attention_mask": True, "data.reset_position_ids": True,
                                        "model.attention_backend": backend})
    cfg = load_config(tiny_config, over, world_size=1)
    vocab, eod = resolve_vocab(cfg)
    model = build_model(cfg, _tconfig(cfg), cfg.padded_vocab_size(vocab), True, True)
    initialize_weights(model, cfg, 0, 1)
    model.eval()
    train, _ = build_datasets(cfg, vocab, eod, 16, 0)
    sample = next(train[i] for i in range(16) if (train[i]["tokens"][:-8] == eod).sum() >= 2)  # 3+ documents
    tokens, positions, mask = sample["tokens"][None], sample["position_ids"][None], sample["attention_mask"][None]
    assert mask.shape == (1, 1, tokens.shape[1], tokens.shape[1]) and mask.dtype == torch.bool
    with torch.no_grad():
        packed = model(tokens, positions, mask)       # [b, s, V]
        leaky = model(tokens, positions, None)        # causal over the whole sample
        ends = torch.nonzero(tokens[0] == eod).flatten().tolist()
        starts = [0] + [e + 1 for e in ends if e + 1 < tokens.shape[1]]
        for a, b in zip(starts, starts[1:] + [tokens.shape[1]]):
            alone = model(tokens[:, a:b], torch.arange(b - a)[None], None)
            assert torch.equal(positions[0, a:b], torch.arange(b - a))
            torch.testing.assert_close(packed[:, a:b], alone, atol=2e-5, rtol=1e-5)
        later = starts[1]
        assert (packed[:, later:] - leaky[:, later:]).abs().max() > 1e-3  # the mask matters past document 1
    torch.testing.assert_close(packed[:, :later], leaky[:, :later], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [4, 24, 64])
def test_sdpa_sliding_window_equals_megatron_unfused(world1, tiny_config, window):
    """model.sliding_window W: SDPA's band mask computes what megatron-core's unfused attention does with
    window_size (W - 1, 0); each query sees itself and the W - 1 keys before it, and a window that covers the
    sequence is plain causal attention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_apex.model.attention import SDPAttention

    cfg = load_config(tiny_config, [*MOCK, "model.num_attention_heads=8", "model.num_query_groups=2",
                                    f"model.sliding_window={window}"])
    tconfig = _tconfig(cfg)
    assert tconfig.window_size == (window - 1, 0)
    sdpa = SDPAttention(tconfig, 1, AttnMaskType.causal, "self")
    unfused = DotProductAttention(tconfig, 1, AttnMaskType.causal, "self")
    s, b, d = 24, 2, cfg.model.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, n, d, generator=g) for n in (8, 2, 2))
    out = sdpa(q, k, v, None)
    torch.testing.assert_close(out, unfused(q, k, v, None), atol=1e-5, rtol=0)
    plain = load_config(tiny_config, [*MOCK, "model.num_attention_heads=8", "model.num_query_groups=2"])
    causal = SDPAttention(_tconfig(plain), 1, AttnMaskType.causal, "self")(q, k, v, None)
    if window >= s:
        assert torch.equal(out, causal)
    else:  # a key W positions back no longer counts; the first W queries are unchanged
        assert (out[window:] - causal[window:]).abs().max() > 1e-3
        torch.testing.assert_close(out[:window], causal[:window], atol=1e-6, rtol=0)
        k2, v2 = k.clone(), v.clone()
        k2[:s - window], v2[:s - window] = 0.0, 0.0  # the last query sees only the last W keys
        torch.testing.assert_close(sdpa(q, k2, v2, None)[-1], out[-1], atol=1e-6, rtol=0)


def test_sliding_window_config_checks():
    from megatron_apex.config import ConfigError

    with pytest.raises(ConfigError, match="model.sliding_window=0: must be positive"):
        load_config(None, [*MOCK, "model.sliding_window=0"])
    with pytest.raises(ConfigError, match=r"model.sliding_window=16: needs parallel.context_parallel_size=1"):
        load_config(None, [*MOCK, "model.sliding_window=16", "parallel.context_parallel_size=2"])
    # a window that covers the sequence is full causal attention, which context parallelism runs
    load_config(None, [*MOCK, "model.sliding_window=256", "parallel.context_parallel_size=2"])
    with pytest.raises(ConfigError, match="megatron-core's unfused attention drops the document mask"):
        load_config(None, [*MOCK, "model.sliding_window=16", "data.reset_attention_mask=true",
                           "model.attention_backend=unfused"])


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (True, True)], ids=["untied", "tied", "tied-qkv-bias"])
def test_count_parameters_matches_built_model(world1, tiny_config, tie, bias):
    from megatron_apex.model.llama import build_model, count_parameters

    cfg = load_config(tiny_config, [*MOCK, f"model.tie_embeddings={tie}", "model.vocab_size=300",
                                    f"model.add_qkv_bias={bias}"])
    padded = cfg.padded_vocab_size()
    assert padded == 384
    model = build_model(cfg, _tconfig(cfg), padded, True, True)
    real = sum(p.numel() for p in model.parameters())  # a tied weight is one parameter
    counts = count_parameters(cfg, padded)
    assert counts["total"] == real
    assert any(n.endswith("linear_qkv.bias") for n, _ in model.named_parameters()) == bias
    assert counts["non_embedding"] == real - padded * cfg.model.hidden_size * (1 if tie else 2)


def test_initialisation_is_deterministic_and_seeded(world1, tiny_config):
    from megatron_apex.model.init import initialize_weights
    from megatron_apex.model.llama import build_model

    def weights(seed):
        cfg = load_config(tiny_config, [*MOCK, f"train.seed={seed}"])
        model = build_model(cfg, _tconfig(cfg), cfg.padded_vocab_size(), True, True)
        initialize_weights(model, cfg, 0, 1)
        return cfg, {n: p.detach().clone() for n, p in model.named_parameters()}

    cfg, a = weights(1)
    _, b = weights(1)
    _, c = weights(2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(not torch.equal(a[n], c[n]) for n in a if a[n].dim() >= 2)
    std = cfg.model.init_method_std
    emb = a["embedding.word_embeddings.weight"]
    assert abs(emb.std().item() - std) < 0.1 * std
    # Residual-branch outputs are scaled by 1/sqrt(2 * layers).
    proj = a["decoder.layers.0.self_attention.linear_proj.weight"]
    assert abs(proj.std().item() - std / (2 * cfg.model.num_layers) ** 0.5) < 0.1 * std


@pytest.mark.slow
def test_initialisation_is_independent_of_tp_and_pp(world1, tiny_config):
    from megatron_apex.model.init import initialize_weights
    from megatron_apex.model.llama import build_model

    overrides = [*MOCK, "model.num_query_groups=2"]
    cfg = load_config(tiny_config, overrides)
    model = build_model(cfg, _tconfig(cfg), cfg.padded_vocab_size(), True, True)
    initialize_weights(model, cfg, 0, 1)
    reference = {n: p.detach() for n, p in model.named_parameters()}

    layouts = (["parallel.tensor_model_parallel_size=2"], ["parallel.pipeline_model_parallel_size=2"])
    per_rank = run_distributed(gathered_initial_weights, 2, tiny_config, [[*overrides, *lay] for lay in layouts])
    for i, layout in enumerate(layouts):
        merged = {}
        for rank_results in per_rank:
            merged.update(rank_results[i] or {})
        assert sorted(merged) == sorted(reference), layout
        for name, full in merged.items():
            assert torch.equal(full, reference[name]), (layout, name)


def test_dry_run_prints_layout_parameters_and_memory(tiny_config):
    from megatron_apex.model.llama import count_parameters

    overrides = [*MOCK, "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                 "train.global_batch_size=16", "train.micro_batch_size=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-m", "megatron_apex.cli", "train", tiny_config, *overrides,
                           "--dry-run", "--world-size", "8"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    cfg = load_config(tiny_config, overrides, world_size=8)
    total = count_parameters(cfg, cfg.padded_vocab_size())["total"]
    assert "layout: world=8 = TP 2 x PP 2 x CP 1 x DP 2" in out
    assert "batch: micro 2 x 4 micro-batches x DP 2 = global 16 sequences of 128 tokens" in out
    assert f"parameters: {total / 1e6:.1f}M total" in out and "vocab 256 padded to 256" in out
    assert "memory estimate per GPU (most loaded stage):" in out and "GiB" in out
    assert "distributed start" not in out + proc.stderr  # nothing was started


def test_activation_estimate_follows_tp_and_sequence_parallel(tiny_config):
    """Per layer and token a rank holds, (10 + 24/TP) x h bytes in bf16, or 34/TP x h with sequence
    parallelism; CP halves (at CP=2) the tokens a rank holds."""
    from megatron_apex.cli import estimate_memory

    base = [*MOCK, "train.precision=bf16", "train.global_batch_size=2", "train.micro_batch_size=1"]

    def layer_acts(*extra, world=1):
        cfg = load_config(tiny_config, [*base, *extra], world_size=world)
        e = estimate_memory(cfg, world, 256)
        p = cfg.parallel
        logits = cfg.data.seq_length // p.context_parallel_size * 256 / p.tensor_model_parallel_size * 6
        # bytes per layer, token (micro-batch 1) and hidden unit
        return (e["activations_gib"] * 1024 ** 3 - logits) / (cfg.model.num_layers * cfg.data.seq_length
                                                               * cfg.model.hidden_size)

    assert layer_acts() == pytest.approx(34)
    assert layer_acts("parallel.tensor_model_parallel_size=2", world=2) == pytest.approx(10 + 24 / 2)
    assert layer_acts("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                      world=2) == pytest.approx(34 / 2)
    # context parallelism: each rank holds half of every sequence (the helper divides by the full length)
    assert layer_acts("parallel.context_parallel_size=2", world=2) == pytest.approx(34 / 2)
    # full recomputation: every layer's input (2 bytes per value) and one layer recomputed at a time
    layers = load_config(tiny_config, base).model.num_layers
    assert layer_acts("train.recompute_activations=true") == pytest.approx(2 + 34 / layers)


@pytest.mark.parametrize("overrides, message", [
    (["data.tokenizer_model=/nonexistent/tok.model", "data.data_path=[/nonexistent/corpus]"],
     "configuration error: data.tokenizer_model='/nonexistent/tok.model': no such file"),
    (["model.vocab_size=256", "data.tokenizer_type=none", "data.eod_id=0", "data.data_path=[/nonexistent/corpus]"],
     "configuration error: data.data_path: no indexed dataset at '/nonexistent/corpus'"),
], ids=["tokenizer", "data"])
def test_dry_run_checks_the_files_the_run_reads(tiny_config, capsys, overrides, message):
    from megatron_apex.cli import main

    assert main(["train", tiny_config, *overrides, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_dry_run_reads_the_tokenizer_vocabulary(tiny_config, tiny_data, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    from megatron_apex.cli import main

    path = str(tmp_path / "tokenizer.json")
    Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 300)}},
                               unk_token="<unk>")).save(path)
    assert main(["train", tiny_config, f"data.data_path=[{tiny_data}]", "data.tokenizer_type=huggingface",
                 f"data.tokenizer_model={path}", "--dry-run", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "vocab 300 padded to 384" in out  # not a made-up 32000
    assert "run: 100 steps = 102.400K tokens" in out  # 100 x 8 x 128, not "0.000B"


@pytest.mark.parametrize("pp, tie", [(1, False), (1, True), (2, False)])
def test_memory_estimate_holds_embedding_and_output_of_the_stage(tiny_config, pp, tie):
    """PP=1: one stage holds the embedding and (untied) the output layer; PP>1: the first stage the one,
    the last the other (the larger counts)."""
    from megatron_apex.cli import estimate_memory
    from megatron_apex.model.llama import count_parameters

    cfg = load_config(tiny_config, [*MOCK, f"parallel.pipeline_model_parallel_size={pp}",
                                    f"model.tie_embeddings={tie}"], world_size=pp)
    c = count_parameters(cfg, 256)
    layers = c["per_layer"] * cfg.model.num_layers // pp
    vocab = c["embedding"] + c["output"] if pp == 1 else max(c["embedding"], c["output"])
    assert estimate_memory(cfg, pp, 256)["parameters_per_gpu"] == layers + vocab
    if pp == 1:
        assert layers + vocab == c["total"] - cfg.model.hidden_size  # all but the final norm


def test_token_counts_keep_their_digits():
    from megatron_apex.cli import _count

    assert [_count(n) for n in (512, 102_400, 2.5e6, 10_000_269_312, 3e12)] == [
        "512", "102.400K", "2.500M", "10.000B", "3.000T"]


def test_dry_run_config_error_exits_2(tiny_config, capsys):
    from megatron_apex.cli import main

    code = main(["train", tiny_config, *MOCK, "model.num_layers=3", "parallel.pipeline_model_parallel_size=2",
                 "--dry-run"])
    assert code == 2
    assert "configuration error: model.num_layers=3:" in capsys.readouterr().err


# ---------------------------------------------------------------------- non-finite losses
class PoisonOutput(Callback):
    """Make the logits NaN during the given steps (as an overflow would)."""

    def __init__(self, steps):
        self.steps, self.handle, self.before, self.after = set(steps), None, {}, {}

    def _snapshot(self, trainer):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def on_step_start(self, trainer, step):
        if step in self.steps:
            self.before[step] = self._snapshot(trainer)
            layer = trainer.model.module.output_layer
            self.handle = layer.register_forward_hook(lambda m, i, out: (out[0] * float("nan"), *out[1:]))

    def on_step_end(self, trainer, step, metrics):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            self.after[step] = (self._snapshot(trainer), metrics)


def test_nan_loss_stops_with_the_step(world1, tiny_config, tiny_data, caplog):
    # The third step (0-based index 2) is poisoned; the error numbers steps from 1, as the log lines do.
    with caplog.at_level("INFO", "megatron_apex"), pytest.raises(
            TrainingError, match=r"non-finite loss or gradient at step 3 .*train.nan_policy='stop'"):
        trainer_in_process(tiny_config, tiny_overrides(tiny_data), [PoisonOutput([2])]).train()
    assert "step 2/6 |" in caplog.text and "step 3/6 |" not in caplog.text


def test_nan_policy_skip_skips_the_update(world1, tiny_config, tiny_data):
    poison = PoisonOutput([2])
    result = trainer_in_process(tiny_config, tiny_overrides(tiny_data, **{"train.nan_policy": "skip"}),
                                [poison]).train()
    assert result.exit_reason == "finished" and sorted(result.losses) == list(range(6))
    after, metrics = poison.after[2]
    assert metrics.get("skipped") is True
    assert all(torch.equal(after[n], poison.before[2][n]) for n in after), "a skipped step changed the weights"
    assert all(torch.isfinite(torch.tensor(result.losses[s])) for s in (3, 4, 5))


def test_skipped_step_leaves_the_interval_loss_to_the_other_steps(world1, tiny_config, tiny_data, caplog):
    """The logged loss of an interval averages the steps that were not skipped and says how many were (a
    NaN step used to make the whole interval's loss NaN, and TensorBoard dropped it)."""
    import re

    overrides = tiny_overrides(tiny_data, **{"train.nan_policy": "skip", "train.log_interval": 3})
    with caplog.at_level("INFO", "megatron_apex"):
        result = trainer_in_process(tiny_config, overrides, [PoisonOutput([1])]).train()
    assert result.losses[1] != result.losses[1]  # the poisoned step's loss is NaN
    line = next(ln for ln in caplog.text.splitlines() if "step 3/6 |" in ln)
    logged = float(re.search(r"loss (\S+)", line).group(1))
    assert logged == pytest.approx((result.losses[0] + result.losses[2]) / 2, abs=1e-4), line
    assert "skipped 1 of 3 steps" in line and "grad norm" in line
    assert "skipped" not in next(ln for ln in caplog.text.splitlines() if "step 6/6 |" in ln)


def test_nan_policy_skip_stops_after_max_skipped_steps(world1, tiny_config, tiny_data):
    overrides = tiny_overrides(tiny_data, **{"train.nan_policy": "skip", "train.max_skipped_steps": 2})
    trainer = trainer_in_process(tiny_config, overrides, [PoisonOutput([1, 2, 3, 4])])
    with pytest.raises(TrainingError, match=r"at step 4 .*3 steps skipped > train.max_skipped_steps=2"):
        trainer.train()


def test_absurd_learning_rate_is_caught(world1, tiny_config, tiny_data):
    """lr=1e30: the first update makes the weights overflow, the next loss is not finite."""
    overrides = tiny_overrides(tiny_data, **{"optimizer.lr": 1e30, "optimizer.min_lr": 0.0,
                                             "optimizer.lr_warmup_steps": 0, "optimizer.clip_grad": 0.0})
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step [23] "):
        trainer_in_process(tiny_config, overrides).train()


class PoisonGradients(Callback):
    """NaN gradients with a finite loss (an overflow in the backward pass) during one step."""

    def __init__(self, step):
        self.step, self.handle, self.before, self.after = step, None, None, None

    def on_step_start(self, trainer, step):
        if step == self.step:
            self.before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            layer = trainer.model.module.decoder.final_layernorm
            self.handle = layer.register_full_backward_hook(
                lambda m, grad_in, grad_out: tuple(g * float("nan") if g is not None else g for g in grad_in))

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            self.handle.remove()
            self.after = ({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, metrics)


def test_nan_gradient_with_finite_loss_is_skipped_without_update(world1, tiny_config, tiny_data):
    poison = PoisonGradients(2)
    result = trainer_in_process(tiny_config, tiny_overrides(tiny_data, **{"train.nan_policy": "skip"}),
                                [poison]).train()
    after, metrics = poison.after
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics.get("skipped") is True
    assert all(torch.equal(after[n], poison.before[n]) for n in after), "a skipped step changed the weights"
    assert result.exit_reason == "finished"


def test_cp_batch_slices_and_attention_chunk_order_agree(monkeypatch):
    """megatron-core's get_batch_on_this_cp_rank (the trainer's CP slicing) gives rank r chunks r and
    2 CP - 1 - r of 2 CP equal chunks (what its rotary embedding assumes); the attention's
    cp_sequence_order puts the ranks' all-gathered chunks back in sequence order, every position once.
    (A sequence that does not split into 2 CP chunks is refused by the config, see test_config.)"""
    import megatron.core.utils as mcore_utils

    from megatron_apex.model.attention import cp_sequence_order

    def held(tokens, rank, cp):
        monkeypatch.setattr(mcore_utils, "get_pg_size", lambda group: cp)
        monkeypatch.setattr(mcore_utils, "get_pg_rank", lambda group: rank)
        return mcore_utils.get_batch_on_this_cp_rank({"tokens": tokens.clone()}, object())["tokens"]

    assert held(torch.arange(8).view(1, 8), 0, 2).tolist() == [[0, 1, 6, 7]]
    assert held(torch.arange(8).view(1, 8), 1, 2).tolist() == [[2, 3, 4, 5]]
    for cp in (1, 2, 3, 4):
        seq = 2 * cp * 5
        gathered = torch.cat([held(torch.arange(seq).view(1, seq), r, cp)[0] for r in range(cp)])  # rank order
        assert gathered.view(2 * cp, 5)[cp_sequence_order(cp)].reshape(-1).tolist() == list(range(seq))
    assert held(torch.arange(16).view(2, 8), 1, 2).tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]


def test_overrides_may_follow_the_options(tiny_config, capsys):
    """``train CFG --dry-run key=value``: overrides after an option count as overrides; anything else
    left over is refused by argparse (exit 2, named)."""
    from megatron_apex.cli import main

    assert main(["train", tiny_config, *MOCK[:1], "--dry-run", *MOCK[1:], "train.train_steps=50"]) == 0
    assert "run: 50 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["train", tiny_config, *MOCK, "--dry-run", "stray"])
    assert exc.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err


@pytest.mark.skipif(__import__("importlib").util.find_spec("transformer_engine") is not None,
                    reason="Transformer Engine is installed here")
def test_transformer_engine_missing_is_a_note_when_planning_and_an_error_when_running(tiny_config):
    """A dry run on a machine without Transformer Engine (a login node) plans the run and says that its
    machines need it; building the model without it is a configuration error, not a traceback."""
    from megatron_apex.cli import dry_run
    from megatron_apex.config import ConfigError
    from megatron_apex.model.llama import get_layer_spec

    cfg = load_config(tiny_config, [*MOCK, "model.transformer_impl=transformer_engine"], world_size=1)
    assert "Transformer Engine is not installed here: the machines of the run need it" in dry_run(cfg, 1)
    with pytest.raises(ConfigError, match="Transformer Engine is not installed"):
        get_layer_spec(cfg)


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_missing_is_a_note_when_planning_and_a_config_error_before_the_run(tiny_config, capsys, monkeypatch):
    """logging.wandb_project without wandb: the run used to build the model and then die with a traceback
    (exit 1); it is refused before anything starts (one line, exit 2), and the dry run says so."""
    import megatron_apex.run as run
    from megatron_apex.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(run, "run_training", never)
    assert main(["train", tiny_config, *MOCK, "logging.wandb_project=x"]) == 2
    err = capsys.readouterr().err
    assert "configuration error: logging.wandb_project='x': wandb is not installed" in err
    assert err.count("\n") == 1
    assert main(["train", tiny_config, *MOCK, "logging.wandb_project=x", "--dry-run"]) == 0
    assert "note: logging.wandb_project='x', and wandb is not installed here" in capsys.readouterr().out


def test_dry_run_checks_the_checkpoint_the_run_starts_from(tiny_config, tmp_path, capsys):
    """checkpoint.load / checkpoint.finetune_from that name nothing used to pass the dry run silently and be
    refused by the run; the dry run now picks and checks the start as the run does and says which it is: a
    path that does not exist yet is a note (a recipe is planned before its import), one that is not a
    checkpoint an error."""
    from megatron_apex.cli import main
    from megatron_apex.training.checkpoint import COMPLETE_MARKER, TRACKER

    for key in ("checkpoint.load", "checkpoint.finetune_from"):  # not there yet (planned before the import)
        assert main(["train", tiny_config, *MOCK, f"{key}={tmp_path / 'nope'}", "--dry-run"]) == 0
        assert (f"note: {key}='{tmp_path / 'nope'}' does not exist here: the run refuses to start without it"
                in capsys.readouterr().out)
    assert main(["train", tiny_config, *MOCK, f"checkpoint.finetune_from={tmp_path}", "--dry-run"]) == 2
    assert "neither a checkpoint directory nor a root with" in capsys.readouterr().err
    # a directory that only looks like a checkpoint (marker and tracker, no files) is refused, saying why
    fake = tmp_path / "fake" / "iter_0000004"
    fake.mkdir(parents=True)
    (fake / COMPLETE_MARKER).write_text("")
    (tmp_path / "fake" / TRACKER).write_text("4")
    assert main(["train", tiny_config, *MOCK, f"checkpoint.load={tmp_path / 'fake'}", "--dry-run"]) == 2
    assert f"{fake}: .metadata is missing" in capsys.readouterr().err
    step = tmp_path / "run" / "iter_0000004"
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "megatron_apex.cli", "train", tiny_config, *MOCK, "train.train_steps=4",
                    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "data.seq_length=64",
                    f"checkpoint.save={tmp_path / 'run'}"], check=True, capture_output=True, timeout=300)
    assert main(["train", tiny_config, *MOCK, "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
                 "data.seq_length=64", f"checkpoint.load={tmp_path / 'run'}", "--dry-run"]) == 0
    assert f"start: resumes from {step} (checkpoint.load)" in capsys.readouterr().out
    # a checkpoint to resume from wins: finetune_from is not looked at, by the run or the dry run
    assert main(["train", tiny_config, *MOCK, "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
                 "data.seq_length=64", f"checkpoint.save={tmp_path / 'run'}",
                 f"checkpoint.finetune_from={tmp_path / 'nope'}", "--dry-run"]) == 0
    assert f"start: resumes from {step} (checkpoint.save holds" in capsys.readouterr().out


def test_a_warmup_longer_than_the_run_is_a_warning(tiny_config, capsys, monkeypatch):
    """train_steps=20 with a 40-step warmup: lr never reaches its peak and never decays. Accepted (a
    short debugging run may do it), but said in the dry run and at the run's start, naming both values."""
    import megatron_apex.training.trainer as trainer
    from megatron_apex.cli import main
    from megatron_apex.distributed import detect_launch_env
    from megatron_apex.run import run_training

    expected = "optimizer.lr_warmup_steps=40 >= train.train_steps=20: the learning rate never reaches its peak"
    overrides = [*MOCK, "train.train_steps=20", "optimizer.lr_warmup_steps=40"]
    cfg = load_config(tiny_config, overrides, world_size=1)
    assert len(cfg.warnings()) == 1 and expected in cfg.warnings()[0] and "never decays" in cfg.warnings()[0]
    assert load_config(tiny_config, [*MOCK, "train.train_steps=20", "optimizer.lr_warmup_steps=19"]).warnings() == []
    assert main(["train", tiny_config, *overrides, "--dry-run"]) == 0
    assert f"warning: {expected}" in capsys.readouterr().out

    class Stop:  # the trainer is not built: the warning comes before
        def __init__(self, *args):
            raise TrainingError("stop here")

    monkeypatch.setattr(trainer, "Trainer", Stop)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(__import__("distributed_utils").free_port())}
    assert run_training(cfg, detect_launch_env(env)) == 1  # logging as main() set it up: rank 0, to stderr
    assert f"WARNING megatron_apex.run: {expected}" in capsys.readouterr().err


def test_a_hugging_face_model_as_checkpoint_says_convert_it_first(tiny_config, tmp_path, capsys):
    """checkpoint.finetune_from=<a Hugging Face model folder> names the conversion to run."""
    from megatron_apex.cli import main

    hf = tmp_path / "Llama-hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert main(["train", tiny_config, *MOCK, f"checkpoint.finetune_from={hf}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (f"neither a checkpoint directory nor a root with latest_checkpointed_iteration.txt; this is a Hugging "
            f"Face model: convert it first with tools/convert_checkpoint.py import --hf-dir {hf} --output") in err


def test_world_size_without_dry_run_is_refused(tiny_config, capsys, monkeypatch):
    """--world-size plans a layout for --dry-run; without it the run used to start one process silently."""
    import megatron_apex.run as run
    from megatron_apex.cli import main

    monkeypatch.setattr(run, "run_training", lambda *args: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exc:
        main(["train", tiny_config, *MOCK, "--world-size", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--world-size 2 applies to --dry-run only" in err and "torchrun" in err


def test_document_masks_refused_where_not_wired(tiny_config, tiny_data):
    from helpers import tiny_overrides

    from megatron_apex.config import ConfigError

    for extra, reason in (({"model.transformer_impl": "transformer_engine"}, "transformer_impl='local'"),
                          ({"parallel.context_parallel_size": 2}, "context_parallel_size=1")):
        with pytest.raises(ConfigError, match=f"data.reset_attention_mask=True: needs .*{re.escape(reason)}"):
            load_config(tiny_config, tiny_overrides(tiny_data, **{"data.reset_attention_mask": True, **extra}), 2)


def test_document_masks_reach_the_model_in_training(tiny_config, tiny_data):
    """The trainer hands the loader's masks to the model: the same run with and without document masks
    starts from the same weights and data, and its losses differ (the first step's already)."""
    from helpers import tiny_overrides, train_worker

    over = {"train.train_steps": 2, "data.reset_position_ids": True}
    (plain,) = run_distributed(train_worker, 1, tiny_config, tiny_overrides(tiny_data, **over))
    (masked,) = run_distributed(train_worker, 1, tiny_config,
                                tiny_overrides(tiny_data, **over, **{"data.reset_attention_mask": True}))
    assert sorted(masked["losses"]) == [0, 1] and all(map(math.isfinite, masked["losses"].values()))
    assert masked["losses"][0] != plain["losses"][0], (masked["losses"], plain["losses"])
