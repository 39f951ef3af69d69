#!/usr/bin/env python3
"""Build the offline demo corpus (train.jsonl / valid.jsonl) from Python's standard library source."""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apex.data.demo_corpus import build_demo_corpus  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-mb", type=float, default=8.0, help="cap on source text used (default 8 MB)")
    parser.add_argument("--valid-percent", type=float, default=5.0, help="share of files in valid.jsonl")
    parser.add_argument("--stdlib-dir", default=None, help="override the standard-library directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        counts = build_demo_corpus(args.output_dir, int(args.max_mb * 1e6), args.valid_percent, args.stdlib_dir)
    except (OSError, ValueError) as exc:
        logging.error("error: %s", exc)
        return 2
    print(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
