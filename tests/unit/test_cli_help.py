"""``serve --help`` documents every option, and every default that is not "off"."""

from __future__ import annotations

import argparse

from nbdquorum.cli import make_parser


def serve_parser() -> argparse.ArgumentParser:
    parser = make_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]
    raise AssertionError("no serve subcommand")


def test_every_serve_option_has_help() -> None:
    missing = [a.option_strings[-1] for a in serve_parser()._actions
               if a.help in (None, "") and a.option_strings]
    assert not missing, f"options without help text: {missing}"


def test_every_real_default_is_stated() -> None:
    unstated = []
    for a in serve_parser()._actions:
        if not a.option_strings or a.default in (None, False, [], argparse.SUPPRESS):
            continue
        if isinstance(a, argparse._CountAction):
            continue
        if "default" not in (a.help or ""):
            unstated.append(a.option_strings[-1])
    assert not unstated, f"options whose default the help does not state: {unstated}"
