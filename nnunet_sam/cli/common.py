"""What every console script shares: logging set-up and one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from nnunet_sam.errors import NnsamError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("numexpr").setLevel(logging.WARNING)  # its thread-count notice is noise here


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], None],
        argv: Sequence[str] | None = None) -> None:
    """Parse arguments, run `body`; an NnsamError becomes 'PROG: error: MESSAGE' and exit status 2."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        body(args)
    except NnsamError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; finished cases are kept, rerun with --continue", file=sys.stderr)
        sys.exit(130)
