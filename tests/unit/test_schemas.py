"""The topic schemas and the typed records the code uses agree, and bad events are refused with a clear reason."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import fastjsonschema
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
    decode_event,
    load_schema,
    validate,
)
from schemas.registry import _fast_check
from tagstream.errors import EventDecodeError, SchemaValidationError

RECORDS = {
    "product-change": ProductChange,
    "click": BehaviorEvent,
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


def test_the_fast_click_check_accepts_only_what_the_schema_accepts() -> None:
    fast = _fast_check("click")
    full = fastjsonschema.compile(load_schema("click"))
    assert fast is not None and _fast_check("product-change") is None  # nested schemas get no fast check
    rng = random.Random(11)
    odd_values: list[Any] = [None, True, False, 0, -1, 1.0, 2.5, "", "x", "a b", "p{1}", "p1\n", "é" * 129, "u" * 128,
                             [], {}, "view", "purchase", "VIEW", 1, 2**63]  # fmt: skip
    names = ["schema_version", "event_type", "product_id", "user_id", "session_id", "ts", "extra"]
    agreed = fast_accepted = 0
    for _ in range(20_000):
        event: dict[str, Any] = {"schema_version": 1, "event_type": "view", "product_id": "jd-1", "user_id": "u-1",
                                 "session_id": "s", "ts": 1_764_316_800_000}  # fmt: skip
        for _ in range(rng.randint(0, 2)):
            name = rng.choice(names)
            if rng.random() < 0.2:
                event.pop(name, None)
            else:
                event[name] = rng.choice(odd_values)
        try:
            full(event)
            valid = True
        except fastjsonschema.JsonSchemaValueException:
            valid = False
        accepted = fast(event)
        assert not accepted or valid, event  # never accepts what the schema refuses
        fast_accepted += accepted
        agreed += accepted == valid
    assert fast_accepted > 3000 and agreed > 0.95 * 20_000  # and it is the common path for valid events
