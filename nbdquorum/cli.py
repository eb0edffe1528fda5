"""Command line: ``nbdquorum serve`` (the server), ``ctl`` (the operator's client), ``drill``.

This is only the entry point: each subcommand lives in its own module
(serve.py, ctl.py, drill/), which registers its parser and runs it.  The
arrows point one way: this module imports them, none of them imports it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from nbdquorum import __version__, ctl, drill, serve


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdquorum",
        description="NBD server exporting a voted quorum of raw disk images",
    )
    parser.add_argument("--version", action="version", version=f"nbdquorum {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(sub)
    ctl.add_parser(sub)
    drill.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "ctl":
        return ctl.run(args)
    if args.command == "drill":
        return drill.run(args)
    return serve.run(args, parser, argv)
