"""Typed records for the topics' events; `to_dict()` output is validated against the JSON Schemas in tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from schemas.registry import decode_event, validate

ProductOp = Literal["upsert", "delete"]
BehaviorType = Literal["view", "click", "add_to_cart", "purchase"]
TagOrigin = Literal["model", "catalog", "behaviour"]
UpdateReason = Literal["product-upsert", "product-delete", "behaviour", "window-expired", "model-swap", "retag"]


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where an event came from: topic, partition, offset (-1 for updates not caused by one event)."""

    topic: str
    partition: int
    offset: int

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> SourceRef:
        """Build from an already validated dict (integers written 5.0 read as int)."""
        return cls(obj["topic"], int(obj["partition"]), int(obj["offset"]))


@dataclass(frozen=True, slots=True)
class ProductChange:
    """An upsert or delete of one product (topic `products`)."""

    op: ProductOp
    product_id: str
    updated_at: int
    version: int
    title: str | None = None
    description: str | None = None
    brand: str | None = None
    price: float | None = None
    currency: str | None = None
    category_hints: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)

    SCHEMA = "product-change"

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ProductChange:
        """Build from an already validated dict."""
        return cls(
            op=obj["op"],
            product_id=obj["product_id"],
            updated_at=int(obj["updated_at"]),  # JSON Schema integers may be written 5.0 (a float here)
            version=int(obj["version"]),
            title=obj.get("title"),
            description=obj.get("description"),
            brand=obj.get("brand"),
            price=obj.get("price"),
            currency=obj.get("currency"),
            category_hints=tuple(obj.get("category_hints") or ()),
            attributes=dict(obj.get("attributes") or {}),
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> ProductChange:
        """Decode and validate a message value."""
        return cls.from_dict(decode_event(cls.SCHEMA, raw))

    def to_dict(self) -> dict[str, Any]:
        """The schema-valid wire form (deletes carry only the required fields)."""
        out: dict[str, Any] = {
            "schema_version": 1,
            "op": self.op,
            "product_id": self.product_id,
            "updated_at": self.updated_at,
            "version": self.version,
        }
        if self.op == "upsert":
            out.update(
                title=self.title,
                description=self.description,
                brand=self.brand,
                price=self.price,
                currency=self.currency,
                category_hints=list(self.category_hints),
                attributes=dict(self.attributes),
            )
        return validate(self.SCHEMA, out)


@dataclass(frozen=True, slots=True)
class BehaviorEvent:
    """One shopper interaction (topic `behavior`)."""

    event_type: BehaviorType
    product_id: str
    user_id: str
    ts: int
    session_id: str | None = None

    SCHEMA = "click"

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> BehaviorEvent:
        """Build from an already validated dict."""
        # positional: one per behaviour event, the worker's hottest call; JSON Schema integers may be written 5.0
        return cls(obj["event_type"], obj["product_id"], obj["user_id"], int(obj["ts"]), obj.get("session_id"))

    @classmethod
    def decode(cls, raw: bytes | None) -> BehaviorEvent:
        """Decode and validate a message value."""
        return cls.from_dict(decode_event(cls.SCHEMA, raw))

    def to_dict(self) -> dict[str, Any]:
        """The schema-valid wire form."""
        out = {"schema_version": 1, **asdict(self)}
        return validate(self.SCHEMA, out)


TICK_KEY = b"{tick}"  # the key of a WindowTick on the behaviour topic: braces are never in a product id


@dataclass(frozen=True, slots=True)
class WindowTick:
    """A control record on the behaviour topic (key `TICK_KEY`): the partition's event time reaches `ts`."""

    ts: int
    worker_id: str

    SCHEMA = "tick"

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> WindowTick:
        """Build from an already validated dict."""
        return cls(int(obj["ts"]), obj["worker_id"])

    @classmethod
    def decode(cls, raw: bytes | None) -> WindowTick:
        """Decode and validate a message value."""
        return cls.from_dict(decode_event(cls.SCHEMA, raw))

    def to_dict(self) -> dict[str, Any]:
        """The schema-valid wire form."""
        return validate(self.SCHEMA, {"schema_version": 1, **asdict(self)})


@dataclass(frozen=True, slots=True)
class Tag:
    """One current tag of a product with its score and where it came from."""

    tag: str
    group: str
    score: float
    origin: TagOrigin


@dataclass(frozen=True, slots=True)
class TagUpdate:
    """A product's full current tag set after a change (topic `tag-updates`)."""

    product_id: str
    tags: tuple[Tag, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    model_version: str | None
    reason: UpdateReason
    source: SourceRef
    event_time: int
    emit_time: int
    deleted: bool = False

    SCHEMA = "tag-update"

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> TagUpdate:
        """Build from an already validated dict."""
        return cls(
            product_id=obj["product_id"],
            tags=tuple(Tag(**t) for t in obj["tags"]),
            added=tuple(obj["added"]),
            removed=tuple(obj["removed"]),
            model_version=obj["model_version"],
            reason=obj["reason"],
            source=SourceRef.from_dict(obj["source"]),
            event_time=int(obj["event_time"]),  # JSON Schema integers may be written 5.0 (a float here)
            emit_time=int(obj["emit_time"]),
            deleted=obj["deleted"],
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> TagUpdate:
        """Decode and validate a message value."""
        return cls.from_dict(decode_event(cls.SCHEMA, raw))

    def to_dict(self, *, check: bool = True) -> dict[str, Any]:
        """The schema-valid wire form (`check=False` skips the schema check: for records built by tagstream
        itself on the hot path; tests check those against the schema)."""
        out = {
            "schema_version": 1,
            "product_id": self.product_id,
            "tags": [{"tag": t.tag, "group": t.group, "score": t.score, "origin": t.origin} for t in self.tags],
            "added": list(self.added),
            "removed": list(self.removed),
            "model_version": self.model_version,
            "reason": self.reason,
            "source": {"topic": self.source.topic, "partition": self.source.partition, "offset": self.source.offset},
            "event_time": self.event_time,
            "emit_time": self.emit_time,
            "deleted": self.deleted,
        }
        return validate(self.SCHEMA, out) if check else out


@dataclass(frozen=True, slots=True)
class ModelUpdate:
    """A model lifecycle event (topic `model-updates`): activate/shadow/promote/rollback or a worker's answer."""

    kind: Literal["activate", "shadow", "promote", "rollback", "model-rejected", "model-activated"]
    model_version: str
    emitted_at: int
    bundle_uri: str | None = None
    sha256: str | None = None
    signature: str | None = None
    worker_id: str | None = None
    reasons: tuple[str, ...] = ()

    SCHEMA = "model-update"

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ModelUpdate:
        """Build from an already validated dict."""
        return cls(
            kind=obj["kind"],
            model_version=obj["model_version"],
            emitted_at=int(obj["emitted_at"]),
            bundle_uri=obj.get("bundle_uri"),
            sha256=obj.get("sha256"),
            signature=obj.get("signature"),
            worker_id=obj.get("worker_id"),
            reasons=tuple(obj.get("reasons") or ()),
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> ModelUpdate:
        """Decode and validate a message value."""
        return cls.from_dict(decode_event(cls.SCHEMA, raw))

    def to_dict(self) -> dict[str, Any]:
        """The schema-valid wire form."""
        out = {"schema_version": 1, **asdict(self), "reasons": list(self.reasons)}
        return validate(self.SCHEMA, out)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input event that could not be processed, kept whole with the reason (topic `dead-letter`)."""

    reason: str
    error_type: str
    source: SourceRef
    key_b64: str | None
    value_b64: str | None
    failed_at: int

    SCHEMA = "dead-letter"

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> DeadLetter:
        """Build from an already validated dict."""
        return cls(
            reason=obj["reason"],
            error_type=obj["error_type"],
            source=SourceRef.from_dict(obj["source"]),
            key_b64=obj["key_b64"],
            value_b64=obj["value_b64"],
            failed_at=int(obj["failed_at"]),
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> DeadLetter:
        """Decode and validate a message value."""
        return cls.from_dict(decode_event(cls.SCHEMA, raw))

    def to_dict(self) -> dict[str, Any]:
        """The schema-valid wire form."""
        out = {"schema_version": 1, **asdict(self)}
        return validate(self.SCHEMA, out)


@dataclass(frozen=True, slots=True)
class ShadowDiff:
    """How the shadow model's tags of one product differ from the active model's (topic `tag-shadow-diffs`)."""

    product_id: str
    active_version: str
    shadow_version: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    agreement: float
    emitted_at: int
    active_tags: tuple[str, ...] = ()
    shadow_tags: tuple[str, ...] = ()
    worker_id: str | None = None

    SCHEMA = "shadow-diff"

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ShadowDiff:
        """Build from an already validated dict."""
        return cls(
            product_id=obj["product_id"],
            active_version=obj["active_version"],
            shadow_version=obj["shadow_version"],
            added=tuple(obj["added"]),
            removed=tuple(obj["removed"]),
            agreement=float(obj["agreement"]),
            emitted_at=int(obj["emitted_at"]),
            active_tags=tuple(obj.get("active_tags") or ()),
            shadow_tags=tuple(obj.get("shadow_tags") or ()),
            worker_id=obj.get("worker_id"),
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> ShadowDiff:
        """Decode and validate a message value."""
        return cls.from_dict(decode_event(cls.SCHEMA, raw))

    def to_dict(self) -> dict[str, Any]:
        """The schema-valid wire form."""
        out = {
            "schema_version": 1,
            **asdict(self),
            "added": list(self.added),
            "removed": list(self.removed),
            "active_tags": list(self.active_tags),
            "shadow_tags": list(self.shadow_tags),
        }
        return validate(self.SCHEMA, out)
