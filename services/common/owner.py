"""Who owns a session: the gateway's API key, as the router stores it.

The gateway sends the router an owner id with every call, in gRPC metadata: a
SHA-256 of the caller's API key (never the key). The router writes it into a new
session's meta hash and answers any later call for that session whose owner id
differs as if the session did not exist (NOT_FOUND), so one key cannot read,
continue or cancel another key's sessions, nor learn that they exist. A call
without an owner id (no keys configured, or a client of the router itself) owns
the sessions created without one. The router trusts this metadata: only callers
it authenticates (mutual TLS, see docs/security.md) should reach it.
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable

METADATA_KEY = "x-glimprouter-owner"
_VALID = re.compile(r"^[0-9a-f]{64}$")


def owner_id(api_key: str) -> str:
    # Domain-separated, so the stored value is not simply the key's bare digest.
    return hashlib.sha256(b"glimprouter-session-owner\x00" + api_key.encode()).hexdigest()


def from_metadata(metadata: Iterable[tuple[str, object]] | None) -> str | None:
    """The caller's owner id ("" when it sent none); None when it sent a malformed one."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return text if _VALID.match(text) else None
    return ""
