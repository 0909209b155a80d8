"""JSON Schemas of tagstream's topics and the typed records checked against them."""

from schemas.records import (
    BehaviorEvent,
    DeadLetter,
    ModelUpdate,
    ProductChange,
    ShadowDiff,
    SourceRef,
    Tag,
    TagUpdate,
)
from schemas.registry import SCHEMA_NAMES, decode_event, encode_event, load_schema, validate

__all__ = [
    "SCHEMA_NAMES",
    "BehaviorEvent",
    "DeadLetter",
    "ModelUpdate",
    "ProductChange",
    "ShadowDiff",
    "SourceRef",
    "Tag",
    "TagUpdate",
    "decode_event",
    "encode_event",
    "load_schema",
    "validate",
]
