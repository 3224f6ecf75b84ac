"""The tokenizer fingerprint, one scheme for every backend."""
from __future__ import annotations

import hashlib
from typing import Iterable


def tokenizer_fingerprint(pieces: Iterable[bytes], eos_token_ids: Iterable[int], bos_token_id: int) -> str:
    """sha256 over id -> bytes in id order, then the special ids: equal fingerprints
    mean token ids mean the same thing on both workers, so prefixes can travel as ids."""
    h = hashlib.sha256()
    for piece in pieces:
        h.update(len(piece).to_bytes(4, "little"))
        h.update(piece)
    h.update(repr((sorted(eos_token_ids), bos_token_id)).encode())
    return h.hexdigest()
