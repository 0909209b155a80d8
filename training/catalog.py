"""The canonical catalog record that every loader produces and `--format jsonl` reads (no TensorFlow here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JSONL_KEYS = (
    "product_id",
    "title",
    "category_path",
    "attributes",
    "tags",
    "description",
    "brand",
    "price",
    "currency",
    "source",
)  # the keys of a product `--format jsonl` reads (`CatalogProduct.to_json`); `training.loaders` names any other


@dataclass(frozen=True, slots=True)
class CatalogProduct:
    """One product of a training catalog.

    JSONL form, one object per line: {"product_id", "title", "description", "brand", "price", "currency",
    "category_path": [L1, L2, ...], "attributes": {name: value}, "tags": [extra tag, ...]}; only product_id and
    title are required. Attribute values are strings or numbers (a number is kept as its JSON text, `42` → "42"),
    tags are strings, price is a number ≥ 0; null means absent (`training.loaders` skips rows that break this).
    """

    product_id: str
    title: str
    description: str | None = None
    brand: str | None = None
    price: float | None = None
    currency: str | None = None
    category_path: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    # Where the product came from (shop, merchant, site): used for out-of-domain splits, never as a feature.
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The canonical JSONL object of this product."""
        return {
            "product_id": self.product_id,
            "title": self.title,
            "description": self.description,
            "brand": self.brand,
            "price": self.price,
            "currency": self.currency,
            "category_path": list(self.category_path),
            "attributes": dict(self.attributes),
            "tags": list(self.tags),
            "source": self.source,
        }
