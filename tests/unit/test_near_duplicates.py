"""bench/near_duplicates.py: label agreement of the nearest training title, and titles that name their label."""

from __future__ import annotations

import json
from pathlib import Path

from bench.near_duplicates import main, near_duplicates


def _jd_catalog(root: Path, twins: bool = True) -> Path:
    """A cn-jd file: runners, each with a near-twin title filed under another leaf (`twins`), and books."""
    rows = []
    for i in range(10, 22):
        rows.append(f"1,运动|跑步鞋|男跑步鞋,鸿星尔克 男式跑步鞋 款{i}号,,京东,店A")
        if twins:
            rows.append(f"2,运动|跑步鞋|女跑步鞋,鸿星尔克 男式跑步鞋 款{i}号 新,,京东,店B")  # the same shoe, other leaf
        rows.append(f"3,图书|小说|科幻,三体 第{i}部 刘慈欣 科幻小说 精装,,京东,店C")
    path = root / "cn-products-jd" / "products.csv"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_near_twins_with_other_labels_are_counted(tmp_path: Path) -> None:
    result = near_duplicates(_jd_catalog(tmp_path), "cn-jd", "leaf", seed=0)
    assert result["test"] > 0 and result["named_in_title"] is None
    near = result["near"]["0.8"]
    assert near["share_of_test"] >= 0.5 and near["labels_differ"] >= 0.3  # a runner's nearest title is its twin
    assert result["nearest_neighbour_accuracy"] <= 0.8


def test_without_twins_near_titles_agree(tmp_path: Path) -> None:
    result = near_duplicates(_jd_catalog(tmp_path, twins=False), "cn-jd", "leaf", seed=0)
    assert result["near"]["0.8"]["labels_differ"] == 0.0 and result["nearest_neighbour_accuracy"] == 1.0


def test_the_command_prints_one_json_line(tmp_path: Path, capsys) -> None:
    assert main(["--data", str(_jd_catalog(tmp_path)), "--catalog", "cn-jd"]) == 0
    assert json.loads(capsys.readouterr().out)["catalog"] == "cn-jd"


def test_titles_that_name_their_attribute_are_counted(tmp_path: Path) -> None:
    """Myntra format: the colour is in the title for the black and white shirts, never for the 'Rust' ones."""
    import zipfile

    lines = ["id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"]
    for i in range(12):
        lines.append(f"{i},Men,Apparel,Topwear,Shirts,Black,Fall,2011,Casual,Brand{i} Men Black Shirt")
        lines.append(f"{100 + i},Men,Apparel,Topwear,Shirts,White,Fall,2011,Casual,Brand{i} Men White Shirt")
        lines.append(f"{200 + i},Men,Apparel,Topwear,Shirts,Rust,Fall,2011,Casual,Brand{i} Men Check Shirt")
    folder = tmp_path / "fashion-myntra-styles"
    folder.mkdir()
    with zipfile.ZipFile(folder / "styles.csv.zip", "w") as z:
        z.writestr("styles.csv", "\n".join(lines) + "\n")
    result = near_duplicates(tmp_path, "myntra", "colour", seed=0)
    test = result["test"]
    assert test >= 6 and result["rare_labels"] == 3
    assert abs(result["named_in_title"] - 2 / 3) <= 1 / test  # black and white are named, rust never
