"""Training's label names match what the worker emits and accepts: one `colour` group whichever spelling a catalog
uses, free tags that cannot pass for behaviour or attribute tags, and a warning for attribute names product-change
events cannot carry."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas import validate
from serving.behaviour import BEHAVIOUR_TAGS
from serving.bundle import Thresholds
from serving.decoding import TAG_PREFIXES, TagDecoder, catalog_tags, merge_tags
from tagstream.errors import DataError, SchemaValidationError
from training.catalog import CatalogProduct
from training.cleaning import DataReport, clean_products
from training.labels import build_label_map
from training.loaders import load_catalog

COLOUR_SPELLINGS = [*sorted(TAG_PREFIXES), "COLOR", "BaseColour"]  # SPEC §1: the spellings naming the group `colour`


def _catalog(
    n: int = 24, tags: dict[int, tuple[str, ...]] | None = None, **attrs: tuple[str, str]
) -> list[CatalogProduct]:
    """`n` products over two category paths; each keyword an attribute with (even value, odd value); `tags` the
    free tags of some products by index."""
    return [
        CatalogProduct(
            f"p{i}",
            f"title {i}",
            category_path=("Clothing", "Shirts") if i % 2 else ("Shoes", "Boots"),
            attributes={name: values[i % 2] for name, values in attrs.items()},
            tags=(tags or {}).get(i, ()),
        )
        for i in range(n)
    ]


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """(exit code, stdout, the stderr lines starting with "tagstream ") of `tagstream ARGS`."""
    from tagstream.cli import main

    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith("tagstream ")]


# ---------------------------------------------------------------- one colour group, whichever the spelling


@pytest.mark.parametrize("spelling", COLOUR_SPELLINGS)
def test_every_colour_spelling_trains_the_group_the_worker_names_colour(spelling: str) -> None:
    # before: a catalog spelling `color` trained the group `color`, so the worker emitted model colour tags in group
    # `color` and catalog colour tags in group `colour`, and bundle, metrics and evaluate keys said `color`
    products = _catalog(**{spelling: ("Red", "Blue")})
    lm = build_label_map(products, min_support=3)
    assert "colour" in lm.group_names and spelling not in lm.group_names
    assert lm.labels[lm.index("colour:Red")].group == "colour"
    assert [g["name"] for g in lm.to_json()["groups"]] == lm.group_names  # labels.json: the bundle's group names

    scores = np.zeros((1, len(lm)), np.float32)
    scores[0, lm.index("colour:Red")] = 0.9
    model = TagDecoder(lm.bundle_labels(), Thresholds(0.5, {})).decode(scores)[0]
    catalog = catalog_tags({spelling: "Blue"})
    assert [(t.tag, t.group) for t in model] == [("colour:Red", "colour")]
    assert [(t.tag, t.group) for t in catalog] == [("colour:Blue", "colour")]  # one group name in tag-updates
    assert [t.tag for t in merge_tags(model, catalog, [])] == ["colour:Blue"]

    report = DataReport()
    clean_products(list(enumerate(products, 1)), report)
    assert "colour" in report.label_counts and spelling not in report.label_counts


def test_myntra_base_colour_still_trains_the_group_colour(tmp_path: Path) -> None:
    rows = ["id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"]
    rows += [
        f"{i},Men,Apparel,Topwear,Shirts,{'Navy Blue' if i % 2 else 'White'},Fall,2011,Casual,Shirt number {i}"
        for i in range(12)
    ]
    path = tmp_path / "styles.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    res = load_catalog(path, "myntra")
    lm = build_label_map(res.products, min_support=3)
    assert [lab.tag for lab in lm.labels if lab.group == "colour"] == ["colour:Navy Blue", "colour:White"]
    assert "colour" in res.report.label_counts


def _evaluate(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spelling: str,
    bundle_group: str = "colour",
    bundle_prefix: str = "colour",
) -> tuple[dict[str, Any], list[str]]:
    """(JSON, "tagstream " stderr lines) of `tagstream evaluate --json` of a tiny bundle (labels: tests.tinymodel.
    DEFAULT_LABELS, the colour group renamed `bundle_group`) on 12 products that carry a colour it knows under the
    attribute name `spelling`."""
    from serving.featurizer import Featurizer, FeaturizerConfig
    from tagstream.synth import write_jsonl
    from tests.models import featurizer_files
    from tests.tinymodel import DEFAULT_LABELS, make_bundle

    text = json.dumps(DEFAULT_LABELS).replace('"colour"', json.dumps(bundle_group))
    labels = json.loads(text.replace('"colour:', f'"{bundle_prefix}:'))  # an older bundle's tag prefix
    featurizer = Featurizer.fit(
        [CatalogProduct(f"f{i}", f"Navy Blue shirt {i}") for i in range(6)],
        FeaturizerConfig(hash_bits=10, max_features=32, min_df=1),
    )
    bundle = make_bundle(
        tmp_path / "registry",
        labels=labels,
        L=featurizer.max_features,
        K=featurizer.n_numeric,
        buckets=featurizer.n_buckets,
        featurizer_files=featurizer_files(featurizer),
    )
    products = [
        CatalogProduct(
            f"e{i}",
            f"product {i}",
            category_path=("Clothing", "Shirts"),
            attributes={spelling: ("Black", "Navy Blue")[i % 2]},
        )
        for i in range(12)
    ]
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(products, catalog)
    code, out, err = _cli(
        ["evaluate", "--model", str(bundle), "--catalog", str(catalog), "--format", "jsonl", "--json"], capsys
    )
    assert code == 0, err
    return json.loads(out), err


@pytest.mark.parametrize("spelling", ["color", "Color", "baseColour"])
def test_evaluate_matches_a_colour_group_whichever_spelling_the_catalog_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    # before: a bundle trained on Myntra's baseColour (group `colour`) evaluated on a catalog spelling `color` said
    # "no product has a label the model knows in colour" and gave the group n 0 and null figures
    doc, err = _evaluate(tmp_path, capsys, spelling)
    assert doc["n_unknown"]["colour"] == 0 and doc["groups"]["colour"]["accuracy"] is not None
    assert not any("colour" in line for line in err), err


@pytest.mark.parametrize("spelling", ["colour", "baseColour"])
def test_a_bundle_that_named_its_group_color_still_evaluates_every_spelling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    # bundles trained before this fix on a catalog spelling `color` name the group `color` (tags `colour:X`)
    doc, err = _evaluate(tmp_path, capsys, spelling, bundle_group="color")
    assert doc["n_unknown"]["color"] == 0 and doc["groups"]["color"]["accuracy"] is not None
    assert not any("color" in line for line in err), err


@pytest.mark.parametrize("spelling", ["colour", "Colour", "COLOR", "baseColour"])
def test_a_bundle_that_named_its_group_and_tags_Colour_still_evaluates_every_spelling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    # bundles trained before the twenty-second session on a catalog spelling `Colour` have the group `Colour` and
    # the tags `Colour:X`; a catalog's `colour` now makes `colour:X`, which must still match them
    doc, err = _evaluate(tmp_path, capsys, spelling, bundle_group="Colour", bundle_prefix="Colour")
    assert doc["n_unknown"]["Colour"] == 0 and doc["groups"]["Colour"]["accuracy"] is not None
    assert not any("Colour" in line for line in err), err


# ---------------------------------------------------------------- free tags that look like other tags


def _width(s: str) -> str:
    """`s` in full-width forms (ASCII letters and `-`)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


@pytest.mark.parametrize(
    "tag", [*BEHAVIOUR_TAGS, *(t.upper() for t in BEHAVIOUR_TAGS), *(_width(t) for t in BEHAVIOUR_TAGS), "Hot "]
)
def test_a_free_tag_named_like_a_behaviour_tag_is_refused_in_one_line(tag: str) -> None:
    # before: accepted; the model then emitted e.g. `new` for good (it never turned off with the behaviour window,
    # an update showed no `removed`) or `hot` on products nobody clicked
    products = _catalog(tags={i: ("organic", tag) for i in range(3, 10)})
    with pytest.raises(DataError) as exc:
        build_label_map(products, min_support=3)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"free tag {tag!r} (on 7 products, e.g. p3)"), msg
    assert "reserved for the worker's behaviour tags" in msg and ", ".join(BEHAVIOUR_TAGS) in msg


@pytest.mark.parametrize("tag", ["colour:Red", "category:Sale", "material:cotton"])
def test_a_free_tag_shaped_like_an_attribute_or_category_tag_is_refused(tag: str) -> None:
    # before: `colour:Red` beside a catalog colour failed only as "the tag twice" in the label map, and without one
    # it was learned in group `tags`, where a catalog colour would never replace it
    products = _catalog(tags={i: (tag,) for i in range(4)}, colour=("Red", "Blue"))
    with pytest.raises(DataError) as exc:
        build_label_map(products, min_support=3)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"free tag {tag!r} (on 4 products, e.g. p0) contains ':'"), msg


def test_free_tags_that_only_contain_a_behaviour_word_are_learned() -> None:
    products = _catalog(tags={i: ("newest", "hot deal", "trending-now") for i in range(8)})
    lm = build_label_map(products, min_support=3)
    assert [lab.tag for lab in lm.labels if lab.group == "tags"] == ["hot deal", "newest", "trending-now"]
    assert build_label_map(_catalog(tags={0: ("new",)}), min_support=3, include_tags=False)  # tags not learned


def test_train_refuses_a_free_behaviour_tag_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import training.train
    from tagstream.synth import write_jsonl

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(training.train, "fit", no_fit)
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(_catalog(40, tags={i: ("new",) for i in range(0, 40, 4)}, colour=("Red", "Blue")), catalog)
    code, _, err = _cli(
        ["train", "--catalog", str(catalog), "--format", "jsonl", "--out", str(tmp_path / "models")], capsys
    )
    assert code == 2
    assert len(err) == 1 and err[0].startswith("tagstream train: error: free tag 'new' (on 10 products, e.g. p0)")


# ---------------------------------------------------------------- attribute names events cannot carry


def _event_refuses(name: str) -> bool:
    event = {"schema_version": 1, "op": "upsert", "product_id": "p1", "title": "t", "updated_at": 0, "version": 0}
    try:
        validate("product-change", {**event, "attributes": {name: "x"}})
    except SchemaValidationError:
        return True
    return False


def test_the_data_report_warns_once_of_attribute_names_events_cannot_carry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # before: no word: the model tagged `材质` and `fit type`, and no catalog event could ever replace those tags
    long_name = "a" * 65
    rows = [
        {"product_id": f"p{i}", "title": f"shirt {i}", "category_path": ["A", "B" if i % 2 else "C"]}
        | {"attributes": {name: f"v{i % 2}" for name in ("材质", "fit type", "fit_type", "color", long_name)}}
        for i in range(3)
    ] + [{"product_id": "p9", "title": "plain shirt", "category_path": ["A", "B"], "attributes": {"材质": "麻"}}]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="training.cleaning"):
        res = load_catalog(catalog, "jsonl")

    names = {"材质", "fit type", "fit_type", "color", long_name}
    assert {n for n in names if _event_refuses(n)} == {"材质", "fit type", long_name}  # the schema's verdict
    assert len(res.report.warnings) == 1
    warning = res.report.warnings[0]
    assert f"{long_name!r} (3 products), 'fit type' (3 products), '材质' (4 products)" in warning
    assert "'fit_type'" not in warning and "'color'" not in warning and "'colour'" not in warning
    assert "product-change events cannot carry these names" in warning
    assert "a change that carries one is dead-lettered whole" in warning
    assert "a catalog can never send their values" in warning
    assert [r.getMessage() for r in caplog.records if r.name == "training.cleaning"] == [f"{catalog}: {warning}"]
    assert res.report.to_dict()["warnings"] == [warning] and f"- warning: {warning}" in res.report.to_markdown()
    from training.report import _data_html

    assert "a change that carries one is dead-lettered whole" in _data_html(res.report.to_dict())  # report.html

    lm = build_label_map(res.products, min_support=1)  # a warning, not a refusal: the groups are still learned
    assert {"材质", "fit type", "fit_type", "colour"} <= set(lm.group_names)


def test_a_catalog_whose_attribute_names_events_can_carry_gets_no_warning() -> None:
    report = DataReport()
    clean_products(list(enumerate(_catalog(gender=("Men", "Women"), baseColour=("Red", "Blue")), 1)), report)
    assert report.warnings == [] and report.to_dict()["warnings"] == []


@pytest.mark.parametrize("spelling", COLOUR_SPELLINGS)
def test_the_same_run_baseline_scores_the_colour_group_whichever_the_spelling(spelling: str) -> None:
    from training.baseline import group_tag_functions

    products = _catalog(**{spelling: ("Red", "Blue")})
    tag_of = group_tag_functions(products)
    assert "colour" in tag_of and spelling not in tag_of  # one group, named as the model's
    assert [tag_of["colour"](p) for p in products[:2]] == ["colour:Red", "colour:Blue"]
