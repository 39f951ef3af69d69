"""The configuration tree: typed dataclasses, loaded from YAML/TOML plus ``a.b=value`` overrides.

Every field is documented once, where it is declared (``doc(default, "help")``); the README's
configuration reference is generated from these texts (``megatron_apex.config.reference_markdown``)
and a test keeps the two in sync. Validation happens here, before any process group starts:
an unknown key, a value of the wrong type or an inconsistent combination raises
:class:`ConfigError` naming the field and the value. Derived values are properties, never
silent rewrites of what the user wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or inconsistent with another."""


def doc(default: Any, help: str, factory: bool = False):
    """Declare a field with its default and its documentation."""
    if factory:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """LLaMA-family decoder (LLaMA, Mistral, Qwen2): RMSNorm, RoPE, SwiGLU, grouped-query attention; no biases but
    the optional Q/K/V bias of Qwen2, full causal attention or a sliding window."""

    num_layers: int = doc(2, "Number of transformer layers.")
    hidden_size: int = doc(128, "Model (residual stream) width.")
    ffn_hidden_size: int = doc(352, "SwiGLU intermediate size (per branch).")
    num_attention_heads: int = doc(4, "Number of query heads.")
    num_query_groups: Optional[int] = doc(
        None, "Key/value heads (GQA). None means plain multi-head attention (= num_attention_heads).")
    kv_channels: Optional[int] = doc(None, "Head dimension. None means hidden_size / num_attention_heads.")
    max_position_embeddings: int = doc(2048, "Longest sequence the model is configured for.")
    vocab_size: Optional[int] = doc(
        None, "Vocabulary size before padding. None takes it from the tokenizer (data.tokenizer_model).")
    make_vocab_size_divisible_by: int = doc(
        128, "Pad the vocabulary to a multiple of this (and of the TP degree).")
    rotary_base: float = doc(10000.0, "RoPE theta.")
    rope_scaling_factor: Optional[float] = doc(
        None, "Llama-3.x RoPE frequency scaling (Hugging Face rope_type 'llama3'): the factor, 8 for Llama-3.1 and "
        "32 for Llama-3.2; low and high frequency factors 1 and 4 over an original context of 8192 (megatron-core's "
        "fixed values, those of every Llama-3.x release). None: plain RoPE.")
    norm_epsilon: float = doc(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = doc(False, "Share the input embedding and the output layer weights.")
    add_qkv_bias: bool = doc(
        False, "A bias on the query, key and value projections (Qwen2/Qwen2.5); no other linear has one.")
    sliding_window: Optional[int] = doc(
        None, "Sliding-window attention (Mistral): every token attends to itself and the window - 1 tokens before "
        "it, in every layer (Hugging Face's sliding_window). None: full causal attention. A window of at least "
        "data.seq_length computes the same as none. Not with context parallelism.")
    init_method_std: float = doc(0.02, "Standard deviation of the normal weight initialisation.")
    transformer_impl: Literal["local", "transformer_engine"] = doc(
        "local", "Layer implementation: 'local' (pure PyTorch, runs everywhere) or "
        "'transformer_engine' (needs Transformer Engine and CUDA).")
    attention_backend: Literal["sdpa", "unfused"] = doc(
        "sdpa", "Core attention for the local implementation: torch scaled_dot_product_attention "
        "(flash/memory-efficient kernels on GPU) or megatron-core's unfused DotProductAttention.")

    @property
    def query_groups(self) -> int:
        return self.num_attention_heads if self.num_query_groups is None else self.num_query_groups

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads if self.kv_channels is None else self.kv_channels

    def validate(self) -> None:
        positive = {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                    "ffn_hidden_size": self.ffn_hidden_size, "num_attention_heads": self.num_attention_heads,
                    "max_position_embeddings": self.max_position_embeddings,
                    "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by, "rotary_base": self.rotary_base}
        _all(positive, "model", lambda v: v > 0, "must be positive")
        # None means "derived"; 0 is not a silent synonym for it.
        _all({"vocab_size": self.vocab_size, "num_query_groups": self.num_query_groups, "kv_channels": self.kv_channels,
              "sliding_window": self.sliding_window},
             "model", lambda v: v is None or v > 0, "must be positive (or null)")
        _all({"norm_epsilon": self.norm_epsilon, "init_method_std": self.init_method_std}, "model", lambda v: v >= 0,
             "must be >= 0")
        if self.rope_scaling_factor is not None:
            _check(self.rope_scaling_factor >= 1.0, "model.rope_scaling_factor", self.rope_scaling_factor,
                   "must be >= 1 (the factor the low frequencies are divided by), or null for plain RoPE")
        _check(self.num_attention_heads % self.query_groups == 0, "model.num_query_groups", self.num_query_groups,
               f"must divide model.num_attention_heads={self.num_attention_heads}")
        if self.kv_channels is None:
            _check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size", self.hidden_size,
                   f"must be divisible by model.num_attention_heads={self.num_attention_heads} (or set "
                   "model.kv_channels)")
        _check(self.head_dim % 2 == 0, "model.kv_channels", self.head_dim, "must be even for RoPE")


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes (megatron-core parallel_state)."""

    tensor_model_parallel_size: int = doc(1, "Tensor-parallel degree (TP).")
    pipeline_model_parallel_size: int = doc(1, "Pipeline-parallel degree (PP).")
    context_parallel_size: int = doc(1, "Context-parallel degree (CP): every sequence split over CP ranks; the local spec all-gathers keys and values in attention, Transformer Engine uses its own CP communication.")
    sequence_parallel: bool = doc(False, "Megatron sequence parallelism: activations outside attention and MLP split along the sequence over the TP group (needs TP > 1).")
    use_distributed_optimizer: bool = doc(False, "Shard optimizer state over data-parallel ranks (ZeRO-1).")
    overlap_grad_reduce: bool = doc(False, "Overlap the data-parallel gradient reduction with backward (GPU).")
    ddp_bucket_size: int = doc(
        0, "Parameters per gradient-reduction bucket (megatron-core's bucket_size); with overlap_grad_reduce a "
        "bucket is reduced as soon as its gradients are complete. 0 = megatron-core's default on a GPU "
        "(max(40M, 1M x DP)), one bucket on the CPU.")
    backend: Literal["auto", "nccl", "gloo"] = doc("auto", "torch.distributed backend; auto = nccl with CUDA, gloo without.")
    distributed_timeout_minutes: float = doc(30.0, "Timeout of collectives and of the rendezvous, in minutes.")

    def validate(self) -> None:
        _all({"tensor_model_parallel_size": self.tensor_model_parallel_size,
              "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
              "context_parallel_size": self.context_parallel_size,
              "distributed_timeout_minutes": self.distributed_timeout_minutes}, "parallel", lambda v: v > 0,
             "must be positive")
        _check(self.ddp_bucket_size >= 0, "parallel.ddp_bucket_size", self.ddp_bucket_size, "must be >= 0")
        _check(not self.sequence_parallel or self.tensor_model_parallel_size > 1, "parallel.sequence_parallel", True,
               "needs parallel.tensor_model_parallel_size > 1")


@dataclass
class DataConfig:
    """Training data: Megatron indexed datasets read through megatron-core's GPTDataset."""

    data_path: list = doc(
        list, "Dataset prefixes (without .bin/.idx), optionally weighted: [0.7, pfxA, 0.3, pfxB] (weights > 0, "
        "relative). Every dataset is checked at start-up: .bin/.idx consistent, and its sidecar's tokenizer "
        "(vocabulary size, end-of-document id) the configured one; with no tokenizer recorded (no sidecar), its "
        "largest token id (one scan of the .bin) within the padded vocabulary.", factory=True)
    valid_data_path: list = doc(
        list, "Separate validation prefixes, weighted or not like data_path. Empty: validation comes from "
        "data.split.", factory=True)
    split: str = doc(
        "969,30,1", "train,valid,test proportions of each data_path dataset (by documents); the train share must "
        "be > 0, and the valid share too when train.eval_steps > 0. The test part is never read. Ignored "
        "entirely when valid_data_path is set: train then uses all of data_path.")
    seq_length: int = doc(256, "Tokens per training sample.")
    tokenizer_type: Literal["auto", "sentencepiece", "huggingface", "none"] = doc(
        "auto", "Tokenizer kind; 'auto' tells it from data.tokenizer_model (a .model file: sentencepiece; a .json "
        "file or a directory with tokenizer.json: huggingface), as tools/preprocess_data.py does; 'none' needs "
        "model.vocab_size, and data.eod_id with real data (mock data, benchmarks).")
    tokenizer_model: Optional[str] = doc(None, "Path to a sentencepiece .model or a Hugging Face tokenizer.json.")
    eod_id: Optional[int] = doc(None, "End-of-document id when there is no tokenizer.")
    mock: bool = doc(False, "Use random tokens instead of files (smoke tests and benchmarks).")
    data_cache_path: Optional[str] = doc(
        None, "Directory for the GPTDataset sample/shuffle index caches, keyed by split, seed, sequence length "
        "and each dataset's .idx contents. None: a directory named after each prefix, {prefix}/cache/, next to "
        "its .bin (the data directory must then be writable).")
    num_workers: int = doc(0, "DataLoader worker processes per rank.")
    reset_position_ids: bool = doc(False, "Restart position ids at every end-of-document token.")
    reset_attention_mask: bool = doc(
        False, "Document masks in packed sequences: attention does not cross end-of-document tokens (a block-diagonal "
        "causal mask per sample, built by the data loader; attention then takes an explicit mask, slower than "
        "plain causal attention). Pair with reset_position_ids. The local implementation, without context "
        "parallelism.")
    eod_mask_loss: bool = doc(False, "Exclude end-of-document tokens from the loss.")

    def validate(self) -> None:
        _all({"seq_length": self.seq_length}, "data", lambda v: v > 0, "must be positive")
        _all({"num_workers": self.num_workers}, "data", lambda v: v >= 0, "must be >= 0")
        split_shares(self.split)
        if not self.mock:
            _check(len(self.data_path) > 0, "data.data_path", self.data_path, "is empty (or set data.mock=true)")
            parse_blend("data.data_path", self.data_path)
            if self.valid_data_path:
                parse_blend("data.valid_data_path", self.valid_data_path)
        if self.tokenizer_type == "none" and not self.mock:
            _check(self.eod_id is not None, "data.eod_id", None, "must be set when data.tokenizer_type='none'")


@dataclass
class OptimizerConfig:
    """AdamW through megatron-core's optimizer, with warmup and decay to a minimum rate."""

    lr: float = doc(3e-4, "Peak learning rate.")
    min_lr: float = doc(3e-5, "Learning rate at the end of decay.")
    lr_warmup_steps: int = doc(0, "Linear warmup steps from 0 to lr.")
    lr_decay_style: Literal["cosine", "linear", "constant", "wsd"] = doc(
        "cosine", "Schedule after warmup: cosine or linear decay to min_lr, constant, or 'wsd' (warmup-stable-decay: "
        "lr until a final decay over the last lr_wsd_decay_steps steps).")
    lr_decay_steps: Optional[int] = doc(None, "The step at which lr reaches min_lr, counted from the start (warmup "
                                              "included); None = train.train_steps.")
    lr_wsd_decay_steps: Optional[int] = doc(
        None, "wsd: steps of the final decay, ending at lr_decay_steps (None: lr_wsd_decay_fraction of the steps "
        "after warmup). 0: no decay, lr to the end; a later run resumes from its checkpoint with more "
        "train.train_steps and a decay, exactly as a run planned with that decay.")
    lr_wsd_decay_fraction: float = doc(0.1, "wsd: the final decay's share of the steps after warmup, in [0, 1], when "
                                            "lr_wsd_decay_steps is null.")
    lr_wsd_decay_shape: Literal["1-sqrt", "linear", "cosine"] = doc(
        "1-sqrt", "wsd: shape of the final decay: min_lr + (lr - min_lr) x (1 - sqrt(p)), (1 - p) or the cosine of p, "
        "p the decay's progress.")
    lr_rewarmup_start: Optional[int] = doc(
        None, "A re-warmup: from this step (e.g. the one a run resumes at on new data) the schedule is scaled "
        "linearly from 0 back to its own value over lr_rewarmup_steps. None: none.")
    lr_rewarmup_steps: int = doc(0, "Steps of the re-warmup from lr_rewarmup_start (> 0 when it is set).")
    weight_decay: float = doc(0.1, "Decoupled weight decay (not applied to norms).")
    adam_beta1: float = doc(0.9, "Adam beta1.")
    adam_beta2: float = doc(0.95, "Adam beta2.")
    adam_eps: float = doc(1e-8, "Adam epsilon.")
    clip_grad: float = doc(1.0, "Clip the global gradient norm to this value (0 disables).")

    def validate(self) -> None:
        _all({"lr": self.lr, "adam_eps": self.adam_eps}, "optimizer", lambda v: v > 0, "must be positive")
        _all({"lr_decay_steps": self.lr_decay_steps}, "optimizer", lambda v: v is None or v > 0,
             "must be positive (or null)")
        _all({"lr_warmup_steps": self.lr_warmup_steps, "weight_decay": self.weight_decay,
              "clip_grad": self.clip_grad}, "optimizer", lambda v: v >= 0, "must be >= 0")
        _check(0 <= self.min_lr <= self.lr, "optimizer.min_lr", self.min_lr, f"must lie in [0, optimizer.lr={self.lr}]")
        _check(self.lr_decay_steps is None or self.lr_decay_steps > self.lr_warmup_steps, "optimizer.lr_decay_steps",
               self.lr_decay_steps, f"must exceed optimizer.lr_warmup_steps={self.lr_warmup_steps}: it counts from the "
               "start, warmup included (None decays until train.train_steps)")
        for name, beta in (("optimizer.adam_beta1", self.adam_beta1), ("optimizer.adam_beta2", self.adam_beta2)):
            _check(0 <= beta < 1, name, beta, "must lie in [0, 1)")
        _all({"lr_wsd_decay_steps": self.lr_wsd_decay_steps}, "optimizer", lambda v: v is None or v >= 0,
             "must be >= 0 (or null)")
        _check(0 <= self.lr_wsd_decay_fraction <= 1, "optimizer.lr_wsd_decay_fraction", self.lr_wsd_decay_fraction,
               "must lie in [0, 1]")
        _all({"lr_rewarmup_start": self.lr_rewarmup_start}, "optimizer", lambda v: v is None or v >= 0,
             "must be >= 0 (or null)")
        _check(self.lr_rewarmup_start is None or self.lr_rewarmup_steps > 0, "optimizer.lr_rewarmup_steps",
               self.lr_rewarmup_steps, f"must be positive with optimizer.lr_rewarmup_start={self.lr_rewarmup_start}")
        _check(self.lr_rewarmup_steps >= 0, "optimizer.lr_rewarmup_steps", self.lr_rewarmup_steps, "must be >= 0")


@dataclass
class TrainConfig:
    """The loop: batch sizes, length of the run, evaluation, precision, failure handling."""

    micro_batch_size: int = doc(1, "Samples per micro-batch per data-parallel rank.")
    global_batch_size: int = doc(8, "Samples per optimizer step over all data-parallel ranks.")
    train_steps: int = doc(100, "Optimizer steps of the whole run.")
    seed: int = doc(1234, "Seed of weights, data order and dropout.")
    eval_interval: int = doc(0, "Validate every N steps (0: only at the end when eval_steps > 0).")
    eval_steps: int = doc(0, "Validation batches (of global_batch_size) per evaluation.")
    log_interval: int = doc(10, "Log loss, lr, grad norm and throughput every N steps.")
    precision: Literal["auto", "fp32", "bf16"] = doc("auto", "auto = bf16 with CUDA, fp32 without.")
    nan_policy: Literal["stop", "skip"] = doc(
        "stop", "On a NaN/Inf loss or gradient: stop with an error, or skip the update.")
    max_skipped_steps: int = doc(10, "With nan_policy=skip, stop after this many skipped steps.")
    exit_after_minutes: Optional[float] = doc(
        None, "Save a checkpoint and exit cleanly (code 75) after this much wall time (before a job's time "
        "limit); needs checkpoint.save.")
    exit_on_signal: bool = doc(
        True, "SIGTERM/SIGUSR1/SIGINT make the trainer stop after the current step, save a checkpoint and exit "
        "(code 75: resubmit to continue); without checkpoint.save nothing is saved and the code is 128 + the "
        "signal number. A second SIGINT (Ctrl-C) aborts at once without saving.")
    gpu_peak_tflops: Optional[float] = doc(
        None, "Peak dense bf16 TFLOP/s of one GPU for MFU; None looks the device name up (H100/H200/A100).")
    recompute_activations: bool = doc(
        False, "Full activation recomputation: a layer keeps only its input and is recomputed in the backward; "
        "every layer, or the first train.recompute_num_layers of each pipeline stage.")
    recompute_num_layers: Optional[int] = doc(
        None, "With recompute_activations: recompute only the first N layers of each pipeline stage (the others "
        "keep their activations; megatron-core's 'block' method). None: every layer.")
    recompute_core_attention: bool = doc(
        False, "Selective recomputation: only core attention is recomputed in the backward. Saves the attention "
        "scores of model.attention_backend='unfused' (s x s per head); SDPA keeps none, so it saves little there. "
        "Not with recompute_activations.")

    def validate(self) -> None:
        _all({"micro_batch_size": self.micro_batch_size, "global_batch_size": self.global_batch_size,
              "train_steps": self.train_steps, "log_interval": self.log_interval}, "train", lambda v: v > 0,
             "must be positive")
        _all({"exit_after_minutes": self.exit_after_minutes, "gpu_peak_tflops": self.gpu_peak_tflops}, "train",
             lambda v: v is None or v > 0, "must be positive (or null)")
        _all({"seed": self.seed, "eval_interval": self.eval_interval, "eval_steps": self.eval_steps,
              "max_skipped_steps": self.max_skipped_steps}, "train", lambda v: v >= 0, "must be >= 0")
        _check(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size", self.global_batch_size,
               f"must be divisible by train.micro_batch_size={self.micro_batch_size}")
        _all({"recompute_num_layers": self.recompute_num_layers}, "train", lambda v: v is None or v > 0,
             "must be positive (or null)")
        _check(self.recompute_num_layers is None or self.recompute_activations, "train.recompute_num_layers",
               self.recompute_num_layers, "applies to full recomputation: set train.recompute_activations=true")
        _check(not (self.recompute_core_attention and self.recompute_activations), "train.recompute_core_attention",
               True, "and train.recompute_activations exclude each other (megatron-core recomputes either whole "
               "layers or core attention); choose one")


@dataclass
class CheckpointConfig:
    """Saving and resuming with megatron-core dist_checkpointing (torch_dist)."""

    save: Optional[str] = doc(None, "Checkpoint directory. None disables saving.")
    save_interval: int = doc(0, "Save every N steps (0: only at the end).")
    load: Optional[str] = doc(
        None, "Resume from this checkpoint (a root with latest_checkpointed_iteration.txt, or an iter_* directory), "
        "which must exist, until checkpoint.save holds a checkpoint: from then on the run resumes from "
        "checkpoint.save (its newer state). None: resume from checkpoint.save when it has a checkpoint.")
    finetune_from: Optional[str] = doc(
        None, "Initialise weights only from this checkpoint (fresh optimizer, LR schedule and step 0); "
        "ignored when a checkpoint to resume from exists.")
    load_optimizer: bool = doc(True, "Restore optimizer state when resuming.")
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = doc(
        "dp_reshardable", "How saves store the distributed optimizer's state (parallel.use_distributed_optimizer): "
        "'dp_reshardable' writes each rank's shard as it is (no gathering, no extra memory) and resumes under the "
        "same TP and PP with any DP; 'fully_reshardable' gathers the state of each TP/PP rank onto its first DP "
        "rank (CPU memory) at every save, every rank reads it whole at a load, and it resumes under any TP/PP/DP. "
        "A load reads the format the checkpoint was saved in.")
    load_rng: bool = doc(True, "Restore RNG states when resuming.")
    async_save: bool = doc(
        False, "Write the periodic checkpoints in the background: a forked process writes the files while training "
        "goes on, and the checkpoint is published (renamed into place, then the tracker) at the first step after "
        "every rank's writer is done. At most one save in flight; the final save (end of run, stop signal) is "
        "blocking. A crash before publication leaves the previous checkpoint the latest, as for any save.")
    verify: Literal["checksums", "sizes"] = doc(
        "checksums", "Before loading, check every file of the checkpoint against what its save recorded: its size "
        "and CRC-32 ('checksums', reads the checkpoint once on global rank 0) or its size only ('sizes'). A damaged "
        "latest checkpoint falls back to the newest intact one (a warning says why); none intact is an error.")
    keep_last: Optional[int] = doc(
        None, "After each save, delete all but the newest N complete checkpoints up to the one just saved (None "
        "keeps all); incomplete directories and steps newer than the one saved are left alone, with a warning.")

    def validate(self) -> None:
        _all({"keep_last": self.keep_last}, "checkpoint", lambda v: v is None or v > 0, "must be positive (or null)")
        _all({"save_interval": self.save_interval}, "checkpoint", lambda v: v >= 0, "must be >= 0")
        for key in ("save", "load", "finetune_from"):
            value = getattr(self, key)
            _check(value is None or value.strip() != "", f"checkpoint.{key}", value,
                   "is empty (an unset shell variable?): give a directory, or leave the key out")


@dataclass
class LoggingConfig:
    """Where metrics go."""

    tensorboard_dir: Optional[str] = doc(None, "TensorBoard event directory (None: no TensorBoard).")
    wandb_project: Optional[str] = doc(None, "Weights & Biases project (needs wandb installed).")
    level: Literal["DEBUG", "INFO", "WARNING"] = doc("INFO", "Python logging level.")


@dataclass
class ApexConfig:
    """APEX: advantageous parameter expansion (see the README section "How APEX works")."""

    enabled: bool = doc(False, "Turn APEX on.")
    mode: Literal["all", "selected"] = doc(
        "all", "'all': base weights and operator train (pre-training); 'selected': base frozen, deltas "
        "on selected units (instruction-tuning setting).")
    ratio: float = doc(0.125, "Expansion ratio k/n per layer and unit type, in (0, 0.5]. Below one unit per layer "
                        "(4 query groups at 0.125) round(ratio x units x layers) layers expand one P/N pair each, "
                        "drawn from train.seed and the stage.")
    attn_ratio: Optional[float] = doc(
        None, "Ratio of the attention units (heads; query groups under GQA) alone, in [0, 0.5]: null = "
        "apex.ratio, 0 = attention not expanded.")
    ffn_ratio: Optional[float] = doc(None, "Ratio of the FFN channels alone, in [0, 0.5]: null = apex.ratio, 0 = not expanded.")
    stages: int = doc(3, "Number of expansion stages, evenly spaced over train.train_steps.")
    boundaries: list = doc(list, "Explicit stage start steps (overrides stages), e.g. [0, 300, 600].", factory=True)
    init_scoring_samples: int = doc(256, "Samples of the no-grad scoring pass before stage 1.")
    attn_tuned_ratio: float = doc(0.5625, "selected mode: share of attention units trained (P+N+E).")
    ffn_tuned_ratio: float = doc(0.465, "selected mode: share of FFN channels trained (P+N+E).")
    progressive: bool = doc(False, "Halve k at every stage (never below one unit per partition) and keep former "
                             "N units out of later selections.")
    statistic: Literal["rank", "norm", "ema"] = doc(
        "rank", "Advantage score: 'rank' = per micro-batch top-k +1 / bottom-k -1 votes (ties by summed norm); "
        "'norm' = summed activation L2 norms; 'ema' = moving average over steps of each step's summed norms.")
    ema_decay: float = doc(0.99, "statistic 'ema': decay d per scored step, score = d * score + (1 - d) * step sum; in (0, 1).")
    score_interval: int = doc(
        1, "Take the statistics in every n-th training step of a stage, counted from its start (1 = every "
        "step, the method as specified); n > 1 divides the scoring cost and the number of votes by about n.")
    partitions: int = doc(
        8, "Operator blocks per layer: each unit kind uses B = gcd(partitions, units, k) blocks, M block-diagonal "
        "over them (1 = one operator mixing all of P into every N slot, as the paper). Independent of the TP "
        "degree, so every layout computes the same; a block lies on one tensor-parallel rank, or where its P and N "
        "units cannot, the unit kind's operator spans the ranks (dry run: 'spans the ranks').")
    monarch_blocks: int = doc(
        0, "Monarch block count nb of each operator matrix (m x m): 0 = the divisor of m closest to sqrt(m) (as "
        "released), n > 0 = the divisor of m closest to n (m varies by operator and stage).")
    lr_scale: float = doc(1.0, "Learning-rate multiplier of the operator parameters.")
    operator_weight_decay: float = doc(0.0, "Weight decay of the operator parameters.")
    cuda_graphs: bool = doc(True, "On GPUs, replay the per-step operator work (mode all) from two CUDA graphs.")

    def kind_ratio(self, kind: str) -> float:
        """The expansion ratio of one unit kind ('attn' or 'ffn')."""
        own = self.attn_ratio if kind == "attn" else self.ffn_ratio
        return self.ratio if own is None else own

    def validate(self) -> None:
        """The APEX fields' own ranges; what they ask of the model, the layout and the run is checked by
        ``megatron_apex.expansion.geometry.check``."""
        _check(0 < self.ratio <= 0.5, "apex.ratio", self.ratio, "must lie in (0, 0.5]")
        for kind in ("attn", "ffn"):
            own = getattr(self, f"{kind}_ratio")
            _check(own is None or 0 <= own <= 0.5, f"apex.{kind}_ratio", own, "must lie in [0, 0.5] (or null)")
        _check(self.partitions > 0, "apex.partitions", self.partitions, "must be positive")
        _check(self.lr_scale > 0, "apex.lr_scale", self.lr_scale, "must be positive")
        _check(self.init_scoring_samples >= 0, "apex.init_scoring_samples", self.init_scoring_samples, "must be >= 0")
        _check(0 < self.ema_decay < 1, "apex.ema_decay", self.ema_decay, "must lie in (0, 1)")
        _check(self.score_interval >= 1, "apex.score_interval", self.score_interval, "must be >= 1")
        _check(self.monarch_blocks >= 0, "apex.monarch_blocks", self.monarch_blocks,
               "must be >= 0 (0: closest to sqrt(m))")
        if self.boundaries:
            b = list(self.boundaries)
            _check(all(type(x) is int for x in b) and b == sorted(set(b)), "apex.boundaries", b,
                   "must be strictly increasing integers")
        else:
            _check(self.stages >= 1, "apex.stages", self.stages, "must be >= 1")
        if self.mode == "selected":
            for kind in ("attn", "ffn"):
                name, v = f"apex.{kind}_tuned_ratio", getattr(self, f"{kind}_tuned_ratio")
                _check(2 * self.kind_ratio(kind) <= v <= 1, name, v,
                       f"must lie in [2 x the {kind} ratio {self.kind_ratio(kind)}, 1]")


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = doc(ModelConfig, "Model shape.", factory=True)
    parallel: ParallelConfig = doc(ParallelConfig, "Parallel layout.", factory=True)
    data: DataConfig = doc(DataConfig, "Training data.", factory=True)
    optimizer: OptimizerConfig = doc(OptimizerConfig, "Optimizer and LR schedule.", factory=True)
    train: TrainConfig = doc(TrainConfig, "Training loop.", factory=True)
    checkpoint: CheckpointConfig = doc(CheckpointConfig, "Checkpoints.", factory=True)
    logging: LoggingConfig = doc(LoggingConfig, "Logging.", factory=True)
    apex: ApexConfig = doc(ApexConfig, "APEX parameter expansion.", factory=True)

    # ------------------------------------------------------------------ derived values
    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)

    def num_micro_batches(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.data_parallel_size(world_size))

    def padded_vocab_size(self, vocab_size: Optional[int] = None) -> int:
        """Vocabulary padded to lcm(make_vocab_size_divisible_by, TP): the padding does not change
        with the TP degree for the usual power-of-two layouts, so checkpoints reshard freely."""
        v = vocab_size or self.model.vocab_size
        multiple = math.lcm(self.model.make_vocab_size_divisible_by, self.parallel.tensor_model_parallel_size)
        return int(math.ceil(v / multiple) * multiple)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Check every section, then what the sections ask of each other (and, given the world size, the
        parallel layout). Returns self. APEX is checked against the model and layout by
        ``megatron_apex.expansion.geometry.check`` (the entry points run both)."""
        m, p, t, d, o, c = self.model, self.parallel, self.train, self.data, self.optimizer, self.checkpoint
        for section in (m, p, d, o, t, c, self.apex if self.apex.enabled else None):
            if section is not None:
                section.validate()
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        for name, value in (("model.num_attention_heads", m.num_attention_heads),
                            ("model.num_query_groups", m.query_groups), ("model.ffn_hidden_size", m.ffn_hidden_size)):
            _check(value % tp == 0, name, value, f"must be divisible by parallel.tensor_model_parallel_size={tp}")
        _check(m.num_layers % pp == 0, "model.num_layers", m.num_layers,
               f"must be divisible by parallel.pipeline_model_parallel_size={pp}")
        _check(t.recompute_num_layers is None or t.recompute_num_layers <= m.num_layers // pp,
               "train.recompute_num_layers", t.recompute_num_layers,
               f"exceeds the {m.num_layers // pp} layers of a pipeline stage")
        _check(d.seq_length <= m.max_position_embeddings, "data.seq_length", d.seq_length,
               f"exceeds model.max_position_embeddings={m.max_position_embeddings}")
        _check(d.seq_length % (2 * p.context_parallel_size) == 0 or p.context_parallel_size == 1,
               "data.seq_length", d.seq_length, f"must be divisible by 2 x parallel.context_parallel_size="
               f"{2 * p.context_parallel_size} (every CP rank holds two of 2 x CP equal chunks)")
        _check(not p.sequence_parallel or d.seq_length % (tp * p.context_parallel_size) == 0, "data.seq_length",
               d.seq_length, f"must be divisible by tensor_model_parallel_size x context_parallel_size="
               f"{tp * p.context_parallel_size} under parallel.sequence_parallel")
        if m.vocab_size is None:
            _check(d.tokenizer_type != "none" and d.tokenizer_model is not None or d.mock, "model.vocab_size", None,
                   "must be set when there is no tokenizer (data.tokenizer_model)")
        if not d.mock and not d.valid_data_path:
            shares = split_shares(d.split)
            _check(shares[0] > 0, "data.split", d.split, "gives training no share of data.data_path")
            _check(shares[1] > 0 or t.eval_steps == 0, "data.split", d.split,
                   f"gives validation no share, but train.eval_steps={t.eval_steps} asks for validation "
                   "(give valid a share, set data.valid_data_path, or set train.eval_steps=0)")
        if o.lr_decay_style == "wsd" and o.lr_wsd_decay_steps is not None:
            end = o.lr_decay_steps or t.train_steps
            _check(o.lr_wsd_decay_steps <= end - o.lr_warmup_steps, "optimizer.lr_wsd_decay_steps",
                   o.lr_wsd_decay_steps, f"must fit after the warmup: at most (optimizer.lr_decay_steps or "
                   f"train.train_steps) - optimizer.lr_warmup_steps = {end} - {o.lr_warmup_steps}")
        _check(t.exit_after_minutes is None or c.save is not None, "train.exit_after_minutes", t.exit_after_minutes,
               "needs checkpoint.save: the run stops with exit code 75 (resubmit to continue), which needs a "
               "checkpoint to continue from")
        if d.reset_attention_mask:
            _check(m.transformer_impl == "local", "data.reset_attention_mask", True,
                   "needs model.transformer_impl='local' (the Transformer Engine path is not wired for document masks)")
            _check(p.context_parallel_size == 1, "data.reset_attention_mask", True,
                   f"needs parallel.context_parallel_size=1 (got {p.context_parallel_size}): the context-parallel "
                   "attention is causal only")
        if m.sliding_window is not None and m.sliding_window < d.seq_length:
            _check(p.context_parallel_size == 1, "model.sliding_window", m.sliding_window,
                   f"needs parallel.context_parallel_size=1 (got {p.context_parallel_size}): the context-parallel "
                   "attention is full causal only")
            _check(not (d.reset_attention_mask and m.transformer_impl == "local" and m.attention_backend == "unfused"),
                   "model.sliding_window", m.sliding_window, "with data.reset_attention_mask needs "
                   "model.attention_backend='sdpa' (megatron-core's unfused attention drops the document mask when "
                   "it builds the window's)")
        if m.transformer_impl == "local" and p.context_parallel_size > 1:
            _check(m.attention_backend == "sdpa", "parallel.context_parallel_size", p.context_parallel_size,
                   "needs model.attention_backend='sdpa' (or model.transformer_impl='transformer_engine')")
        if world_size is not None:
            model_parallel = tp * pp * p.context_parallel_size
            _check(world_size % model_parallel == 0, "parallel", f"TP={tp} x PP={pp} x CP={p.context_parallel_size}",
                   f"does not divide the world size {world_size}")
            dp = world_size // model_parallel
            _check(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
                   t.global_batch_size, f"must be divisible by train.micro_batch_size x data-parallel size "
                   f"= {t.micro_batch_size} x {dp}")
        return self

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not meant, one line each; the dry run prints them and the
        run logs them at start (rank 0). Not errors: a short debugging run may do this on purpose."""
        o, steps = self.optimizer, self.train.train_steps
        found = []
        if o.lr_warmup_steps >= steps:
            peak = (f"reaches its peak optimizer.lr={o.lr:g} only at the last step" if o.lr_warmup_steps == steps
                    else f"never reaches its peak optimizer.lr={o.lr:g} (the last step's is "
                    f"{o.lr * steps / o.lr_warmup_steps:.3g})")
            decay = "" if o.lr_decay_style == "constant" else " and never decays"
            found.append(f"optimizer.lr_warmup_steps={o.lr_warmup_steps} >= train.train_steps={steps}: the learning "
                         f"rate {peak}{decay}; shorten the warmup for a full schedule")
        return found


def _check(ok: bool, name: str, value: Any, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {problem}")


def _all(values: dict, section: str, ok, problem: str) -> None:
    """_check every ``{key: value}`` of a section."""
    for key, value in values.items():
        _check(ok(value), f"{section}.{key}", value, problem)


def _number(x: Any) -> Optional[float]:
    """x as a float if it is a number or a numeric string (the comma form gives strings), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        return None
    try:
        return float(x)
    except ValueError:
        return None


def parse_blend(name: str, blend: list) -> tuple[list, Optional[list]]:
    """megatron-core's blend ``(prefixes, weights or None)`` of a data_path-style list.

    megatron-core's rule, in every syntax (``[0.7, a, 0.3, b]`` or ``0.7,a,0.3,b``): a list whose
    first element is a number alternates weight, prefix; weights must be finite and > 0
    (megatron-core refuses 0: leave such a dataset out). Raises :class:`ConfigError` naming the
    field and the value.
    """
    if blend and _number(blend[0]) is not None:
        prefixes, weights = blend[1::2], [_number(w) for w in blend[0::2]]
        _check(len(blend) % 2 == 0 and all(isinstance(p, str) for p in prefixes), name, blend,
               "a weighted blend must alternate weight, prefix")
        bad = [w for w, v in zip(blend[0::2], weights) if v is None or not math.isfinite(v) or v <= 0]
        _check(not bad, name, blend, f"weights must be positive numbers, got {', '.join(map(repr, bad))}"
               + (" (leave a dataset out rather than weighting it 0)" if 0 in weights else ""))
        return [p.strip() for p in prefixes], weights
    _check(all(isinstance(x, str) for x in blend), name, blend, "must list prefixes, or weight/prefix pairs")
    return [p.strip() for p in blend], None


def split_shares(split: str) -> list[float]:
    """The three train,valid,test shares of ``data.split`` (not normalised)."""
    parts = [p.strip() for p in split.split(",")]
    _check(len(parts) == 3 and all(re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", p) for p in parts)
           and sum(map(float, parts)) > 0,
           "data.split", split, "must be three non-negative numbers 'train,valid,test', not all 0")
    return [float(p) for p in parts]


# ---------------------------------------------------------------------- loading
_TOKENIZER_KINDS = {  # the spellings tools/preprocess_data.py accepts (ours and Megatron-LM's), by kind
    "sentencepiece": "sentencepiece", "sentencepiecetokenizer": "sentencepiece", "sp": "sentencepiece",
    "gptsentencepiecetokenizer": "sentencepiece", "llama2tokenizer": "sentencepiece",
    "huggingface": "huggingface", "huggingfacetokenizer": "huggingface", "hf": "huggingface",
}


def tokenizer_kind(name: Any) -> Optional[str]:
    """The canonical tokenizer kind a spelling names ('SentencePieceTokenizer', 'hf', ...), or None."""
    return _TOKENIZER_KINDS.get(str(name).strip().lower().replace("-", "").replace("_", ""))


def _tokenizer_type_hint(value: Any) -> str:
    """tools/preprocess_data.py takes Megatron-LM's spellings (SentencePieceTokenizer, ...): name the
    config's for the same kind rather than let the user guess. Not accepted as aliases: the config keeps
    one spelling per kind."""
    kind = tokenizer_kind(value)
    if kind is None:
        return ""
    return (f" ({value!r} is the tools/preprocess_data.py --tokenizer-type spelling; in the config it is "
            f"data.tokenizer_type={kind})")


# Extra words for a refused choice, by key: what the user probably meant.
_LITERAL_HINTS = {"data.tokenizer_type": _tokenizer_type_hint}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check (and, for strings from the command line, parse) ``value`` against type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _LITERAL_HINTS[name](value) if name in _LITERAL_HINTS else ""
            raise ConfigError(f"{name}={value!r}: must be one of {', '.join(map(repr, choices))}{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name}={value!r}: expected an integer")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected an integer") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}={value!r}: expected a number")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected a number") from None
        if not math.isfinite(number):  # inf/nan parse as floats, and a run with one dies of NaN later
            raise ConfigError(f"{name}={value!r}: expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r}: expected a string")
        return value
    if tp is list:
        if isinstance(value, str):  # "[a, b]" or "a,b": the items are YAML scalars, as in a file
            text = value.strip()
            value = _load_yaml(text if text.startswith("[") else f"[{text}]", f"{name}={value!r}")
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r}: expected a list")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp}")


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"section {prefix.rstrip('.')}" if prefix else "top level"
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in values.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _load_yaml(text: str, where: str) -> Any:
    """YAML with safe types only and no duplicate keys (a second ``model:`` section would silently
    replace the first); a parse error raises :class:`ConfigError` naming ``where``."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" may override on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in first:
                    raise ConfigError(f"{where}: duplicate key {key!r} at line {line} (first at line {first[key]})")
                first.setdefault(key, line)
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse {where}: {exc}") from None


def _read_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not a text file (byte {exc.start} is not UTF-8); give a YAML or "
                          "TOML config") from None
    if "\x00" in text:
        raise ConfigError(f"config file {path}: not a text file (it holds NUL bytes); give a YAML or TOML config")
    if path.suffix != ".toml":
        values = _load_yaml(text, f"config file {path}") or {}
    else:
        import tomllib

        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # a parse error: say which file
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: its top level is a {type(values).__name__}, not a mapping of "
                          "sections (model:, train:, ...)")
    return values


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as YAML scalars)."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            parsed = raw
        node[parts[-1]] = parsed
    return values


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None) -> Config:
    """Load a YAML/TOML file (or the defaults), apply overrides, build and validate."""
    values = _read_file(path) if path else {}
    values = apply_overrides(values, list(overrides or []))
    return _build(Config, values, "").validate(world_size)


def config_from_dict(values: dict) -> Config:
    """Rebuild a config stored in a checkpoint (no world-size validation)."""
    return _build(Config, json.loads(json.dumps(values)), "").validate()


def reference_markdown() -> str:
    """The configuration reference (README section), generated from the field docs."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += [f"### `{section.name}`", "", (cls.__doc__ or "").strip(), "",
                  "| key | default | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"| `{section.name}.{f.name}` | `{default!r}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)
