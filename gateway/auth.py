"""Bearer-token API keys from configuration and/or a mounted file.

Keys are compared as SHA-256 digests with hmac.compare_digest against every
configured key, so neither the key's content nor its length shows in the timing.
The file is re-read when its mtime or size changes (a rotated Kubernetes secret
takes effect without a restart). Keys are never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

log = logging.getLogger("glimprouter.gateway")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


class KeyStore:
    def __init__(self, keys: tuple[str, ...] | list[str] = (), path: str = "") -> None:
        self._static = [_digest(k) for k in keys if k]
        self._path = Path(path) if path else None
        self._stamp: tuple[int, int] | None = None
        self._from_file: list[bytes] = []
        if self._path is not None:
            self._reload(required=True)

    def _reload(self, required: bool = False) -> None:
        assert self._path is not None
        try:
            st = self._path.stat()
        except OSError as exc:
            if required:
                raise SystemExit(f"cannot read the API keys file {self._path}: {exc.strerror}") from None
            # A secret being swapped can vanish for a moment: keep the last keys.
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._from_file = [_digest(k) for k in parse_keys(self._path.read_text())]
        self._stamp = stamp
        log.info("loaded %d API key(s) from %s", len(self._from_file), self._path)

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self._path is not None

    def check(self, presented: str) -> bool:
        if self._path is not None:
            self._reload()
        got = _digest(presented)
        ok = False
        for want in self._static + self._from_file:
            # No early exit: every key is compared.
            ok |= hmac.compare_digest(got, want)
        return ok


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()

