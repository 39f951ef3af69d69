#!/usr/bin/env python3
"""Regenerate the README's configuration reference from megatron_apex/config.py (--check: fail on drift)."""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_apex.config import reference_markdown  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(text: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{reference_markdown()}\n{END}", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = open(README, encoding="utf-8").read()
    new = render(text)
    if args.check:
        if new != text:
            print("README configuration reference is out of date: run python tools/sync_readme.py")
            return 1
        return 0
    open(README, "w", encoding="utf-8").write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
