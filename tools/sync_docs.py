#!/usr/bin/env python3
"""Regenerate docs/configuration.md's reference from megatron_apex/config.py (--check: fail on drift)."""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_apex.config import reference_markdown  # noqa: E402

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.md")
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(text: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{reference_markdown()}\n{END}", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = open(DOC, encoding="utf-8").read()
    new = render(text)
    if args.check:
        if new != text:
            print("docs/configuration.md is out of date: run python tools/sync_docs.py")
            return 1
        return 0
    open(DOC, "w", encoding="utf-8").write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
