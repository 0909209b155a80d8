"""User ids never reach Redis or logs in clear: they are replaced by a keyed hash."""

from __future__ import annotations

import hashlib
import hmac


def hash_user_id(key: bytes, user_id: str) -> str:
    """HMAC-SHA256 of the user id under `key`, first 16 bytes as hex (SPEC.md §1)."""
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


class UserHasher:
    """`hash_user_id` under one key, with the keyed state prepared once and recent users remembered (shoppers click
    many times; at most `remember` ids are kept, ~2 MB)."""

    def __init__(self, key: bytes, remember: int = 8192) -> None:
        self._prepared = hmac.new(key, digestmod=hashlib.sha256)
        self._remember = remember
        self._known: dict[str, str] = {}

    def __call__(self, user_id: str) -> str:
        """The hashed id of `user_id`."""
        hashed = self._known.get(user_id)
        if hashed is None:
            if len(self._known) >= self._remember:
                self._known.clear()
            mac = self._prepared.copy()
            mac.update(user_id.encode("utf-8"))
            hashed = self._known[user_id] = mac.hexdigest()[:32]
        return hashed
