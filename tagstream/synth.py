"""Synthetic catalog + behaviour for demos and tests, and real click-log replay (numpy + stdlib only).

- `generate_catalog(n, seed)`: a bilingual (Chinese/English) catalog over a small 3-level category tree
  (`CATEGORY_TREE`: 4 L1 × 2–3 L2 × 2–3 leaves) with brands, colours, gender, sizes, model codes and noise words.
  Titles are learnable but not trivial: ~12% carry no leaf keyword (only the L2's words), ~8% mention a sibling
  leaf's keyword as a distractor, word order is shuffled and the language varies per product.
- `generate_behaviour(products, n_events, start_ms, seed, bursts=...)`: click events (schema `click` v1) with Zipf
  popularity, sessions, a view ≫ click > add_to_cart > purchase mix, and optional bursts (→ `trending`).
- `load_click_log(path, fmt)` reads the real logs (`taobao`, `yoochoose`, `diginetica`) and
  `map_clicks_to_catalog(log, products)` maps their items onto catalog products by popularity rank, keeping
  timestamps (ms), sessions and the event-type mix.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tagstream.errors import DataError
from training.catalog import CatalogProduct

__all__ = [
    "CATEGORY_TREE",
    "EVENT_TYPES",
    "Burst",
    "ClickLog",
    "generate_behaviour",
    "generate_catalog",
    "load_click_log",
    "map_clicks_to_catalog",
    "write_jsonl",
]

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")

# L1 -> L2 -> leaf -> (zh keywords, en keywords, base price CNY); L2 entries carry shared words under "_words".
CATEGORY_TREE: dict[str, dict[str, Any]] = {
    "Electronics": {
        "_zh": "数码电子",
        "Phones": {
            "_words": (["手机", "通讯"], ["phone", "mobile"]),
            "Smartphones": (["智能手机", "5G手机", "全网通"], ["smartphone", "5G phone", "dual sim"], 2499),
            "Phone Cases": (["手机壳", "保护套", "防摔壳"], ["phone case", "cover", "shockproof case"], 39),
            "Chargers": (["充电器", "快充头", "数据线"], ["charger", "fast charger", "usb-c cable"], 69),
        },
        "Audio": {
            "_words": (["音频", "蓝牙"], ["audio", "bluetooth"]),
            "Headphones": (["耳机", "降噪耳机", "头戴式"], ["headphones", "earbuds", "noise cancelling"], 399),
            "Speakers": (["音箱", "音响", "低音炮"], ["speaker", "soundbar", "subwoofer"], 299),
        },
        "Computers": {
            "_words": (["电脑", "办公"], ["computer", "office"]),
            "Laptops": (["笔记本电脑", "轻薄本", "游戏本"], ["laptop", "notebook", "ultrabook"], 5999),
            "Keyboards": (["键盘", "机械键盘", "青轴"], ["keyboard", "mechanical keyboard", "keycaps"], 259),
            "Mice": (["鼠标", "无线鼠标", "电竞鼠标"], ["mouse", "wireless mouse", "gaming mouse"], 129),
        },
    },
    "Apparel": {
        "_zh": "服饰鞋包",
        "Tops": {
            "_words": (["上衣", "春秋款"], ["top", "casual"]),
            "T-Shirts": (["T恤", "短袖", "圆领"], ["t-shirt", "tee", "crew neck"], 79),
            "Shirts": (["衬衫", "长袖衬衣", "商务"], ["shirt", "button-down", "oxford"], 159),
            "Hoodies": (["卫衣", "连帽", "加绒"], ["hoodie", "sweatshirt", "fleece"], 199),
        },
        "Bottoms": {
            "_words": (["裤装", "修身"], ["bottoms", "slim fit"]),
            "Jeans": (["牛仔裤", "直筒", "弹力"], ["jeans", "denim", "straight leg"], 229),
            "Skirts": (["半身裙", "百褶裙", "A字裙"], ["skirt", "pleated skirt", "a-line"], 139),
        },
        "Footwear": {
            "_words": (["鞋", "透气"], ["shoes", "breathable"]),
            "Running Shoes": (["跑步鞋", "运动鞋", "缓震"], ["running shoes", "sneakers", "cushioned"], 399),
            "Boots": (["靴子", "马丁靴", "短靴"], ["boots", "ankle boots", "leather boots"], 459),
            "Sandals": (["凉鞋", "拖鞋", "沙滩鞋"], ["sandals", "slides", "flip flops"], 89),
        },
    },
    "Home": {
        "_zh": "家居家装",
        "Kitchen": {
            "_words": (["厨房", "家用"], ["kitchen", "home"]),
            "Cookware": (["炒锅", "不粘锅", "汤锅"], ["wok", "non-stick pan", "stockpot"], 199),
            "Knives": (["菜刀", "刀具套装", "不锈钢刀"], ["chef knife", "knife set", "stainless knife"], 129),
        },
        "Bedding": {
            "_words": (["床上用品", "纯棉"], ["bedding", "cotton"]),
            "Pillows": (["枕头", "记忆枕", "乳胶枕"], ["pillow", "memory foam pillow", "latex pillow"], 99),
            "Duvets": (["被子", "羽绒被", "空调被"], ["duvet", "down comforter", "quilt"], 359),
            "Bed Sheets": (["床单", "四件套", "被套"], ["bed sheet", "sheet set", "duvet cover"], 169),
        },
        "Storage": {
            "_words": (["收纳", "整理"], ["storage", "organizer"]),
            "Storage Boxes": (["收纳箱", "储物盒", "整理箱"], ["storage box", "bin", "container"], 49),
            "Hangers": (["衣架", "晾衣架", "防滑衣架"], ["hangers", "clothes hanger", "non-slip hanger"], 29),
        },
    },
    "Grocery": {
        "_zh": "食品饮料",
        "Beverages": {
            "_words": (["饮品", "冲饮"], ["drink", "beverage"]),
            "Tea": (["茶叶", "绿茶", "乌龙茶"], ["tea", "green tea", "oolong"], 88),
            "Coffee": (["咖啡", "咖啡豆", "挂耳咖啡"], ["coffee", "coffee beans", "drip coffee"], 69),
            "Juice": (["果汁", "橙汁", "NFC"], ["juice", "orange juice", "cold pressed"], 35),
        },
        "Snacks": {
            "_words": (["零食", "休闲食品"], ["snack", "treats"]),
            "Nuts": (["坚果", "每日坚果", "腰果"], ["nuts", "mixed nuts", "cashews"], 59),
            "Chocolate": (["巧克力", "黑巧克力", "夹心"], ["chocolate", "dark chocolate", "truffles"], 45),
        },
    },
}

_BRANDS: dict[str, list[tuple[str, str]]] = {
    "Electronics": [("禅科", "Zenko"), ("璐米", "Lumina"), ("威斯顿", "Vexton"), ("奥德", "Orda"), ("极光", "Aurora")],
    "Apparel": [
        ("森屿", "Forestia"),
        ("北岸", "Northshore"),
        ("优步", "Urbano"),
        ("蓝鲸", "Bluewhale"),
        ("棉语", "Cottona"),
    ],
    "Home": [("宜居", "Habita"), ("厨匠", "Cookcraft"), ("眠雅", "Sleepwell"), ("纳美", "Nestor")],
    "Grocery": [("山谷", "Valleyfarm"), ("晨露", "Morningdew"), ("果园", "Orchardia"), ("可可乡", "Cocoland")],
}
_COLOURS = [("黑色", "Black"), ("白色", "White"), ("灰色", "Grey"), ("藏青", "Navy Blue"), ("红色", "Red"),
            ("粉色", "Pink"), ("绿色", "Green"), ("米色", "Beige")]  # fmt: skip
_GENDERS = [("男士", "Men's", "Men"), ("女士", "Women's", "Women"), ("男女同款", "Unisex", "Unisex")]
_NOISE_ZH = ["新款", "2024", "包邮", "正品", "官方旗舰", "热卖", "限时特惠", "爆款", "送礼", "现货"]
_NOISE_EN = ["new", "2024", "free shipping", "official", "hot sale", "best seller", "gift", "limited", "original"]
_SIZES = {
    "Apparel": ["S", "M", "L", "XL", "XXL", "36", "38", "40", "42", "44"],
    "Electronics": ["64GB", "128GB", "256GB", "1m", "2m", "13寸", "15.6英寸"],
    "Home": ["30cm", "1.5m", "1.8m", "2L", "5件套", "10个装"],
    "Grocery": ["250g", "500g", "1kg", "12袋", "6瓶装", "礼盒装"],
}
_HAS_COLOUR = {"Electronics", "Apparel", "Home"}
_HAS_GENDER = {"Apparel"}
_RESELLERS = [f"reseller-{i:02d}" for i in range(12)]


def _leaves() -> list[tuple[str, str, str, list[str], list[str], float, list[str], list[str]]]:
    out = []
    for l1, l2s in CATEGORY_TREE.items():
        for l2, leaves in l2s.items():
            if l2.startswith("_"):
                continue
            w_zh, w_en = leaves["_words"]
            for leaf, spec in leaves.items():
                if leaf.startswith("_"):
                    continue
                zh, en, price = spec
                out.append((l1, l2, leaf, list(zh), list(en), float(price), list(w_zh), list(w_en)))
    return out


def _pick(rng: np.random.Generator, xs: Sequence[Any]) -> Any:
    return xs[int(rng.integers(len(xs)))]


def generate_catalog(n: int, seed: int = 0) -> list[CatalogProduct]:
    """`n` products, deterministic for a seed; leaves are uniform-ish (Dirichlet weights), ids `synth-000001`."""
    rng = np.random.default_rng(seed)
    leaves = _leaves()
    weights = rng.dirichlet(np.full(len(leaves), 4.0))
    products = []
    for i in range(n):
        li = int(rng.choice(len(leaves), p=weights))
        l1, l2, leaf, kw_zh, kw_en, base, w_zh, w_en = leaves[li]
        lang = rng.choice(["zh", "en", "mixed"], p=[0.5, 0.3, 0.2])
        brand_zh, brand_en = _pick(rng, _BRANDS[l1])
        words: list[str] = []
        zh_words = lang == "zh" or (lang == "mixed" and rng.random() < 0.6)
        kws, shared, noise = (kw_zh, w_zh, _NOISE_ZH) if zh_words else (kw_en, w_en, _NOISE_EN)
        r = rng.random()
        if r < 0.12:  # hard: only the L2's shared words
            words += list(rng.choice(shared, size=min(2, len(shared)), replace=False))
        else:
            words += list(rng.choice(kws, size=int(rng.integers(1, 3)), replace=False))
            if rng.random() < 0.4:
                words.append(_pick(rng, shared))
        if rng.random() < 0.08:  # distractor: a sibling leaf's keyword ("phone case for smartphone")
            sibs = [x for x in leaves if x[1] == l2 and x[2] != leaf]
            if sibs:
                s = _pick(rng, sibs)
                words.append(_pick(rng, s[3] if zh_words else s[4]))
        attrs: dict[str, str] = {}
        if l1 in _HAS_COLOUR and rng.random() < 0.85:
            c_zh, c_en = _pick(rng, _COLOURS)
            attrs["colour"] = c_en
            if rng.random() < 0.9:
                words.append(c_zh if zh_words else c_en)
        if l1 in _HAS_GENDER:
            g_zh, g_en, g = _GENDERS[int(rng.choice(3, p=[0.45, 0.45, 0.10]))]
            attrs["gender"] = g
            if rng.random() < 0.8:
                words.append(g_zh if zh_words else g_en)
        if rng.random() < 0.6:
            words.append(_pick(rng, _SIZES[l1]))
        if rng.random() < 0.5:
            words.append(f"{chr(65 + int(rng.integers(26)))}{int(rng.integers(10, 9999))}")
        words += list(rng.choice(noise, size=int(rng.choice(3, p=[0.4, 0.4, 0.2])), replace=False))
        rng.shuffle(words)
        brand = brand_zh if (lang == "zh" or (lang == "mixed" and rng.random() < 0.5)) else brand_en
        title = " ".join([brand, *words]) if rng.random() < 0.85 else " ".join([*words, brand])
        price = round(float(base * math.exp(rng.normal(0.0, 0.35))), 1)
        source = f"{brand_en} official store" if rng.random() < 0.6 else _pick(rng, _RESELLERS)
        products.append(
            CatalogProduct(
                product_id=f"synth-{i + 1:06d}",
                title=title,
                brand=brand_en if rng.random() < 0.7 else None,
                price=price if rng.random() < 0.95 else None,
                currency="CNY",
                category_path=(l1, l2, leaf),
                attributes=attrs,
                source=source,
            )
        )
    return products


@dataclass(frozen=True)
class Burst:
    """Extra traffic on one product in [start_ms, start_ms + duration_ms): drives a `trending` tag."""

    product_id: str
    start_ms: int
    duration_ms: int
    n_events: int


def _event(event_type: str, product_id: str, user_id: str, session_id: str | None, ts: int) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_type": event_type,
        "product_id": product_id,
        "user_id": user_id,
        "session_id": session_id,
        "ts": int(ts),
    }


def generate_behaviour(
    products: Sequence[CatalogProduct],
    n_events: int,
    start_ms: int,
    seed: int = 0,
    *,
    duration_ms: int = 3_600_000,
    zipf_s: float = 1.1,
    bursts: Sequence[Burst] = (),
) -> list[dict[str, Any]]:
    """`n_events` background events (+ each burst's events), sorted by `ts`, as `click` v1 event dicts.

    Sessions: a user views products drawn by Zipf popularity (rank over a seeded shuffle of the catalog),
    gaps ~ exponential (mean 30 s); a view leads to a click w.p. 0.25, a click to add_to_cart w.p. 0.3, a cart to
    a purchase w.p. 0.35. Burst events come from many fresh users with a higher click/cart rate.
    """
    if not products:
        raise ValueError("no products")
    rng = np.random.default_rng(seed)
    ids = [p.product_id for p in products]
    order = rng.permutation(len(ids))
    pop = 1.0 / np.arange(1, len(ids) + 1) ** zipf_s
    pop /= pop.sum()
    n_users = max(10, n_events // 25)
    user_w = 1.0 / np.arange(1, n_users + 1) ** 0.8
    user_w /= user_w.sum()
    events: list[dict[str, Any]] = []
    s = 0
    while len(events) < n_events:
        s += 1
        user = f"u-{int(rng.choice(n_users, p=user_w)) + 1}"
        session = f"s-{seed}-{s}"
        t = start_ms + int(rng.integers(0, max(duration_ms, 1)))
        for _ in range(int(rng.geometric(1 / 6))):
            pid = ids[order[int(rng.choice(len(ids), p=pop))]]
            chain = ["view"]
            if rng.random() < 0.25:
                chain.append("click")
                if rng.random() < 0.3:
                    chain.append("add_to_cart")
                    if rng.random() < 0.35:
                        chain.append("purchase")
            for et in chain:
                events.append(_event(et, pid, user, session, t))
                t += int(rng.exponential(30_000)) + 500
    events = events[:n_events]
    for b, burst in enumerate(bursts):
        for j in range(burst.n_events):
            ts = burst.start_ms + int(rng.integers(0, max(burst.duration_ms, 1)))
            et = str(rng.choice(EVENT_TYPES, p=[0.6, 0.25, 0.1, 0.05]))
            user = f"bu-{b}-{int(rng.integers(0, max(burst.n_events // 2, 1)))}"
            events.append(_event(et, burst.product_id, user, f"bs-{b}-{j // 3}", ts))
    events.sort(key=lambda e: e["ts"])
    return events


def write_jsonl(items: Iterable[CatalogProduct | dict[str, Any]], path: str | Path) -> int:
    """Write products (canonical JSONL) or event dicts, one JSON object per line; returns the count."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for it in items:
            obj = it.to_json() if isinstance(it, CatalogProduct) else it
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------------------------ real click logs


@dataclass
class ClickLog:
    """Events of a real click log: dicts {event_type, item_id, user_id, session_id, ts (ms)}, sorted by ts."""

    path: str
    fmt: str
    events: list[dict[str, Any]]
    rows_read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[int, str]] = field(default_factory=list)

    def event_mix(self) -> dict[str, int]:
        """Count of events per event type."""
        return dict(Counter(e["event_type"] for e in self.events))


_TAOBAO_TYPES = {"pv": "view", "fav": "click", "cart": "add_to_cart", "buy": "purchase"}
_SESSION_GAP_MS = 30 * 60 * 1000


def _parse_taobao(row: list[str]) -> dict[str, Any]:
    if len(row) != 5:
        raise ValueError(f"expected 5 fields, got {len(row)}")
    user, item, _cat, beh, ts = (x.strip() for x in row)
    if beh not in _TAOBAO_TYPES:
        raise ValueError(f"unknown behavior {beh!r}")
    return {"event_type": _TAOBAO_TYPES[beh], "item_id": item, "user_id": f"tb-{int(user)}", "ts": int(ts) * 1000}


def _parse_yoochoose(row: list[str]) -> dict[str, Any]:
    if len(row) < 3:
        raise ValueError(f"expected 3 fields, got {len(row)}")
    session, item, ts = row[0].strip(), row[1].strip(), float(row[2])
    s = f"yc-{int(session)}"
    return {"event_type": "view", "item_id": item, "user_id": s, "session_id": s, "ts": round(ts * 1000)}


def _parse_diginetica(row: list[str]) -> dict[str, Any]:
    if len(row) != 5:
        raise ValueError(f"expected 5 fields, got {len(row)}")
    session, user, item, frame, date = (x.strip() for x in row)
    day = datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC)
    s = f"dg-{int(session)}"
    uid = f"dg-u{user}" if user and user != "NA" else s
    ts = int(day.timestamp() * 1000) + int(frame)
    return {"event_type": "view", "item_id": item, "user_id": uid, "session_id": s, "ts": ts}


_CLICK_FORMATS = {
    "taobao": (",", None, _parse_taobao),
    "yoochoose": ("\t", "sessionid", _parse_yoochoose),
    "diginetica": (";", "session_id", _parse_diginetica),
}


def load_click_log(path: str | Path, fmt: str) -> ClickLog:
    """Read a real click log (`taobao`, `yoochoose`, `diginetica`); bad rows are counted and skipped.

    Raises `DataError` (file, line, reason) if the file is missing, has the wrong header, or its first data row
    does not parse. Taobao rows get sessions by a 30-minute inactivity gap per user; pv→view, fav→click,
    cart→add_to_cart, buy→purchase. Yoochoose/Diginetica rows are views; their session doubles as user.
    """
    path = Path(path)
    if fmt not in _CLICK_FORMATS:
        raise DataError(f"{path}: unknown click log format {fmt!r} (choose from {sorted(_CLICK_FORMATS)})")
    delim, header, parse = _CLICK_FORMATS[fmt]
    log = ClickLog(path=str(path), fmt=fmt, events=[])
    try:
        f = path.open(encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e}") from e
    with f:
        reader = csv.reader(f, delimiter=delim)
        first = True
        try:
            for row in reader:
                line = reader.line_num
                if not row or not "".join(row).strip():
                    continue
                if header is not None and line == 1:
                    if row[0].strip().casefold() != header:
                        raise DataError(f"{path}: line 1: header {row[:3]} is not a {fmt} header ({header}, ...)")
                    continue
                log.rows_read += 1
                try:
                    ev = parse(row)
                except (ValueError, IndexError) as e:
                    if first:
                        raise DataError(f"{path}: line {line}: {e} (not a {fmt} click log?)") from None
                    log.skipped[type(e).__name__ if not str(e) else str(e).split(" ")[0]] += 1
                    if len(log.examples) < 5:
                        log.examples.append((line, str(e)))
                    continue
                first = False
                log.events.append(ev)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: line {reader.line_num + 1}: not UTF-8 text") from e
    if fmt == "taobao":
        log.events.sort(key=lambda e: (e["user_id"], e["ts"]))
        prev_user, prev_ts, k = None, 0, 0
        for e in log.events:
            if e["user_id"] != prev_user or e["ts"] - prev_ts > _SESSION_GAP_MS:
                k += 1
            e["session_id"] = f"{e['user_id']}-s{k}"
            prev_user, prev_ts = e["user_id"], e["ts"]
    log.events.sort(key=lambda e: e["ts"])
    if not log.events:
        raise DataError(f"{path}: no events read")
    return log


def map_clicks_to_catalog(
    log: ClickLog | Sequence[dict[str, Any]],
    products: Sequence[CatalogProduct],
    *,
    seed: int = 0,
    start_ms: int | None = None,
) -> list[dict[str, Any]]:
    """Replace the log's item ids by catalog product ids by popularity rank → `click` v1 event dicts.

    The k-th most clicked item becomes the k-th product of a seeded shuffle of the catalog (wrapping around when
    the log has more items than the catalog), so the popularity skew, sessions, event types and relative timing
    are kept. `start_ms` shifts all timestamps so that the first event is at `start_ms` (default: unchanged).
    """
    events = log.events if isinstance(log, ClickLog) else list(log)
    if not products:
        raise ValueError("no products")
    counts = Counter(e["item_id"] for e in events)
    first_seen: dict[str, int] = {}
    for i, e in enumerate(events):
        first_seen.setdefault(e["item_id"], i)
    ranked = sorted(counts, key=lambda it: (-counts[it], first_seen[it]))
    order = np.random.default_rng(seed).permutation(len(products))
    item_to_pid = {it: products[int(order[r % len(products)])].product_id for r, it in enumerate(ranked)}
    shift = 0 if start_ms is None or not events else start_ms - min(e["ts"] for e in events)
    return [
        _event(e["event_type"], item_to_pid[e["item_id"]], e["user_id"], e.get("session_id"), e["ts"] + shift)
        for e in events
    ]


def product_change_event(
    p: CatalogProduct, version: int = 1, product_id: str | None = None, updated_at: int = 1_764_316_800_000
) -> dict[str, Any]:
    """A `product-change` upsert (schema v1) of catalog product `p`, as sent to the `products` topic."""
    return {
        "schema_version": 1,
        "op": "upsert",
        "product_id": product_id or p.product_id,
        "title": p.title,
        "description": p.description,
        "brand": p.brand,
        "price": p.price,
        "currency": p.currency,
        "category_hints": [],
        "attributes": dict(p.attributes or {}),
        "updated_at": updated_at,
        "version": version,
    }
