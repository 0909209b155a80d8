"""The schema-compiled fast decoder (schemas/fast.py) is only a shortcut of `decode_event`: on every input, valid or
not, the records decode exactly as orjson + the JSON Schema validator decode them, and bad input gets the schema's
error."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import fastjsonschema
import orjson
import pytest

import schemas.registry
from schemas import BehaviorEvent, ModelUpdate, ProductChange, load_schema
from schemas.fast import UnsupportedSchema, compile_struct, fast_decoder
from tagstream.errors import TagstreamError

RECORDS = {"click": BehaviorEvent, "model-update": ModelUpdate, "product-change": ProductChange}

ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    1.0,
    2.5,
    -0.5,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    "",
    "x",
    "x" * 128,
    "x" * 129,
    "x" * 200,
    "x" * 201,
    "x" * 2001,
    "a b",
    "a\tb",
    "{x}",
    "ABC",
    "abc",
    "ab",
    "view",
    "purchase",
    "upsert",
    "delete",
    "é" * 128,
    "😀" * 128,
    "😀" * 129,
    [],
    ["x"],
    ["x"] * 20,
    ["x"] * 21,
    [1],
    [None],
    ["x" * 201],
    {},
    {"gender": "Men"},
    {"1bad": "x"},
    {"k": "x" * 201},
    {"k": 1},
    {"k" * 64: "v"},
    {"k" * 65: "v"},
    {"a b": "v"},
    {"gender\n": "Men"},
]
LINE_ENDS = ("\n", "\r\n")  # Python's `$` matches before a final "\n"; the validator's patterns do not


def _line_ended(value: Any) -> list[Any]:
    """`value` (a valid field) with a line end after it, after each of its items or after each of its keys."""
    if isinstance(value, str):
        return [value + end for end in LINE_ENDS]
    if isinstance(value, list) and value:
        return [[v + end for v in value] for end in LINE_ENDS]
    if isinstance(value, dict) and value:
        return [{k + end: v for k, v in value.items()} for end in LINE_ENDS]
    return []


def _decode_old(record: type, raw: bytes | None) -> Any:
    """orjson + the validator alone (the fast path switched off)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(schemas.registry, "_fast_decoder", lambda name: None)
        return _decode_new(record, raw)


def _decode_new(record: type, raw: bytes | None) -> Any:
    try:
        return record.decode(raw)
    except TagstreamError as exc:
        return (type(exc), str(exc))


def _same(old: Any, new: Any) -> bool:
    """Equal outcomes, and numbers of the same type (1299 stays an int: it is stored as text)."""
    if old != new:
        return False
    if isinstance(old, tuple):
        return True
    return all(type(getattr(old, f)) is type(getattr(new, f)) for f in old.__slots__)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()  # big integers too


def _mutations(example: dict[str, Any], schema: dict[str, Any]) -> list[bytes]:
    out = [_dumps(example)]
    for prop in schema["properties"]:
        out.append(_dumps({k: v for k, v in example.items() if k != prop}))
        out += [_dumps({**example, prop: v}) for v in [*ODD_VALUES, *_line_ended(example.get(prop))]]
    out.append(_dumps({**example, "extra": 1}))
    body = _dumps(example)[1:-1]
    out += [
        b"{" + body + b',"product_id":"other"}',  # a duplicate key: the last one counts for both
        b'{"product_id":"first",' + body + b"}",
        b" {" + body + b"} \n",
        b"{" + body + b",}",
        b"[" + body + b"]",
        b"null",
        b"",
        b"{" + body.replace(b'"product_id":"', b'"product_id":"\\ud800') + b"}",
        b"{" + body.replace(b'"product_id":"', b'"product_id":"\xff') + b"}",
        b"{" + body.replace(b'"product_id":"', b'"product_id":"\\u00e9') + b"}",
        b"{" + body.replace(b'"schema_version":1', b'"schema_version":1.0') + b"}",
        b"{" + body.replace(b'"schema_version":1', b'"schema_version":true') + b"}",
        b"{" + body.replace(b'"schema_version":1', b'"schema_version":NaN') + b"}",
    ]
    return out


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_the_fast_path_decodes_every_input_as_the_schema_does(name: str) -> None:
    record = RECORDS[name]
    schema = load_schema(name)
    fast = fast_decoder(name, schema)
    assert fast is not None, "the event schema no longer compiles to a fast path"
    inputs = [None, *itertools.chain.from_iterable(_mutations(e, schema) for e in schema["examples"])]
    taken = 0
    for raw in inputs:
        old, new = _decode_old(record, raw), _decode_new(record, raw)
        assert _same(old, new), (raw, old, new)
        if raw is not None and fast(raw) is not None:
            taken += 1
            assert not isinstance(old, tuple), f"the fast path accepted what the schema refuses: {raw!r}"
    # valid events do take the fast path (integers written 5.0 or beyond int64 do not), and plenty are refused
    assert all(fast(_dumps(example)) is not None for example in schema["examples"])
    accepted = sum(not isinstance(_decode_old(record, raw), tuple) for raw in inputs)
    assert 0.85 * accepted <= taken < len(inputs) / 2, (taken, accepted, len(inputs))


def test_an_integer_written_with_a_zero_fraction_is_the_same_event() -> None:
    plain = {"schema_version": 1, "event_type": "view", "product_id": "p", "user_id": "u", "ts": 1764316805123}
    event = BehaviorEvent.decode(_dumps({**plain, "ts": 1764316805123.0}))
    assert event == BehaviorEvent.decode(_dumps(plain)) and type(event.ts) is int  # same time buckets in Redis


@pytest.mark.parametrize("written", ["9007199254740993.0", "9223372036854775807e0", "18446744073709551617"])
def test_an_integer_that_cannot_be_read_exactly_is_refused_not_changed(written: str) -> None:
    # orjson reads these as floats (9007199254740992.0, 9.223372036854776e18, 1.8446744073709552e19): accepted, the
    # event's time would have been another number than the one written
    raw = f'{{"schema_version":1,"event_type":"view","product_id":"p","user_id":"u","ts":{written}}}'.encode()
    with pytest.raises(TagstreamError, match=r"click: ts is an integer from 2\^53 on .* cannot be read exactly"):
        BehaviorEvent.decode(raw)
    exact = b'{"schema_version":1,"event_type":"view","product_id":"p","user_id":"u","ts":9007199254740991.0}'
    assert BehaviorEvent.decode(exact).ts == 2**53 - 1  # below 2^53 the float is the number written


@pytest.mark.parametrize(
    "written", ["5.000000000000000000001", "1764316805123.0000000000000001", "4.9999999999999999999e0"]
)
def test_an_integer_with_a_fraction_too_small_for_a_float_is_refused(written: str) -> None:
    # each reads as a whole float (5.0, 1764316805123.0, 5.0) and used to be taken as that integer
    raw = f'{{"schema_version":1,"event_type":"view","product_id":"p","user_id":"u","ts":{written}}}'.encode()
    with pytest.raises(TagstreamError, match=r"click: ts must be an integer: .* has a fraction"):
        BehaviorEvent.decode(raw)
    for whole in ("5.000000000000000000000", "5e0", "50E-1"):  # integers, however written
        raw = f'{{"schema_version":1,"event_type":"view","product_id":"p","user_id":"u","ts":{whole}}}'.encode()
        assert BehaviorEvent.decode(raw).ts == 5


def test_the_integer_rules_hold_inside_nested_objects_and_records_read_ints() -> None:
    from schemas import TagUpdate

    update = {
        "schema_version": 1, "product_id": "p", "tags": [], "added": [], "removed": [], "model_version": None,
        "reason": "product-upsert", "source": {"topic": "products", "partition": 0, "offset": 7},
        "event_time": 5, "emit_time": 6, "deleted": False,
    }  # fmt: skip
    raw = orjson.dumps(update).replace(b'"offset":7', b'"offset":9007199254740993.0')
    with pytest.raises(TagstreamError, match=r"tag-update: source\.offset is an integer from 2\^53 on"):
        TagUpdate.decode(raw)
    raw = orjson.dumps(update).replace(b'"partition":0', b'"partition":5.000000000000000000001')
    with pytest.raises(TagstreamError, match=r"tag-update: source\.partition must be an integer: .* has a fraction"):
        TagUpdate.decode(raw)
    written = orjson.dumps({**update, "event_time": 5.0, "source": {**update["source"], "offset": 7.0}})
    read = TagUpdate.decode(written)
    assert (
        type(read.event_time) is int
        and type(read.source.offset) is int
        and read == TagUpdate.decode(orjson.dumps(update))
    )


def test_a_bad_event_gets_the_schema_validators_message() -> None:
    raw = orjson.dumps({"schema_version": 1, "event_type": "view", "product_id": "p", "user_id": "", "ts": 1})
    with pytest.raises(TagstreamError, match=r"click: data\.user_id must be longer than or equal to 1 characters"):
        BehaviorEvent.decode(raw)


def test_a_schema_with_a_keyword_it_does_not_know_gets_no_fast_path() -> None:
    schema = {**load_schema("click"), "minProperties": 3}
    with pytest.raises(UnsupportedSchema, match="minProperties"):
        compile_struct("click", schema)
    # nested object schemas are decoded by the validator alone
    assert fast_decoder("tag-update", load_schema("tag-update")) is None


@pytest.mark.parametrize("pattern", [r"^a\$$", r"a", r"^(a|b)$"])
def test_a_pattern_accepts_on_the_fast_path_exactly_what_the_validator_accepts(pattern: str) -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"s": {"type": "string", "pattern": pattern}},
    }
    fast, validate = fast_decoder("t", schema), fastjsonschema.compile(schema)
    assert fast is not None
    for value in ["a", "a\n", "a\r\n", "a$", "a$\n", "b", "b\n", "ba", "ba\n", "\na", ""]:
        try:
            validate({"s": value})
        except fastjsonschema.JsonSchemaValueException:
            assert fast(_dumps({"s": value})) is None, value
        else:
            assert fast(_dumps({"s": value})) == {"s": value}, value


def _fast_agrees_with_validator(schema: dict[str, Any], raw: bytes) -> bool:
    """The fast path on `raw` either defers (None) or gives what orjson + the validator give, of the same types; it
    never raises (a schema it cannot compile has no fast path)."""
    fast = fast_decoder("t", schema)
    if fast is None or (obj := fast(raw)) is None:
        return True
    try:
        expected = fastjsonschema.compile(schema)(orjson.loads(raw))
    except (orjson.JSONDecodeError, fastjsonschema.JsonSchemaValueException):
        return False
    return obj == expected and all(type(obj[k]) is type(expected[k]) for k in obj)


def test_then_applies_when_the_if_property_is_absent() -> None:
    # `properties` holds for an object without the property, so "if" holds and "then" applies (JSON Schema)
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"op": {"enum": ["upsert", "delete"]}, "title": {"type": "string"}},
        "if": {"properties": {"op": {"const": "upsert"}}},
        "then": {"required": ["title"]},
    }
    fast = fast_decoder("t", schema)
    assert fast is not None
    assert fast(b"{}") is None and _fast_agrees_with_validator(schema, b"{}")
    assert fast(b'{"op":"upsert"}') is None
    assert fast(b'{"title":"t"}') == {"title": "t"}
    assert fast(b'{"op":"delete"}') == {"op": "delete"}


@pytest.mark.parametrize("kind", ["integer", "number"])
def test_an_integer_below_int64_takes_the_slow_path(kind: str) -> None:
    # orjson reads it as a float (and the validator decides on that); msgspec would read it exactly, as an int
    schema = {"type": "object", "additionalProperties": False, "properties": {"n": {"type": [kind, "null"]}}}
    fast = fast_decoder("t", schema)
    assert fast is not None
    for n in [-(2**63) - 1, -(10**22)]:
        raw = _dumps({"n": n})
        assert fast(raw) is None and _fast_agrees_with_validator(schema, raw), n
    assert fast(_dumps({"n": -(2**63)})) == {"n": -(2**63)}


def test_an_object_of_any_values_gets_no_fast_path() -> None:
    # msgspec reads any JSON under it unlike orjson: big integers exactly, and a depth that overflows to_builtins
    schema = {"type": "object", "additionalProperties": False, "properties": {"o": {"type": "object"}}}
    deep = b'{"o":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    for raw in [_dumps({"o": {"a": -(10**22)}}), _dumps({"o": {"a": 2**64}}), deep]:
        assert _fast_agrees_with_validator(schema, raw), raw[:40]


def test_a_required_property_outside_properties_is_never_accepted() -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["a", "b"],
        "properties": {"a": {"type": "string"}},
    }
    assert _fast_agrees_with_validator(schema, b'{"a":"x"}')


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        ({"type": "integer", "minimum": 0.5}, [0, 1, 2]),  # an integer bound msgspec only takes as an int
        ({"type": "number", "minimum": -(2**64)}, [0, -(2**63), 1.5]),  # an int bound beyond int64
        ({"type": "integer", "minimum": 2**63}, [0, 2**63]),
        ({"enum": [0.5, "a"]}, [0.5, "a", 1]),  # literals msgspec does not support
        ({"const": 2**64}, [2**64, 0]),
    ],
)
def test_a_schema_msgspec_cannot_express_does_not_break_decoding(spec: dict[str, Any], values: list[Any]) -> None:
    schema = {"type": "object", "additionalProperties": False, "properties": {"v": spec}}
    for value in values:
        assert _fast_agrees_with_validator(schema, _dumps({"v": value})), value


@pytest.mark.parametrize("count", [100, 101])
def test_a_product_change_takes_at_most_100_attributes_on_either_path(count: int) -> None:
    # Each attribute becomes a tag, written twice in the product's tag update: 16,000 one-letter attributes (a
    # 197 KB event the schema took) made a 1.2 MB update the broker refused, and the worker stopped at it for good.
    schema = load_schema("product-change")
    event = {**schema["examples"][0], "attributes": {f"a{i}": "x" for i in range(count)}}
    raw = _dumps(event)
    assert _fast_agrees_with_validator(schema, raw)
    if count <= 100:
        assert fast_decoder("product-change", schema)(raw) is not None
        assert len(ProductChange.decode(raw).attributes or {}) == count
    else:
        with pytest.raises(TagstreamError, match=r"attributes must contain less than or equal to 100 properties"):
            ProductChange.decode(raw)


def test_schema_version_written_with_a_fraction_is_refused_like_any_integer() -> None:
    base = '{{"schema_version":{v},"event_type":"view","product_id":"p","user_id":"u","ts":5}}'
    with pytest.raises(TagstreamError, match=r"click: schema_version must be an integer: .* has a fraction"):
        BehaviorEvent.decode(base.format(v="1.0000000000000000001").encode())
    assert BehaviorEvent.decode(base.format(v="1.0").encode()).ts == 5  # a zero fraction is still 1


def test_an_error_quoting_the_event_stays_short_and_names_a_few_keys() -> None:
    # the validator listed every unknown key, escaped: a 1 MB event gave a 2.8-million-character error
    event = {"schema_version": 1, "event_type": "view", "product_id": "p", "user_id": "u", "ts": 5}
    raw = _dumps({**event, **{"\x7f" * 100 + str(i): 1 for i in range(5000)}})
    with pytest.raises(TagstreamError) as err:
        BehaviorEvent.decode(raw)
    message = str(err.value)
    assert message.startswith("click: data has the unknown keys '\\x7f") and message.endswith("and 4997 more")
    assert len(message) < 300


def test_a_dead_letters_reason_is_cut_short_and_its_event_kept_whole() -> None:
    from streams.processor import InMessage, dead_letter

    value = b"x" * 300_000
    _, record, _ = dead_letter(InMessage("behavior", 0, 7, b"k", value, 1), RuntimeError("y" * 300_000))
    letter = orjson.loads(record)
    assert len(letter["reason"]) < 1100 and letter["reason"].endswith("… (299000 more characters)")
    assert base64.b64decode(letter["value_b64"]) == value


def test_bytes_that_are_not_utf8_are_named_with_their_offset() -> None:
    raw = b'{"schema_version":1,"event_type":"view","product_id":"p\xff","user_id":"u","ts":5}'
    with pytest.raises(TagstreamError, match=r"click: not UTF-8: byte 0xff at offset 55 \(invalid start byte\)"):
        BehaviorEvent.decode(raw)  # orjson's own words: "surrogates not allowed"


def test_a_name_repeated_in_an_object_keeps_its_last_value_on_either_path() -> None:
    """SPEC §1: not refused; the last value counts, at the top level and in `attributes`, whichever path decodes it."""
    raw = (
        b'{"schema_version":1,"op":"upsert","product_id":"p1","title":"first","updated_at":1,"version":1,'
        b'"attributes":{"colour":"Red","colour":"Blue"},"title":"last"}'
    )
    slow = b'{"schema_version":1.0,' + raw[len(b'{"schema_version":1,') :]  # a zero fraction: the validator's path
    for event in (raw, slow):
        obj = schemas.registry.decode_event("product-change", event)
        assert obj["title"] == "last" and obj["attributes"] == {"colour": "Blue"}
