"""The topic schemas and the typed records the code uses agree, and bad events are refused with a clear reason."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from schemas import (
    SCHEMA_NAMES,
    BehaviorEvent,
    DeadLetter,
    ModelUpdate,
    ProductChange,
    ShadowDiff,
    TagUpdate,
    WindowTick,
    decode_event,
    load_schema,
    validate,
)
from tagstream.errors import EventDecodeError, SchemaValidationError

RECORDS = {
    "product-change": ProductChange,
    "click": BehaviorEvent,
    "tick": WindowTick,
    "tag-update": TagUpdate,
    "model-update": ModelUpdate,
    "dead-letter": DeadLetter,
    "shadow-diff": ShadowDiff,
}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_example_validates_and_round_trips_through_its_record(name: str) -> None:
    schema = load_schema(name)
    assert schema["examples"], f"{name} has no examples"
    for example in schema["examples"]:
        validate(name, example)
        record = RECORDS[name].from_dict(example)
        again = record.to_dict()
        assert RECORDS[name].from_dict(again) == record
        assert RECORDS[name].decode(orjson.dumps(again)) == record


@pytest.mark.parametrize("name", [n for n in SCHEMA_NAMES if n in RECORDS])
def test_record_fields_are_the_schema_properties(name: str) -> None:
    props = set(load_schema(name)["properties"]) - {"schema_version"}
    fields = {f.name for f in dataclasses.fields(RECORDS[name])}
    assert fields == props


def test_a_missing_required_field_names_the_field() -> None:
    with pytest.raises(SchemaValidationError, match="title"):
        validate(
            "product-change", {"schema_version": 1, "op": "upsert", "product_id": "p", "updated_at": 1, "version": 1}
        )


def test_a_delete_needs_no_title_but_an_unknown_op_is_refused() -> None:
    validate("product-change", {"schema_version": 1, "op": "delete", "product_id": "p", "updated_at": 1, "version": 2})
    with pytest.raises(SchemaValidationError, match="op"):
        validate(
            "product-change", {"schema_version": 1, "op": "merge", "product_id": "p", "updated_at": 1, "version": 2}
        )


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xff\xfe", EventDecodeError),
        (b"[1, 2]", EventDecodeError),
        (None, EventDecodeError),
        (
            b'{"schema_version": 1, "event_type": "view", "product_id": "p", "user_id": "u", "ts": -1}',
            SchemaValidationError,
        ),
        (
            b'{"schema_version": 1, "event_type": "hover", "product_id": "p", "user_id": "u", "ts": 1}',
            SchemaValidationError,
        ),
        (
            b'{"schema_version": 2, "event_type": "view", "product_id": "p", "user_id": "u", "ts": 1}',
            SchemaValidationError,
        ),
        (
            b'{"schema_version": 1, "event_type": "view", "product_id": "a{b}", "user_id": "u", "ts": 1}',
            SchemaValidationError,
        ),
    ],
)
def test_bad_click_events_are_refused(raw: bytes | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_event("click", raw)


def test_product_ids_that_would_break_the_redis_hash_tag_are_refused() -> None:
    for pid in ["a{b", "a}b", "a b", ""]:
        with pytest.raises(SchemaValidationError):
            validate(
                "product-change",
                {"schema_version": 1, "op": "delete", "product_id": pid, "updated_at": 1, "version": 1},
            )


def _upsert_with(attributes: dict[str, str]) -> bytes:
    return orjson.dumps(
        {"schema_version": 1, "op": "upsert", "product_id": "p", "title": "t", "updated_at": 1, "version": 1}
        | {"attributes": attributes}
    )


@pytest.mark.parametrize("spell", [str.lower, str.upper, str.title])
def test_an_attribute_named_like_a_built_in_group_is_refused_by_name_as_training_refuses_it(spell: Any) -> None:
    from training.labels import RESERVED_NAMES

    for reserved in RESERVED_NAMES:
        name = spell(reserved)
        with pytest.raises(SchemaValidationError) as info:
            decode_event("product-change", _upsert_with({"gender": "Men", name: "Shoes"}))
        message = str(info.value)
        assert f"refused key {name!r}" in message and "'gender'" not in message and "category_l1" in message
    # names that only contain or extend a reserved one are attributes like any other
    ok = {"categoryName": "a", "category_l3": "b", "tagsline": "c", "subCategory": "d", "colour": "Red"}
    assert decode_event("product-change", _upsert_with(ok))["attributes"] == ok


def test_a_refused_attribute_key_ending_in_a_newline_is_named() -> None:
    with pytest.raises(SchemaValidationError) as info:
        decode_event("product-change", _upsert_with({"gender": "Men", "colour\n": "Red"}))
    assert "refused key 'colour\\n'" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "named"),
    [(b"null", "null"), (b"[1]", "array"), (b'"x"', "string"), (b"1.5", "number"), (b"true", "boolean")],
)
def test_an_event_that_is_no_json_object_is_named_by_its_json_type(raw: bytes, named: str) -> None:
    """The reason said `got NoneType`, `got list`, `got str`: Python's names for what the producer wrote as JSON."""
    with pytest.raises(EventDecodeError) as refused:
        decode_event("click", raw)
    assert str(refused.value) == f"click: expected a JSON object, got {named}"


def test_unknown_keys_cut_short_keep_their_closing_quote() -> None:
    """The cut dropped each long key's closing quote: `has the unknown keys 'k000xxxx…, 'k001xxxx…, … and 47 more`."""
    event = {"schema_version": 1, "event_type": "view", "product_id": "p", "user_id": "u", "ts": 5}
    long_keys = {f"k{i:03d}" + "x" * 60: 1 for i in range(50)}
    with pytest.raises(SchemaValidationError) as refused:
        decode_event("click", orjson.dumps({**event, **long_keys, "\x7f" * 60: 1}))
    message = str(refused.value)
    assert message.startswith("click: data has the unknown keys 'k000xxx") and message.endswith(" and 48 more")
    shown = message.removeprefix("click: data has the unknown keys ").removesuffix(" and 48 more").split(", ")
    assert len(shown) == 3
    for key in shown:
        assert key.startswith("'k") and key.endswith("…'") and key.count("'") == 2 and len(key) <= 40, key
