"""User ids never reach Redis or logs in clear: they are replaced by a keyed hash."""

from __future__ import annotations

import hashlib
import hmac


def hash_user_id(key: bytes, user_id: str) -> str:
    """HMAC-SHA256 of the user id under `key`, first 16 bytes as hex (SPEC.md §1)."""
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
