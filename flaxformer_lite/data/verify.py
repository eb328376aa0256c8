"""Check a token store whole against its checksums (checksums.py), e.g. after copying it to another machine:

    python -m flaxformer_lite.data.verify stores/shakespeare

Exit 0 when it is intact; 1 with one line per problem (damaged token blocks, offsets, counts, a swapped tokenizer);
2 when the folder is not a token store. A run checks each block as it first reads it anyway: this is the whole
store at once, at disk speed.
"""
from __future__ import annotations

import argparse
import sys

from .checksums import verify_store


def main(argv=None) -> int:
    """``python -m flaxformer_lite.data.verify FOLDER [--quiet]``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the token store folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        problems = verify_store(args.folder, progress=not args.quiet)
    except ValueError as err:
        print(f"verify: error: {err}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"verify: {line}", file=sys.stderr)
    if not problems:
        print(f"{args.folder}: intact (every token block, the offsets, the counts and the tokenizer)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
