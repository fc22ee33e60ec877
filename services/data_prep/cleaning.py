"""Normalising and deduplicating documents, and the held-out split.

Unicode NFC (not NFKC: NFKC rewrites full-width CJK punctuation and digits,
which changes what users wrote), one newline convention, no control
characters, no trailing spaces. Exact duplicates are found on the normalised
text. The held-out split is decided by each document's hash, so it is the
same on every re-run and no document moves between train and held-out when
others are added.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def document_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class ExactDeduplicator:
    """Remembers the digests of documents seen so far (32 bytes each, ~100 with the
    bytes object and the set's slot: it grows with the corpus)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, digest: bytes) -> bool:
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


def is_heldout(digest: bytes, heldout_fraction: float) -> bool:
    """Stable split: a document's hash decides, not its position."""
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return bucket < heldout_fraction
