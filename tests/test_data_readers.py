"""Readers: RecBole atomic, raw Amazon 2018 / 2023, auto-detection, bad inputs."""

from __future__ import annotations

import gzip
import re
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from speeder_fast.data import DataFormatError, detect_format, read_dataset
from speeder_fast.data.readers import read_amazon2018, read_amazon2023, read_atomic


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def seqs_raw(ds) -> dict[str, list[str]]:
    """user raw id -> list of raw item ids (chronological)."""
    return {ds.user_ids[u]: [ds.item_ids[i] for i in s.tolist()] for u, s in enumerate(ds.sequences)}


@pytest.fixture
def capture(caplog):
    """caplog that also sees the project logger (which does not propagate to root)."""
    lg = logging.getLogger("speeder_fast")
    lg.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="speeder_fast")
    yield caplog
    lg.removeHandler(caplog.handler)


# ---------------------------------------------------------------------------------- atomic


def test_atomic_extra_columns_ratings_and_missing_item_rows(tmp_path, capture):
    write_lines(tmp_path / "toy.inter", [
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\tnote:token_seq",
        "u1\ti1\t5\t10\ta b",
        "u1\ti2\t3\t20\t",
        "u2\ti2\t4\t5\tx",
        "u2\ti3\t1\t1\ty",
        "",  # a trailing blank line is tolerated
    ])
    write_lines(tmp_path / "toy.item", [
        "item_id:token\tmovie_title:token_seq\tdescription:token_seq\tclass:token_seq\tprice:float\tcolor:token",
        "i1\tFirst item\tdesc one\tA B\t1.5\tred",
        "i2\tSecond\t\t\t2.0\tblue",
        "i9\tUnused item\tnever interacted\tZ\t0\tgreen",  # not in .inter: ignored
    ])
    ds = read_dataset(tmp_path)
    assert ds.name == "toy"
    assert ds.user_ids == ["u1", "u2"] and ds.item_ids == ["i1", "i2", "i3"]
    assert seqs_raw(ds) == {"u1": ["i1", "i2"], "u2": ["i3", "i2"]}  # u2 sorted by timestamp
    assert all(s.dtype == np.int64 for s in ds.sequences)
    # mapped fields first, extra text column kept, numeric .item column ignored
    assert list(ds.item_text) == ["title", "description", "categories", "color"]
    assert ds.item_text["title"] == ["First item", "Second", ""]  # i3 has no row -> ""
    assert ds.item_text["categories"] == ["A B", "", ""]
    assert ds.item_text["color"] == ["red", "blue", ""]
    assert ds.title(1) == "Second"
    assert "1 of 3 items have no text row" in capture.text


def test_atomic_without_item_file_and_without_timestamp(tmp_path):
    write_lines(tmp_path / "ids.inter", ["user_id:token\titem_id:token", "a\tx", "b\ty", "a\tz", "a\tx"])
    ds = read_atomic(tmp_path / "ids.inter")
    assert ds.item_text == {}
    assert seqs_raw(ds) == {"a": ["x", "z", "x"], "b": ["y"]}  # file order kept
    assert ds.title(0) == ""


def test_atomic_stable_ties_keep_file_order(tmp_path):
    write_lines(tmp_path / "t.inter", [
        "user_id:token\titem_id:token\ttimestamp:float",
        "u\ti1\t5", "v\tj1\t1", "u\ti2\t3", "u\ti3\t5", "u\ti4\t3", "v\tj2\t1", "v\tj3\t0",
    ])
    assert seqs_raw(read_dataset(tmp_path)) == {"u": ["i2", "i4", "i1", "i3"], "v": ["j3", "j1", "j2"]}


def test_atomic_column_detection_by_prefix(tmp_path):
    write_lines(tmp_path / "p.inter", ["timestamp_s:float\titem_id_raw:token\tuser_id_raw:token",
                                       "2\tb\tu", "1\ta\tu"])
    assert seqs_raw(read_dataset(tmp_path)) == {"u": ["a", "b"]}


def test_atomic_malformed_line_names_file_and_line(tmp_path):
    write_lines(tmp_path / "bad.inter", ["user_id:token\titem_id:token\ttimestamp:float",
                                         "u\ti\t1", "u\ti2\t2", "u only-two-fields"])
    with pytest.raises(DataFormatError, match=r"bad\.inter:4: expected 3 tab-separated fields"):
        read_dataset(tmp_path)


def test_atomic_bad_timestamp_names_line_and_column(tmp_path):
    write_lines(tmp_path / "bad.inter", ["user_id:token\titem_id:token\ttimestamp:float",
                                         "u\ti\t1", "u\ti2\tyesterday"])
    with pytest.raises(DataFormatError, match=r"bad\.inter:3: column 'timestamp'.*'yesterday'"):
        read_dataset(tmp_path)


def test_atomic_unknown_type_names_file_line_and_column(tmp_path):
    write_lines(tmp_path / "bad.inter", ["user_id:token\titem_id:token\tscore:int", "u\ti\t1"])
    with pytest.raises(DataFormatError, match=r"bad\.inter:1: column 'score' has unknown type 'int'"):
        read_dataset(tmp_path)


def test_atomic_untyped_item_header(tmp_path):
    write_lines(tmp_path / "x.inter", ["user_id:token\titem_id:token", "u\ti"])
    write_lines(tmp_path / "x.item", ["item_id:token\ttitle", "i\tT"])
    with pytest.raises(DataFormatError, match=r"x\.item:1: column 'title' has no type"):
        read_dataset(tmp_path)


def test_atomic_empty_files(tmp_path):
    (tmp_path / "e.inter").write_text("")
    with pytest.raises(DataFormatError, match=r"e\.inter: file is empty"):
        read_dataset(tmp_path)
    write_lines(tmp_path / "e.inter", ["user_id:token\titem_id:token"])
    with pytest.raises(DataFormatError, match=r"e\.inter: no interactions"):
        read_dataset(tmp_path)


def test_atomic_missing_user_column(tmp_path):
    write_lines(tmp_path / "m.inter", ["uid:token\titem_id:token", "u\ti"])
    with pytest.raises(DataFormatError, match=r"m\.inter:1: no user_id column"):
        read_dataset(tmp_path)


# ---------------------------------------------------------------------------------- Amazon 2018


def _amazon2018(folder: Path, gz: bool) -> None:
    reviews = [
        {"reviewerID": "R1", "asin": "A1", "unixReviewTime": 300, "overall": 5.0, "reviewText": "nice"},
        {"reviewerID": "R1", "asin": "A2", "unixReviewTime": 100},
        {"reviewerID": "R2", "asin": "A2", "unixReviewTime": 50, "vote": "2"},
        {"reviewerID": "R1", "asin": "A3", "unixReviewTime": 100},  # tie with A2: file order
    ]
    meta = [
        {"asin": "A1", "title": "Stapler", "description": ["Heavy duty.", "Metal\tbody."], "brand": "Acme",
         "category": ["Office Products", "Staplers"], "imageURL": ["http://x/small.jpg"],
         "imageURLHighRes": ["http://x/large.jpg", "http://x/2.jpg"]},
        {"asin": "A2", "title": "Pen", "description": [], "category": [], "imageURL": ["http://x/pen.jpg"]},
        {"asin": "ZZ", "title": "never reviewed"},
    ]
    ext = ".json.gz" if gz else ".json"
    opener = gzip.open if gz else open
    with opener(folder / f"Office_Products_5{ext}", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in reviews)
    with opener(folder / f"meta_Office_Products{ext}", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in meta)


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2018(tmp_path, gz):
    _amazon2018(tmp_path, gz)
    assert detect_format(tmp_path) == "amazon2018"
    ds = read_dataset(tmp_path)
    assert ds.name == "Office_Products"
    assert seqs_raw(ds) == {"R1": ["A2", "A3", "A1"], "R2": ["A2"]}
    t = {f: dict(zip(ds.item_ids, col)) for f, col in ds.item_text.items()}
    assert list(ds.item_text)[:4] == ["title", "description", "brand", "categories"]
    assert t["title"] == {"A1": "Stapler", "A2": "Pen", "A3": ""}
    assert t["description"]["A1"] == "Heavy duty. Metal body."
    assert t["brand"] == {"A1": "Acme", "A2": "", "A3": ""}
    assert t["categories"]["A1"] == "Office Products, Staplers"
    assert t["image_url"] == {"A1": "http://x/large.jpg", "A2": "http://x/pen.jpg", "A3": ""}


def test_amazon2018_reviews_file_path(tmp_path):
    _amazon2018(tmp_path, gz=True)
    ds = read_amazon2018(tmp_path / "Office_Products_5.json.gz")
    assert ds.n_interactions == 4 and ds.item_text["title"][0] != ""


def test_amazon_malformed_json_names_line(tmp_path):
    (tmp_path / "Cat.json").write_text('{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n\n{"reviewerID": oops}\n')
    with pytest.raises(DataFormatError, match=r"Cat\.json:3: malformed JSON"):
        read_dataset(tmp_path)


def test_amazon_missing_field_names_line_and_field(tmp_path):
    (tmp_path / "Cat.json").write_text('{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n'
                                       '{"reviewerID": "a", "unixReviewTime": 2}\n')
    with pytest.raises(DataFormatError, match=r"Cat\.json:2: missing field 'asin'"):
        read_dataset(tmp_path)


def test_amazon_empty_review_file(tmp_path):
    (tmp_path / "Cat.json").write_text("\n")
    with pytest.raises(DataFormatError, match=r"Cat\.json: file is empty"):
        read_dataset(tmp_path)


# ---------------------------------------------------------------------------------- Amazon 2023


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2023(tmp_path, gz):
    reviews = [
        {"user_id": "U1", "parent_asin": "P1", "asin": "c1", "timestamp": 1_600_000_000_123, "rating": 5},
        {"user_id": "U1", "parent_asin": "P2", "asin": "c2", "timestamp": 1_500_000_000_000},
        {"user_id": "U2", "parent_asin": "P1", "asin": "c1", "timestamp": 1_700_000_000_000},
    ]
    meta = [
        {"parent_asin": "P1", "title": "Lamp", "description": ["Bright.", "LED."], "features": ["10W", "USB"],
         "categories": ["Home", "Lighting"], "store": "Lumo", "main_category": "Home",
         "images": [{"thumb": "t.jpg", "large": "l.jpg", "hi_res": "h.jpg"}]},
        {"parent_asin": "P2", "title": "Cable", "description": [], "features": [], "categories": [],
         "store": None, "images": [{"large": "cable.jpg", "hi_res": None}]},
    ]
    ext = ".jsonl.gz" if gz else ".jsonl"
    opener = gzip.open if gz else open
    with opener(tmp_path / f"All_Beauty{ext}", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in reviews)
    with opener(tmp_path / f"meta_All_Beauty{ext}", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in meta)
    assert detect_format(tmp_path) == "amazon2023"
    ds = read_dataset(tmp_path)
    assert ds.name == "All_Beauty"
    assert seqs_raw(ds) == {"U1": ["P2", "P1"], "U2": ["P1"]}
    t = {f: dict(zip(ds.item_ids, col)) for f, col in ds.item_text.items()}
    assert t["title"] == {"P1": "Lamp", "P2": "Cable"}
    assert t["description"] == {"P1": "Bright. LED.", "P2": ""}  # features NOT merged in
    assert t["features"] == {"P1": "10W USB", "P2": ""}
    assert t["brand"] == {"P1": "Lumo", "P2": ""}
    assert t["categories"]["P1"] == "Home, Lighting"
    assert t["image_url"] == {"P1": "h.jpg", "P2": "cable.jpg"}
    assert read_amazon2023(tmp_path).n_interactions == 3


def test_amazon2023_malformed_meta_line(tmp_path):
    (tmp_path / "X.jsonl").write_text('{"user_id": "u", "parent_asin": "p", "timestamp": 1}\n')
    (tmp_path / "meta_X.jsonl").write_text('{"parent_asin": "p", "title": "ok"}\n{"parent_asin": "q", \n')
    with pytest.raises(DataFormatError, match=r"meta_X\.jsonl:2: malformed JSON"):
        read_dataset(tmp_path)


# ---------------------------------------------------------------------------------- detection


def test_detect_format_error_lists_what_it_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataFormatError) as e:
        read_dataset(tmp_path)
    msg = str(e.value)
    for part in ("NAME.inter", "*.json[.gz]", "*.jsonl[.gz]", "readme.txt"):
        assert part in msg
    with pytest.raises(DataFormatError, match="no such file"):
        read_dataset(tmp_path / "missing")


# ------------------------------------------------------------- files as people actually have them
# (issue 14: each fixture is written by the test; no personal data)

BOM = b"\xef\xbb\xbf"


def write_bytes_lines(path: Path, lines: list[str], bom: bool = False, encoding: str = "utf-8") -> Path:
    data = "".join(line + "\r\n" for line in lines).encode(encoding)  # Excel also writes CRLF
    path.write_bytes((BOM if bom else b"") + data)
    return path


def test_bom_atomic_inter_and_item(tmp_path):
    """An .inter/.item saved by Excel starts with EF BB BF: the first column is still user_id / item_id."""
    write_bytes_lines(tmp_path / "x.inter", ["user_id:token\titem_id:token\ttimestamp:float",
                                             "u\ti1\t1", "u\ti2\t2"], bom=True)
    write_bytes_lines(tmp_path / "x.item", ["item_id:token\ttitle:token_seq", "i1\tCafé crème", "i2\tPen"], bom=True)
    ds = read_dataset(tmp_path)
    assert seqs_raw(ds) == {"u": ["i1", "i2"]}
    assert ds.item_text["title"] == ["Café crème", "Pen"]


@pytest.mark.parametrize("name,gz", [("Office.json", False), ("Office.json.gz", True), ("Office.jsonl", False),
                                     ("Office.jsonl.gz", True)])
def test_bom_raw_amazon_reviews_and_meta(tmp_path, name, gz):
    v2023 = ".jsonl" in name
    ukey, ikey, tkey = ("user_id", "parent_asin", "timestamp") if v2023 else ("reviewerID", "asin", "unixReviewTime")
    reviews = [json.dumps({ukey: "U", ikey: "A", tkey: 1}), json.dumps({ukey: "U", ikey: "B", tkey: 2})]
    meta = [json.dumps({ikey: "A", "title": "Ruler"})]
    for fname, lines in ((name, reviews), ("meta_" + name, meta)):
        data = BOM + "".join(x + "\n" for x in lines).encode()
        (tmp_path / fname).write_bytes(gzip.compress(data) if gz else data)
    ds = read_dataset(tmp_path)
    assert seqs_raw(ds) == {"U": ["A", "B"]} and ds.item_text["title"] == ["Ruler", ""]


def test_undecodable_byte_in_item_file_names_file_line_and_column(tmp_path):
    """A latin-1 byte on line 352 of an .item file: the error names the line and the column, not a buffer offset."""
    write_lines(tmp_path / "x.inter", ["user_id:token\titem_id:token", "u\ti1", "u\ti2"])
    rows = ["item_id:token\ttitle:token_seq\tdescription:token_seq"] + [f"i{k}\tItem {k}\tplain" for k in range(350)]
    rows.insert(351, "i9\tCaf\xe9\tlatin-1 title")  # line 352
    write_bytes_lines(tmp_path / "x.item", rows, encoding="latin-1")
    with pytest.raises(DataFormatError) as e:
        read_dataset(tmp_path)
    msg = str(e.value)
    assert re.search(r"x\.item:352: column 'title': byte 0xe9 \(byte 7 of the line\) is not UTF-8", msg), msg
    assert "iconv" in msg and "position" not in msg


def test_undecodable_byte_in_gzipped_json_names_line_and_field(tmp_path):
    (tmp_path / "C.json").write_text('{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}\n')
    meta = ['{"asin": "a", "title": "ok"}', '{"asin": "b", "title": "ok"}', '{"asin": "c", "brand": "Bj\xf6rk"}']
    (tmp_path / "meta_C.json.gz").write_bytes(gzip.compress("\n".join(meta).encode("latin-1")))
    with pytest.raises(DataFormatError, match=r"meta_C\.json\.gz:3: field 'brand': byte 0xf6 .* is not UTF-8"):
        read_dataset(tmp_path)


def test_undecodable_byte_in_users_file_names_line(tmp_path):
    from speeder_fast.recommend import read_users

    (tmp_path / "users.txt").write_bytes(BOM + b"u1\r\n# comment\r\nu2\r\n")
    assert read_users(tmp_path / "users.txt", {"u1": 0, "u2": 1}) == [(1, "u1", 0), (3, "u2", 1)]
    (tmp_path / "bad.txt").write_bytes(b"u1\nJos\xe9\n")
    with pytest.raises(DataFormatError, match=r"bad\.txt:2: byte 0xe9"):
        read_users(tmp_path / "bad.txt", {"u1": 0})


@pytest.mark.parametrize("header", ["user_id:token item_id:token timestamp",
                                    "user_id:token  item_id:token  timestamp:float",
                                    "user_id:token,item_id:token,timestamp:float",
                                    "user_id:token\titem_id:token timestamp:float"])
def test_space_or_comma_separated_header_says_tabs(tmp_path, header):
    write_lines(tmp_path / "s.inter", [header, "u i 1", "u j 2"])
    with pytest.raises(DataFormatError, match=r"s\.inter:1: header: .*separated by (spaces|commas), not tabs: "
                                              r"atomic files are tab-separated"):
        read_dataset(tmp_path)


def test_space_separated_row_says_tabs(tmp_path):
    write_lines(tmp_path / "s.inter", ["user_id:token\titem_id:token\ttimestamp:float", "u\ti\t1", "u j 2"])
    with pytest.raises(DataFormatError, match=r"s\.inter:3: expected 3 tab-separated fields .* got 1; the line is "
                                              r"separated by spaces, not tabs"):
        read_dataset(tmp_path)


# RecBole benchmark files: NAME.train.inter, NAME.valid.inter, NAME.test.inter (+ NAME.item)

def write_benchmark(folder: Path, name: str = "bench") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    head = "user_id:token\titem_id:token\ttimestamp:float"
    write_lines(folder / f"{name}.train.inter", [head, "u1\ta\t3", "u2\tc\t1", "u1\tb\t1", "u2\td\t2", "u1\tc\t2",
                                                 "u3\tf\t1", "u3\tg\t2", "u3\th\t3"])
    # the given split is used as is, even where a valid/test time precedes a train time
    write_lines(folder / f"{name}.valid.inter", [head, "u1\td\t4", "u2\ta\t0", "u3\ta\t4"])
    write_lines(folder / f"{name}.test.inter", [head, "u2\tb\t5", "u1\te\t5", "u3\tb\t5"])
    write_lines(folder / f"{name}.item", ["item_id:token\ttitle:token_seq"] + [f"{i}\tTitle {i}" for i in "abcdefgh"])
    return folder


def test_benchmark_folder_keeps_the_given_split(tmp_path):
    folder = write_benchmark(tmp_path / "bench")
    for path in (folder, folder / "bench.train.inter", folder / "bench.test.inter"):
        ds = read_dataset(path)
        assert ds.given_split and ds.name == "bench"
        # train rows by time, then the valid row, then the test row
        assert seqs_raw(ds) == {"u1": ["b", "c", "a", "d", "e"], "u2": ["c", "d", "a", "b"],
                                "u3": ["f", "g", "h", "a", "b"]}
        assert dict(zip(ds.item_ids, ds.item_text["title"])) == {i: f"Title {i}" for i in "abcdefgh"}
    from speeder_fast.data.readers import dataset_files

    fmt, name, files = dataset_files(folder)
    assert (fmt, name) == ("atomic", "bench")
    assert [f.name for f in files] == ["bench.train.inter", "bench.valid.inter", "bench.test.inter", "bench.item"]


def test_benchmark_incomplete_or_not_one_target_per_user_is_refused(tmp_path):
    folder = write_benchmark(tmp_path / "b1")
    (folder / "bench.valid.inter").unlink()
    with pytest.raises(DataFormatError, match=r"bench\.valid\.inter missing.*concatenate the parts into one "
                                              r"bench\.inter"):
        read_dataset(folder / "bench.train.inter")
    folder = write_benchmark(tmp_path / "b2")
    head = "user_id:token\titem_id:token\ttimestamp:float"
    write_lines(folder / "bench.test.inter", [head, "u1\te\t5", "u1\ta\t6", "u3\tb\t5"])  # u1 twice, u2 never
    with pytest.raises(DataFormatError) as e:
        read_dataset(folder)
    msg = str(e.value)
    assert "1 user(s) have no row in bench.test.inter (e.g. 'u2')" in msg
    assert "1 user(s) have several rows in bench.test.inter (e.g. 'u1': 2)" in msg


def test_benchmark_and_plain_file_in_one_folder_must_be_chosen(tmp_path):
    folder = write_benchmark(tmp_path / "mixed")
    write_lines(folder / "other.inter", ["user_id:token\titem_id:token", "u\ti"])
    with pytest.raises(DataFormatError, match=r"several datasets \(other\.inter, bench\.\{train,valid,test\}\.inter"):
        read_dataset(folder)
    assert not read_dataset(folder / "other.inter").given_split
    assert read_dataset(folder / "bench.valid.inter").given_split


def test_exact_duplicate_reviews_dropped_anywhere_in_the_sequence(tmp_path):
    reviews = [("U", "A", 1), ("U", "B", 2), ("V", "A", 1), ("U", "A", 1), ("U", "B", 3), ("U", "B", 2)]
    (tmp_path / "D.jsonl").write_text("".join(json.dumps({"user_id": u, "parent_asin": i, "timestamp": t}) + "\n"
                                              for u, i, t in reviews))
    kept = read_dataset(tmp_path)
    assert seqs_raw(kept) == {"U": ["A", "A", "B", "B", "B"], "V": ["A"]} and kept.read_report == {}
    ds = read_dataset(tmp_path, drop_duplicates=True)
    assert seqs_raw(ds) == {"U": ["A", "B", "B"], "V": ["A"]}  # (U,B,3) is a different time: kept
    assert ds.read_report == {"exact_duplicates_dropped": 2}
