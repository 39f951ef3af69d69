#!/usr/bin/env python3
"""Heat map of the APEX scores and P/N selections stored in a checkpoint saved during APEX training.

  python tools/apex_report.py --checkpoint ckpts/run1 --output heatmap.png [--json votes.json]

--checkpoint: a checkpoint root (latest iteration) or an iter_* directory. One panel for attention
units, one for FFN channels; layers x units, this stage's vote counts (summed over data-parallel
ranks) as color, or the raw score (summed norms, or their moving average) for a run with
apex.statistic 'norm' or 'ema'; P marked with filled and N with open triangles. Exit codes: 0 ok,
2 bad input.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--output", required=True, help="PNG file to write")
    ap.add_argument("--json", help="also write scores (votes, raw) and selections as JSON")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_apex.analysis.apex_report import marks, render, report_data
    from megatron_apex.analysis.checkpoint_io import check_output_file, write_json
    from megatron_apex.training.checkpoint import CheckpointError

    try:
        check_output_file(args.output, "--output")
        if args.json:
            check_output_file(args.json, "--json")
        data = report_data(args.checkpoint)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"apex_report: {exc}", file=sys.stderr)
        return 2
    try:
        render(data, args.output, args.title)
        print(f"wrote {args.output} (step {data['step']}, stage {data['stage']}, layout {data['layout']})")
        if args.json:
            out = {"step": data["step"], "stage": data["stage"], "finished": data["finished"],
                   "statistic": data["statistic"], "votes": {k: v.tolist() for k, v in data["votes"].items()},
                   "raw": {k: v.tolist() for k, v in data["raw"].items()},
                   "selection": {str(li): {k: {"P": marks(sel, k, "P"), "N": marks(sel, k, "N"),
                                                "p_pos": marks(sel, k, "p_pos"), "n_pos": marks(sel, k, "n_pos")}
                                           for k in data["votes"]} for li, sel in data["selection"].items()}}
            write_json(args.json, out)
    except OSError as exc:  # e.g. no permission to write there; the error names the file
        print(f"apex_report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
