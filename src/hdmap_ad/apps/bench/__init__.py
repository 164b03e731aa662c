"""`hdmap-ad bench`: speed, memory and FLOP/s of our Dinomaly against anomalib's, side by side.

command (the CLI, cases, subprocess orchestration, tables) runs every phase through worker in a fresh
interpreter; ours and reference are the two implementations' phases, measure the shared timing code.
"""

from hdmap_ad.apps.bench.command import add_parser, cmd_bench

__all__ = ["add_parser", "cmd_bench"]
