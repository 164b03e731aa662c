"""`hdmap-ad checkpoint`: verify a checkpoint file, or convert an old pickle-based one.

    hdmap-ad checkpoint verify models/model.safetensors
    hdmap-ad checkpoint migrate old-model.pt models/model.safetensors

Checkpoints are safetensors files whose content hash is checked on every load (see
hdmap_ad.core.checkpoint). Files written by hdmap-ad before that (format 1) are torch.save pickles,
which are never loaded as they are, since unpickling can run code; `migrate` reads one through
torch's restricted `weights_only` unpickler (tensors, plain containers, numbers, strings and
numpy arrays; any other object is refused) and writes the new format.

This module keeps its top-level imports light: every `hdmap-ad` call imports it to build the parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_migrate(args: argparse.Namespace) -> int:
    from hdmap_ad.core import checkpoint

    digest = checkpoint.migrate(Path(args.old), Path(args.new))
    print(
        f"{args.new}: written as a format-{checkpoint.FORMAT_VERSION} checkpoint (sha256 {digest}); "
        f"{args.old} is left as it was",
        file=sys.stderr,
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from hdmap_ad.core import checkpoint

    payload, digest = checkpoint.read(Path(args.file))
    kind = "training state" if "optimizer" in payload else "model"
    print(
        f"{args.file}: format {checkpoint.FORMAT_VERSION} {kind}, content matches its hash (sha256 {digest}); "
        f"step {payload.get('step')}, domains {', '.join(map(str, payload.get('domains') or [])) or '?'}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "checkpoint",
        parents=[common],
        help="verify a checkpoint file, or convert an old pickle-based one",
        description=__doc__.split("\n\nThis module")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="checkpoint_action", required=True, metavar="ACTION")
    m = actions.add_parser(
        "migrate",
        help="convert a format-1 (torch.save) checkpoint to the current format",
        description="Read OLD with torch's restricted weights_only unpickler and write NEW in the "
        "current format (OLD is not changed). Migrate only files you trust.",
    )
    m.add_argument("old", metavar="OLD", help="the format-1 checkpoint")
    m.add_argument("new", metavar="NEW", help="the file to write")
    m.set_defaults(func=run_migrate)
    v = actions.add_parser("verify", help="check a checkpoint's content hash and print what it holds")
    v.add_argument("file", metavar="FILE")
    v.set_defaults(func=run_verify)
    return p
