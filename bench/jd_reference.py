"""Where issue 3's JD reference figure ("the same-run baseline reaches about 0.87") comes from.

    python -m bench.jd_reference [--data ../shared/data] [--seed 0] [--out FILE]

Fits the same-run baseline of `bench/quality.py` (char n-gram TF-IDF + LinearSVC on the leaf) on a stratified 80/20
split of the JD catalog read two ways, and prints the leaf's weighted F1 of each, overall and per top-level category:

- `naive`: the file read as its documented field order says, `category_id,L1|L2|L3,title,breadcrumb,site,merchant`
  (the title is everything between the second field and the third-last), duplicate titles dropped. On ~4.7k
  publication rows the source swapped title and breadcrumb, so this "title" is the site's breadcrumb, which names
  the category (`图书>文学>散文/随笔/书信`), and the bare book names behind it are never seen.
- `loader`: `training.loaders` (`--format cn-jd`), which repairs those rows (`title_breadcrumb_swapped`), so every
  model here, the baseline included, reads the book's own name.

The publications' leaves are genre × medium (`出版物|电子书|文艺`, `出版物|图书|文艺`): a bare book name says
neither reliably, so those rows are where the two readings differ.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.quality import FILES, ROOT, by_top_level, group_report, linear_baseline_scores
from training.catalog import CatalogProduct
from training.labels import build_label_map
from training.loaders import load_catalog
from training.splits import stratified_split

# a breadcrumb as the source writes it: `segment>segment…`
_BREADCRUMB = re.compile(r"^[^<>,]{1,40}>[^>]")


def read_naive(path: Path) -> tuple[list[CatalogProduct], int]:
    """The JD rows with the title taken from its documented position, duplicate titles dropped; and how many kept
    rows have a breadcrumb there instead of a title."""
    products, seen, breadcrumbs = [], set(), 0
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split(",")
        if len(fields) < 6:
            continue
        title = ",".join(fields[2:-3]).strip()
        path_parts = tuple(fields[1].split("|"))
        if not title or title in seen or len(path_parts) < 2:
            continue
        seen.add(title)
        breadcrumbs += bool(_BREADCRUMB.match(title))
        products.append(CatalogProduct(product_id=f"jd-{line_no}", title=title, category_path=path_parts))
    return products, breadcrumbs


def baseline_by_top_level(products: Sequence[CatalogProduct], seed: int) -> dict[str, Any]:
    """The baseline's leaf figures on a stratified 80/20 split: overall and per top-level category."""
    split = stratified_split(products, validation=0.0, test=0.2, seed=seed)
    label_map = build_label_map(split.train, min_support=1)
    start, end = label_map.slices()["category_leaf"]
    tags = [lab.tag for lab in label_map.labels[start:end]]
    targets = label_map.encode(split.test).targets["category_leaf"]
    scores = linear_baseline_scores(split.train, split.test, label_map, ["category_leaf"])["category_leaf"]
    return {
        "sizes": split.sizes(),
        "leaf": group_report(scores, targets, tags),
        "by_top_level": by_top_level(scores, targets, tags, [p.category_path[0] for p in split.test]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = ap.parse_args(argv)
    path = args.data / FILES["cn-jd"]
    naive, breadcrumbs = read_naive(path)
    loaded = load_catalog(path, "cn-jd")
    results = {
        "naive": {"rows": len(naive), "breadcrumb_as_title": breadcrumbs, **baseline_by_top_level(naive, args.seed)},
        "loader": {
            "rows": len(loaded.products),
            "repaired": loaded.report.repaired.get("title_breadcrumb_swapped", 0),
            **baseline_by_top_level(loaded.products, args.seed),
        },
    }
    print(f"{'reading':<8} {'part':<22} {'n':>6} {'accuracy':>8} {'w-F1':>6}")
    for reading, r in results.items():
        for part, figures in {"all": r["leaf"], **r["by_top_level"]}.items():
            print(f"{reading:<8} {part:<22} {figures['n']:>6} {figures['accuracy']:8.4f} {figures['weighted_f1']:6.4f}")
    repaired = results["loader"]["repaired"]
    print(f"naive: {breadcrumbs} of {len(naive)} titles are breadcrumbs; loader: {repaired} rows repaired")
    if args.out:
        args.out.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
