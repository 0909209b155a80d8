"""Load, compile and apply the versioned JSON Schemas in this folder (one per topic)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

from tagstream.errors import EventDecodeError, SchemaValidationError

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
SCHEMA_NAMES = ("product-change", "click", "tag-update", "model-update", "dead-letter", "shadow-diff")


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
    fast = _fast_check(name)
    if fast is not None and type(obj) is dict and fast(obj):
        return obj
    try:
        _validator(name)(obj)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise SchemaValidationError(f"{name}: {exc.message}") from None
    return obj


# A flat object schema (only these keywords) also gets a fast check compiled from it: it accepts only objects the
# schema accepts, in a fraction of the full validator's time, and anything it does not accept goes to the full
# validator (which accepts it or names the error). The click events of the hot path are such objects.
_FLAT_OBJECT_KEYWORDS = {"$schema", "$id", "title", "description", "type", "additionalProperties", "required",
                         "properties", "examples"}  # fmt: skip
_SIMPLE_PROPERTY_KEYWORDS = {"type", "enum", "const", "pattern", "minLength", "maxLength", "minimum", "maximum",
                             "description", "title", "examples"}  # fmt: skip
_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "null": (type(None),)}
_SCALARS = (str, int, float, bool, type(None))


@cache
def _fast_check(name: str) -> Callable[[dict[str, Any]], bool] | None:
    schema = load_schema(name)
    if (
        schema.get("type") != "object"
        or schema.get("additionalProperties") is not False
        or set(schema) - _FLAT_OBJECT_KEYWORDS
    ):
        return None
    checks: list[tuple[str, Callable[[Any], bool]]] = []
    for prop_name, prop in schema.get("properties", {}).items():
        check = _property_check(prop)
        if check is None:
            return None
        checks.append((prop_name, check))
    required, allowed = frozenset(schema.get("required", ())), frozenset(n for n, _ in checks)

    def fast(obj: dict[str, Any]) -> bool:
        keys = obj.keys()
        if not (required <= keys and keys <= allowed):
            return False
        return all(check(obj[prop_name]) for prop_name, check in checks if prop_name in obj)

    return fast


def _property_check(prop: dict[str, Any]) -> Callable[[Any], bool] | None:
    """True only for values `prop` accepts (False: not sure); None when `prop` uses other keywords or types."""
    if set(prop) - _SIMPLE_PROPERTY_KEYWORDS:
        return None
    type_names = prop.get("type", [])
    type_names = [type_names] if isinstance(type_names, str) else type_names
    if any(t not in _JSON_TYPES for t in type_names):
        return None
    types = tuple(t for n in type_names for t in _JSON_TYPES[n])
    allowed = None
    if "enum" in prop or "const" in prop:
        values = prop["enum"] if "enum" in prop else [prop["const"]]
        allowed = frozenset((type(v), v) for v in values)
    # as fastjsonschema compiles it: every unescaped `$` becomes `\Z` (Python's `$` also matches before a final
    # newline, JSON Schema's does not)
    pattern = re.compile(re.sub(r"(?<!\\)\$", r"\\Z", prop["pattern"])) if "pattern" in prop else None
    min_len, max_len = prop.get("minLength", 0), prop.get("maxLength")
    minimum, maximum = prop.get("minimum"), prop.get("maximum")

    def check(value: Any) -> bool:
        kind = type(value)
        if (types and kind not in types) or (
            allowed is not None and (kind not in _SCALARS or (kind, value) not in allowed)
        ):
            return False
        if kind is str:
            if len(value) < min_len or (max_len is not None and len(value) > max_len):
                return False
            return pattern is None or pattern.search(value) is not None
        if kind is int:
            return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
        return value is None

    return check


def decode_event(name: str, raw: bytes | None) -> dict[str, Any]:
    """Decode one message value (UTF-8 JSON object) and validate it against schema `name`."""
    if raw is None:
        raise EventDecodeError(f"{name}: empty message value (tombstone)")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(f"{name}: not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EventDecodeError(f"{name}: expected a JSON object, got {type(obj).__name__}")
    return validate(name, obj)


def encode_event(obj: dict[str, Any]) -> bytes:
    """Serialise an event as compact UTF-8 JSON (the wire format of every topic)."""
    return orjson.dumps(obj)
