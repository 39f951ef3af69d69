"""``python -m megatron_apex.train CONFIG [overrides]``: the same as ``megatron-apex train``."""

import sys

from megatron_apex.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
