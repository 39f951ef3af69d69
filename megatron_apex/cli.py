"""Command line: ``megatron-apex train CONFIG [section.key=value ...] [--dry-run]``.

The same entry point runs under torchrun, slurm (srun, one task per GPU) and mpirun; see
``megatron_apex.distributed``. Exit codes: 0 finished, 75 stopped cleanly with a checkpoint
(signal or ``train.exit_after_minutes``: resubmit to continue), 2 bad configuration (or a checkpoint
or tokenizer that does not fit it, a damaged checkpoint, a file that tries to run code, a checkpoint
directory in use by another run), 74 a checkpoint could not be written (disk full: the previous one is
intact), 1 error, 128 + N stopped by signal N with nothing saved (no ``checkpoint.save``; 130 also when a
second Ctrl-C aborts).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

import yaml

from megatron_apex.config import Config, ConfigError
from megatron_apex.expansion import geometry
from megatron_apex.expansion.geometry import UNIT_NAMES

logger = logging.getLogger("megatron_apex")


def quiet_third_party_output() -> None:
    """Keep the console to what this project says (for ``train`` and the tools; call before megatron-core
    is imported). megatron-core warns at import time that NVIDIA apex / Transformer Engine are absent
    (the local fallbacks are intended here) and logs at INFO which FSDP variant it would use; it and
    torch's distributed checkpoint emit deprecation warnings about their own internals (FutureWarning,
    megatron's "full scope is deprecated"), whose source lines print as stray fragments. None of these
    is something a user can act on."""
    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch\.distributed|megatron)\.")
    warnings.filterwarnings("ignore", message="full scope is deprecated", module=r"megatron\.")
    for noisy in ("megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _setup_logging(level: str, rank: int) -> None:
    quiet_third_party_output()
    fmt = f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, datefmt="%H:%M:%S", force=True)
    if rank != 0:
        # Other ranks report warnings and errors only; the logging rank reports metrics itself.
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("megatron_apex.training.trainer").setLevel(logging.INFO)


def estimate_memory(cfg: Config, world_size: int, padded_vocab: int) -> dict:
    """Rough per-GPU memory (GiB) for the most loaded pipeline stage.

    Weights/grads/optimizer: bf16 weights (2 B) + fp32 grads (4 B) + fp32 main weights and Adam
    moments (12 B, divided by DP under the distributed optimizer); fp32 runs hold 4 + 4 + 8 B.
    Activations per layer and micro-batch (bf16, SDPA/flash attention, no recomputation; Korthikanti
    et al. 2022): s * b * h * (10 + 24 / TP) bytes, or 34 * s * b * h / TP bytes with sequence
    parallelism (which also splits the norms' and residuals' 10 * s * b * h), s being the tokens a rank
    holds (the sequence / CP); times the micro-batches the 1F1B schedule keeps in flight on the first
    stage (min(PP, micro-batches)). The unfused attention backend adds its scores, 5 * a * s^2 * b / TP
    bytes per layer (a heads; SDPA keeps none), which core-attention recomputation
    (``train.recompute_core_attention``) removes. With full recomputation only a recomputed layer's input
    is kept (s * b * h x 2 bytes, / TP under SP), plus one layer's activations while it is recomputed;
    ``train.recompute_num_layers`` recomputes the first N layers of a stage, the others keep theirs. The
    logits add s * b * V/TP * 6 bytes on the last stage. APEX adds :func:`apex_memory_bytes`.
    """
    from megatron_apex.model.llama import count_parameters

    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = cfg.data_parallel_size(world_size)
    counts = count_parameters(cfg, padded_vocab)
    layers = m.num_layers // pp
    # PP = 1: one stage holds the embedding and the output layer; otherwise the first or the last.
    vocab_params = counts["embedding"] + counts["output"] if pp == 1 else max(counts["embedding"], counts["output"])
    stage_params = (counts["per_layer"] * layers + vocab_params) / tp
    bf16 = t.precision == "bf16" or (t.precision == "auto" and cfg.parallel.backend != "gloo")
    weight_b, grad_b, opt_b = (2, 4, 12) if bf16 else (4, 4, 8)
    if p.use_distributed_optimizer:
        opt_b /= dp
    s, b, h = cfg.data.seq_length // p.context_parallel_size, t.micro_batch_size, m.hidden_size  # tokens per rank
    in_flight = min(pp, cfg.num_micro_batches(world_size))
    per_token = 34 / tp if p.sequence_parallel else 10 + 24 / tp
    scale = (2 if bf16 else 4) / 2  # the coefficients count bf16 bytes
    full_layer = per_token * s * b * h * scale
    if m.transformer_impl == "local" and m.attention_backend == "unfused" and not t.recompute_core_attention:
        full_layer += 5 * m.num_attention_heads * s * s * b / tp * scale
    if t.recompute_activations:  # a recomputed layer keeps its input; one layer's activations while recomputed
        recomputed = t.recompute_num_layers or layers
        kept = s * b * h * (2 if bf16 else 4) / (tp if p.sequence_parallel else 1)
        act = (kept * recomputed + full_layer * (layers - recomputed)) * in_flight + full_layer
    else:
        act = full_layer * layers * in_flight
    act += s * b * padded_vocab / tp * 6
    apex = apex_memory_bytes(cfg, bf16)
    gib = 1024 ** 3
    return {"parameters_per_gpu": stage_params, "weights_gib": stage_params * weight_b / gib,
            "grads_gib": stage_params * grad_b / gib, "optimizer_gib": stage_params * opt_b / gib,
            "activations_gib": act / gib, "apex_gib": apex / gib,
            "total_gib": (stage_params * (weight_b + grad_b + opt_b) + act + apex) / gib}


def apex_memory_bytes(cfg: Config, bf16: bool) -> float:
    """APEX's own memory per GPU (most loaded pipeline stage and tensor-parallel rank): the operators'
    fp32 parameters, gradients and two AdamW moments (16 bytes a parameter), and on the in-place path
    (mode all) the original P and N rows of every expanded weight,
    kept while W_eff is written in (the weights' dtype). A rank holds ceil(B / TP) of a kind's B blocks
    in each layer that expands it, or all of them where the kind's operator spans the ranks (and runs per
    call). Selected mode's deltas are not counted."""
    from megatron_apex.expansion.operator import attn_operator_num_params, ffn_operator_num_params

    if not cfg.apex.enabled:
        return 0.0
    m, p, a = cfg.model, cfg.parallel, cfg.apex
    g = geometry.of(cfg)
    tp, stage_layers = p.tensor_model_parallel_size, m.num_layers // p.pipeline_model_parallel_size
    r, d, h = m.num_attention_heads // m.query_groups, m.head_dim, m.hidden_size
    inplace = a.mode == "all"
    total = 0.0
    for kind, (_, k, blocks) in g.units.items():
        if not k:
            continue
        k_per, local = k // blocks, blocks if g.spanning[kind] else -(-blocks // tp)
        if kind == "attn":  # P and N units: their rows of linear_qkv ((r + 2) d each, with their bias entries if any)
            # and columns of linear_proj
            rows = 2 * k_per * local * (((r + 2) * d + r * d) * h + ((r + 2) * d if m.add_qkv_bias else 0))
            ops = attn_operator_num_params(local, k_per, d, r, a.monarch_blocks)
        else:  # their gate and up rows of linear_fc1 and columns of linear_fc2
            rows = 2 * k_per * local * 3 * h
            ops = ffn_operator_num_params(local, k_per, a.monarch_blocks)
        per_layer = 16 * ops + (rows * (2 if bf16 else 4) if inplace and not g.spanning[kind] else 0)
        total += min(g.layers[kind], stage_layers) * per_layer
    return total


def _count(n: float) -> str:
    """A large count with a unit: 102.400K, 10.000B."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f}{unit}"
    return f"{n:.0f}"


WANDB_INSTALL = "pip install 'megatron_apex[wandb]'"


def missing_wandb(cfg: Config) -> bool:
    """Whether the config logs to Weights & Biases and this interpreter cannot import wandb. Checked on
    every rank before anything starts (a rank that refused alone would leave the others waiting in the
    rendezvous); the run used to find out only after building the model, with a traceback."""
    return bool(cfg.logging.wandb_project) and importlib.util.find_spec("wandb") is None


def dry_run(cfg: Config, world_size: int) -> str:
    """Validated layout, parameter count and memory estimate, without starting processes.

    The files the run reads first are checked as it checks them (the tokenizer, whose vocabulary sets
    the model's, the data prefixes unless data.mock, including that every part of data.split the run
    reads holds documents, and the checkpoint it resumes or is initialised from): a ConfigError
    (CheckpointError) names what is missing."""
    from megatron_apex.data.datasets import check_datasets, resolve_vocab
    from megatron_apex.model.llama import count_parameters
    from megatron_apex.training.checkpoint import CheckpointError, resolve_checkpoint_dir, resume_source
    from megatron_apex.training.schedule import describe as describe_schedule

    cfg.validate(world_size)
    g = geometry.check(cfg)
    vocab, eod = resolve_vocab(cfg)
    check_datasets(cfg, vocab, eod, valid_samples=cfg.train.eval_steps * cfg.train.global_batch_size)
    # The checkpoint the run starts from, chosen and checked as the run does: one that exists must be a
    # checkpoint (else a CheckpointError, exit 2); one that does not exist yet (a recipe planned before
    # its import) is a note, as the run refuses to start without it.
    c = cfg.checkpoint

    def not_yet(key: str, value: str) -> str:
        return (f"note: {key}={value!r} does not exist here: the run refuses to start without it (checkpoint "
                "error, exit code 2)")

    notes = []
    try:
        source, path, why = resume_source(cfg, checksums=False)  # sizes; the run also compares checksums
    except CheckpointError:
        if not c.load or os.path.exists(c.load):
            raise
        source, path, why = c.load, c.load, "checkpoint.load"
        notes.append(not_yet("checkpoint.load", c.load))
    if source is not None:
        start = f"start: resumes from {path} ({why})"
    elif c.finetune_from:
        if os.path.exists(c.finetune_from):
            where = resolve_checkpoint_dir(c.finetune_from, "checkpoint.finetune_from")
        else:
            where = c.finetune_from
            notes.append(not_yet("checkpoint.finetune_from", c.finetune_from))
        start = f"start: weights from {where} (checkpoint.finetune_from; fresh optimizer and schedule, step 0)"
    else:
        start = "start: fresh weights at step 0"
    padded = cfg.padded_vocab_size(vocab)
    counts = count_parameters(cfg, padded)
    mem = estimate_memory(cfg, world_size, padded)
    p, t = cfg.parallel, cfg.train
    dp = cfg.data_parallel_size(world_size)
    tokens = t.train_steps * t.global_batch_size * cfg.data.seq_length
    lines = [
        f"layout: world={world_size} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} "
        f"x CP {p.context_parallel_size} x DP {dp}" + (" (sequence parallel)" if p.sequence_parallel else ""),
        f"batch: micro {t.micro_batch_size} x {cfg.num_micro_batches(world_size)} micro-batches x DP {dp} "
        f"= global {t.global_batch_size} sequences of {cfg.data.seq_length} tokens",
        f"run: {t.train_steps} steps = {_count(tokens)} tokens",
        f"schedule: {describe_schedule(cfg)}",
        start,
        f"parameters: {counts['total'] / 1e6:.1f}M total ({counts['non_embedding'] / 1e6:.1f}M non-embedding), "
        f"vocab {vocab} padded to {padded}",
        f"memory estimate per GPU (most loaded stage): {mem['total_gib']:.2f} GiB = weights {mem['weights_gib']:.2f}"
        f" + grads {mem['grads_gib']:.2f} + optimizer {mem['optimizer_gib']:.2f} + activations "
        f"{mem['activations_gib']:.2f}" + (f" + APEX {mem['apex_gib']:.2f}" if cfg.apex.enabled else ""),
    ]
    if cfg.model.transformer_impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        lines.append("note: model.transformer_impl='transformer_engine', and Transformer Engine is not installed "
                     "here: the machines of the run need it (pip install 'megatron_apex[te]' on a CUDA machine)")
    lines += notes
    lines += [f"warning: {w}" for w in cfg.warnings()]
    if t.recompute_core_attention and (cfg.model.transformer_impl != "local" or cfg.model.attention_backend == "sdpa"):
        lines.append("note: train.recompute_core_attention with fused attention (SDPA, Transformer Engine) saves "
                     "little: it keeps no attention scores; train.recompute_activations saves more")
    if missing_wandb(cfg):
        lines.append(f"note: logging.wandb_project={cfg.logging.wandb_project!r}, and wandb is not installed here: the "
                     f"run refuses to start without it (configuration error, exit code 2; {WANDB_INSTALL})")
    if cfg.apex.enabled:
        layers, n_layers = g.layers, cfg.model.num_layers
        units = ", ".join(f"{UNIT_NAMES[kind]} k={k} of {n} in {b} partitions"
                          + (f" in {layers[kind]} of {n_layers} layers per stage" if layers[kind] < n_layers else "")
                          if k else f"{UNIT_NAMES[kind]} none of {n} (not expanded"
                          + (", not tuned)" if cfg.apex.mode == "selected" else ")")
                          for kind, (n, k, b) in g.units.items())
        lines.append(f"APEX: mode {cfg.apex.mode}, ratio {cfg.apex.ratio}, stage boundaries {g.boundaries}; "
                     f"per layer: {units}")
        for kind, count in layers.items():
            if 0 < count < n_layers:  # a budget below one unit per layer: the layers of every stage
                lines.append(f"APEX: {UNIT_NAMES[kind]}: budget round({cfg.apex.kind_ratio(kind)} x "
                             f"{g.units[kind][0]} x {n_layers} layers) = {count} P/N pairs per stage, one "
                             "in each of the layers " + "; ".join(
                                 f"stage {s + 1}: {g.stage_layers(s)[kind]}"
                                 for s in range(len(g.boundaries))) + " (drawn from train.seed)")
        lines += [f"APEX: {note}" for note in geometry.path_notes(cfg, g)]
        if cfg.apex.progressive:
            lines.append("APEX progressive: k per stage: " + "; ".join(
                f"{UNIT_NAMES[kind]} {ks}" for kind, ks in g.stage_ks.items()))
    return "\n".join(lines)


def train_main(args) -> int:
    from megatron_apex.distributed import detect_launch_env

    launch = detect_launch_env()
    try:
        from megatron_apex.run import checked_config

        cfg = checked_config(args.config, args.overrides, world_size=launch.world_size if not args.world_size
                             else args.world_size)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(cfg.logging.level, launch.rank)
    if args.dry_run:
        from megatron_apex.data.tokenizers import TokenizerError
        from megatron_apex.training.checkpoint import CheckpointError

        try:
            print(dry_run(cfg, args.world_size or launch.world_size))
        except (ConfigError, TokenizerError) as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            return 2
        except CheckpointError as exc:  # as the run reports it
            print(f"checkpoint error: {exc}", file=sys.stderr)
            return 2
        return 0
    if missing_wandb(cfg):
        print(f"configuration error: logging.wandb_project={cfg.logging.wandb_project!r}: wandb is not installed "
              f"({WANDB_INSTALL}, or leave the key out)", file=sys.stderr)
        return 2
    from megatron_apex.run import run_training

    return run_training(cfg, launch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-apex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) from a config file")
    t.add_argument("config", help="YAML or TOML config file")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument("--dry-run", action="store_true",
                   help="validate, print layout, parameter count and memory estimate, and exit")
    t.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run only: the number of GPUs to plan for (default: this launch's)")
    c = sub.add_parser("config", help="print the resolved config (YAML) or the configuration reference")
    c.add_argument("config", nargs="?", help="config file")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--reference", action="store_true", help="print the configuration reference (Markdown)")
    # Overrides may also follow the options (``train cfg.yaml --dry-run model.num_layers=4``): argparse
    # fills a positional list once, so the later ones come back as unknown and join it here.
    args, rest = parser.parse_known_args(argv)
    late = [x for x in rest if "=" in x and not x.startswith("-")]
    if len(late) < len(rest):
        parser.error("unrecognized arguments: " + " ".join(x for x in rest if x not in late))
    args.overrides = list(args.overrides) + late
    if args.command == "train" and args.world_size is not None and not args.dry_run:
        # It used to be ignored: the run started one process, whatever the number asked for.
        parser.error(f"--world-size {args.world_size} applies to --dry-run only (planning a layout); to run "
                     "on several processes start them with torchrun or launch_scripts/, e.g. "
                     f"GPUS_PER_NODE={args.world_size} bash launch_scripts/torchrun_single_node.sh CONFIG")
    if args.command == "train":
        return train_main(args)
    if args.reference:
        from megatron_apex.config import reference_markdown

        print(reference_markdown())
        return 0
    try:
        from megatron_apex.run import checked_config

        print(yaml.safe_dump(checked_config(args.config, args.overrides).to_dict(), sort_keys=False))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
