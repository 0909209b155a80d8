"""Run report: `report.json` + `report.html` with PNG plots (matplotlib Agg), model vs baseline per group, and the
figures of the tags serving emits beside them.

Per exclusive group a table of the model's and the baseline's top-1 figures and the model's served ones; the
multi-label free `tags` group, which has served figures only, gets them with a per-tag table. Plots (per exclusive
group, from the model's top-1 report, else the baseline's): per-tag F1 against support (log x), PR curves of the 6
largest tags, the most-confused pairs (bar chart), and the reliability diagram (model and baseline); tables of each
group's figures, its per-tag precision / recall / F1 / support and its most-confused pairs.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from training.cleaning import DataReport
from training.evaluate import HEADLINE_METRICS

__all__ = ["HEADLINE_METRICS", "ReportFiles", "write_report"]


_ABOUT = (
    "<p><b>top-1</b>: each group's best-scored label, thresholds ignored (the model against the same-run baseline). "
    "<b>served</b>: the tags serving emits from the same scores (<code>serving.decoding.TagDecoder</code> at the "
    "shipped thresholds: the best label among those passing their thresholds, only under an emitted parent tag, "
    "category paths chosen by the product of their level scores); coverage is the share of products with a tag "
    "emitted in the group, and a product with none is a miss of its true tag. Everywhere, a label the model does not "
    "know (it cannot output it) counts as a miss (<code>n_unknown</code> products).</p>"
)
_ABOUT_MULTI = (
    "<p>Free tags (multi-label), served only: each tag is emitted when its score passes its own threshold. Every "
    "product is evaluated (a tag it does not carry is a negative); accuracy is the exact match of a product's set of "
    "free tags, coverage the share of products with one emitted, and a free tag the model does not know is a missed "
    "tag.</p>"
)


@dataclass
class ReportFiles:
    """Paths of what `write_report` wrote."""

    json: Path
    html: Path
    images: list[Path]


def _slug(s: str, index: int) -> str:
    """The file-name part of tag group `index`: its ASCII letters, digits and `_.-`, after the index (so groups whose
    names have no ASCII, 颜色 and 材质, do not overwrite each other's plots)."""
    ascii_part = re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_.")[:48]
    return f"g{index}_{ascii_part}" if ascii_part else f"g{index}"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _font() -> bool:
    """Prefer a CJK-capable font when one is installed; returns whether one is. Silences missing-glyph noise."""
    import logging
    import warnings

    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [
        n for n in ("Noto Sans CJK SC", "Noto Sans SC", "WenQuanYi Zen Hei", "SimHei", "Microsoft YaHei") if n in names
    ]
    plt.rcParams["font.sans-serif"] = [*cjk, "DejaVu Sans"]
    plt.rcParams["axes.unicode_minus"] = False
    warnings.filterwarnings("ignore", message="Glyph .* missing from")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    return bool(cjk)


class _Keys:
    """Plot labels: the tag itself when the font can draw it, else a short key listed under the images."""

    def __init__(self, prefix: str, cjk_font: bool) -> None:
        self.prefix, self.cjk_font, self.keys = prefix, cjk_font, {}

    def __call__(self, tag: str, width: int = 28) -> str:
        if self.cjk_font or all(ord(c) < 0x2E80 for c in tag):
            return tag if len(tag) <= width else "…" + tag[-(width - 1) :]
        if tag not in self.keys:
            self.keys[tag] = f"{self.prefix}{len(self.keys) + 1}"
        return self.keys[tag]


def _save(fig: Any, path: Path, images: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    images.append(path)


def _plots(
    name: str, index: int, g: Mapping[str, Any], base: Mapping[str, Any] | None, out: Path, key: _Keys
) -> list[Path]:
    images: list[Path] = []
    slug = _slug(name, index)
    per_tag = g.get("per_tag") or {}
    if per_tag:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        sup = [max(v["support"], 0.8) for v in per_tag.values()]
        ax.scatter(sup, [v["f1"] for v in per_tag.values()], s=10, alpha=0.6)
        ax.set_xscale("log")
        ax.set(xlabel="support (test rows)", ylabel="F1", title=f"{name}: per-tag F1 vs support", ylim=(-0.02, 1.02))
        _save(fig, out / f"{slug}_f1_support.png", images)
    curves = g.get("pr_curves") or {}
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for tag, c in curves.items():
            ax.plot(c["recall"], c["precision"], label=f"{key(tag)} (AP {c['average_precision']:.2f})")
        ax.set(xlabel="recall", ylabel="precision", title=f"{name}: PR, largest tags", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=6, loc="lower left")
        _save(fig, out / f"{slug}_pr.png", images)
    pairs = g.get("confused_pairs") or []
    if pairs:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(pairs) + 1.2))
        labels = [f"{key(p['true'], 22)} → {key(p['pred'], 22)}" for p in pairs][::-1]
        ax.barh(range(len(pairs)), [p["count"] for p in pairs][::-1])
        ax.set_yticks(range(len(pairs)), labels, fontsize=7)
        ax.set(xlabel="test rows", title=f"{name}: most confused (true → predicted)")
        _save(fig, out / f"{slug}_confused.png", images)
    if g.get("calibration"):
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        for label, rep in (("model", g), ("baseline", base)):
            cal = (rep or {}).get("calibration")
            if not cal:
                continue
            pts = [(b["mean_confidence"], b["accuracy"]) for b in cal["bins"] if b["count"]]
            ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=f"{label} (ECE {cal['ece']:.3f})")
        ax.set(xlabel="top-1 confidence", ylabel="accuracy", title=f"{name}: reliability", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
        _save(fig, out / f"{slug}_calibration.png", images)
    return images


def _table(
    model: Mapping[str, Any] | None, baseline: Mapping[str, Any] | None, served: Mapping[str, Any] | None, group: str
) -> str:
    columns = [("model (top-1)", model), ("baseline (top-1)", baseline)]
    if served is not None:
        columns.append(("model, served", served))
    figures = [((rep or {}).get("groups") or {}).get(group, {}) for _, rep in columns]
    head = "".join(f"<th>{name}</th>" for name, _ in columns)
    rows = "".join(
        f"<tr><td>{k}</td>" + "".join(f"<td>{_fmt(f.get(k))}</td>" for f in figures) + "</tr>"
        for k in ("n", "n_unknown", *HEADLINE_METRICS)
    )
    return f"<table><tr><th>metric</th>{head}</tr>{rows}</table>"


def _per_tag_html(g: Mapping[str, Any], base: Mapping[str, Any] | None) -> str:
    """An exclusive group's per-tag table (model P/R/F1/support, the baseline's F1; largest support first) and its
    most-confused pairs, folded away (a leaf level has hundreds of tags)."""
    per_tag = sorted((g.get("per_tag") or {}).items(), key=lambda kv: (-kv[1]["support"], kv[0]))
    if not per_tag:
        return ""
    base_tags = (base or {}).get("per_tag") or {}
    rows = "".join(
        f"<tr><td>{html.escape(t)}</td>"
        + "".join(f"<td>{_fmt(v.get(k))}</td>" for k in ("precision", "recall", "f1", "support"))
        + (f"<td>{_fmt((base_tags.get(t) or {}).get('f1'))}</td>" if base is not None else "")
        + "</tr>"
        for t, v in per_tag
    )
    head = "<tr><th>tag</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>" + (
        "<th>baseline F1</th></tr>" if base is not None else "</tr>"
    )
    out = f"<details><summary>per tag ({len(per_tag)} tags)</summary><table>{head}{rows}</table></details>"
    pairs = g.get("confused_pairs") or []
    if pairs:
        cells = "".join(
            f"<tr><td>{html.escape(p['true'])}</td><td>{html.escape(p['pred'])}</td>"
            f"<td>{_fmt(p['count'])}</td><td>{_fmt(p.get('rate'))}</td></tr>"
            for p in pairs
        )
        out += (
            f"<details><summary>most-confused pairs ({len(pairs)})</summary><table><tr><th>true</th>"
            f"<th>predicted</th><th>test rows</th><th>share of the true tag</th></tr>{cells}</table></details>"
        )
    return out


def _multi_html(name: str, g: Mapping[str, Any]) -> str:
    """The served figures of a multi-label group and its per-tag table (largest support first)."""
    rows = "".join(f"<tr><td>{k}</td><td>{_fmt(g.get(k))}</td></tr>" for k in ("n", "n_unknown", *HEADLINE_METRICS))
    per_tag = sorted((g.get("per_tag") or {}).items(), key=lambda kv: (-kv[1]["support"], kv[0]))
    tags = "".join(
        f"<tr><td>{html.escape(t)}</td>"
        + "".join(f"<td>{_fmt(v[k])}</td>" for k in ("precision", "recall", "f1", "support", "predicted"))
        + "</tr>"
        for t, v in per_tag
    )
    return (
        f"<h3>{html.escape(name)} (multi-label, served)</h3>{_ABOUT_MULTI}"
        f"<table><tr><th>metric</th><th>model, served</th></tr>{rows}</table>"
        "<table><tr><th>tag</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>predicted</th></tr>"
        f"{tags}</table>"
    )


def _data_html(data: Mapping[str, Any]) -> str:
    skipped = "".join(f"<li>{html.escape(k)}: {v}</li>" for k, v in (data.get("skipped") or {}).items())
    repaired = "".join(f"<li>{html.escape(k)}: {v}</li>" for k, v in (data.get("repaired") or {}).items())
    n_labels = ", ".join(f"{html.escape(k)} {v}" for k, v in (data.get("n_labels") or {}).items())
    tl = ", ".join(f"{k} {v}" for k, v in (data.get("title_length") or {}).items())
    dup = ", ".join(f"{k} {v}" for k, v in (data.get("duplicates") or {}).items())
    missing = ", ".join(f"{k} {v}" for k, v in (data.get("missing") or {}).items()) or "none"
    normalised = ", ".join(f"{k} {v}" for k, v in (data.get("normalised") or {}).items()) or "none"
    return (
        f"<p><code>{html.escape(str(data.get('path', '')))}</code> ({html.escape(str(data.get('format', '')))}): "
        f"rows read {data.get('rows_read')}, kept {data.get('rows_kept')}, skipped {data.get('rows_skipped')}"
        + (f", blank lines {data['blank_lines']}" if data.get("blank_lines") else "")
        + "</p>"
        f"<p>skipped by reason:</p><ul>{skipped or '<li>none</li>'}</ul>"
        f"<p>repaired:</p><ul>{repaired or '<li>none</li>'}</ul>"
        f"<p>duplicates: {html.escape(dup)}</p><p>labels per level: {n_labels}</p>"
        f"<p>kept products missing a value: {html.escape(missing)}</p>"
        f"<p>rows whose text normalisation changed (width, white space, control characters): "
        f"{html.escape(normalised)}</p>"
        f"<p>title length: {html.escape(tl)}</p>"
        + "".join(f'<p class="warning">warning: {html.escape(str(w))}</p>' for w in data.get("warnings") or ())
    )


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:6px 0}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
    "img{max-width:48%;margin:4px;border:1px solid #eee}"
)


def write_report(
    out_dir: str | Path,
    *,
    model: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    served: Mapping[str, Any] | None = None,
    data: DataReport | Mapping[str, Any] | Sequence[Any] | None = None,
    title: str = "tagstream training report",
    extra: Mapping[str, Any] | None = None,
) -> ReportFiles:
    """Write `report.json`, `report.html` and the PNGs into `out_dir` (created); returns the paths.

    `model` / `baseline` are top-1 `evaluate_groups` reports (either may be None); `served` the model's
    `training.evaluate.evaluate_served` report (metrics.json `served`); `data` a `DataReport` (or its dict, or a list
    of them); `extra` is stored under `"extra"` in the JSON (e.g. split sizes, the command line).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cjk_font = _font()
    if data is None:
        datas: list[Mapping[str, Any]] = []
    elif isinstance(data, DataReport | Mapping):
        datas = [data.to_dict() if isinstance(data, DataReport) else data]
    else:
        datas = [d.to_dict() if isinstance(d, DataReport) else d for d in data]
    doc = {
        "title": title,
        "model": model,
        "baseline": baseline,
        "served": served,
        "data": datas,
        "extra": dict(extra or {}),
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(doc, ensure_ascii=False, indent=1, default=str), encoding="utf-8")

    main = model or baseline or {"groups": {}}
    groups = list(main.get("groups", {}))
    for name in (baseline or {}).get("groups", {}):
        if name not in groups:
            groups.append(name)
    images: list[Path] = []
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>")
    if extra:
        parts.append(
            "<pre>" + html.escape(json.dumps(dict(extra), ensure_ascii=False, indent=1, default=str)) + "</pre>"
        )
    for d in datas:
        parts.append("<h2>Data</h2>" + _data_html(d))
    served_groups = (served or {}).get("groups", {})
    multi = [name for name in served_groups if name not in groups]
    parts.append(f"<h2>Groups (test rows: {main.get('n', (served or {}).get('n'))})</h2>")
    if served is not None:
        parts.append(_ABOUT)
    for index, name in enumerate(groups):
        g = main.get("groups", {}).get(name) or (baseline or {}).get("groups", {}).get(name, {})
        base = (baseline or {}).get("groups", {}).get(name) if model else None
        key = _Keys("T", cjk_font)
        imgs = _plots(name, index, g, base, out, key)
        images += imgs
        parts.append(f"<h3>{html.escape(name)}</h3>" + _table(model, baseline, served, name))
        parts.append(_per_tag_html(g, base))
        parts += [f"<img src='{html.escape(p.name)}' alt='{html.escape(p.stem)}'>" for p in imgs]
        if key.keys:
            parts.append("<p>plot keys: " + "; ".join(f"{k} = {html.escape(t)}" for t, k in key.keys.items()) + "</p>")
    parts += [_multi_html(name, served_groups[name]) for name in multi]
    parts.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    return ReportFiles(json=json_path, html=html_path, images=images)
