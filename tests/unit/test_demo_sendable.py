"""The demo sends a user's catalog as product changes the worker accepts: attributes whose names events cannot carry
are left out (and said), instead of every change that carries one being dead-lettered whole."""

from __future__ import annotations

import io

import orjson
from rich.console import Console

from schemas import decode_event
from tagstream.demo import _sendable
from tagstream.synth import product_change_event
from training.catalog import CatalogProduct


def test_attributes_events_cannot_carry_are_left_out_of_the_demos_events_and_said() -> None:
    products = [
        CatalogProduct(f"p{i}", f"shirt {i}", attributes={"gender": "Men", "fit type": "Slim", "材质": "棉"})
        for i in range(4)
    ] + [CatalogProduct("q", "plain shirt", attributes={"gender": "Women"})]
    out = io.StringIO()
    sent = _sendable(products, Console(file=out, width=200))
    assert [p.attributes for p in sent] == [{"gender": "Men"}] * 4 + [{"gender": "Women"}]
    for p in sent:  # every change decodes: none would be dead-lettered
        decode_event("product-change", orjson.dumps(product_change_event(p, updated_at=1)))
    said = out.getvalue()
    assert "'fit type' (4 products)" in said and "'材质' (4 products)" in said
    plain = [CatalogProduct("r", "shirt", attributes={"gender": "Men"})]
    assert _sendable(plain, Console(file=io.StringIO())) is plain  # nothing to leave out: the catalog as it is
