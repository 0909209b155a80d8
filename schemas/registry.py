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
def _validator(name: str) -> Callable[[Any], Any]:
    return fastjsonschema.compile(load_schema(name))


def validate(name: str, obj: Any) -> dict[str, Any]:
    """Check `obj` against schema `name`; raise SchemaValidationError naming the failing field."""
    try:
        _validator(name)(obj)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise SchemaValidationError(f"{name}: {_explain(exc)}") from None
    return obj


def _explain(exc: fastjsonschema.JsonSchemaValueException) -> str:
    """The validator's message; for a refused object key, which key and the rule it breaks (the validator only says
    "must be named by propertyName definition")."""
    names = (exc.definition or {}).get("propertyNames") if isinstance(exc.definition, dict) else None
    if exc.rule != "propertyNames" or not isinstance(names, dict) or not isinstance(exc.value, dict):
        return exc.message
    pattern = names.get("pattern")
    anchored = end_anchored(pattern) if isinstance(pattern, str) else None  # `$` not before a final "\n"
    bad = [k for k in exc.value if not isinstance(k, str) or anchored is None or not re.search(anchored, k)]
    rule = names.get("description") or f"names must match {pattern}"
    shown = ", ".join(repr(k) for k in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"{exc.name} has the refused key{'s' if len(bad) > 1 else ''} {shown}: {rule}"


@cache
def _fast_decoder(name: str) -> Callable[[bytes], dict[str, Any] | None] | None:
    return fast_decoder(name, load_schema(name))


EXACT_INTEGER = 2**53  # below it every integer is a float too, and no other integer reads as the same float


@cache
def _integer_fields(name: str) -> tuple[str, ...]:
    """The top-level properties schema `name` types as integers."""
    props = load_schema(name).get("properties") or {}
    return tuple(
        field
        for field, spec in props.items()
        if spec.get("type") == "integer" or (isinstance(spec.get("type"), list) and "integer" in spec["type"])
    )


def _refuse_inexact_integers(name: str, obj: dict[str, Any], raw: bytes) -> None:
    """orjson reads an integer beyond 2^64, or one written with a fraction or an exponent, as a float. From 2^53 on
    that float may not be the number written (`9007199254740993.0` reads as ...992); below it, a fraction too small
    for a float (`5.000000000000000000001` reads as 5.0) would pass as an integer. Both are refused, not changed."""
    floats = [f for f in _integer_fields(name) if isinstance(obj.get(f), float)]
    if not floats:
        return
    for field in floats:
        if abs(obj[field]) >= EXACT_INTEGER:
            raise SchemaValidationError(
                f"{name}: {field} is an integer from 2^53 on written with a fraction or an exponent, or beyond 2^64: "
                "it cannot be read exactly (write it as a plain integer within 64 bits)"
            )
    written = json.loads(raw, parse_float=Decimal)  # the numbers as written (only here: an integer written as a float)
    for field in floats:
        value = written.get(field) if isinstance(written, dict) else None
        if isinstance(value, Decimal) and value != value.to_integral_value():
            raise SchemaValidationError(
                f"{name}: {field} must be an integer: {value} has a fraction (a float would read it as "
                f"{obj[field]:.17g})"
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
        raise EventDecodeError(f"{name}: not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EventDecodeError(f"{name}: expected a JSON object, got {type(obj).__name__}")
    validate(name, obj)
    _refuse_inexact_integers(name, obj, raw)
    return obj


def encode_event(obj: dict[str, Any]) -> bytes:
    """Serialise an event as compact UTF-8 JSON (the wire format of every topic)."""
    return orjson.dumps(obj)
