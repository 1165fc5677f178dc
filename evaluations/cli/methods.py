"""`basin methods`: the taxonomy table (no torch import)."""

from __future__ import annotations

import argparse
import json

HELP = "list merge methods with their taxonomy entries"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", help="only this family (interpolation, permutation_alignment, ...)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import taxonomy
    from taxonomy.core import Family

    family = None
    if args.family:
        try:
            family = Family(args.family)
        except ValueError:
            from taxonomy.errors import unknown

            raise taxonomy.BasinError(unknown("family", args.family, [f.value for f in Family])) from None
    methods = taxonomy.all_methods(family)
    if args.json:
        print(json.dumps([m.to_dict() for m in methods], indent=2))
    else:
        print(taxonomy.table(methods))
    return 0
