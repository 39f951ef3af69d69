#!/usr/bin/env python3
"""Compare training runs: loss curves with seed bands (PNG), final losses with 95 % intervals, paired
differences and tokens-to-match (markdown and JSON).

  python tools/compare_runs.py --group plain/full runs/plain-s1 runs/plain-s2 runs/plain-s3 \
      --group apex/half runs/apex-half-s1 runs/apex-half-s2 runs/apex-half-s3 \
      --metric b_valid_text_document --reference plain/full --out report/cpt

A run is a run directory (TensorBoard events below it, and eval.json from tools/evaluate.py --json if
there) or a run summary JSON. Group names are ARM/LABEL: tokens-to-match is computed per arm against
--reference. --metric names the final value compared: a dataset of eval.json (its file name) or a
TensorBoard tag such as valid/loss. Writes OUT.md, OUT.json and OUT.png (curves of --curve).
Exit codes: 0 ok, 2 bad input.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
                    help="a group name (ARM/LABEL) and its runs; repeat for every group")
    ap.add_argument("--metric", default="valid/loss", help="final value to compare (default: valid/loss)")
    ap.add_argument("--reference", help="group the others are compared with (paired differences, tokens-to-match)")
    ap.add_argument("--curve", default="valid/loss", help="TensorBoard tag to plot (default: valid/loss)")
    ap.add_argument("--out", required=True, help="output prefix: OUT.md, OUT.json, OUT.png")
    args = ap.parse_args(argv)
    from megatron_apex.analysis.checkpoint_io import check_output_file, write_json
    from megatron_apex.analysis.compare import compare, markdown_report, plot_curves, read_run

    groups = {}
    try:
        check_output_file(args.out + ".md", "--out")
        for name, *runs in args.group:
            if not runs:
                raise ValueError(f"--group {name}: no runs given")
            if name in groups:
                raise ValueError(f"--group {name}: given twice")
            groups[name] = [read_run(path) for path in runs]
        result = compare(groups, args.metric, args.reference)
        plot_curves(groups, args.curve, args.out + ".png")
    except (ValueError, OSError) as exc:
        print(f"compare_runs: {exc}", file=sys.stderr)
        return 2
    text = markdown_report(result["groups"], args.metric, result["paired"], result["tokens_to_match"], args.reference)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    write_json(args.out + ".json", result)
    print(text, end="")
    print(f"wrote {args.out}.md, {args.out}.json, {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
