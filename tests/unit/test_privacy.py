"""User ids are stored only as keyed hashes, the same however they are computed."""

from __future__ import annotations

from streams.privacy import UserHasher, hash_user_id


def test_the_remembering_hasher_gives_the_keyed_hash_of_every_id_even_after_forgetting() -> None:
    hasher = UserHasher(b"key-1", remember=3)
    ids = [f"user-{i % 5}" for i in range(20)] + ["ユーザー", ""]
    assert [hasher(u) for u in ids] == [hash_user_id(b"key-1", u) for u in ids]
    assert len(hasher._known) <= 3


def test_another_key_gives_other_hashes_and_the_id_is_not_in_them() -> None:
    first, second = UserHasher(b"key-1")("alice@example.com"), UserHasher(b"key-2")("alice@example.com")
    assert first != second and len(first) == 32 and "alice" not in first
