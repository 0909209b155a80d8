"""Load, compile and apply the versioned JSON Schemas in this folder (one per topic)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

from schemas.fast import end_anchored, fast_decoder
from tagstream.errors import EventDecodeError, SchemaValidationError

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
SCHEMA_NAMES = ("product-change", "click", "tick", "tag-update", "model-update", "dead-letter", "shadow-diff")


@cache
def load_schema(name: str, version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """Return the parsed JSON Schema `name` (one of SCHEMA_NAMES) at `version`."""
    if name not in SCHEMA_NAMES:
        raise KeyError(f"unknown schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    return json.loads((SCHEMA_DIR / f"{name}.v{version}.json").read_text(encoding="utf-8"))


@cache
def product_id_pattern() -> re.Pattern[str]:
    """The product id rule of the event schemas (one pattern in click, product-change and tag-update), compiled as
    the workers' validators read it (`search`; `$` only at the very end)."""
    return re.compile(end_anchored(load_schema("click")["properties"]["product_id"]["pattern"]))


@cache
def _validator(name: str) -> Callable[[Any], Any]:
    return fastjsonschema.compile(load_schema(name))


MAX_REASON_CHARS = 1000  # an error's wording; the event itself is kept whole beside it (a dead letter's value_b64)
_MAX_KEY_CHARS = 40  # a refused key as an error quotes it


def bounded(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` cut to `limit` characters, saying how many more there were (an error quoting an event's content can
    be longer than the event: a 1 MB event's keys quoted made a dead letter over the producer's 4 MiB limit)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def validate(name: str, obj: Any) -> dict[str, Any]:
    """Check `obj` against schema `name`; raise SchemaValidationError naming the failing field (in at most
    MAX_REASON_CHARS characters)."""
    try:
        _validator(name)(obj)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise SchemaValidationError(bounded(f"{name}: {_explain(exc)}")) from None
    return obj


def quoted(key: Any) -> str:
    """`key` quoted (repr), at most _MAX_KEY_CHARS characters: a longer one is cut inside its quotes, never inside an
    escape, and marked `…` before its closing quote (`'k000xxx…'`)."""
    text = repr(key)
    if len(text) <= _MAX_KEY_CHARS:
        return text
    if not isinstance(key, str):
        return f"{text[: _MAX_KEY_CHARS - 1]}…"
    cut = key[: _MAX_KEY_CHARS - 3]
    while len(text := repr(cut)) > _MAX_KEY_CHARS - 1:  # its escapes (`\x7f`) make the repr longer than the key
        cut = cut[:-1]
    return f"{text[:-1]}…{text[-1]}"


def _keys(keys: list[Any]) -> str:
    """A few of `keys`, each cut short, and how many more."""
    return ", ".join(quoted(k) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array"}


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (`null`, `boolean`, `number`, `string`, `array`, `object`), as errors
    about JSON input name it (not Python's `NoneType`, `list`, `str`)."""
    return "object" if isinstance(value, dict) else _JSON_TYPES.get(type(value), type(value).__name__)


def _explain(exc: fastjsonschema.JsonSchemaValueException) -> str:
    """The validator's message; for a refused object key, which keys (a few) and the rule they break (the validator
    says only "must be named by propertyName definition", or lists every unknown key whole)."""
    definition = exc.definition if isinstance(exc.definition, dict) else {}
    if exc.rule == "additionalProperties" and isinstance(exc.value, dict):
        known = definition.get("properties") or {}
        unknown = [k for k in exc.value if k not in known]
        if unknown:
            return f"{exc.name} has the unknown key{'s' if len(unknown) > 1 else ''} {_keys(unknown)}"
    names = definition.get("propertyNames")
    if exc.rule != "propertyNames" or not isinstance(names, dict) or not isinstance(exc.value, dict):
        return exc.message
    pattern = names.get("pattern")
    anchored = end_anchored(pattern) if isinstance(pattern, str) else None  # `$` not before a final "\n"
    bad = [k for k in exc.value if not isinstance(k, str) or anchored is None or not re.search(anchored, k)]
    rule = names.get("description") or f"names must match {pattern}"
    return f"{exc.name} has the refused key{'s' if len(bad) > 1 else ''} {_keys(bad)}: {rule}"


@cache
def _fast_decoder(name: str) -> Callable[[bytes], dict[str, Any] | None] | None:
    return fast_decoder(name, load_schema(name))


EXACT_INTEGER = 2**53  # below it every integer is a float too, and no other integer reads as the same float


def _is_integer(spec: dict[str, Any]) -> bool:
    kind = spec.get("type")
    return (
        kind == "integer"
        or (isinstance(kind, list) and "integer" in kind)
        or type(spec.get("const")) is int  # `schema_version: 1.0000000000000000001` is no 1
    )


def _integer_paths(props: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for field, spec in props.items():
        if _is_integer(spec):
            paths.append((*prefix, field))
        elif isinstance(spec.get("properties"), dict):  # a nested object: tag-update's and dead-letter's `source`
            paths += _integer_paths(spec["properties"], (*prefix, field))
    return paths


@cache
def _integer_fields(name: str) -> tuple[tuple[str, ...], ...]:
    """The paths of the properties schema `name` types as integers, or whose constant is one (nested objects'
    properties included)."""
    return tuple(_integer_paths(load_schema(name).get("properties") or {}))


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for field in path:
        obj = obj.get(field) if isinstance(obj, dict) else None
    return obj


def _refuse_inexact_integers(name: str, obj: dict[str, Any], raw: bytes) -> None:
    """orjson reads an integer beyond 2^64, or one written with a fraction or an exponent, as a float. From 2^53 on
    that float may not be the number written (`9007199254740993.0` reads as ...992); below it, a fraction too small
    for a float (`5.000000000000000000001` reads as 5.0) would pass as an integer. Both are refused, not changed."""
    floats = [path for path in _integer_fields(name) if isinstance(_at(obj, path), float)]
    if not floats:
        return
    for path in floats:
        if abs(_at(obj, path)) >= EXACT_INTEGER:
            raise SchemaValidationError(
                f"{name}: {'.'.join(path)} is an integer from 2^53 on written with a fraction or an exponent, or "
                "beyond 2^64: it cannot be read exactly (write it as a plain integer within 64 bits)"
            )
    written = json.loads(raw, parse_float=Decimal)  # the numbers as written (only here: an integer written as a float)
    for path in floats:
        value = _at(written, path)
        if isinstance(value, Decimal) and value != value.to_integral_value():
            raise SchemaValidationError(
                f"{name}: {'.'.join(path)} must be an integer: {value} has a fraction (a float would read it as "
                f"{_at(obj, path):.17g})"
            )


def decode_event(name: str, raw: bytes | None) -> dict[str, Any]:
    """Decode one message value (UTF-8 JSON object) and validate it against schema `name`: through the Struct
    compiled from the schema first (schemas/fast.py), and orjson + the validator for whatever that refuses."""
    if raw is None:
        raise EventDecodeError(f"{name}: empty message value (tombstone)")
    fast = _fast_decoder(name)
    if fast is not None and (obj := fast(raw)) is not None:
        return obj
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(f"{name}: {_not_json(raw, exc)}") from None
    if not isinstance(obj, dict):
        raise EventDecodeError(f"{name}: expected a JSON object, got {json_type(obj)}")
    validate(name, obj)
    _refuse_inexact_integers(name, obj, raw)
    return obj


def _not_json(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    """Why `raw` is no JSON text: where its UTF-8 breaks (orjson says "surrogates not allowed" for any bad byte), or
    the parser's message."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"not UTF-8: byte 0x{raw[bad.start]:02x} at offset {bad.start} ({bad.reason})"
    message = str(exc)
    if "surrogate" in message:  # JSON text, but a string no UTF-8 can carry (RFC 8259 §8.2)
        lone = "an escaped lone UTF-16 surrogate (\\ud800–\\udfff), which is no character"
        return bounded(f"a string holds {lone} ({message})")
    if "infinity when parsed as double" in message:
        return bounded(f"a number beyond the range of a double (about ±1.8e308) ({message})")
    return bounded(f"not JSON: {message}")


def encode_event(obj: dict[str, Any]) -> bytes:
    """Serialise an event as compact UTF-8 JSON (the wire format of every topic)."""
    return orjson.dumps(obj)
