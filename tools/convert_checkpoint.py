#!/usr/bin/env python3
"""Convert between Hugging Face LLaMA, Mistral and Qwen2/Qwen2.5 directories and megatron_apex checkpoints.

  # HF -> megatron_apex (weights only; train from it with checkpoint.finetune_from=CKPT)
  python tools/convert_checkpoint.py import --hf-dir TinyLlama-1.1B --output ckpt/tinyllama \\
      --tp 2 --pp 1 --config-out tinyllama_model.yaml --verify
  # megatron_apex (any TP/PP; a root with tracker or an iter_* dir) -> HF LlamaForCausalLM,
  # MistralForCausalLM or Qwen2ForCausalLM (the family it was imported from)
  python tools/convert_checkpoint.py export --checkpoint runs/cpt --output hf_out \\
      --dtype bf16 --shard-size 5GB --tokenizer tokenizer.model --verify

Families: LlamaForCausalLM; MistralForCausalLM, with its sliding window (model.sliding_window); and
Qwen2ForCausalLM (Qwen2 and Qwen2.5), whose bias on Q, K and V becomes model.add_qkv_bias; tied
embeddings in each. The export writes the family's own config.json; --architecture picks another family
that can express the model.

Both directions stream layer by layer (peak memory near one copy of the model) and run in a
single process on the CPU, whatever launcher environment (torchrun, slurm, MPI) they are started
in. The result is written beside --output and renamed to it once complete, so an interrupted run
leaves no output; a non-empty --output is refused unless --force is given. --verify compares
logits of both sides on random sequences (needs transformers) and fails if they differ beyond the
tolerance.

Exit codes: 0 ok, 2 bad input / unsupported model / impossible layout, 3 verification failed,
130 interrupted.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPE_NAMES = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> megatron_apex checkpoint")
    imp.add_argument("--hf-dir", required=True, help="config.json + model.safetensors (or shards + index, or "
                     "pytorch_model.bin)")
    imp.add_argument("--output", required=True, help="checkpoint root to create (iter_0000000 + tracker)")
    imp.add_argument("--tp", type=int, default=1, help="target tensor-parallel degree to validate and record")
    imp.add_argument("--pp", type=int, default=1, help="target pipeline-parallel degree to validate and record")
    imp.add_argument("--dtype", choices=("auto",) + DTYPE_NAMES, default="auto",
                     help="stored weight dtype; auto = the one config.json names (fp32 if none)")
    imp.add_argument("--config-out", help="write the matching model config section (YAML) here")
    imp.add_argument("--allow-sliding-window", action="store_true",
                     help="a LLaMA config.json (model_type llama) with a sliding_window shorter than its context: "
                     "convert it with full causal attention, as LlamaForCausalLM runs it (Mistral's and Qwen2's "
                     "windows convert as they are)")
    exp = sub.add_parser("export", help="megatron_apex checkpoint -> Hugging Face LLaMA/Mistral/Qwen2 directory")
    exp.add_argument("--checkpoint", required=True, help="checkpoint root (with tracker) or an iter_* directory")
    exp.add_argument("--output", required=True, help="Hugging Face directory to write")
    exp.add_argument("--dtype", choices=DTYPE_NAMES, help="weight dtype (default: the checkpoint's)")
    exp.add_argument("--shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    exp.add_argument("--tokenizer", help="sentencepiece .model, tokenizer.json, or a directory of tokenizer files")
    exp.add_argument("--vocab-size", type=int, help="true vocabulary size when the checkpoint's config lacks it")
    exp.add_argument("--architecture", choices=("llama", "mistral", "qwen2"),
                     help="family of the exported config.json (default: the one the checkpoint was imported "
                     "from, else qwen2 for a QKV bias, mistral for a sliding window, llama otherwise)")
    for p in (imp, exp):
        p.add_argument("--force", action="store_true", help="replace a non-empty --output (refused otherwise); "
                       "the old directory is removed only once the new one is complete")
        p.add_argument("--verify", action="store_true", help="compare logits of both sides (needs transformers)")
        p.add_argument("--verify-sequences", type=int, default=4, help="random sequences for --verify")
        p.add_argument("--verify-length", type=int, default=64, help="tokens per --verify sequence")
        p.add_argument("--atol", type=float, help="largest allowed |logit diff| (default 1e-3, 0.5 after a "
                       "lossy dtype cast)")
        p.add_argument("--kl-tol", type=float, help="largest allowed mean KL (default 1e-5, 1e-2 after a lossy cast)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


def _check_file_target(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written, before the conversion runs."""
    from megatron_apex.analysis.checkpoint_io import check_output_file
    from megatron_apex.convert.mapping import ConversionError

    try:
        check_output_file(path, flag)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


def _verify(args, checkpoint: str, hf_dir: str, lossy: bool, vocab_size=None) -> None:
    from megatron_apex.convert.verify import compare_checkpoint_with_hf

    result = compare_checkpoint_with_hf(checkpoint, hf_dir, args.verify_sequences, args.verify_length,
                                        vocab_size=vocab_size)
    atol = args.atol if args.atol is not None else (0.5 if lossy else 1e-3)
    kl_tol = args.kl_tol if args.kl_tol is not None else (1e-2 if lossy else 1e-5)
    print(f"verify: {result.num_tokens} tokens  max |logit diff| = {result.max_abs_diff:.3e} (tol {atol:.0e})  "
          f"KL(HF || megatron) = {result.kl:.3e} (tol {kl_tol:.0e})")
    result.check(atol, kl_tol)
    print("verify: OK")


def _lossy(source, target) -> bool:
    """Whether converting weights from dtype ``source`` to ``target`` rounds them (verify's tolerance)."""
    import torch

    return torch.finfo(target).bits < torch.finfo(source).bits or {source, target} == {torch.float16,
                                                                                         torch.bfloat16}


def run(args) -> None:
    if args.command == "import":
        from megatron_apex.convert.importer import import_hf_checkpoint, model_yaml

        if args.config_out:
            _check_file_target(args.config_out, "--config-out")
        result = import_hf_checkpoint(args.hf_dir, args.output, tp=args.tp, pp=args.pp, dtype=_dtype(args.dtype),
                                      allow_sliding_window=args.allow_sliding_window, progress=not args.no_progress,
                                      force=args.force)
        for w in result.warnings:
            print(f"warning: {w}")
        print(f"wrote {result.checkpoint} (vocab {result.config.model.vocab_size} padded to "
              f"{result.padded_vocab_size}; loads under TP={args.tp} PP={args.pp}; train from it with "
              f"checkpoint.finetune_from={args.output})")
        if args.config_out:
            with open(args.config_out, "w", encoding="utf-8") as f:
                f.write(model_yaml(result.config, args.tp, args.pp))
            print(f"wrote {args.config_out}")
        if args.verify:
            _verify(args, args.output, args.hf_dir, lossy=_lossy(result.source_dtype, result.dtype))
    else:
        from megatron_apex.convert.exporter import export_hf_checkpoint
        from megatron_apex.convert.runtime import checkpoint_dtype
        from megatron_apex.training.checkpoint import resolve_checkpoint_dir

        result = export_hf_checkpoint(args.checkpoint, args.output, dtype=_dtype(args.dtype),
                                      shard_size=args.shard_size, tokenizer=args.tokenizer,
                                      vocab_size=args.vocab_size, progress=not args.no_progress, force=args.force,
                                      architecture=args.architecture)
        print(f"wrote {args.output}: {', '.join(result.files)}")
        if args.verify:
            stored = checkpoint_dtype(resolve_checkpoint_dir(args.checkpoint))
            _verify(args, args.checkpoint, args.output, _lossy(stored, result.dtype), args.vocab_size)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_apex.cli import quiet_third_party_output

    quiet_third_party_output()  # before megatron-core is imported, as `megatron-apex train` does
    from megatron_apex.config import ConfigError
    from megatron_apex.convert.mapping import ConversionError
    from megatron_apex.convert.verify import VerifyFailed
    from megatron_apex.training.checkpoint import CheckpointError

    try:
        run(args)
    except VerifyFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ConversionError, CheckpointError, ConfigError, NotImplementedError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # an OSError names the file it could not read or write
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
