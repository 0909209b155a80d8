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


# The schemas are a contract for other teams, who validate with standard validators: a pattern must mean the same in
# ECMA-262 (JSON Schema's dialect: ajv, Java's validators) and in Python's `re` (the `jsonschema` package, the workers).
ECMA_WHITE_SPACE = (
    "\t\n\v\f\r \xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
PYTHON_WHITE_SPACE = "".join(c for c in map(chr, range(0x110000)) if c.isspace())


def _click_for(product_id: str) -> dict[str, Any]:
    return {"schema_version": 1, "event_type": "view", "product_id": product_id, "user_id": "u", "ts": 1764316800000}


def test_the_product_id_rule_is_one_pattern_in_every_event_schema() -> None:
    rules = {name: load_schema(name)["properties"]["product_id"] for name in ("click", "product-change", "tag-update")}
    assert len({orjson.dumps(rule) for rule in rules.values()}) == 1


def test_every_white_space_of_either_regex_dialect_is_refused_in_a_product_id_by_every_validator() -> None:
    import jsonschema

    standard = jsonschema.Draft202012Validator(load_schema("click"))
    assert set(ECMA_WHITE_SPACE) - set(PYTHON_WHITE_SPACE) == {"\ufeff"}  # the dialects differ both ways
    assert set(PYTHON_WHITE_SPACE) - set(ECMA_WHITE_SPACE) == {"\x1c", "\x1d", "\x1e", "\x1f", "\x85"}
    for space in sorted(set(ECMA_WHITE_SPACE) | set(PYTHON_WHITE_SPACE)):
        event = _click_for(f"a{space}b")
        assert not standard.is_valid(event), repr(space)
        with pytest.raises(SchemaValidationError):
            decode_event("click", orjson.dumps(event))
    for fine in ["p1", "中文-1", "a\u200bb", "a\x1bb", "x" * 128, "é"]:  # zero-width space and ESC are no white space
        assert standard.is_valid(_click_for(fine)) and decode_event("click", orjson.dumps(_click_for(fine)))


def test_a_final_line_break_is_refused_by_pythons_standard_validator_as_by_the_workers() -> None:
    """Python's `$` matches before a final "\\n" too, so each pattern ends `$(?!\\n)`."""
    import jsonschema

    upsert = {"schema_version": 1, "op": "upsert", "product_id": "p", "title": "t", "updated_at": 1, "version": 1}
    request = {"schema_version": 1, "kind": "activate", "model_version": "v1", "bundle_uri": "/m/v1", "emitted_at": 1}
    cases = [
        ("click", _click_for("p1\n")),
        ("product-change", upsert | {"attributes": {"gender\n": "Men"}}),
        ("product-change", upsert | {"currency": "USD\n"}),
        ("model-update", request | {"sha256": "a" * 64 + "\n"}),
    ]
    for name, event in cases:
        assert not jsonschema.Draft202012Validator(load_schema(name)).is_valid(event), event
        with pytest.raises(SchemaValidationError):
            validate(name, event)
        without = orjson.loads(orjson.dumps(event).replace(b"\\n", b""))
        assert jsonschema.Draft202012Validator(load_schema(name)).is_valid(without) and validate(name, without)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'"title":"a\\udc00b"', "escaped lone UTF-16 surrogate"),
        (b'"brand":"\\ud800"', "escaped lone UTF-16 surrogate"),
        (b'"price":1e400', "beyond the range of a double"),
        (b'"price":1' + b"0" * 400, "beyond the range of a double"),
    ],
)
def test_json_a_decoder_cannot_carry_is_refused_saying_why(raw: bytes, reason: str) -> None:
    event = b'{"schema_version":1,"op":"upsert","product_id":"p","title":"t","updated_at":1,"version":1,' + raw + b"}"
    with pytest.raises(EventDecodeError) as info:
        decode_event("product-change", event)
    assert reason in str(info.value) and "not JSON" not in str(info.value)


def test_a_price_beyond_a_double_is_refused_by_the_standard_validator_too() -> None:
    import jsonschema

    upsert = {"schema_version": 1, "op": "upsert", "product_id": "p", "title": "t", "updated_at": 1, "version": 1}
    validator = jsonschema.Draft202012Validator(load_schema("product-change"))
    assert not validator.is_valid(upsert | {"price": float("inf")})  # what Python's json reads 1e400 as
    assert validator.is_valid(upsert | {"price": 1e300}) and decode_event(
        "product-change", orjson.dumps(upsert | {"price": 1e300})
    )
