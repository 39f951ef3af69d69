#!/usr/bin/env python3
"""Loss and perplexity of a checkpoint (or a Hugging Face model) on several datasets at once.

  python tools/evaluate.py --model ckpts/run --data data/a_valid_text_document data/b_valid_text_document \
      [--samples 0] [--seed 0] [--json out.json]

--model: a megatron-apex checkpoint (root or iter_* directory, saved under any TP/PP layout; read in one
process, a mid-stage APEX checkpoint with its operators fused) or an exported Hugging Face directory.
Each --data prefix is read as the trainer reads data.valid_data_path with train.seed = --seed: the
default seed 0 measures every model on the same tokens, whatever seed it trained with. --samples 0 (the
default) reads one whole pass over each dataset. Prints a table; --json writes the numbers.
Exit codes: 0 ok, 2 bad input.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory or Hugging Face model directory")
    ap.add_argument("--data", required=True, nargs="+", help="indexed dataset prefixes (without .bin/.idx)")
    ap.add_argument("--samples", type=int, default=0, help="samples per dataset (0: one pass over it)")
    ap.add_argument("--seed", type=int, default=0, help="order of the samples (the same for every model)")
    ap.add_argument("--seq-length", type=int, help="tokens per sample (default: the checkpoint's data.seq_length)")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--data-cache-path", help="where the sample indices are cached (default: beside each dataset)")
    ap.add_argument("--json", help="write the results as JSON")
    args = ap.parse_args(argv)
    for flag, value, low in (("--samples", args.samples, 0), ("--micro-batch-size", args.micro_batch_size, 1),
                             ("--seq-length", args.seq_length, 1)):
        if value is not None and value < low:
            ap.error(f"{flag} {value}: must be >= {low}")
    warnings.filterwarnings("ignore")
    from megatron_apex.analysis.checkpoint_io import check_output_file, write_json
    from megatron_apex.analysis.evaluate import evaluate, format_table
    from megatron_apex.cli import quiet_third_party_output
    from megatron_apex.convert.mapping import ConversionError
    from megatron_apex.training.checkpoint import CheckpointError

    quiet_third_party_output()
    try:
        if args.json:
            check_output_file(args.json, "--json")
        result = evaluate(args.model, args.data, num_samples=args.samples, seed=args.seed,
                          micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                          cache_path=args.data_cache_path)
    except (CheckpointError, ConversionError, ValueError, OSError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    print(f"{result['model']} ({result['kind']}; {result['seq_length']}-token samples, order seed {result['eval_seed']})")
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
