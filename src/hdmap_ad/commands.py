"""Subcommands that live beside their own module (compare, grid, predict, bench).

Each such module defines `add_parser(sub, common)`; list it here to make it a `hdmap-ad` command.
"""

from __future__ import annotations

import argparse
import importlib

COMMAND_MODULES: list[str] = ["hdmap_ad.predict", "hdmap_ad.compare", "hdmap_ad.grid", "hdmap_ad.bench",
                              "hdmap_ad.checkpoint_cli"]


def register_all(sub: "argparse._SubParsersAction", common: argparse.ArgumentParser) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub, common)
