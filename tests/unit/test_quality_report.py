"""bench/quality.py counts a test product whose label the model cannot output as a miss, as `tagstream evaluate`
does, and keeps the figures without those products beside them."""

from __future__ import annotations

import numpy as np

from bench.quality import group_report


def test_a_label_the_model_cannot_output_is_a_miss_and_the_known_only_figures_are_kept() -> None:
    tags = ["colour:Red", "colour:Blue"]
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    targets = np.array([0, 1, -1, 0])  # the third product's colour is one the model never learned
    unknown = [None, None, "colour:Teal", None]
    r = group_report(scores, targets, tags, unknown=unknown)
    assert r["n"] == 4 and r["n_unknown"] == 1 and r["accuracy"] == 0.75
    assert r["known_only"]["n"] == 3 and r["known_only"]["accuracy"] == 1.0
    assert r["macro_f1"] < r["known_only"]["macro_f1"] == 1.0
    legacy = group_report(scores, targets, tags)  # without `unknown`: the known products only, as before
    assert legacy["n"] == 3 and "n_unknown" not in legacy


def test_the_article_type_figure_counts_the_right_name_under_another_path_as_right() -> None:
    from bench.quality import by_leaf_name

    # Myntra files "Water Bottle" under two paths: the path-level leaf calls the first product's prediction a miss
    leaves = ["category:Accessories/Accessories/Water Bottle", "category:Accessories/Water Bottle/Water Bottle",
              "category:Apparel/Topwear/Tshirts"]  # fmt: skip
    scores = np.array([[0.1, 0.8, 0.1], [0.1, 0.7, 0.2], [0.1, 0.1, 0.8], [0.6, 0.1, 0.3]])
    leaf_targets = np.array([0, 1, 2, 2])
    assert group_report(scores, leaf_targets, leaves)["accuracy"] == 0.5
    r = by_leaf_name(scores, leaves, ["Water Bottle", "Water Bottle", "Tshirts", "Tshirts"])
    assert (r["n"], r["accuracy"]) == (4, 0.75)  # only the last product, a Tshirt called a bottle, is a miss
    unknown = by_leaf_name(scores, leaves, ["Water Bottle", "Water Bottle", "Tshirts", "Kurtas"])
    assert (unknown["n"], unknown["n_unknown"], unknown["accuracy"]) == (4, 1, 0.75)  # a name the model lacks: a miss
