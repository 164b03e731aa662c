"""Optional HMAC signing of model files, for teams that share them (docs/design.md#pipe-provenance).

A content hash (the checkpoint's `sha256`, the ONNX file's `content_sha256`) catches damage, but
anyone who alters a file can recompute it. With a shared secret key set, saving and exporting also
store `signature = HMAC-SHA256(key, content hash)`, and loading refuses a file that is unsigned or
whose signature does not match: only holders of the key can make a file that loads.

The key: the environment variable HDMAP_AD_SIGNING_KEY (the key itself, at least 16 characters), or
HDMAP_AD_SIGNING_KEY_FILE (a file holding it). Neither set: files are written unsigned and any
signature is not checked.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from hdmap_ad.core.errors import HdmapError

KEY_ENV = "HDMAP_AD_SIGNING_KEY"
KEY_FILE_ENV = "HDMAP_AD_SIGNING_KEY_FILE"
MIN_KEY_LENGTH = 16


def signing_key() -> bytes | None:
    """The shared key, or None when signing is off; a key that is set but unusable is an HdmapError."""
    text = os.environ.get(KEY_ENV)
    source = KEY_ENV
    if not text and os.environ.get(KEY_FILE_ENV):
        path = Path(os.environ[KEY_FILE_ENV])
        try:
            text = path.read_text().strip()
        except OSError as err:
            raise HdmapError(f"{KEY_FILE_ENV}={path}: cannot read the signing key ({err.strerror or err})") from None
        source = f"{KEY_FILE_ENV}={path}"
    if not text:
        return None
    if len(text) < MIN_KEY_LENGTH:
        raise HdmapError(f"{source}: a signing key needs at least {MIN_KEY_LENGTH} characters")
    return text.encode()


def sign(content_hash: str, key: bytes | None = None) -> str | None:
    """The signature of `content_hash` with the configured key (or `key`); None when signing is off."""
    key = key if key is not None else signing_key()
    if key is None:
        return None
    return hmac.new(key, content_hash.encode(), hashlib.sha256).hexdigest()


def check(content_hash: str, signature: str | None, what: str) -> None:
    """With a key set: `signature` must be the key's signature of `content_hash`, else an HdmapError
    naming `what`. Without a key: nothing is checked."""
    key = signing_key()
    if key is None:
        return
    if not signature:
        raise HdmapError(
            f"{what}: not signed, and a signing key is set ({KEY_ENV} / {KEY_FILE_ENV}); "
            "only files saved or exported with the key are accepted"
        )
    if not hmac.compare_digest(str(signature), sign(content_hash, key) or ""):
        raise HdmapError(
            f"{what}: signature does not match the signing key (altered, or signed with another key); not loaded"
        )
