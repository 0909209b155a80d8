"""JSON Schemas of tagstream's topics and the typed records checked against them."""

from schemas.records import (
    TICK_KEY,
    BehaviorEvent,
    DeadLetter,
    ModelUpdate,
    ProductChange,
    ShadowDiff,
    SourceRef,
    Tag,
    TagUpdate,
    WindowTick,
)
from schemas.registry import SCHEMA_NAMES, decode_event, encode_event, load_schema, validate

__all__ = [
    "SCHEMA_NAMES",
    "TICK_KEY",
    "BehaviorEvent",
    "DeadLetter",
    "ModelUpdate",
    "ProductChange",
    "ShadowDiff",
    "SourceRef",
    "Tag",
    "TagUpdate",
    "WindowTick",
    "decode_event",
    "encode_event",
    "load_schema",
    "validate",
]
