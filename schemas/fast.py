"""A fast path for decoding events: a msgspec Struct type compiled from a topic's JSON Schema.

msgspec parses and checks a message in one C pass (~0.9 µs for a click event against ~4.5 µs for orjson + the
fastjsonschema validator). It is only ever a shortcut, taken by `registry.decode_event`: a message it accepts is
one the schema accepts, decoded to the same dict (tests/unit/test_fast_decode.py checks both on mutations of every
field), and a message it refuses goes through orjson and the validator, so the schema decides and its error message
is the one reported.

The compiler covers the keywords the event schemas use: `type` (one type, or one type and null), `const`, `enum`,
`pattern`, `minLength`, `maxLength`, `minimum`, `maximum`, `items`, `maxItems`, `maxProperties`,
`propertyNames.pattern`, `additionalProperties` (false at the top, a schema inside objects), `required`, and
`if`/`then` of the form "if property P is the constant C (or absent: `properties` holds then too), then these are
required". A schema with any other keyword gets no fast path, nor does one msgspec cannot express (float or
beyond-int64 literals, an object of untyped values). Integers outside int64 always take the slow path: orjson reads
some of them as floats.

Patterns are checked with `re.search`, as fastjsonschema checks them, but with every end anchor `$` written `\\Z`
(`end_anchored`): Python's `$` also matches before a final "\\n", which the validator refuses ("p1\\n" is no
product id).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

import msgspec

__all__ = ["UnsupportedSchema", "fast_decoder"]

_NOT_CHECKED = {"$schema", "$id", "title", "description", "examples"}
_TOP_LEVEL = {"type", "additionalProperties", "required", "properties", "if", "then"} | _NOT_CHECKED
_FIELD = {
    "type",
    "const",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "items",
    "maxItems",
    "propertyNames",
    "additionalProperties",
    "maxProperties",
} | _NOT_CHECKED


class UnsupportedSchema(ValueError):
    """The schema uses a keyword the fast path does not compile."""


# an escaped character, a character class (a "]" right after "[" or "[^" is part of it), or a "$"
_PATTERN_TOKEN = re.compile(r"\\.|\[\^?\]?(?:\\.|[^\\\]])*\]|\$", re.DOTALL)


def end_anchored(pattern: str) -> str:
    """`pattern` with each `$` anchor (not escaped, not in a character class) written `\\Z`, so that it matches
    only at the very end of the string, never before a final "\\n"."""
    return _PATTERN_TOKEN.sub(lambda m: r"\Z" if m[0] == "$" else m[0], pattern)


def _meta(spec: dict[str, Any]) -> msgspec.Meta | None:
    kw: dict[str, Any] = {}
    if "pattern" in spec:
        kw["pattern"] = end_anchored(spec["pattern"])
    if "minLength" in spec:
        kw["min_length"] = spec["minLength"]
    if "maxLength" in spec:
        kw["max_length"] = spec["maxLength"]
    if "maxItems" in spec:
        kw["max_length"] = spec["maxItems"]
    if "minimum" in spec:
        kw["ge"] = spec["minimum"]
    if "maximum" in spec:
        kw["le"] = spec["maximum"]
    return msgspec.Meta(**kw) if kw else None


def _constrained(base: Any, spec: dict[str, Any]) -> Any:
    meta = _meta(spec)
    return Annotated[base, meta] if meta is not None else base


def _field_type(name: str, spec: dict[str, Any]) -> Any:
    unknown = set(spec) - _FIELD
    if unknown:
        raise UnsupportedSchema(f"{name}: keywords {sorted(unknown)}")
    if "const" in spec:
        return Literal[spec["const"]]
    if "enum" in spec:
        return Literal[tuple(spec["enum"])]
    types = spec.get("type")
    names = [types] if isinstance(types, str) else list(types or [])
    nullable = "null" in names
    names = [t for t in names if t != "null"]
    if len(names) != 1:
        raise UnsupportedSchema(f"{name}: type {types!r}")
    kind = names[0]
    if kind == "string":
        base: Any = _constrained(str, spec)
    elif kind == "integer":  # int64 only: integers beyond it take the slow path (orjson reads some as floats)
        base = _int64(spec)
    elif kind == "number":  # ints stay ints, as orjson leaves them (within int64)
        bounds = {k: spec[key] for k, key in (("ge", "minimum"), ("le", "maximum")) if key in spec}
        base = Union[_int64(spec), Annotated[float, msgspec.Meta(**bounds)] if bounds else float]  # noqa: UP007
    elif kind == "array":
        base = _constrained(list[_field_type(f"{name}[]", spec.get("items", {}))], spec)  # type: ignore[misc]
    elif kind == "object":
        key: Any = str
        if "additionalProperties" not in spec:  # values of any JSON: msgspec reads big integers and depth unlike orjson
            raise UnsupportedSchema(f"{name}: object without a schema of its values")
        if "propertyNames" in spec:
            if set(spec["propertyNames"]) - _NOT_CHECKED != {"pattern"}:
                raise UnsupportedSchema(f"{name}: propertyNames {spec['propertyNames']!r}")
            key = Annotated[str, msgspec.Meta(pattern=end_anchored(spec["propertyNames"]["pattern"]))]
        values = spec.get("additionalProperties", {})
        if not isinstance(values, dict):
            raise UnsupportedSchema(f"{name}: additionalProperties {values!r}")
        base = dict[key, _field_type(f"{name}{{}}", values)]  # type: ignore[misc,valid-type]
        if "maxProperties" in spec:
            base = Annotated[base, msgspec.Meta(max_length=spec["maxProperties"])]
    else:
        raise UnsupportedSchema(f"{name}: type {kind!r}")
    return base | None if nullable else base


def _int64(spec: dict[str, Any]) -> Any:
    """An integer within int64, at least the spec's `minimum` (rounded up: an integer is >= 0.5 when it is >= 1) and at
    most its `maximum` (rounded down). Below -2**63 (and above 2**64 - 1) orjson reads an integer as a float, which
    msgspec would read exactly."""
    low = max(math.ceil(spec["minimum"]), _INT64_MIN) if "minimum" in spec else _INT64_MIN
    high = min(math.floor(spec["maximum"]), _INT64_MAX) if "maximum" in spec else _INT64_MAX
    return Annotated[int, msgspec.Meta(ge=low, le=high)]


def _conditional_required(schema: dict[str, Any]) -> Callable[[Any], bool]:
    """The schema's if/then as a check of a decoded Struct (True = satisfied)."""
    if "if" not in schema and "then" not in schema:
        return lambda obj: True
    cond, then = schema.get("if", {}), schema.get("then", {})
    props = cond.get("properties", {})
    if set(cond) != {"properties"} or len(props) != 1 or set(then) != {"required"}:
        raise UnsupportedSchema(f"if/then {cond!r} {then!r}")
    ((prop, test),) = props.items()
    if set(test) != {"const"}:
        raise UnsupportedSchema(f"if: {test!r}")
    value, needed = test["const"], tuple(then["required"])
    # `properties` holds for an object without P, so "then" applies when P is absent too
    return lambda obj: (
        ((present := getattr(obj, prop, _ABSENT)) is not _ABSENT and present != value)
        or all(getattr(obj, n, _ABSENT) is not _ABSENT for n in needed)
    )


_ABSENT = msgspec.UNSET
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


def compile_struct(name: str, schema: dict[str, Any]) -> tuple[type[msgspec.Struct], Callable[[Any], bool]]:
    """The Struct type `schema` compiles to (absent optional fields are `msgspec.UNSET`), and its if/then check."""
    unknown = set(schema) - _TOP_LEVEL
    if unknown or schema.get("type") != "object" or schema.get("additionalProperties") is not False:
        raise UnsupportedSchema(f"{name}: top level {sorted(unknown) or schema.get('type')!r}")
    required = set(schema.get("required", ()))
    if required - set(schema["properties"]):  # a required property that is not allowed: no object is valid
        raise UnsupportedSchema(f"{name}: required {sorted(required - set(schema['properties']))} not in properties")
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for prop, spec in schema["properties"].items():
        kind = _field_type(prop, spec)
        fields.append((prop, kind) if prop in required else (prop, kind | msgspec.UnsetType, msgspec.UNSET))
    fields.sort(key=len)  # required fields first, as Struct needs
    struct = msgspec.defstruct(f"Fast{name.title().replace('-', '')}", fields, forbid_unknown_fields=True, frozen=True)
    return struct, _conditional_required(schema)


def fast_decoder(name: str, schema: dict[str, Any]) -> Callable[[bytes], dict[str, Any] | None] | None:
    """A function that decodes a message of `schema` to the dict orjson would give (absent optional fields absent),
    or returns None when the message is not one the fast path can vouch for (then the validator decides); None when
    the schema has no fast path."""
    try:
        struct, conditions_hold = compile_struct(name, schema)
        decoder = msgspec.json.Decoder(struct)
    except (UnsupportedSchema, TypeError, ValueError, NotImplementedError, re.error):
        return None  # also what msgspec cannot express (float or big-integer literals, int bounds beyond int64)
    errors = (msgspec.DecodeError, msgspec.ValidationError)
    to_dict = msgspec.to_builtins  # leaves UNSET fields out

    def decode(raw: bytes) -> dict[str, Any] | None:
        try:
            obj = decoder.decode(raw)
        except errors:
            return None
        return to_dict(obj) if conditions_hold(obj) else None

    return decode
