"""`hdmap-ad checkpoint`: verify a checkpoint file, or convert an old pickle-based one.

    hdmap-ad checkpoint verify models/model.safetensors [--run RUN_ID]
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

from hdmap_ad.apps.parsing import add_command


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
    from hdmap_ad.core import checkpoint, signing

    path = Path(args.file)
    signed = " and its signature" if signing.signing_key() is not None else ""
    if path.suffix == ".onnx":  # an exported model: its own content hash (and signature), then its source
        from hdmap_ad.core.onnx_scorer import HASH_KEY, OnnxScorer

        scorer = OnnxScorer(path)
        digest, model_sha = scorer.info[HASH_KEY], scorer.info.get("model_sha256")
        print(
            f"{path}: exported ONNX model, content matches its hash{signed} (sha256 {digest}); from checkpoint sha256 {model_sha}"
        )
    else:
        payload, digest = checkpoint.read(path)
        model_sha = digest
        kind = "training state" if "optimizer" in payload else "model"
        print(
            f"{path}: format {checkpoint.FORMAT_VERSION} {kind}, content matches its hash{signed} (sha256 {digest}); "
            f"step {payload.get('step')}, domains {', '.join(map(str, payload.get('domains') or [])) or '?'}"
        )
    if args.run:
        recorded, uri = run_model_sha256(args)
        if recorded != model_sha:
            from hdmap_ad.core.errors import HdmapError

            raise HdmapError(
                f"{path}: not the model MLflow run {args.run} trained (file {str(model_sha)[:12]}, the run's "
                f"model_sha256 {recorded[:12]} in {uri}); altered, or from another run"
            )
        print(f"{path}: the model MLflow run {args.run} trained (its model_sha256 tag in {uri})")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from hdmap_ad.core import checkpoint

    digest = checkpoint.sign_file(Path(args.file))
    print(f"{args.file}: signed (sha256 {digest})")
    return 0


def run_model_sha256(args: argparse.Namespace) -> tuple[str, str]:
    """The `model_sha256` tag of run `args.run` and the store URI (MLFLOW_TRACKING_URI > --params)."""
    from hdmap_ad.core.config import load_params
    from hdmap_ad.core.errors import HdmapError
    from hdmap_ad.pipeline import tracking
    from hdmap_ad.pipeline.store_check import check_store, short_http_timeouts

    configured = load_params(args.params, args.set).mlflow.tracking_uri if Path(args.params).is_file() else None
    uri = tracking.tracking_uri(configured)
    check_store(uri, write=False)
    import mlflow

    try:
        with short_http_timeouts():
            tags = mlflow.MlflowClient(uri).get_run(args.run).data.tags
    except mlflow.exceptions.MlflowException as err:
        first = (str(err.message).strip().splitlines() or ["?"])[0][:200]
        raise HdmapError(f"--run {args.run}: not found in the MLflow store {uri} ({first})") from None
    recorded = tags.get("model_sha256")
    if not recorded:
        raise HdmapError(f"--run {args.run}: records no model_sha256 in {uri} (not a finished training run)")
    return recorded, uri


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = add_command(
        sub,
        common,
        "checkpoint",
        "verify a checkpoint file, or convert an old pickle-based one",
        __doc__.split("\n\nThis module")[0],
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
    v = actions.add_parser(
        "verify",
        help="check a checkpoint's (or exported .onnx model's) content hash, signature and source run",
        description="Check FILE's recorded content hash (and, with HDMAP_AD_SIGNING_KEY set, its signature); with\n"
        "--run, also that it is the model that MLflow run trained (the run's model_sha256 tag; for an .onnx\n"
        "file, the checkpoint it was exported from).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("file", metavar="FILE")
    v.add_argument("--run", metavar="RUN_ID", help="the MLflow run that should have trained it")
    s = actions.add_parser(
        "sign",
        help="sign a checkpoint you trust with the shared key (HDMAP_AD_SIGNING_KEY or HDMAP_AD_SIGNING_KEY_FILE)",
        description="Check FILE's content hash and write it again with the signature of the shared key. Sign only\n"
        "files you trust: verify them against their run first (`checkpoint verify FILE --run RUN_ID`).",
    )
    s.add_argument("file", metavar="FILE")
    s.set_defaults(func=run_sign)
    v.set_defaults(func=run_verify)
    return p
