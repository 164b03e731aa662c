"""What every `hdmap-ad` subcommand's parser shares: the common options, the description printed as
written, and comma lists of integers."""

from __future__ import annotations

import argparse


def add_command(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser, name: str, help: str, description: str | None
) -> argparse.ArgumentParser:
    """The subcommand `name` with the common options (--params, --set); `description` (default: `help`) keeps
    its line breaks in `--help`."""
    return sub.add_parser(
        name,
        parents=[common],
        help=help,
        description=description or help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def doc_body(doc: str | None) -> str | None:
    """A module docstring without its first paragraph (the summary): a subcommand's `--help` description."""
    return doc.split("\n\n", 1)[1] if doc and "\n\n" in doc else doc


def int_list(text: str) -> list[int]:
    """`42,43` -> [42, 43] (an argparse type: a bad value is argparse's one-line usage error)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int_list(text: str) -> list[int]:
    """int_list, at least one value, each > 0."""
    values = int_list(text)
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
