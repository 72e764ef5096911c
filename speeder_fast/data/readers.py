"""Readers: RecBole atomic files, raw Amazon 2018 reviews/meta, raw Amazon 2023 reviews/meta.

Every reader returns one :class:`~speeder_fast.data.dataset.RecDataset` with

* users and items indexed in order of first appearance in the interaction file(s);
* per-user sequences sorted by timestamp, ties broken by file order (stable sort);
* ``item_text`` holding the standard fields (``title``, ``description``, ``brand``,
  ``categories``) when the source has them, plus any extra text fields (``image_url``,
  ``features``, ...); an item without a text row gets ``""`` in every field.

Field mapping of the raw Amazon releases:

* 2018 (``*.json[.gz]`` reviews + ``meta_*.json[.gz]``): ``reviewerID`` -> user, ``asin`` -> item,
  ``unixReviewTime`` -> time; meta ``title``, ``description`` (list, joined with ``" "``),
  ``brand``, ``category`` (list, joined with ``", "``) -> categories, first of ``imageURLHighRes``
  else ``imageURL`` -> extra field ``image_url``.
* 2023 (``*.jsonl[.gz]`` reviews + ``meta_*.jsonl[.gz]``): ``user_id`` -> user, ``parent_asin``
  -> item, ``timestamp`` (ms) -> time; meta ``title``, ``description`` (list, joined with
  ``" "``), ``store`` -> brand, ``categories`` (list, joined with ``", "``) -> categories.
  ``features`` (list) is **not** merged into the description: it is kept as the extra field
  ``features`` (joined with ``" "``) so templates can use ``{features}``; ``main_category`` is
  kept as an extra field; the first image's ``hi_res`` (else ``large``) -> ``image_url``.

Malformed input raises :class:`DataFormatError` naming the file, the line and the field.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from speeder_fast.data.dataset import TEXT_FIELDS, RecDataset
from speeder_fast.utils import get_logger

log = get_logger("speeder_fast.data")

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
# RecBole/raw column names that map onto the standard text fields.
TEXT_COLUMN_MAP = {
    "title": "title",
    "movie_title": "title",
    "description": "description",
    "brand": "brand",
    "categories": "categories",
    "category": "categories",
    "class": "categories",
    "genre": "categories",
    "genres": "categories",
}


class DataFormatError(ValueError):
    """An input file is malformed; the message names the file, line and field."""


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


PROGRESS_MIN_BYTES = 64 << 20  # show a progress bar when reading files at least this large


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line without the newline)``; gzip errors name the file.

    Large files (>= PROGRESS_MIN_BYTES on disk) get a tqdm progress bar counting lines.
    """
    try:
        big = path.stat().st_size >= PROGRESS_MIN_BYTES
        with _open_text(path) as f, tqdm(desc=f"reading {path.name}", unit=" lines", disable=not big,
                                         mininterval=1.0) as bar:
            for n, line in enumerate(f, 1):
                if big:
                    bar.update(1)
                yield n, line.rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read file: {e}") from e


def _iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for a JSON-lines file; blank lines are skipped."""
    empty = True
    for n, line in _iter_lines(path):
        if not line.strip():
            continue
        empty = False
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj
    if empty:
        raise DataFormatError(f"{path}: file is empty (no JSON records)")


def _clean(s: Any) -> str:
    """A single-line string (tabs/newlines collapsed) from a str/number/None."""
    if s is None:
        return ""
    if not isinstance(s, str):
        s = str(s)
    return " ".join(s.split()) if ("\n" in s or "\t" in s or "\r" in s) else s.strip()


def _join(v: Any, sep: str) -> str:
    """Join a list of strings (nested lists flattened); a plain string is returned cleaned."""
    if v is None:
        return ""
    if isinstance(v, str):
        return _clean(v)
    if isinstance(v, (list, tuple)):
        out: list[str] = []
        for x in v:
            if isinstance(x, (list, tuple)):
                x = _join(x, sep)
            x = _clean(x)
            if x:
                out.append(x)
        return sep.join(out)
    return _clean(v)


def build_dataset(
    name: str,
    users: list[str],
    items: list[str],
    times: np.ndarray | None,
    item_rows: dict[str, dict[str, str]] | None,
    text_fields: list[str],
    source: str,
) -> RecDataset:
    """Events (one entry per interaction, in file order) -> RecDataset.

    Users/items are indexed by first appearance; each user's events are sorted by time with a
    stable sort, so ties keep file order. ``item_rows`` maps raw item id -> {field: text}; items
    without a row get ``""`` everywhere (counted and logged); rows for items that never occur
    in the interactions are ignored.
    """
    if not users:
        raise DataFormatError(f"{source}: no interactions")
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    u = np.fromiter((user_index.setdefault(x, len(user_index)) for x in users), np.int64, len(users))
    it = np.fromiter((item_index.setdefault(x, len(item_index)) for x in items), np.int64, len(items))
    if times is None:
        order = np.argsort(u, kind="stable")
    else:
        t = np.asarray(times, dtype=np.float64)
        by_time = np.argsort(t, kind="stable")
        order = by_time[np.argsort(u[by_time], kind="stable")]
    u_sorted, it_sorted = u[order], it[order]
    counts = np.bincount(u_sorted, minlength=len(user_index))
    sequences = np.split(it_sorted, np.cumsum(counts)[:-1])
    user_ids = list(user_index)
    item_ids = list(item_index)
    item_text: dict[str, list[str]] = {}
    if item_rows is not None and text_fields:
        missing = 0
        cols: dict[str, list[str]] = {f: [] for f in text_fields}
        for raw in item_ids:
            row = item_rows.get(raw)
            if row is None:
                missing += 1
                for f in text_fields:
                    cols[f].append("")
            else:
                for f in text_fields:
                    cols[f].append(row.get(f, ""))
        if missing:
            log.warning("%s: %d of %d items have no text row (empty strings used)", source, missing, len(item_ids))
        ignored = len(set(item_rows) - set(item_index))
        if ignored:
            log.info("%s: %d item rows refer to items without interactions (ignored)", source, ignored)
        item_text = _order_fields(cols)
    return RecDataset(name=name, user_ids=user_ids, item_ids=item_ids, sequences=sequences,
                      item_text=item_text, source=source)


def _order_fields(cols: dict[str, list[str]]) -> dict[str, list[str]]:
    """Standard text fields first (in TEXT_FIELDS order), extra fields after, in given order."""
    out = {f: cols[f] for f in TEXT_FIELDS if f in cols}
    out.update({k: v for k, v in cols.items() if k not in out})
    return out


# ----------------------------------------------------------------------------------------------
# RecBole atomic files
# ----------------------------------------------------------------------------------------------


def _parse_header(path: Path, line: str) -> list[tuple[str, str]]:
    cols = []
    for raw in line.split("\t"):
        if ":" not in raw:
            raise DataFormatError(f"{path}:1: column {raw!r} has no type (expected name:type, "
                                  f"type one of {', '.join(ATOMIC_TYPES)})")
        name, typ = raw.rsplit(":", 1)
        name, typ = name.strip(), typ.strip()
        if typ not in ATOMIC_TYPES:
            raise DataFormatError(f"{path}:1: column {name!r} has unknown type {typ!r} "
                                  f"(expected one of {', '.join(ATOMIC_TYPES)})")
        cols.append((name, typ))
    return cols


def _find_column(cols: list[tuple[str, str]], prefix: str) -> int | None:
    names = [c[0] for c in cols]
    if prefix in names:
        return names.index(prefix)
    for i, n in enumerate(names):
        if n.startswith(prefix):
            return i
    return None


def _read_atomic_table(path: Path) -> tuple[list[tuple[str, str]], list[list[str]], list[int]]:
    """Header + rows (split on tabs) + their 1-based line numbers; checks the field count."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    lines = _iter_lines(path)
    header = next(lines, None)
    if header is None or not header[1].strip():
        raise DataFormatError(f"{path}: file is empty (expected a typed header 'name:type<TAB>...')")
    cols = _parse_header(path, header[1])
    n = len(cols)
    rows: list[list[str]] = []
    line_nos: list[int] = []
    for ln, line in lines:
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != n:
            raise DataFormatError(f"{path}:{ln}: expected {n} tab-separated fields "
                                  f"({', '.join(c[0] for c in cols)}), got {len(parts)}")
        rows.append(parts)
        line_nos.append(ln)
    return cols, rows, line_nos


def _parse_floats(path: Path, col: str, values: list[str], line_nos: list[int]) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float64)
    except ValueError:
        for v, ln in zip(values, line_nos):
            try:
                float(v)
            except ValueError:
                raise DataFormatError(f"{path}:{ln}: column {col!r}: {v!r} is not a number") from None
        raise


def _atomic_paths(folder: str | Path, name: str | None = None) -> tuple[Path, str]:
    """Resolve ``(folder, NAME)`` of an atomic dataset given a folder or a ``.inter`` file."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".inter":
        return folder.parent, name or folder.stem
    if name is None:
        inters = sorted(folder.glob("*.inter"))
        if not inters:
            raise DataFormatError(f"{folder}: no NAME.inter file")
        if len(inters) > 1:
            match = [p for p in inters if p.stem == folder.name]
            if len(match) != 1:
                raise DataFormatError(f"{folder}: several .inter files ({', '.join(p.name for p in inters)}); "
                                      "pass the file path to choose one")
            inters = match
        name = inters[0].stem
    return folder, name


def read_atomic(folder: str | Path, name: str | None = None) -> RecDataset:
    """Read RecBole atomic files ``folder/NAME.inter`` (+ optional ``folder/NAME.item``).

    The user/item/timestamp columns are found by name (``user_id``, ``item_id``, ``timestamp``,
    or the first column whose name starts with that); other ``.inter`` columns (ratings, ...) are
    ignored. ``.item`` columns of type token/token_seq become item text: title/movie_title ->
    ``title``, description, brand, categories/class/genre -> ``categories``; any other text
    column is kept under its own name. Numeric ``.item`` columns are ignored.
    """
    folder, name = _atomic_paths(folder, name)
    inter = folder / f"{name}.inter"
    cols, rows, line_nos = _read_atomic_table(inter)
    if not rows:
        raise DataFormatError(f"{inter}: no interactions after the header")
    ui, ii, ti = (_find_column(cols, p) for p in ("user_id", "item_id", "timestamp"))
    for idx, what in ((ui, "user_id"), (ii, "item_id")):
        if idx is None:
            raise DataFormatError(f"{inter}:1: no {what} column (columns: {', '.join(c[0] for c in cols)})")
    users = [r[ui] for r in rows]
    items = [r[ii] for r in rows]
    for col_i, vals in ((ui, users), (ii, items)):
        for v, ln in zip(vals, line_nos):
            if not v:
                raise DataFormatError(f"{inter}:{ln}: column {cols[col_i][0]!r} is empty")
    times = None
    if ti is not None:
        if cols[ti][1] not in ("float", "token"):
            raise DataFormatError(f"{inter}:1: column {cols[ti][0]!r} has type {cols[ti][1]!r}; "
                                  "a timestamp must be float or token")
        times = _parse_floats(inter, cols[ti][0], [r[ti] for r in rows], line_nos)
    else:
        log.info("%s: no timestamp column; file order is the interaction order", inter)

    item_rows = None
    text_fields: list[str] = []
    item_file = folder / f"{name}.item"
    if item_file.is_file():
        icols, irows, ilines = _read_atomic_table(item_file)
        iid = _find_column(icols, "item_id")
        if iid is None:
            raise DataFormatError(f"{item_file}:1: no item_id column (columns: {', '.join(c[0] for c in icols)})")
        fields: list[tuple[int, str]] = []
        for j, (cname, ctype) in enumerate(icols):
            if j == iid or ctype not in ("token", "token_seq"):
                continue
            target = TEXT_COLUMN_MAP.get(cname, cname)
            if target in (f for _, f in fields):
                target = cname  # two columns map to the same field: keep the second under its name
            fields.append((j, target))
        text_fields = [f for _, f in fields]
        item_rows = {}
        dup = 0
        for r in irows:
            key = r[iid]
            if key in item_rows:
                dup += 1
                continue
            item_rows[key] = {f: _clean(r[j]) for j, f in fields}
        if dup:
            log.warning("%s: %d duplicate item rows (first kept)", item_file, dup)
    return build_dataset(name, users, items, times, item_rows, text_fields, str(inter))


# ----------------------------------------------------------------------------------------------
# raw Amazon releases
# ----------------------------------------------------------------------------------------------


def _strip_ext(name: str) -> str:
    for ext in (".jsonl.gz", ".json.gz", ".jsonl", ".json"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _require(path: Path, ln: int, obj: dict, key: str) -> Any:
    v = obj.get(key)
    if v is None or v == "":
        raise DataFormatError(f"{path}:{ln}: missing field {key!r}")
    return v


def _read_reviews(path: Path, user_key: str, item_key: str, time_key: str,
                  time_scale: float = 1.0) -> tuple[list[str], list[str], np.ndarray]:
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    for ln, obj in _iter_json_lines(path):
        users.append(str(_require(path, ln, obj, user_key)))
        items.append(str(_require(path, ln, obj, item_key)))
        t = _require(path, ln, obj, time_key)
        try:
            times.append(float(t) * time_scale)
        except (TypeError, ValueError):
            raise DataFormatError(f"{path}:{ln}: field {time_key!r}: {t!r} is not a number") from None
    return users, items, np.asarray(times, dtype=np.float64)


def _read_meta(path: Path, item_key: str, convert: Callable[[dict], dict[str, str]],
               wanted: set[str]) -> dict[str, dict[str, str]]:
    """Meta rows for the items in ``wanted`` (first row per item kept)."""
    rows: dict[str, dict[str, str]] = {}
    for ln, obj in _iter_json_lines(path):
        key = obj.get(item_key)
        if key is None:
            raise DataFormatError(f"{path}:{ln}: missing field {item_key!r}")
        key = str(key)
        if key in wanted and key not in rows:
            try:
                rows[key] = convert(obj)
            except (TypeError, AttributeError) as e:
                raise DataFormatError(f"{path}:{ln}: unexpected field layout: {e}") from e
    return rows


def _meta_2018(obj: dict) -> dict[str, str]:
    imgs = obj.get("imageURLHighRes") or obj.get("imageURL") or []
    if isinstance(imgs, str):
        imgs = [imgs]
    return {
        "title": _clean(obj.get("title")),
        "description": _join(obj.get("description"), " "),
        "brand": _clean(obj.get("brand")),
        "categories": _join(obj.get("category") or obj.get("categories"), ", "),
        "image_url": _clean(imgs[0]) if imgs else "",
    }


def _meta_2023(obj: dict) -> dict[str, str]:
    url = ""
    for img in obj.get("images") or []:
        if isinstance(img, dict):
            url = img.get("hi_res") or img.get("large") or ""
            if url:
                break
        elif isinstance(img, str) and img:
            url = img
            break
    return {
        "title": _clean(obj.get("title")),
        "description": _join(obj.get("description"), " "),
        "brand": _clean(obj.get("store")),
        "categories": _join(obj.get("categories"), ", "),
        "features": _join(obj.get("features"), " "),
        "main_category": _clean(obj.get("main_category")),
        "image_url": _clean(url),
    }


_FIELDS_2018 = ["title", "description", "brand", "categories", "image_url"]
_FIELDS_2023 = ["title", "description", "brand", "categories", "features", "main_category", "image_url"]


def _pick_files(folder: Path, exts: tuple[str, ...], what: str) -> tuple[Path, Path | None]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(exts))
    metas = [p for p in files if p.name.startswith("meta_")]
    reviews = [p for p in files if not p.name.startswith("meta_")]
    if not reviews:
        raise DataFormatError(f"{folder}: no {what} review file ({' or '.join('*' + e for e in exts)} "
                              "not starting with meta_)")
    if len(reviews) > 1:
        raise DataFormatError(f"{folder}: several {what} review files ({', '.join(p.name for p in reviews)}); "
                              "pass the file path to choose one")
    return reviews[0], _match_meta(reviews[0], metas)


def _match_meta(review: Path, metas: list[Path]) -> Path | None:
    stem = _strip_ext(review.name)
    base = re.sub(r"_5$", "", stem)
    for m in metas:
        if _strip_ext(m.name)[len("meta_"):] in (stem, base):
            return m
    if len(metas) == 1:
        return metas[0]
    if metas:
        log.warning("%s: several meta files and none named meta_%s.*: item text not read", review, base)
    return None


def _amazon_paths(path: Path, exts: tuple[str, ...], what: str) -> tuple[Path, Path | None]:
    """``(reviews file, meta file or None)`` for a folder or a reviews file."""
    if path.is_dir():
        review, meta = _pick_files(path, exts, what)
    else:
        review = path
        metas = sorted(p for p in path.parent.iterdir() if p.name.startswith("meta_") and p.name.endswith(exts))
        meta = _match_meta(review, metas)
    if review.name.startswith("meta_"):
        raise DataFormatError(f"{review}: this is a meta file; pass the reviews file or the folder")
    return review, meta


def _read_amazon(path: Path, exts: tuple[str, ...], what: str, user_key: str, item_key: str,
                 time_key: str, time_scale: float, convert: Callable[[dict], dict[str, str]],
                 fields: list[str]) -> RecDataset:
    review, meta = _amazon_paths(path, exts, what)
    users, items, times = _read_reviews(review, user_key, item_key, time_key, time_scale)
    item_rows = None
    if meta is not None:
        item_rows = _read_meta(meta, item_key, convert, set(items))
    else:
        log.warning("%s: no meta_*.%s file found; items have no text", review, exts[0].lstrip("."))
    name = re.sub(r"_5$", "", _strip_ext(review.name))
    ds = build_dataset(name, users, items, times, item_rows, fields if meta is not None else [], str(review))
    return ds


def read_amazon2018(path: str | Path) -> RecDataset:
    """Raw Amazon 2018 release: a folder (or the reviews file) with ``*.json[.gz]`` + ``meta_*``."""
    return _read_amazon(Path(path), (".json", ".json.gz"), "Amazon 2018", "reviewerID", "asin",
                        "unixReviewTime", 1.0, _meta_2018, _FIELDS_2018)


def read_amazon2023(path: str | Path) -> RecDataset:
    """Raw Amazon 2023 release: a folder (or the reviews file) with ``*.jsonl[.gz]`` + ``meta_*``.

    Timestamps are milliseconds; they are converted to seconds (ordering is unaffected).
    """
    return _read_amazon(Path(path), (".jsonl", ".jsonl.gz"), "Amazon 2023", "user_id", "parent_asin",
                        "timestamp", 1e-3, _meta_2023, _FIELDS_2023)


# ----------------------------------------------------------------------------------------------
# auto-detection
# ----------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """'atomic', 'amazon2018' or 'amazon2023' for a folder or a file; DataFormatError otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataFormatError(f"{p}: no such file or folder")
    names = [p.name] if p.is_file() else sorted(x.name for x in p.iterdir() if x.is_file())
    if any(n.endswith(".inter") for n in names):
        return "atomic"
    if any(n.endswith((".jsonl", ".jsonl.gz")) for n in names):
        return "amazon2023"
    if any(n.endswith((".json", ".json.gz")) for n in names):
        return "amazon2018"
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "nothing"
    raise DataFormatError(
        f"{p}: unrecognised dataset. Looked for NAME.inter (+ NAME.item) (RecBole atomic), "
        f"*.json[.gz] + meta_*.json[.gz] (Amazon 2018), *.jsonl[.gz] + meta_*.jsonl[.gz] (Amazon 2023); "
        f"found: {shown}")


def dataset_files(path: str | Path) -> tuple[str, str, list[Path]]:
    """``(format, dataset name, input files)`` that :func:`read_dataset` would read for ``path``."""
    fmt = detect_format(path)
    p = Path(path)
    if fmt == "atomic":
        folder, name = _atomic_paths(p)
        files = [folder / f"{name}.inter"]
        if (folder / f"{name}.item").is_file():
            files.append(folder / f"{name}.item")
        return fmt, name, files
    exts = (".jsonl", ".jsonl.gz") if fmt == "amazon2023" else (".json", ".json.gz")
    review, meta = _amazon_paths(p, exts, "Amazon 2023" if fmt == "amazon2023" else "Amazon 2018")
    name = re.sub(r"_5$", "", _strip_ext(review.name))
    return fmt, name, [review] + ([meta] if meta is not None else [])


def read_dataset(path: str | Path) -> RecDataset:
    """Read a dataset folder or file, auto-detecting the format (see :func:`detect_format`)."""
    fmt = detect_format(path)
    log.info("reading %s (%s)", path, fmt)
    if fmt == "atomic":
        return read_atomic(path)
    if fmt == "amazon2023":
        return read_amazon2023(path)
    return read_amazon2018(path)
