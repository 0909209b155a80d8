"""Catalog loaders: real public catalogs and the canonical JSONL → `CatalogProduct` + a `DataReport`.

`load_catalog(path, fmt)` picks the parser from `LOADERS` (`--format`), then cleans (`training.cleaning`).
Malformed rows are skipped and counted per reason, with the first examples (line number + reason) in the report.
In every format a row is also skipped when its product id is held by an earlier row that cleaning keeps (non-empty
title and category levels; `duplicate_product_id`), and in JSONL when a string holds a lone surrogate (`"\\ud800"`,
which cannot be written as UTF-8; `not_unicode`: CSV bytes are decoded as strict UTF-8, so they cannot hold one).
A file that cannot be read at all raises a one-line `DataError` naming the file, the line and the reason: missing
or unreadable file, a corrupt, encrypted or ambiguous zip, wrong header, a first data row without the format's
shape (too few columns, not a JSON object: e.g. a CSV given as `jsonl`), or more than half of the rows malformed.
A first data row with a bad value (a price `₹220`) is skipped like any other.
Values quoted in messages are repr-like and cut short (`_show`), so every message and detail is one line.

Formats (product ids are `<format prefix>-<source id>` so they satisfy the event schema's id pattern):

- `cn-jd`: JD `products.csv`, no header: `category_id,L1|L2|L3,title,breadcrumb,site,merchant`, unquoted. Titles
  (and breadcrumbs) may contain commas; the first two and last two fields are reliable and the breadcrumb is the
  first field after the title that looks like `segment>segment` (else the third-last field). ~4.6k book rows have
  title and breadcrumb swapped (a breadcrumb of three or more levels first, and none after it): repaired
  (`title_breadcrumb_swapped`); a title with a `>` of its own is not. Rows that hold several records glued together
  (a second site name inside) are skipped (`concatenated_records`). The breadcrumb repeats the category, so it is
  never used (not even as description). `source` = merchant (`\\N`/empty → None). Product id: `jd-<line>`.
- `myntra`: `styles.csv.zip` (or plain `styles.csv`) with exactly the header `_MYNTRA_HEADER`; title = columns
  10..end (unquoted commas); a file re-saved with quoted fields (all, or those holding commas) is read as CSV. A
  zip must hold one `styles.csv`, else exactly one `.csv`. A row whose title holds the
  start of another record (a lost line break: `…<id>,<gender>,<3 levels>,<colour>,<season>,<year>,…`) is skipped
  (`concatenated_records`). category_path = masterCategory|subCategory|articleType; attributes `gender`, `colour`
  (baseColour), `season`, `usage` (`NA`/empty → absent). `year` is dropped: listing metadata, not a property of the
  product to tag.
- `bigbasket`: quoted CSV with header `index,product,category,sub_category,brand,sale_price,market_price,type,...`;
  category_path = category|sub_category|type; brand; price = sale_price (INR). A quoted field may span lines
  (joined into one record when its quote closes within 5 lines and the result parses as one row). A line that
  starts like a record (`<index>,`) ends the search, unless it is the line that closes the quote and the opening
  line is too short to be a record (`"Pack of` / `12, Red",…` is one title). A quote that does not close so skips
  its own line as `unterminated_quote` and the lines after it are read as records again. A `"` inside an unquoted
  field (`Pizza Pan 10" Round`) is plain text, as in the csv module.
- `jsonl`: the canonical form (`CatalogProduct.to_json`); `product_id` (a string or an integer) and `title`
  required. A row is skipped with its reason when a value has the wrong type: `category_path` not a list of strings
  (or a non-empty `A|B` string), `attributes` not an object or a value in it, `description`, `brand`, `currency`,
  `source` that is not a string or a number (`bad_<field>`), `tags` not a list of strings, a price that is not a
  number ≥ 0 or a string of one. null (or an absent key) is "absent"; `false`, `""`, `[]` for an object are not.
  A line nested too deeply or with an integer of more than 4300 digits is `invalid_json`. Keys other than
  `JSONL_KEYS` are ignored and named, with how many rows carry each, in one data-report warning (a misspelt
  `categories` would otherwise train a model without categories, silently).

Prices (BigBasket, JSONL strings) are decimals with commas only as thousands separators (`1,250.50`); anything
else (`12,50`, `1_000`, `₹220`, `-5`) is `bad_price`.

Lines end at LF, with any CRs before it (a `\\r\\r\\n` file is numbered as an editor shows it); a lone CR inside a
line is text (so a stray one does not renumber the lines, which are JD's ids). A file with more lone CRs than LFs
(old Mac line ends, perhaps with a stray LF) is split at CR, CRLF and LF alike. Blank lines are neither rows nor
malformed: they are counted in `DataReport.blank_lines` (a blank line inside a quoted BigBasket field is part of
the field, not counted).
"""

from __future__ import annotations

import csv
import io
import json
import lzma
import math
import re
import reprlib
import sys
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.registry import product_id_pattern
from tagstream.errors import DataError
from training.catalog import JSONL_KEYS, CatalogProduct
from training.cleaning import DataReport, clean_label, clean_products, clean_text

__all__ = ["JSONL_KEYS", "LOADERS", "LoadResult", "load_catalog", "parse_jd_line"]

_PRODUCT_ID_RE = product_id_pattern()  # the event schemas' rule
_BREADCRUMB_RE = re.compile(r"^[^<>,]{1,40}>[^>]")
_LINE_END_RE = re.compile(rb"\r*\n|\r")
_PRICE_RE = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", re.ASCII)
_YEAR_RE = re.compile(r"\d{4}", re.ASCII)
_NULLS = {"", "\\N", "$N", "NA", "N/A", "null", "None"}
_KNOWN_SITES = {"京东商城", "1号店", "当当网", "亚马逊", "天猫", "淘宝网", "苏宁易购", "国美在线", "易迅网"}
_MALFORMED_LIMIT = 0.5
_FORMAT_PROBE_ROWS = 5  # the first data rows all without the format's shape: another format
_MAX_RECORD_LINES = 5  # physical lines one quoted CSV record may span
_BOOK_CRUMB_LEVELS = 3  # a breadcrumb in the title's place (book rows) has at least this many levels
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)
_MAX_SHOWN = 200  # characters of a value quoted in a message

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlist = _SHOW.maxdict = 4
_SHOW.maxlevel = 2


def _show(value: object) -> str:
    """A value as quoted in a message: repr-like (one line, control characters escaped) and cut short."""
    s = _SHOW.repr(value)
    return s if len(s) <= _MAX_SHOWN else s[: _MAX_SHOWN - 1] + "…"


def _one_line(text: str) -> str:
    """`text` with line breaks, control characters and lone surrogates escaped (`\\n`), so it prints as one line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _error(path: Path, line: int, message: str) -> DataError:
    """The one-line `DataError` `<file>: line <n>: <message>`; line 0 is the file as a whole: `<file>: <message>`."""
    return DataError(_one_line(f"{path}: line {line}: {message}" if line > 0 else f"{path}: {message}"))


class _Malformed(Exception):
    """A row that cannot be turned into a product (reason + one-line detail). `structural`: the row does not have the
    format's shape (too few columns, not a JSON object), so as the first data row it suggests a wrong `--format`;
    any other reason is a bad value, skipped and counted on every line."""

    def __init__(self, reason: str, detail: str = "", *, structural: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = _one_line(detail)
        self.structural = structural


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
    except FileNotFoundError:
        raise DataError(_one_line(f"no such file: {path}")) from None  # as `tagstream train` / `evaluate` say it
    except IsADirectoryError:
        raise _error(path, 0, "is a directory, not a catalog file") from None
    except OSError as e:
        raise _error(path, 0, f"cannot read: {e}") from None


def _split_lines(data: bytes) -> list[bytes]:
    """Physical lines as an editor numbers them: split at LF (any CRs before it belong to the line end, so
    `\\r\\r\\n` is one), a lone CR inside a line is text; a file with more lone CRs than LFs (old Mac line ends,
    perhaps with a stray LF) is split at CR, CRLF and LF alike."""
    if data.count(b"\r") - data.count(b"\r\n") > data.count(b"\n"):
        lines = _LINE_END_RE.split(data)
    else:
        lines = [line.rstrip(b"\r") for line in data.split(b"\n")]
    if not lines[-1]:
        lines.pop()
    return lines


def _lines(path: Path, data: bytes, report: DataReport) -> Lines:
    """Decode line by line (so a bad byte names its line); blank lines are counted apart (`blank_lines`), never
    as rows."""
    return _skip_blank(_decoded_lines(path, data, report), report)


def _decoded_lines(path: Path, data: bytes, report: DataReport) -> Lines:
    """Every line decoded, blank ones included (for a reader that knows whether one is inside a quoted field or
    between records); a line that is not UTF-8 is skipped as `not_utf8` (on line 1: the whole file is refused)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for i, raw in enumerate(_split_lines(data), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if i == 1:
                raise _error(path, 1, f"not UTF-8 text ({e.reason} at byte {e.start}){_compressed(data)}") from None
            report.rows_read += 1
            report.skip(i, "not_utf8", str(e))
            continue
        yield i, line


def _compressed(data: bytes) -> str:
    """A hint for a file that is compressed ("" when it does not look so)."""
    if data.startswith(b"\x1f\x8b"):
        return ": a gzip file; decompress it first (gunzip)"
    if data.startswith(_ZIP_MAGIC):
        return ": a zip archive; unpack it first (only --format myntra reads its zip itself)"
    if data.startswith(b"\xfd7zXZ\x00"):
        return ": an xz file; decompress it first (unxz)"
    if data.startswith(b"BZh"):
        return ": a bzip2 file; decompress it first (bunzip2)"
    return ""


def _texts(p: CatalogProduct) -> Iterator[tuple[str, str]]:
    """Every string of a product, with the field it is in."""
    yield "product_id", p.product_id
    yield "title", p.title
    for name in ("description", "brand", "currency", "source"):
        value = getattr(p, name)
        if value is not None:
            yield name, value
    yield from (("category_path", c) for c in p.category_path)
    yield from (("attributes", s) for kv in p.attributes.items() for s in kv)
    yield from (("tags", t) for t in p.tags)


def _check_unicode(p: CatalogProduct) -> None:
    """Refuse a product with a lone surrogate in a string (JSON `"\\ud800"`): it cannot be featurized or written as
    UTF-8. Only JSONL can hold one: CSV formats are decoded as strict UTF-8."""
    for name, text in _texts(p):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _Malformed("not_unicode", f"{name}: a lone surrogate in {_show(text)}") from None


def _claim_id(p: CatalogProduct, holders: dict[str, CatalogProduct]) -> None:
    """Refuse a product whose id an earlier row holds. Only a row that cleaning keeps (non-empty title and category
    levels) holds its id, so one dropped for an empty title does not take its id's product with it."""
    held = holders.get(p.product_id)
    if held is not None and clean_text(held.title) and all(clean_label(c) for c in held.category_path):
        raise _Malformed("duplicate_product_id", _show(p.product_id))
    holders[p.product_id] = p


def _rows(
    path: Path, lines: Lines, report: DataReport, parse: Callable[[int, str], CatalogProduct]
) -> Iterator[tuple[int, CatalogProduct]]:
    """Parse data lines; a malformed row is skipped, but when the first data rows (`_FORMAT_PROBE_ROWS`, or all of a
    shorter file) all lack the format's shape, the file is in another format (DataError naming the first). One bad
    first row before good ones (a truncated line, a stray header) is skipped like any other."""
    holders: dict[str, CatalogProduct] = {}
    shapeless: list[tuple[int, _Malformed]] = []  # the structural failures while every row so far was one
    n = 0
    for n, (i, line) in enumerate(lines, 1):
        report.rows_read += 1
        try:
            p = parse(i, line)
            _claim_id(p, holders)
        except _Malformed as m:
            if m.structural and len(shapeless) == n - 1:
                shapeless.append((i, m))
                if len(shapeless) == _FORMAT_PROBE_ROWS:
                    raise _wrong_format(path, report.fmt, shapeless) from None
            report.skip(i, m.reason, m.detail)
            continue
        report.rows_parsed += 1
        yield i, p
    if shapeless and len(shapeless) == n:
        raise _wrong_format(path, report.fmt, shapeless)


def _wrong_format(path: Path, fmt: str, shapeless: list[tuple[int, _Malformed]]) -> DataError:
    """The file's first data rows, all without the format's shape: it is in another format."""
    i, m = shapeless[0]
    detail = f": {m.detail}" if m.detail else ""
    rows = "the only data row" if len(shapeless) == 1 else f"the first {len(shapeless)} data rows"
    return _error(path, i, f"{m.reason}{detail} ({rows} do not parse as {fmt!r}; wrong --format?)")


def _header(path: Path, lines: Lines, expected: list[str], fmt: str, *, exact: bool = False) -> None:
    """Check the header line: its first columns are `expected` (any case), and no more if `exact`."""
    try:
        i, line = next(lines)
    except StopIteration:
        raise _error(path, 1, f"empty file, expected a {fmt} header") from None
    try:
        got = [c.strip() for c in next(csv.reader([line]))]
    except csv.Error as e:
        raise _error(path, i, f"header is not valid CSV ({e})") from None
    problem = _header_problem(got, expected, exact=exact)
    if problem:
        raise _error(path, i, f"header {problem}; the {fmt} header is {','.join(expected)!r}")


def _header_problem(got: list[str], expected: list[str], *, exact: bool) -> str | None:
    for n, (have, want) in enumerate(zip(got, expected, strict=False), 1):
        if have.casefold() != want.casefold():
            return f"column {n} is {_show(have)}, expected {want!r}"
    if len(got) < len(expected) or (exact and len(got) > len(expected)):
        return f"has {len(got)} columns, expected {len(expected)}"
    return None


# ---------------------------------------------------------------- cn-jd


def _crumb_levels(field: str) -> int:
    """The number of levels of a field that looks like a breadcrumb (`图书>小说>当代`: 3), else 0."""
    field = field.strip()
    return field.count(">") + 1 if _BREADCRUMB_RE.match(field) else 0


def parse_jd_line(line: str, line_no: int, report: DataReport | None = None) -> CatalogProduct:
    """One JD row → product (raises `_Malformed`); records repairs in `report` when given."""
    f = line.rstrip("\r\n").split(",")
    if len(f) < 6:
        raise _Malformed("too_few_fields", f"{len(f)} fields, need 6", structural=True)
    cat_id, path_s, site, merchant = f[0].strip(), f[1], f[-2].strip(), f[-1]
    if not cat_id.isdigit():
        raise _Malformed("bad_category_id", _show(cat_id))
    path = tuple(c.strip() for c in path_s.split("|"))
    if len(path) < 2 or any(not c for c in path):
        raise _Malformed("bad_category_path", _show(path_s))
    middle = f[2:-2]
    if any(m.strip() in _KNOWN_SITES or (site and m.strip() == site) for m in middle[1:]):
        raise _Malformed("concatenated_records", "a site name inside the title/breadcrumb fields")
    levels = [_crumb_levels(m) for m in middle]
    k = next((j for j in range(1, len(middle)) if levels[j]), None)
    if levels[0] >= _BOOK_CRUMB_LEVELS and max(levels[1:], default=0) < _BOOK_CRUMB_LEVELS:
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

_MYNTRA_HEADER = [
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
]


def _myntra_bytes(path: Path) -> bytes:
    """The CSV bytes of a Myntra file: the file itself, or the member `_zip_member` picks of a zip."""
    data = _read_bytes(path)
    if not data.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(io.BytesIO(data)):
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            info = z.getinfo(_zip_member(path, z.namelist()))
            if info.flag_bits & 0x1:
                raise _error(path, 0, f"zip member {_show(info.filename)} is encrypted (password required)")
            return z.read(info)
    except NotImplementedError as e:
        raise _error(path, 0, f"zip member uses an unsupported compression method ({e})") from None
    except _ZIP_ERRORS as e:
        raise _error(path, 0, f"corrupt or truncated zip ({e})") from None


def _zip_member(path: Path, names: list[str]) -> str:
    """The one `styles.csv` (in any folder) of a zip, else its one `.csv`; more than one is refused."""
    csvs = [n for n in names if n.lower().endswith(".csv") and not n.startswith("__MACOSX")]
    styles = [n for n in csvs if n.rsplit("/", 1)[-1] == "styles.csv"]
    pick = styles or csvs
    if len(pick) == 1:
        return pick[0]
    if not pick:
        raise _error(path, 0, f"zip holds no .csv file (members: {_show(names)})")
    what = "styles.csv members" if styles else ".csv members and none is styles.csv"
    raise _error(path, 0, f"zip holds {len(pick)} {what} ({_show(pick)}): unzip the one to load")


def _glued_record(f: list[str]) -> bool:
    """Whether the title fields (10..) hold the start of another record, after a lost line break:
    `…<id>,<gender>,<master>,<sub>,<article>,<colour>,<season>,<year>,<usage>,<title>`."""
    return any(
        f[j - 1][-1:].isdigit() and all(f[j : j + 4]) and _YEAR_RE.fullmatch(f[j + 6]) for j in range(10, len(f) - 8)
    )


def _myntra_fields(line: str) -> list[str]:
    """A row's fields: split at every comma (the original file quotes nothing, and a title may hold commas), or, in
    a file re-saved with quotes (a field starting with `"`, every field or only those holding commas), read as CSV
    when that gives the 10 columns."""
    text = line.rstrip("\r\n")
    if text.startswith('"') or ',"' in text:
        try:
            quoted = next(csv.reader([text]))
        except csv.Error:
            quoted = []
        if len(quoted) == len(_MYNTRA_HEADER):
            return quoted
    return text.split(",")


def _parse_myntra(i: int, line: str, report: DataReport) -> CatalogProduct:
    f = _myntra_fields(line)
    if len(f) < 10:
        raise _Malformed("too_few_fields", f"{len(f)} fields, need 10", structural=True)
    if not f[0].strip().isdigit():
        raise _Malformed("bad_id", _show(f[0]))
    if _glued_record(f):
        raise _Malformed("concatenated_records", "the title holds the start of another record (a lost line break)")
    path = (f[2].strip(), f[3].strip(), f[4].strip())
    if any(_null(c) is None for c in path):
        raise _Malformed("missing_category", _show("|".join(path)))
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
    _header(path, lines, _MYNTRA_HEADER, "myntra", exact=True)
    yield from _rows(path, lines, report, lambda i, line: _parse_myntra(i, line, report))


# ---------------------------------------------------------------- bigbasket

_BB_HEADER = ["index", "product", "category", "sub_category", "brand", "sale_price", "market_price", "type"]
_BB_RECORD_START = re.compile(r"^\d+,")


def _price(s: str | None) -> float | None:
    """A price text: a decimal number, commas only as thousands separators (`1,250.50`); NA/empty → None."""
    s = _null(s)
    if s is None:
        return None
    v = float(s.replace(",", "")) if _PRICE_RE.fullmatch(s) else None
    if v is None or not math.isfinite(v):
        raise _Malformed("bad_price", _show(s))
    return v


def _parse_bigbasket(row: list[str]) -> CatalogProduct:
    if len(row) < 8:
        raise _Malformed("too_few_fields", f"{len(row)} fields, need 8", structural=True)
    idx = row[0].strip()
    if not idx.isdigit():
        raise _Malformed("bad_index", _show(idx))
    path = (row[2].strip(), row[3].strip(), row[7].strip())
    if any(not c for c in path):
        raise _Malformed("missing_category", _show("|".join(path)))
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


def _skip_blank(lines: Lines, report: DataReport) -> Lines:
    """`lines` without its blank lines, which are counted (`blank_lines`)."""
    for item in lines:
        if item[1].strip():
            yield item
        else:
            report.blank_lines += 1


def _csv_records(lines: Lines, unterminated: set[int], report: DataReport, max_lines: int = _MAX_RECORD_LINES) -> Lines:
    """Physical lines → BigBasket CSV records, joining the lines of a quoted field that spans them (the real file
    has two such titles). The lines are joined only when the quote closes within `max_lines` lines and the result
    parses as one row. A line that starts a record of its own (`<index>,`) ends the search, unless it closes the
    quote and the opening line has too few fields to be a record (`"Pack of` + `12, Red",…`). Else the first line
    is yielded alone and added to `unterminated` (the parser skips it as `unterminated_quote`) and the lines after
    it are read again as records of their own, so every physical line is kept or skipped by line number, never
    swallowed. A blank line is text inside a quoted field, and counted as blank (`blank_lines`) between records."""
    queue: deque[tuple[int, str]] = deque()
    source = iter(lines)

    def pull() -> tuple[int, str] | None:
        return queue.popleft() if queue else next(source, None)

    while (item := pull()) is not None:
        if not item[1].strip():
            report.blank_lines += 1
            continue
        if not _ends_in_quotes(item[1], False):
            yield item
            continue
        group = [item]
        fragment = item[1].count(",") + 1 < len(_BB_HEADER)
        closed = False
        while len(group) < max_lines and (nxt := pull()) is not None:
            closes = not _ends_in_quotes(nxt[1], True)
            if _BB_RECORD_START.match(nxt[1]) and not (fragment and closes):
                queue.appendleft(nxt)
                break
            group.append(nxt)
            if closes:
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
    lines = _decoded_lines(path, _read_bytes(path), report)  # a quoted field may hold a blank line
    _header(path, _skip_blank(lines, report), _BB_HEADER, "bigbasket")
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

    yield from _rows(path, _csv_records(lines, unterminated, report), report, parse)


# ---------------------------------------------------------------- jsonl


def _typed(v: object) -> str:
    return f"{type(v).__name__} {_show(v)}"


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


def _json_object(line: str) -> dict[str, Any]:
    """The object of a JSON line. Not JSON or not an object is structural; JSON nested too deeply or with an integer
    of more than 4300 digits is a bad value."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        at = "" if e.msg.endswith(" at") else " at"  # "Unterminated string starting at" names no place itself
        raise _Malformed("invalid_json", f"{e.msg}{at} column {e.colno}", structural=True) from None
    except RecursionError:
        raise _Malformed("invalid_json", "nested too deeply") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise _Malformed("invalid_json", str(e).split(":")[0]) from None
    if not isinstance(obj, dict):
        raise _Malformed("not_an_object", type(obj).__name__, structural=True)
    return obj


def _json_id(v: object) -> str:
    if v is None or v == "":
        raise _Malformed("missing_product_id")
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise _Malformed("bad_product_id", _typed(v))
    pid = str(v)
    if not _PRODUCT_ID_RE.fullmatch(pid):
        raise _Malformed("bad_product_id", _show(pid))
    return pid


def _json_title(v: object) -> str:
    if v is None:
        raise _Malformed("missing_title")
    if not isinstance(v, str):
        raise _Malformed("bad_title", _typed(v))
    return v


def _json_path(v: object) -> tuple[str, ...]:
    """A list of strings, or a non-empty `A|B|C` string."""
    if v is None:
        return ()
    if isinstance(v, str) and v:
        return tuple(v.split("|"))
    if isinstance(v, list) and all(isinstance(c, str) for c in v):
        return tuple(v)
    raise _Malformed("bad_category_path", _typed(v))


def _json_attributes(v: object) -> dict[str, str]:
    """An object of strings and numbers; a null value is an attribute the product does not have."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Malformed("bad_attributes", _typed(v))
    attributes: dict[str, str] = {}
    for k, x in v.items():
        if x is None:
            continue
        value = _label_value(x)
        if value is None:
            raise _Malformed("bad_attributes", f"{_show(k)}: {_typed(x)}")
        attributes[k] = value
    return attributes


def _json_tags(v: object) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise _Malformed("bad_tags", _typed(v))
    return tuple(v)


def _json_price(v: object) -> float | None:
    """A number ≥ 0 or a price text (`_price`)."""
    if v is None or isinstance(v, str):
        return _price(v)
    if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= sys.float_info.max:  # not NaN/inf
        return float(v)
    raise _Malformed("bad_price", _typed(v))


def _json_text(obj: dict[str, Any], key: str) -> str | None:
    """`description`, `brand`, …: a string or a number."""
    v = obj.get(key)
    text = None if v is None else _label_value(v)
    if v is not None and text is None:
        raise _Malformed(f"bad_{key}", _typed(v))
    return text


def _parse_jsonl(line: str, unknown_keys: list[str] | None = None) -> CatalogProduct:
    """A JSONL row; `unknown_keys` is set to its keys tagstream does not read once it parsed (the caller counts them
    when the row is kept)."""
    obj = _json_object(line)
    product = CatalogProduct(
        product_id=_json_id(obj.get("product_id")),
        title=_json_title(obj.get("title")),
        category_path=_json_path(obj.get("category_path")),
        attributes=_json_attributes(obj.get("attributes")),
        tags=_json_tags(obj.get("tags")),
        price=_json_price(obj.get("price")),
        description=_json_text(obj, "description"),
        brand=_json_text(obj, "brand"),
        currency=_json_text(obj, "currency"),
        source=_json_text(obj, "source"),
    )
    if "\\u" in line:  # only a `\u` escape makes a lone surrogate (the line was decoded from strict UTF-8)
        _check_unicode(product)
    if unknown_keys is not None:
        unknown_keys[:] = [k for k in obj if k not in JSONL_KEYS]
    return product


def _load_jsonl(path: Path, report: DataReport) -> Iterator[tuple[int, CatalogProduct]]:
    lines = _lines(path, _read_bytes(path), report)
    unknown: list[str] = []  # of the row parsed last: counted only when it is kept (not a malformed row)
    for i, product in _rows(path, lines, report, lambda i, line: _parse_jsonl(line, unknown)):
        report.unknown_keys.update(unknown)
        yield i, product


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
        raise _error(path, 0, f"unknown format {_show(fmt)} (choose from {', '.join(sorted(LOADERS))})")
    report = DataReport(path=str(path), fmt=fmt, max_examples=max_examples)
    rows = list(LOADERS[fmt](path, report))
    if not rows:
        ex = report.examples[0] if report.examples else {"line": 0, "reason": "", "detail": ""}
        why = f"{ex['reason']} {ex['detail']}".strip()
        raise _error(path, ex["line"], f"{why + ' — ' if why else ''}no product rows ({report.rows_read} rows read)")
    # rows repeating an id are well formed (an export appended twice): skipped and counted, never a wrong format
    malformed = report.rows_skipped - report.skipped.get("duplicate_product_id", 0)
    if report.rows_read and malformed / report.rows_read > _MALFORMED_LIMIT:
        bad = [e for e in report.examples if e["reason"] != "duplicate_product_id"]
        ex = bad[0] if bad else {"line": 0, "reason": "?"}
        raise _error(
            path,
            ex["line"],
            f"{ex['reason']} — {malformed} of {report.rows_read} rows malformed (wrong --format {fmt!r}?)",
        )
    products = clean_products(rows, report, dedupe=dedupe)
    return LoadResult(products=products, report=report)
