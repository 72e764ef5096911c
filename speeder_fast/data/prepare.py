"""``prepare(cfg)``: read -> filter -> leave-one-out -> persisted candidates, cached on disk.

Cache layout (``cfg.cache_dir`` or ``cache_root()/"data"``)::

    <name>-<key>/
        manifest.json           options, input fingerprints, filter report, counts
        data.safetensors        items (flat int64, chronological per user), offsets ([n_users+1])
        candidates.safetensors  valid, test (int64 [n_users, n_candidates])
        ids.json                raw user and item ids (index -> token)
        item_text.json          {field: [per-item string]}

``key`` hashes the cache format version, each input file's name, size, mtime and sha256, and
every option that changes the persisted content: ``user_kcore``, ``item_kcore``,
``drop_consecutive_duplicates``, ``drop_duplicates`` (as resolved for the format, recorded only
when on), ``min_user_events``, ``max_users``, ``n_candidates``, ``seed`` (and the ml-100k text
mapping). ``max_history`` and ``max_train_examples`` only shape the
windows, which are rebuilt on load (vectorised, deterministic, well under a second), so changing
them re-uses the same filtered data and the same evaluation candidates. The folder is written
to a temporary sibling and renamed into place, so a cache entry is either complete or absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from speeder_fast.config import DataConfig
from speeder_fast.data.candidates import eval_candidates
from speeder_fast.data.dataset import PreparedData, RecDataset
from speeder_fast.data.filtering import filter_dataset
from speeder_fast.data.readers import dataset_files, read_dataset
from speeder_fast.errors import ConfigError, DataError, DataFormatError
from speeder_fast.data.splits import leave_one_out, seq_offsets
from speeder_fast.utils import cache_root, get_logger, sha256_file, stable_hash

log = get_logger("speeder_fast.data")

CACHE_VERSION = 1
MIN_LOO_EVENTS = 3  # leave-one-out needs a train item, a validation target and a test target


def movielens_text(ds: RecDataset) -> RecDataset:
    """MovieLens (RecBole ml-100k) item text: ``title = movie_title (release_year)``,
    ``categories`` = the ``class`` genres joined with ``", "``; ``release_year`` stays an extra
    field. The atomic reader has already mapped movie_title -> title and class -> categories."""
    text = dict(ds.item_text)
    titles = text.get("title", [""] * ds.n_items)
    years = text.get("release_year", [""] * ds.n_items)
    text["title"] = [f"{t} ({y})" if y else t for t, y in zip(titles, years)]
    if "categories" in text:
        text["categories"] = [", ".join(c.split()) for c in text["categories"]]
    order = ["title", "description", "brand", "categories"]
    text = {**{k: text[k] for k in order if k in text}, **{k: v for k, v in text.items() if k not in order}}
    return RecDataset(ds.name, ds.user_ids, ds.item_ids, ds.sequences, text, ds.source, ds.given_split,
                      ds.read_report)


def _resolve_source(cfg: DataConfig) -> tuple[Path, str]:
    """``(path, transform)``: the dataset path and the name of a text mapping ("" for none)."""
    if cfg.source == "ml-100k":
        from speeder_fast.assets import fetch_movielens_100k

        return Path(fetch_movielens_100k()), "ml-100k"
    p = Path(cfg.source).expanduser()
    if not p.exists():
        raise DataFormatError(f"data.source: {cfg.source!r} is neither 'ml-100k' nor an existing file/folder")
    return p, ""


def _fingerprint(files: list[Path]) -> list[dict]:
    out = []
    for f in files:
        st = f.stat()
        out.append({"name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(f)})
    return out


#: formats whose ``data.drop_duplicates=auto`` means on: raw review dumps repeat review lines
DROP_DUPLICATES_BY_DEFAULT = ("amazon2018", "amazon2023")


def drop_duplicates_for(cfg: DataConfig, fmt: str) -> bool:
    """``data.drop_duplicates`` resolved for a source format: ``auto`` is on for the raw Amazon
    formats (:data:`DROP_DUPLICATES_BY_DEFAULT`), off for RecBole atomic files and ml-100k.

    Raises:
        ConfigError: a value other than auto/on/off.
    """
    mode = str(cfg.drop_duplicates).lower()
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"data.drop_duplicates: {cfg.drop_duplicates!r} is not auto, on or off")
    return mode == "on" or (mode == "auto" and fmt in DROP_DUPLICATES_BY_DEFAULT)


def cache_options(cfg: DataConfig, fmt: str = "") -> dict:
    """The options that change the persisted content (part of the cache key).

    ``drop_duplicates`` (resolved for ``fmt``) is only listed when on, so the keys of entries
    prepared before the option existed (it was off for them) stay valid.
    """
    opts = {
        "user_kcore": int(cfg.user_kcore),
        "item_kcore": int(cfg.item_kcore),
        "drop_consecutive_duplicates": bool(cfg.drop_consecutive_duplicates),
        "min_user_events": max(int(cfg.min_user_events), MIN_LOO_EVENTS),
        "max_users": int(cfg.max_users),
        "n_candidates": int(cfg.n_candidates),
        "seed": int(cfg.seed),
    }
    if drop_duplicates_for(cfg, fmt):
        opts["drop_duplicates"] = True
    return opts


def check_given_split(ds: RecDataset, opts: dict) -> None:
    """A source with a given split (RecBole benchmark files) can only lose whole users: refuse the
    options that remove single events (they would move the valid/test targets).

    Raises:
        ConfigError: naming each such option and the value to set.
    """
    bad = []
    if opts["item_kcore"] > 0:
        bad.append(f"data.item_kcore={opts['item_kcore']} (set 0)")
    if opts["drop_consecutive_duplicates"]:
        bad.append("data.drop_consecutive_duplicates=true (set false)")
    if opts.get("drop_duplicates"):
        bad.append("data.drop_duplicates=on (set auto or off)")
    if bad:
        raise ConfigError(f"{ds.source}: a RecBole benchmark split is used as given, so only whole users may be "
                          f"filtered out (data.user_kcore, data.min_user_events, data.max_users); these options "
                          f"would remove single interactions and move the valid/test targets: {', '.join(bad)}")


def cache_key(cfg: DataConfig) -> tuple[Path, dict]:
    """``(cache folder, key material)`` for a config (hashes the input files)."""
    path, transform = _resolve_source(cfg)
    fmt, name, files = dataset_files(path)
    if transform:
        name = transform
    material = {"version": CACHE_VERSION, "format": fmt, "transform": transform,
                "files": _fingerprint(files), "options": cache_options(cfg, fmt)}
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "data"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "dataset"
    material["source"] = str(path)
    key = stable_hash({k: v for k, v in material.items() if k != "source"})
    return root / f"{safe}-{key}", material


def _write_cache(out: Path, ds: RecDataset, flat: np.ndarray, offsets: np.ndarray, valid_c: np.ndarray,
                 test_c: np.ndarray, manifest: dict) -> None:
    from safetensors.numpy import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({"items": np.ascontiguousarray(flat, dtype=np.int64),
                   "offsets": np.ascontiguousarray(offsets, dtype=np.int64)}, str(tmp / "data.safetensors"))
        save_file({"valid": np.ascontiguousarray(valid_c), "test": np.ascontiguousarray(test_c)},
                  str(tmp / "candidates.safetensors"), metadata={"seed": str(manifest["options"]["seed"])})
        (tmp / "ids.json").write_text(json.dumps({"user_ids": ds.user_ids, "item_ids": ds.item_ids}))
        (tmp / "item_text.json").write_text(json.dumps(ds.item_text, ensure_ascii=False))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        if out.exists():  # a broken/stale entry under the same key: move it aside first
            stale = out.parent / f".stale-{out.name}-{os.getpid()}-{time.time_ns()}"
            os.replace(out, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if (out / "manifest.json").is_file():  # another process finished the same entry first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_cache(out: Path) -> tuple[RecDataset, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    from safetensors.numpy import load_file

    manifest = json.loads((out / "manifest.json").read_text())
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(f"cache version {manifest.get('version')} != {CACHE_VERSION}")
    arrays = load_file(str(out / "data.safetensors"))
    cands = load_file(str(out / "candidates.safetensors"))
    ids = json.loads((out / "ids.json").read_text())
    text = json.loads((out / "item_text.json").read_text())
    flat, offsets = arrays["items"].astype(np.int64), arrays["offsets"].astype(np.int64)
    seqs = np.split(flat, offsets[1:-1]) if offsets.shape[0] > 1 else []
    ds = RecDataset(name=manifest["name"], user_ids=ids["user_ids"], item_ids=ids["item_ids"], sequences=seqs,
                    item_text=text, source=manifest.get("source", ""))
    if offsets[-1] != flat.shape[0] or len(ds.user_ids) != offsets.shape[0] - 1:
        raise ValueError("inconsistent cached arrays")
    return ds, flat, offsets, cands["valid"].astype(np.int64), cands["test"].astype(np.int64), manifest


def _same_sequences(raw: RecDataset, ds: RecDataset) -> None:
    """Every user kept from a given split keeps their whole sequence (the split is used as is)."""
    index = {u: i for i, u in enumerate(raw.user_ids)}
    changed = sum(len(raw.sequences[index[u]]) != len(s) for u, s in zip(ds.user_ids, ds.sequences))
    if changed:  # pragma: no cover - check_given_split refuses the options that could do this
        raise DataError(f"{raw.source}: filtering changed the sequences of {changed} users of a given split")


def prepare(cfg: DataConfig) -> PreparedData:
    """Read, filter, split and sample evaluation candidates for ``cfg``, using the disk cache.

    Filtering (see :func:`speeder_fast.data.filtering.filter_dataset`): exact duplicates (same user,
    item and timestamp; ``data.drop_duplicates``, done by the reader, which sees the timestamps),
    consecutive duplicates (optional), iterative user/item k-core, users with fewer than ``max(min_user_events, 3)``
    events dropped (count logged), the ``max_users`` subset (first N users in input order), dense
    re-indexing. Splits: leave-one-out (see :mod:`speeder_fast.data.splits`); for RecBole benchmark
    files the given split (the reader orders each sequence train, valid, test, so leave-one-out
    reproduces it; only whole users may be filtered out). Candidates: see
    :func:`speeder_fast.data.candidates.eval_candidates`.

    Raises:
        ConfigError: an out-of-range option, or an event-level filter on a given split.
        DataFormatError: a malformed input file (names file, line, field).
        DataError: nothing left after filtering; ``CatalogueTooSmallError`` when ``data.n_candidates``
            does not fit the catalogue (names the users affected).
    """
    if cfg.max_history < 1:
        raise ConfigError(f"data.max_history must be >= 1, got {cfg.max_history}")
    if cfg.n_candidates < 2:
        raise ConfigError(f"data.n_candidates must be >= 2, got {cfg.n_candidates}")
    if cfg.min_user_events < MIN_LOO_EVENTS:
        log.warning("data.min_user_events=%d raised to %d (leave-one-out needs a train item, a validation "
                    "and a test target)", cfg.min_user_events, MIN_LOO_EVENTS)
    t0 = time.perf_counter()
    out, material = cache_key(cfg)
    loaded = None
    if (out / "manifest.json").is_file():
        try:
            loaded = _load_cache(out)
            log.info("using cached %s (%s)", out.name, out)
        except Exception as e:  # noqa: BLE001 - any broken entry is rebuilt
            log.warning("cache entry %s is unreadable (%s); preparing again", out, e)
    if loaded is not None:
        ds, flat, offsets, valid_c, test_c, manifest = loaded
    else:
        log.info("preparing %s -> %s", material["source"], out)
        transform = material["transform"]
        opts = material["options"]
        if opts.get("drop_duplicates") and str(cfg.drop_duplicates).lower() == "auto":
            log.info("data.drop_duplicates=auto is on for %s sources: exact repeats (same user, item and "
                     "timestamp) are dropped and counted; --set data.drop_duplicates=off keeps them",
                     material["format"])
        raw = read_dataset(Path(material["source"]), drop_duplicates=bool(opts.get("drop_duplicates", False)))
        if transform == "ml-100k":
            raw = movielens_text(raw)
            raw.name = "ml-100k"
        if raw.given_split:
            check_given_split(raw, opts)
        ds, report = filter_dataset(raw, user_kcore=opts["user_kcore"], item_kcore=opts["item_kcore"],
                                    drop_duplicates=opts["drop_consecutive_duplicates"],
                                    min_user_events=opts["min_user_events"], max_users=opts["max_users"])
        report.exact_duplicates_dropped = int(raw.read_report.get("exact_duplicates_dropped", 0))
        if raw.given_split:
            _same_sequences(raw, ds)
        lengths = np.fromiter((len(s) for s in ds.sequences), np.int64, ds.n_users)
        offsets = seq_offsets(lengths)
        flat = np.concatenate(ds.sequences).astype(np.int64)
        valid_c, test_c = eval_candidates(flat, offsets, ds.n_items, opts["n_candidates"], opts["seed"],
                                          flat[offsets[1:] - 2], flat[offsets[1:] - 1])
        manifest = {**material, "name": ds.name, "filter": report.as_dict(),
                    "split": "given (RecBole benchmark files)" if raw.given_split else "leave-one-out",
                    "n_users": ds.n_users, "n_items": ds.n_items, "n_interactions": int(flat.shape[0]),
                    "text_fields": ds.text_fields(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_cache(out, ds, flat, offsets, valid_c, test_c, manifest)
        ds.sequences = np.split(flat, offsets[1:-1])  # same views as a cache load gives
    train, valid, test = leave_one_out(flat, offsets, cfg.max_history, cfg.max_train_examples)
    manifest = {**manifest, "max_history": int(cfg.max_history),
                "max_train_examples": int(cfg.max_train_examples)}
    log.info("%s: %d users, %d items, %d interactions; %d train / %d valid / %d test examples (%.2fs)",
             ds.name, ds.n_users, ds.n_items, int(flat.shape[0]), len(train), len(valid), len(test),
             time.perf_counter() - t0)
    return PreparedData(dataset=ds, train=train, valid=valid, test=test, valid_candidates=valid_c,
                        test_candidates=test_c, cache_dir=str(out), manifest=manifest)
