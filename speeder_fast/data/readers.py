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

Text encoding: every file is read as UTF-8; a leading byte-order mark (``EF BB BF``, as Excel and
Notepad write it) is skipped. A byte that is not UTF-8 is an error (not replaced): it names the file,
the line, the column (atomic files) or JSON field, and the byte, so a latin-1/cp1252 export is found
at once instead of feeding mojibake titles to the model.

RecBole benchmark files (``benchmark_filename``): a folder with ``NAME.train.inter``,
``NAME.valid.inter``, ``NAME.test.inter`` (+ ``NAME.item``), or any of the three files, is read as
one dataset whose split is kept as given (see :func:`read_atomic`).

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
from speeder_fast.errors import DataFormatError
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


#: the parts of a RecBole benchmark split, in sequence order (``NAME.<part>.inter``)
BENCHMARK_PARTS = ("train", "valid", "test")
_BENCHMARK_RE = re.compile(r"^(?P<name>.+)\.(?P<part>train|valid|test)\.inter$")
#: separators people put in atomic files instead of tabs (named in the error)
_OTHER_SEPARATORS = ((",", "commas"), (";", "semicolons"), ("|", "bars"))

# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _open_text(path: Path) -> io.TextIOBase:
    """UTF-8 text (a leading byte-order mark is skipped), gzip-decompressed for ``*.gz``."""
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", newline="")


def _decode_error_message(path: Path, tsv: bool) -> str | None:
    """Where the first non-UTF-8 byte of ``path`` is: ``"FILE:LINE: column 'c': byte 0xe9 ..."``.

    Re-reads the file in binary (only on the error path). ``tsv``: name the atomic-file column (from
    the header); otherwise, for a JSON line, the top-level field holding the byte when it can be told.
    """
    header: list[str] = []
    with _open_binary(path) as f:
        for ln, raw in enumerate(f, 1):
            if ln == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = ""
                if tsv and ln == 1:
                    where = " (header)"
                elif tsv:
                    col = raw[: e.start].count(b"\t")
                    name = header[col] if col < len(header) else f"#{col + 1}"
                    where = f" column {name!r}:"
                else:
                    try:
                        obj = json.loads(raw.decode("utf-8", errors="replace"))
                        keys = [k for k, v in obj.items() if "\ufffd" in json.dumps(v, ensure_ascii=False)]
                        where = f" field {keys[0]!r}:" if len(keys) == 1 else ""
                    except (ValueError, AttributeError):
                        pass
                return (f"{path}:{ln}:{where} byte 0x{raw[e.start]:02x} (byte {e.start + 1} of the line) is not "
                        "UTF-8; input files must be UTF-8 (a byte-order mark is fine): re-save it as UTF-8, "
                        "e.g. iconv -f latin1 -t utf-8 (or cp1252 for Windows exports)")
            if tsv and ln == 1:
                header = [c.rsplit(":", 1)[0].strip() for c in text.rstrip("\r\n").split("\t")]
    return None


PROGRESS_MIN_BYTES = 64 << 20  # show a progress bar when reading files at least this large


def iter_text_lines(path: Path, tsv: bool = False) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line without the newline)`` of a UTF-8 text file (or ``*.gz``).

    A leading byte-order mark is skipped. Errors are :class:`DataFormatError` naming the file: an
    unreadable/corrupt gzip, or a byte that is not UTF-8 (with its line, and the column for
    ``tsv=True`` atomic files or the JSON field). Large files (>= PROGRESS_MIN_BYTES on disk) get a
    tqdm progress bar counting lines.
    """
    try:
        big = path.stat().st_size >= PROGRESS_MIN_BYTES
        with _open_text(path) as f, tqdm(desc=f"reading {path.name}", unit=" lines", disable=not big,
                                         mininterval=1.0) as bar:
            for n, line in enumerate(f, 1):
                if big:
                    bar.update(1)
                yield n, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        try:
            msg = _decode_error_message(path, tsv)
        except (OSError, EOFError):
            msg = None
        raise DataFormatError(msg or f"{path}: not UTF-8: {e}") from None
    except (OSError, EOFError) as e:
        raise DataFormatError(f"{path}: cannot read file: {e}") from e


def _iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for a JSON-lines file; blank lines are skipped."""
    empty = True
    for n, line in iter_text_lines(path):
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
    drop_duplicates: bool = False,
    parts: np.ndarray | None = None,
) -> RecDataset:
    """Events (one entry per interaction, in file order) -> RecDataset.

    Users/items are indexed by first appearance; each user's events are sorted by time with a
    stable sort, so ties keep file order. ``item_rows`` maps raw item id -> {field: text}; items
    without a row get ``""`` everywhere (counted and logged); rows for items that never occur
    in the interactions are ignored.

    Args:
        drop_duplicates: drop exact duplicate events (same user, item and timestamp, anywhere in the
            file; the first in file order is kept). The count goes to ``read_report
            ["exact_duplicates_dropped"]``. Without timestamps nothing is dropped (logged).
        parts: int [n_events] (0 train, 1 valid, 2 test of a given split): events sort by part first,
            then time, then file order, and the dataset is marked ``given_split``.

    Raises:
        DataFormatError: no interactions.
    """
    if not users:
        raise DataFormatError(f"{source}: no interactions")
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    u = np.fromiter((user_index.setdefault(x, len(user_index)) for x in users), np.int64, len(users))
    it = np.fromiter((item_index.setdefault(x, len(item_index)) for x in items), np.int64, len(items))
    t = None if times is None else np.asarray(times, dtype=np.float64)
    report: dict = {}
    if drop_duplicates:
        if t is None:
            log.info("%s: no timestamps, so exact duplicates (same user, item and time) cannot be told from "
                     "repeat interactions; data.drop_duplicates drops nothing", source)
            report["exact_duplicates_dropped"] = 0
        else:
            keep = exact_duplicate_mask(u, it, t)
            report["exact_duplicates_dropped"] = int((~keep).sum())
            if not keep.all():
                log.info("%s: dropped %d exact duplicate interactions (same user, item and timestamp)", source,
                         report["exact_duplicates_dropped"])
                u, it, t = u[keep], it[keep], t[keep]
                parts = None if parts is None else np.asarray(parts)[keep]
    if parts is not None:
        keys = [np.arange(u.shape[0])] + ([] if t is None else [t]) + [np.asarray(parts), u]
        order = np.lexsort(keys)  # user, then part, then time, then file order
    elif t is None:
        order = np.argsort(u, kind="stable")
    else:
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
                      item_text=item_text, source=source, given_split=parts is not None, read_report=report)


def exact_duplicate_mask(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> np.ndarray:
    """bool [n]: False for an event whose (user, item, time) already occurred earlier in the arrays.

    Args: int64 ``users``/``items`` and float64 ``times`` of the same length ``n`` (file order).
    """
    n = users.shape[0]
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    order = np.lexsort((np.arange(n), times, items, users))  # equal triples adjacent, file order within
    same = ((users[order[1:]] == users[order[:-1]]) & (items[order[1:]] == items[order[:-1]])
            & (times[order[1:]] == times[order[:-1]]))
    keep[order[1:][same]] = False
    return keep


def _order_fields(cols: dict[str, list[str]]) -> dict[str, list[str]]:
    """Standard text fields first (in TEXT_FIELDS order), extra fields after, in given order."""
    out = {f: cols[f] for f in TEXT_FIELDS if f in cols}
    out.update({k: v for k, v in cols.items() if k not in out})
    return out


# ----------------------------------------------------------------------------------------------
# RecBole atomic files
# ----------------------------------------------------------------------------------------------


def _separator_problem(line: str, n_expected: int | None = None, subject: str = "the line is") -> str:
    """A hint when ``line`` looks separated by spaces/commas/... instead of tabs ("" otherwise).

    ``n_expected``: a data row must split into that many fields to count (None: a header, which
    counts when at least two fields look like ``name:type``).
    """
    seps = [(None, "spaces")] + [(c, w) for c, w in _OTHER_SEPARATORS]
    for sep, what in seps:
        fields = line.split(sep)
        if len(fields) < 2:
            continue
        if n_expected is None:
            ok = sum(":" in f for f in fields) >= 2
        else:
            ok = len(fields) == n_expected
        if ok:
            return (f"{subject} separated by {what}, not tabs: atomic files are tab-separated (RecBole "
                    "field_separator '\\t'); replace the separators by tabs")
    return ""


def _parse_header(path: Path, line: str) -> list[tuple[str, str]]:
    """``[(name, type)]`` of a typed atomic header ``name:type<TAB>...``.

    Raises:
        DataFormatError: a column without a type or with an unknown type, or a header separated by
            spaces/commas/semicolons instead of tabs (``path:1: ...``).
    """
    hint = _separator_problem(line) if "\t" not in line else ""
    for raw in line.split("\t") if not hint else []:
        if len(raw.split()) > 1 and sum(":" in f for f in raw.split()) >= 2:
            hint = _separator_problem(raw, subject=f"column {raw.strip()!r} is several columns")
            break
    if hint:
        raise DataFormatError(f"{path}:1: header: {hint}")
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
    lines = iter_text_lines(path, tsv=True)
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
            hint = _separator_problem(line, n) if len(parts) == 1 else ""
            raise DataFormatError(f"{path}:{ln}: expected {n} tab-separated fields ({', '.join(c[0] for c in cols)}), "
                                  f"got {len(parts)}" + (f"; {hint}" if hint else ""))
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


def _benchmark_parts(folder: Path, name: str) -> list[Path]:
    """The three ``NAME.{train,valid,test}.inter`` files; DataFormatError naming the missing ones."""
    files = [folder / f"{name}.{part}.inter" for part in BENCHMARK_PARTS]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise DataFormatError(
            f"{folder}: RecBole benchmark split {name}.{{train,valid,test}}.inter is incomplete: "
            f"{', '.join(missing)} missing. speeder_fast uses the given split only when all three parts "
            f"exist; otherwise concatenate the parts into one {name}.inter to split by leave-one-out")
    return files


def _atomic_paths(folder: str | Path, name: str | None = None) -> tuple[Path, str, bool]:
    """``(folder, NAME, benchmark)`` of an atomic dataset given a folder or a ``.inter`` file.

    ``benchmark`` is True for a RecBole benchmark split (``NAME.train.inter``, ``NAME.valid.inter``,
    ``NAME.test.inter``), whether the folder or one of the three files is given.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".inter":
        m = _BENCHMARK_RE.match(folder.name)
        if m and name is None:
            log.info("%s is part of the RecBole benchmark split %s.{train,valid,test}.inter: reading all three "
                     "parts with the split kept as given", folder, m["name"])
            _benchmark_parts(folder.parent, m["name"])
            return folder.parent, m["name"], True
        return folder.parent, name or folder.stem, False
    if name is not None:
        plain = (folder / f"{name}.inter").is_file()
        if not plain and (folder / f"{name}.train.inter").is_file():
            _benchmark_parts(folder, name)
            return folder, name, True
        return folder, name, False
    inters = sorted(folder.glob("*.inter"))
    if not inters:
        raise DataFormatError(f"{folder}: no NAME.inter file")
    # candidates: plain NAME.inter files and benchmark splits NAME.{train,valid,test}.inter
    plain = [p.stem for p in inters if not _BENCHMARK_RE.match(p.name)]
    bench = sorted({m["name"] for p in inters if (m := _BENCHMARK_RE.match(p.name))})
    options = [(n, False) for n in plain] + [(n, True) for n in bench]
    if len(options) > 1:
        match = [o for o in options if o[0] == folder.name]
        if len(match) != 1:
            shown = [f"{n}.inter" for n in plain] + [f"{n}.{{train,valid,test}}.inter (benchmark split)" for n in bench]
            raise DataFormatError(f"{folder}: several datasets ({', '.join(shown)}); pass the file path to choose "
                                  "one (NAME.train.inter for a benchmark split)")
        options = match
    name, is_bench = options[0]
    if is_bench:
        _benchmark_parts(folder, name)
    return folder, name, is_bench


def _read_interactions(inter: Path) -> tuple[list[str], list[str], np.ndarray | None]:
    """``(users, items, times or None)`` of one ``.inter`` file, in file order."""
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
    return users, items, times


def _read_item_table(item_file: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``(item_rows, text_fields)`` of a ``.item`` file (first row per item kept)."""
    icols, irows, _ = _read_atomic_table(item_file)
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
    item_rows: dict[str, dict[str, str]] = {}
    dup = 0
    for r in irows:
        key = r[iid]
        if key in item_rows:
            dup += 1
            continue
        item_rows[key] = {f: _clean(r[j]) for j, f in fields}
    if dup:
        log.warning("%s: %d duplicate item rows (first kept)", item_file, dup)
    return item_rows, [f for _, f in fields]


def _check_benchmark_split(name: str, parts: dict[str, list[str]]) -> None:
    """Refuse a benchmark split that is not one valid and one test interaction per user.

    ``parts``: part -> raw user id of each row. speeder_fast evaluates one held-out item per user
    (:class:`~speeder_fast.data.dataset.PreparedData` holds one valid and one test row per user), so
    any other shape cannot be used as given; the message counts the users affected.
    """
    from collections import Counter

    everyone = dict.fromkeys(parts["train"] + parts["valid"] + parts["test"])
    problems = []
    for part in ("valid", "test"):
        counts = Counter(parts[part])
        none = [u for u in everyone if u not in counts]
        many = [u for u, c in counts.items() if c > 1]
        if none:
            problems.append(f"{len(none)} user(s) have no row in {name}.{part}.inter (e.g. {none[0]!r})")
        if many:
            problems.append(f"{len(many)} user(s) have several rows in {name}.{part}.inter (e.g. {many[0]!r}: "
                            f"{counts[many[0]]})")
    if problems:
        raise DataFormatError(
            f"{name}.{{train,valid,test}}.inter: this benchmark split cannot be used as given: speeder_fast "
            f"evaluates exactly one valid and one test interaction per user, but {'; '.join(problems)}. Fix the "
            f"split files, or concatenate the three parts into one {name}.inter to split by leave-one-out")


def read_atomic(folder: str | Path, name: str | None = None, drop_duplicates: bool = False) -> RecDataset:
    """Read RecBole atomic files ``folder/NAME.inter`` (+ optional ``folder/NAME.item``).

    The user/item/timestamp columns are found by name (``user_id``, ``item_id``, ``timestamp``,
    or the first column whose name starts with that); other ``.inter`` columns (ratings, ...) are
    ignored. ``.item`` columns of type token/token_seq become item text: title/movie_title ->
    ``title``, description, brand, categories/class/genre -> ``categories``; any other text
    column is kept under its own name. Numeric ``.item`` columns are ignored. Files are
    tab-separated UTF-8 (a byte-order mark is skipped).

    **Benchmark split** (RecBole ``benchmark_filename``): ``NAME.train.inter``,
    ``NAME.valid.inter``, ``NAME.test.inter`` (+ ``NAME.item``) are read as one dataset whose split
    is kept as given: each user's sequence is their train rows (by time, ties in file order), then
    their valid row, then their test row, so leave-one-out gives exactly the given valid and test
    targets, and the training windows cover the train rows only. Every user must have exactly one
    valid and one test row (that is what the evaluation represents); the result has
    ``given_split=True``.

    Args:
        drop_duplicates: drop exact duplicate interactions (see :func:`build_dataset`).

    Raises:
        DataFormatError: a malformed file (names file, line, column), an incomplete benchmark split, or
            one that is not one valid + one test row per user (counts the users affected).
    """
    folder, name, bench = _atomic_paths(folder, name)
    if bench:
        files = _benchmark_parts(folder, name)
        users, items, times_l, parts, by_part = [], [], [], [], {}
        for code, (part, f) in enumerate(zip(BENCHMARK_PARTS, files)):
            u, i, t = _read_interactions(f)
            users += u
            items += i
            times_l.append(t)
            parts.append(np.full(len(u), code, np.int64))
            by_part[part] = u
        _check_benchmark_split(name, by_part)
        times = None if any(t is None for t in times_l) else np.concatenate(times_l)
        part_codes = np.concatenate(parts)
        source = str(files[0])
    else:
        inter = folder / f"{name}.inter"
        users, items, times = _read_interactions(inter)
        part_codes, source = None, str(inter)
    item_rows, text_fields = None, []
    item_file = folder / f"{name}.item"
    if item_file.is_file():
        item_rows, text_fields = _read_item_table(item_file)
    return build_dataset(name, users, items, times, item_rows, text_fields, source, drop_duplicates=drop_duplicates,
                         parts=part_codes)


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
                 fields: list[str], drop_duplicates: bool = False) -> RecDataset:
    review, meta = _amazon_paths(path, exts, what)
    users, items, times = _read_reviews(review, user_key, item_key, time_key, time_scale)
    item_rows = None
    if meta is not None:
        item_rows = _read_meta(meta, item_key, convert, set(items))
    else:
        log.warning("%s: no meta_*.%s file found; items have no text", review, exts[0].lstrip("."))
    name = re.sub(r"_5$", "", _strip_ext(review.name))
    return build_dataset(name, users, items, times, item_rows, fields if meta is not None else [], str(review),
                         drop_duplicates=drop_duplicates)


def read_amazon2018(path: str | Path, drop_duplicates: bool = False) -> RecDataset:
    """Raw Amazon 2018 release: a folder (or the reviews file) with ``*.json[.gz]`` + ``meta_*``.

    ``drop_duplicates``: drop repeated review lines (same user, item, time; see :func:`build_dataset`).
    """
    return _read_amazon(Path(path), (".json", ".json.gz"), "Amazon 2018", "reviewerID", "asin",
                        "unixReviewTime", 1.0, _meta_2018, _FIELDS_2018, drop_duplicates)


def read_amazon2023(path: str | Path, drop_duplicates: bool = False) -> RecDataset:
    """Raw Amazon 2023 release: a folder (or the reviews file) with ``*.jsonl[.gz]`` + ``meta_*``.

    Timestamps are milliseconds; they are converted to seconds (ordering is unaffected).
    ``drop_duplicates``: drop repeated review lines (same user, item, time; see :func:`build_dataset`).
    """
    return _read_amazon(Path(path), (".jsonl", ".jsonl.gz"), "Amazon 2023", "user_id", "parent_asin",
                        "timestamp", 1e-3, _meta_2023, _FIELDS_2023, drop_duplicates)


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
        folder, name, bench = _atomic_paths(p)
        files = _benchmark_parts(folder, name) if bench else [folder / f"{name}.inter"]
        if (folder / f"{name}.item").is_file():
            files.append(folder / f"{name}.item")
        return fmt, name, files
    exts = (".jsonl", ".jsonl.gz") if fmt == "amazon2023" else (".json", ".json.gz")
    review, meta = _amazon_paths(p, exts, "Amazon 2023" if fmt == "amazon2023" else "Amazon 2018")
    name = re.sub(r"_5$", "", _strip_ext(review.name))
    return fmt, name, [review] + ([meta] if meta is not None else [])


def read_dataset(path: str | Path, drop_duplicates: bool = False) -> RecDataset:
    """Read a dataset folder or file, auto-detecting the format (see :func:`detect_format`).

    ``drop_duplicates``: drop exact duplicate interactions (same user, item and timestamp); see
    :func:`build_dataset`. ``speeder_fast.data.prepare`` resolves ``data.drop_duplicates=auto`` to
    True for the raw Amazon formats and False for atomic files.
    """
    fmt = detect_format(path)
    log.info("reading %s (%s)", path, fmt)
    if fmt == "atomic":
        return read_atomic(path, drop_duplicates=drop_duplicates)
    if fmt == "amazon2023":
        return read_amazon2023(path, drop_duplicates)
    return read_amazon2018(path, drop_duplicates)
