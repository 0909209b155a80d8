"""Catalog loaders: real public catalogs and the canonical JSONL → `CatalogProduct` + a `DataReport`.

`load_catalog(path, fmt)` picks the parser from `LOADERS` (`--format`), then cleans (`training.cleaning`).
Malformed rows are skipped and counted per reason, with the first examples (line number + reason) in the report.
A file that cannot be read at all raises `DataError` naming the file, the line and the reason: missing or
unreadable file, wrong header, a first data row that does not parse (e.g. a CSV given as `jsonl`), or more than
half of the rows malformed.

Formats (product ids are `<format prefix>-<source id>` so they satisfy the event schema's id pattern):

- `cn-jd`: JD `products.csv`, no header: `category_id,L1|L2|L3,title,breadcrumb,site,merchant`, unquoted. Titles
  (and breadcrumbs) may contain commas; the first two and last two fields are reliable and the breadcrumb is the
  first field after the title that looks like `segment>segment` (else the third-last field). ~4.6k book rows have
  title and breadcrumb swapped (breadcrumb first): repaired (`title_breadcrumb_swapped`). Rows that hold several
  records glued together (a second site name inside) are skipped (`concatenated_records`). The breadcrumb repeats
  the category, so it is never used (not even as description). `source` = merchant (`\\N`/empty → None).
  Product id: `jd-<line>`.
- `myntra`: `styles.csv.zip` (or plain `styles.csv`) with header; title = columns 10..end (unquoted commas).
  category_path = masterCategory|subCategory|articleType; attributes `gender`, `colour` (baseColour), `season`,
  `usage` (`NA`/empty → absent). `year` is dropped: listing metadata, not a property of the product to tag.
- `bigbasket`: quoted CSV with header `index,product,category,sub_category,brand,sale_price,market_price,type,...`;
  category_path = category|sub_category|type; brand; price = sale_price (INR). A quoted field may span lines
  (joined into one record when its quote closes within 5 lines, before the next `<index>,` line); a quote that
  does not close so skips its own line as `unterminated_quote` and the lines after it are read as records again.
  A `"` inside an unquoted field (`Pizza Pan 10" Round`) is plain text, as in the csv module.
- `jsonl`: the canonical form (`CatalogProduct.to_json`); `product_id` (a string or an integer) and `title`
  required. A row is skipped with its reason when a value has the wrong type: an attribute value or `description`,
  `brand`, `currency`, `source` that is not a string or a number (`bad_attributes`, `bad_<field>`), a tag that is
  not a string (`bad_tags`), a price that is not a number ≥ 0 or a string of one (`bad_price`). null is "absent".

Lines end at LF, with any CRs before it (a `\\r\\r\\n` file is numbered as an editor shows it), or at CR / CRLF
in a file without LF. Blank lines are neither rows nor malformed: they are counted in `DataReport.blank_lines`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tagstream.errors import DataError
from training.catalog import CatalogProduct
from training.cleaning import DataReport, clean_products

__all__ = ["LOADERS", "LoadResult", "load_catalog", "parse_jd_line"]

_PRODUCT_ID_RE = re.compile(r"[^{}\s]{1,128}")  # the whole id: fullmatch (`$` would let a final newline through)
_BREADCRUMB_RE = re.compile(r"^[^<>,]{1,40}>[^>]")
_NULLS = {"", "\\N", "$N", "NA", "N/A", "null", "None"}
_KNOWN_SITES = {"京东商城", "1号店", "当当网", "亚马逊", "天猫", "淘宝网", "苏宁易购", "国美在线", "易迅网"}
_MALFORMED_LIMIT = 0.5
_MAX_RECORD_LINES = 5  # physical lines one quoted CSV record may span


class _Malformed(Exception):
    """A row that cannot be turned into a product (reason + detail). `bad_value`: the row has the format's shape and
    one value is wrong, so even as the first data row it says nothing about a wrong `--format`."""

    def __init__(self, reason: str, detail: str = "", *, bad_value: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.bad_value = bad_value


@dataclass
class LoadResult:
    """The products of one file and what happened while loading it."""

    products: list[CatalogProduct]
    report: DataReport


Lines = Iterator[tuple[int, str]]
Parser = Callable[[Path, DataReport], Iterator[tuple[int, CatalogProduct]]]


def _null(s: str | None) -> str | None:
    s = (s or "").strip()
    return None if s in _NULLS else s


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: line 0: file not found") from e
    except IsADirectoryError as e:
        raise DataError(f"{path}: line 0: is a directory, expected a file") from e
    except OSError as e:
        raise DataError(f"{path}: line 0: cannot read: {e}") from e


def _split_lines(data: bytes) -> list[bytes]:
    """Physical lines as an editor numbers them: split at LF (any CRs before it belong to the line ending, so
    `\\r\\r\\n` is one line end), or at CR / CRLF in a file without LF."""
    if b"\n" not in data:
        return data.splitlines()
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return [line.rstrip(b"\r") for line in lines]


def _lines(path: Path, data: bytes, report: DataReport) -> Lines:
    """Decode line by line (so a bad byte names its line); blank lines are counted apart (`blank_lines`), never
    as rows."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for i, raw in enumerate(_split_lines(data), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if i == 1:
                raise DataError(f"{path}: line 1: not UTF-8 text ({e.reason} at byte {e.start})") from e
            report.rows_read += 1
            report.skip(i, "not_utf8", str(e))
            continue
        if not line.strip():
            report.blank_lines += 1
            continue
        yield i, line


def _rows(
    path: Path, lines: Lines, report: DataReport, parse: Callable[[int, str], CatalogProduct]
) -> Iterator[tuple[int, CatalogProduct]]:
    """Parse data lines; the first data row must parse (else the file is the wrong format → DataError)."""
    first = True
    for i, line in lines:
        report.rows_read += 1
        try:
            p = parse(i, line)
        except _Malformed as m:
            if first and not m.bad_value:
                raise DataError(
                    f"{path}: line {i}: {m.reason}{': ' + m.detail if m.detail else ''} "
                    f"(first data row does not parse as {report.fmt!r}; wrong --format?)"
                ) from None
            report.skip(i, m.reason, m.detail)
            continue
        first = False
        report.rows_parsed += 1
        yield i, p


def _header(path: Path, lines: Lines, expected: list[str], fmt: str) -> None:
    try:
        i, line = next(lines)
    except StopIteration:
        raise DataError(f"{path}: line 1: empty file, expected a {fmt} header") from None
    got = [c.strip().casefold() for c in next(csv.reader([line]))]
    if got[: len(expected)] != [e.casefold() for e in expected]:
        raise DataError(
            f"{path}: line {i}: header {','.join(got[: len(expected)])!r} is not the {fmt} header "
            f"{','.join(expected)!r}"
        )


# ---------------------------------------------------------------- cn-jd


def parse_jd_line(line: str, line_no: int, report: DataReport | None = None) -> CatalogProduct:
    """One JD row → product (raises `_Malformed`); records repairs in `report` when given."""
    f = line.rstrip("\r\n").split(",")
    if len(f) < 6:
        raise _Malformed("too_few_fields", f"{len(f)} fields, need 6")
    cat_id, path_s, site, merchant = f[0].strip(), f[1], f[-2].strip(), f[-1]
    if not cat_id.isdigit():
        raise _Malformed("bad_category_id", cat_id[:40])
    path = tuple(c.strip() for c in path_s.split("|"))
    if len(path) < 2 or any(not c for c in path):
        raise _Malformed("bad_category_path", path_s[:60])
    middle = f[2:-2]
    if any(m.strip() in _KNOWN_SITES or (site and m.strip() == site) for m in middle[1:]):
        raise _Malformed("concatenated_records", "a site name inside the title/breadcrumb fields")
    k = next((j for j in range(1, len(middle)) if _BREADCRUMB_RE.match(middle[j].strip())), None)
    if _BREADCRUMB_RE.match(middle[0].strip()):
        # breadcrumb first (book rows): it ends at the first field cut with an ellipsis, else after one field
        end = next((j for j in range(len(middle) - 1) if middle[j].rstrip().endswith(("…", "..."))), 0)
        title = ",".join(middle[end + 1 :])
        if report is not None:
            report.repair(line_no, "title_breadcrumb_swapped")
    elif k is not None:
        title = ",".join(middle[:k])
    else:
        title = ",".join(middle[:-1])
    if report is not None and len(f) > 6:
        report.repair(line_no, "unquoted_comma_in_title_or_breadcrumb", f"{len(f)} fields")
    title = title.strip().strip(",").strip()
    return CatalogProduct(
        product_id=f"jd-{line_no}",
        title=title,
        category_path=path,
        source=_null(merchant),
    )


def _load_jd(path: Path, report: DataReport) -> Iterator[tuple[int, CatalogProduct]]:
    lines = _lines(path, _read_bytes(path), report)
    yield from _rows(path, lines, report, lambda i, line: parse_jd_line(line, i, report))


# ---------------------------------------------------------------- myntra

_MYNTRA_HEADER = ["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year"]


def _myntra_bytes(path: Path) -> bytes:
    data = _read_bytes(path)
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = [n for n in z.namelist() if n.lower().endswith(".csv") and not n.startswith("__MACOSX")]
            if not names:
                raise DataError(f"{path}: line 0: zip holds no .csv file ({z.namelist()[:5]})")
            name = next((n for n in names if n.rsplit("/", 1)[-1] == "styles.csv"), names[0])
            return z.read(name)
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: line 0: broken zip: {e}") from e


def _parse_myntra(i: int, line: str, report: DataReport) -> CatalogProduct:
    f = line.rstrip("\r\n").split(",")
    if len(f) < 10:
        raise _Malformed("too_few_fields", f"{len(f)} fields, need 10")
    if not f[0].strip().isdigit():
        raise _Malformed("bad_id", f[0][:40])
    path = (f[2].strip(), f[3].strip(), f[4].strip())
    if any(_null(c) is None for c in path):
        raise _Malformed("missing_category", "|".join(path))
    if len(f) > 10:
        report.repair(i, "unquoted_comma_in_title", f"{len(f)} fields")
    attrs = {"gender": f[1], "colour": f[5], "season": f[6], "usage": f[8]}
    return CatalogProduct(
        product_id=f"myntra-{f[0].strip()}",
        title=_null(",".join(f[9:])) or "",  # a literal "NA" title is missing → empty_title
        category_path=path,
        attributes={k: v for k, v in ((k, _null(v)) for k, v in attrs.items()) if v},
    )


def _load_myntra(path: Path, report: DataReport) -> Iterator[tuple[int, CatalogProduct]]:
    lines = _lines(path, _myntra_bytes(path), report)
    _header(path, lines, _MYNTRA_HEADER, "myntra")
    yield from _rows(path, lines, report, lambda i, line: _parse_myntra(i, line, report))


# ---------------------------------------------------------------- bigbasket

_BB_HEADER = ["index", "product", "category", "sub_category", "brand", "sale_price", "market_price", "type"]
_BB_RECORD_START = re.compile(r"^\d+,")


def _price(s: str | None) -> float | None:
    s = _null(s)
    if s is None:
        return None
    try:
        v = float(s.replace(",", ""))
    except ValueError:
        raise _Malformed("bad_price", s[:40]) from None
    if not math.isfinite(v) or v < 0:
        raise _Malformed("bad_price", s[:40])
    return v


def _parse_bigbasket(row: list[str]) -> CatalogProduct:
    if len(row) < 8:
        raise _Malformed("too_few_fields", f"{len(row)} fields, need 8")
    idx = row[0].strip()
    if not idx.isdigit():
        raise _Malformed("bad_index", idx[:40])
    path = (row[2].strip(), row[3].strip(), row[7].strip())
    if any(not c for c in path):
        raise _Malformed("missing_category", "|".join(path))
    return CatalogProduct(
        product_id=f"bigbasket-{idx}",
        title=row[1],
        brand=_null(row[4]),
        price=_price(row[5]),
        currency="INR",
        category_path=path,
    )


def _ends_in_quotes(line: str, in_quotes: bool) -> bool:
    """Whether a CSV line ends inside a quoted field, starting inside one when `in_quotes`. As in the csv module, a
    quote opens a quoted field only as the field's first character (`Pizza Pan 10" Round` is plain text) and `""`
    inside one is a literal quote."""
    if '"' not in line:  # most lines: nothing opens or closes
        return in_quotes
    at_start = not in_quotes
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if in_quotes:
            if c == '"':
                if i + 1 < n and line[i + 1] == '"':
                    i += 2
                    continue
                in_quotes = False
        elif c == '"' and at_start:
            in_quotes = True
        at_start = c == "," and not in_quotes
        i += 1
    return in_quotes


def _csv_records(lines: Lines, unterminated: set[int], max_lines: int = _MAX_RECORD_LINES) -> Lines:
    """Physical lines → BigBasket CSV records, joining the lines of a quoted field that spans them (the real file
    has two such titles). The lines are joined only when the quote closes within `max_lines` lines, before a line
    that starts a record of its own (`<index>,`), and the result parses as one row; else the first line is yielded
    alone and added to `unterminated` (the parser skips it as `unterminated_quote`) and the lines after it are read
    again as records of their own, so every physical line is kept or skipped by line number, never swallowed."""
    queue: deque[tuple[int, str]] = deque()
    source = iter(lines)

    def pull() -> tuple[int, str] | None:
        return queue.popleft() if queue else next(source, None)

    while (item := pull()) is not None:
        if not _ends_in_quotes(item[1], False):
            yield item
            continue
        group = [item]
        closed = False
        while len(group) < max_lines and (nxt := pull()) is not None:
            if _BB_RECORD_START.match(nxt[1]):
                queue.appendleft(nxt)
                break
            group.append(nxt)
            if not _ends_in_quotes(nxt[1], True):
                closed = True
                break
        text = "\n".join(line for _, line in group)
        if closed and _one_row(text):
            yield item[0], text
            continue
        unterminated.add(item[0])
        yield item
        queue.extendleft(reversed(group[1:]))


def _one_row(text: str) -> bool:
    try:
        return len(next(csv.reader([text], strict=True))) >= len(_BB_HEADER)
    except csv.Error:
        return False


def _load_bigbasket(path: Path, report: DataReport) -> Iterator[tuple[int, CatalogProduct]]:
    lines = _lines(path, _read_bytes(path), report)
    _header(path, lines, _BB_HEADER, "bigbasket")
    unterminated: set[int] = set()

    def parse(i: int, text: str) -> CatalogProduct:
        if i in unterminated:
            raise _Malformed(
                "unterminated_quote",
                f"a quoted field opened here is not closed before the next record (at most {_MAX_RECORD_LINES} lines)",
            )
        try:
            row = next(csv.reader([text], strict=True))
        except csv.Error as e:
            raise _Malformed("bad_csv_quoting", str(e)) from None
        return _parse_bigbasket(row)

    yield from _rows(path, _csv_records(lines, unterminated), report, parse)


# ---------------------------------------------------------------- jsonl


def _label_value(v: object) -> str | None:
    """An attribute value: a string, or a finite number (written as JSON writes it, `42`, `10.5`); None when not
    one (lists, objects, booleans, NaN)."""
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and math.isfinite(v):
        return json.dumps(v)
    return None


def _parse_jsonl(line: str, seen: set[str]) -> CatalogProduct:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Malformed("invalid_json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise _Malformed("not_an_object", type(obj).__name__)
    pid = obj.get("product_id")
    if pid is None or pid == "":
        raise _Malformed("missing_product_id")
    if isinstance(pid, bool) or not isinstance(pid, str | int):
        raise _Malformed(
            "bad_product_id", f"{type(pid).__name__} {json.dumps(pid, ensure_ascii=False)[:60]}", bad_value=True
        )
    pid = str(pid)
    if not _PRODUCT_ID_RE.fullmatch(pid):
        raise _Malformed("bad_product_id", pid[:60])
    if "title" not in obj or obj["title"] is None:
        raise _Malformed("missing_title")
    if not isinstance(obj["title"], str):
        raise _Malformed("bad_title", type(obj["title"]).__name__)
    path = obj.get("category_path") or []
    if isinstance(path, str):
        path = path.split("|")
    if not isinstance(path, list) or not all(isinstance(c, str) for c in path):
        raise _Malformed("bad_category_path", str(path)[:60])
    attrs = obj.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise _Malformed("bad_attributes", type(attrs).__name__)
    attributes: dict[str, str] = {}
    for k, v in attrs.items():
        if v is None:  # null: the product has no value for it
            continue
        value = _label_value(v)
        if value is None:
            raise _Malformed("bad_attributes", f"{k}: {json.dumps(v, ensure_ascii=False)[:60]}", bad_value=True)
        attributes[k] = value
    tags = obj.get("tags") or []
    if not isinstance(tags, list):
        raise _Malformed("bad_tags", type(tags).__name__)
    bad_tags = [t for t in tags if not isinstance(t, str)]
    if bad_tags:
        detail = f"not a string: {json.dumps(bad_tags[0], ensure_ascii=False)[:60]}"
        raise _Malformed("bad_tags", detail, bad_value=True)
    price = obj.get("price")
    if isinstance(price, str):
        try:
            price = _price(price)
        except _Malformed as m:
            raise _Malformed(m.reason, m.detail, bad_value=True) from None
    elif price is not None and (
        isinstance(price, bool) or not isinstance(price, int | float) or not math.isfinite(price) or price < 0
    ):
        raise _Malformed("bad_price", json.dumps(price)[:40], bad_value=True)
    texts: dict[str, str | None] = {}
    for k in ("description", "brand", "currency", "source"):
        v = obj.get(k)
        texts[k] = None if v is None else _label_value(v)
        if v is not None and texts[k] is None:
            detail = f"{type(v).__name__} {json.dumps(v, ensure_ascii=False)[:60]}"
            raise _Malformed(f"bad_{k}", detail, bad_value=True)
    if pid in seen:
        raise _Malformed("duplicate_product_id", pid[:60])
    seen.add(pid)
    return CatalogProduct(
        product_id=pid,
        title=obj["title"],
        description=texts["description"],
        brand=texts["brand"],
        price=None if price is None else float(price),
        currency=texts["currency"],
        category_path=tuple(path),
        attributes=attributes,
        tags=tuple(tags),
        source=texts["source"],
    )


def _load_jsonl(path: Path, report: DataReport) -> Iterator[tuple[int, CatalogProduct]]:
    seen: set[str] = set()
    lines = _lines(path, _read_bytes(path), report)
    yield from _rows(path, lines, report, lambda i, line: _parse_jsonl(line, seen))


LOADERS: dict[str, Parser] = {
    "cn-jd": _load_jd,
    "myntra": _load_myntra,
    "bigbasket": _load_bigbasket,
    "jsonl": _load_jsonl,
}


def load_catalog(path: str | Path, fmt: str, *, dedupe: bool = True, max_examples: int = 5) -> LoadResult:
    """Load, validate and clean one catalog file; `fmt` is a key of `LOADERS`."""
    path = Path(path)
    if fmt not in LOADERS:
        raise DataError(f"{path}: line 0: unknown format {fmt!r} (choose from {', '.join(sorted(LOADERS))})")
    report = DataReport(path=str(path), fmt=fmt, max_examples=max_examples)
    rows = list(LOADERS[fmt](path, report))
    if not rows:
        ex = report.examples[0] if report.examples else {"line": 0, "reason": "", "detail": ""}
        why = f"{ex['reason']} {ex['detail']}".strip()
        raise DataError(
            f"{path}: line {ex['line']}: {why + ' — ' if why else ''}no product rows ({report.rows_read} rows read)"
        )
    malformed = report.rows_skipped
    if report.rows_read and malformed / report.rows_read > _MALFORMED_LIMIT:
        ex = report.examples[0] if report.examples else {"line": 0, "reason": "?"}
        raise DataError(
            f"{path}: line {ex['line']}: {ex['reason']} — {malformed} of {report.rows_read} rows malformed "
            f"(wrong --format {fmt!r}?)"
        )
    products = clean_products(rows, report, dedupe=dedupe)
    return LoadResult(products=products, report=report)
