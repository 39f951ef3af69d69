#!/usr/bin/env python3
"""Effective rank (Roy & Vetterli) of every weight matrix of a checkpoint, per layer.

  python tools/effective_rank.py --checkpoint ckpts/plain [--compare ckpts/apex] [--json out.json]

erank(W) = exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j over the singular values of W. Matrices:
Q, K, V, O, gate, up, down of every layer, plus embeddings and output layer. Global tensors are read
in one process whatever the layout the checkpoint was saved with. With --compare, each cell shows the
second checkpoint's value and its difference to the first (both must have the same model shape). A
checkpoint saved in the middle of an APEX stage is measured with the stage's operators fused into
its weights, as the export writes it, and the output says so. Exit codes: 0 ok, 2 bad input.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--compare", help="second checkpoint: report its values and the difference")
    ap.add_argument("--json", help="write the numbers as JSON")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_apex.analysis.checkpoint_io import check_output_file, write_json
    from megatron_apex.analysis.effective_rank import checkpoint_effective_ranks, format_table, shape_differences
    from megatron_apex.training.checkpoint import CheckpointError

    try:
        if args.json:
            check_output_file(args.json, "--json")
        first = checkpoint_effective_ranks(args.checkpoint)
        second = checkpoint_effective_ranks(args.compare) if args.compare else None
    except (CheckpointError, ValueError, OSError, KeyError) as exc:
        print(f"effective_rank: {exc}", file=sys.stderr)
        return 2
    differences = shape_differences(first, second) if second is not None else []
    if differences:
        print(f"effective_rank: {args.checkpoint} and {args.compare} are models of different shapes "
              f"({'; '.join(differences)}); their matrices cannot be compared", file=sys.stderr)
        return 2
    print(f"effective rank: {_describe(args.checkpoint, first)}"
          + (f" vs {_describe(args.compare, second)}: value of the second (difference)" if second else ""))
    print(format_table(first, second))
    if args.json:
        try:
            write_json(args.json, {"checkpoint": first, "compare": second})
        except OSError as exc:  # e.g. no permission to write there; the error names the file
            print(f"effective_rank: {exc}", file=sys.stderr)
            return 2
    return 0


def _describe(checkpoint: str, result: dict) -> str:
    fused = ""
    if result["fused_operators"]:
        apex = result["apex"]
        fused = (f", saved during APEX stage {apex['stage']} of {len(apex['boundaries'])}: measured with the "
                 "stage's operators fused into the weights, as exported")
    return f"{checkpoint} (step {result['step']}{fused})"


if __name__ == "__main__":
    sys.exit(main())
