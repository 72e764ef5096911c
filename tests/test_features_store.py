"""Feature store: round trip, memory mapping, staleness detection; build_item_features end to end."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from speeder_fast.config import FeatureConfig
from speeder_fast.data.dataset import RecDataset
from speeder_fast.features import build as build_mod
from speeder_fast.features.build import build_item_features
from speeder_fast.features.store import FeatureStore, item_table_hash, mmap_safetensors
from speeder_fast.features.toy import toy_prepared


def _ds(ids=("a", "b", "c"), titles=("x", "", "z")):
    return RecDataset(name="ds", user_ids=["u"], item_ids=list(ids), sequences=[np.arange(len(ids))],
                      item_text={"title": list(titles)})


class _Builder:
    def __init__(self, n=3, d=4, seed=0):
        self.calls, self.n, self.d, self.seed = 0, n, d, seed

    def __call__(self):
        self.calls += 1
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.n, self.d, generator=g), torch.tensor([True, False, True][: self.n])


def test_round_trip_hit_and_mmap(tmp_path):
    store, ds, b = FeatureStore(tmp_path), _ds(), _Builder()
    f1, m1 = store.get_or_build(ds, "text", "enc:one:fp1", {"k": 1}, b)
    assert b.calls == 1
    assert f1.dtype == torch.float16 and f1.shape == (3, 4) and m1.dtype == torch.bool
    assert m1.tolist() == [True, False, True] and torch.count_nonzero(f1[1]) == 0
    want, _ = b()
    assert torch.allclose(f1[0].float(), want[0], atol=1e-2)
    f2, m2 = store.get_or_build(ds, "text", "enc:one:fp1", {"k": 1}, b)
    # 2 = the build + the explicit b() above: the hit did not call build_fn
    assert b.calls == 2 and torch.equal(f1, f2) and torch.equal(m1, m2)  # hit: build_fn not called again
    tpath, mpath = store.paths("ds", "text", "enc:one:fp1")
    man = json.loads(mpath.read_text())
    assert man["dim"] == 4 and man["n_items"] == 3 and man["n_present"] == 2
    assert man["item_table_hash"] == item_table_hash(ds) and man["encoder_id"] == "enc:one:fp1"
    assert man["options"] == {"k": 1} and man["created"]
    # memory-mapped, copy-on-write: writing to the tensor never touches the file
    before = tpath.read_bytes()
    f2[0, 0] = 123.0
    assert tpath.read_bytes() == before
    from safetensors.torch import load_file

    ref = load_file(str(tpath))
    mm, meta = mmap_safetensors(tpath)
    assert torch.equal(mm["features"], ref["features"]) and torch.equal(mm["mask"], ref["mask"])
    assert meta["encoder_id"] == "enc:one:fp1"


@pytest.mark.parametrize("change", ["item_ids", "item_text", "encoder", "options", "dtype"])
def test_staleness_triggers_rebuild_in_place(tmp_path, change):
    store, b = FeatureStore(tmp_path), _Builder()
    ds, enc, opts, dtype = _ds(), "enc:one:fp1", {"k": 1}, "float16"
    store.get_or_build(ds, "text", enc, opts, b, dtype)
    if change == "item_ids":
        ds = _ds(ids=("a", "b", "CHANGED"))
    elif change == "item_text":
        ds = _ds(titles=("x", "", "new text"))
    elif change == "encoder":
        enc = "enc:one:fp2"  # same encoder name, new weights fingerprint
    elif change == "options":
        opts = {"k": 2}
    else:
        dtype = "float32"
    assert store.stale_reason(ds, "text", enc, opts, dtype) is not None
    f, _ = store.get_or_build(ds, "text", enc, opts, b, dtype)
    assert b.calls == 2
    assert f.dtype == (torch.float32 if dtype == "float32" else torch.float16)
    files = sorted(p.name for p in (tmp_path / "ds" / "text").iterdir())
    assert files == ["enc_one.manifest.json", "enc_one.safetensors"]  # replaced, not accumulated
    store.get_or_build(ds, "text", enc, opts, b, dtype)
    assert b.calls == 2


def test_damaged_entries_are_rebuilt(tmp_path):
    store, ds, b = FeatureStore(tmp_path), _ds(), _Builder()
    store.get_or_build(ds, "image", "file:f:1", {}, b)
    tpath, mpath = store.paths("ds", "image", "file:f:1")
    tpath.write_bytes(tpath.read_bytes()[:40])  # truncated tensor file
    store.get_or_build(ds, "image", "file:f:1", {}, b)
    assert b.calls == 2
    mpath.write_text("{not json")
    store.get_or_build(ds, "image", "file:f:1", {}, b)
    assert b.calls == 3
    # a tensor file from another build next to this manifest (interrupted write): key mismatch
    other = FeatureStore(tmp_path / "other")
    other.get_or_build(ds, "image", "file:f:1", {"different": True}, _Builder(seed=5))
    tpath.write_bytes(other.paths("ds", "image", "file:f:1")[0].read_bytes())
    assert store.load(ds, "image", "file:f:1", {}) is None
    store.get_or_build(ds, "image", "file:f:1", {}, b)
    assert b.calls == 4


def test_save_validates(tmp_path):
    store, ds = FeatureStore(tmp_path), _ds()
    with pytest.raises(ValueError, match="n_items=3"):
        store.save(ds, "text", "e:x", {}, torch.zeros(2, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="overflow float16"):
        store.save(ds, "text", "e:x", {}, torch.full((3, 2), 1e6), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-finite"):
        store.save(ds, "text", "e:x", {}, torch.full((3, 2), float("nan")), torch.ones(3, dtype=torch.bool),
                   dtype="float32")
    with pytest.raises(ValueError, match="store_dtype"):
        store.save(ds, "text", "e:x", {}, torch.zeros(3, 2), torch.ones(3, dtype=torch.bool), dtype="bf16")


def _tiny_llm(n_vocab=64, d=12):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(
        ["item", "a", "thing", "number", "of", "colour", "red", "green", "blue", "brand0", "brand1", "brand2",
         "brand3", "cat0", "cat1", "cat2", "cat3", "cat4", "sub0", "sub1", ".", ","])}}
    vocab.update({str(i): len(vocab) for i in range(40)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(0)
    return fast, torch.randn(len(vocab), d)


def test_build_item_features_all_modalities_and_store_hits(tmp_path, monkeypatch):
    p = toy_prepared(n_users=40, n_items=28, seed=2)
    tok, w = _tiny_llm()
    feats_file = tmp_path / "img.npy"
    np.save(feats_file, np.ones((2, 5), dtype=np.float32))
    (tmp_path / "img.txt").write_text("i3\ni7\n")
    cfg = FeatureConfig(modalities=["text", "image", "collab"], image_source=str(feats_file), sasrec_dim=16,
                        sasrec_epochs=2)
    out = build_item_features(p, cfg, llm=(tok, w), store_root=tmp_path / "store", progress=False,
                              sasrec_overrides={"max_len": 10, "batch_size": 16})
    assert set(out) == {"text", "image", "collab"}
    t, tm = out["text"]
    assert t.shape == (28, 12) and tm.sum() == 24  # every 7th toy item has no text
    i, im = out["image"]
    assert i.shape == (28, 5) and im.nonzero().flatten().tolist() == [3, 7]
    c, cm = out["collab"]
    assert c.shape == (28, 16) and cm.dtype == torch.bool and 0 < int(cm.sum()) <= 28

    # second call: everything from the store, SASRec not retrained
    def boom(*a, **k):
        raise AssertionError("SASRec retrained despite a valid store entry")

    monkeypatch.setattr("speeder_fast.features.sasrec.train_sasrec", boom)
    again = build_item_features(p, cfg, llm=(tok, w), store_root=tmp_path / "store", progress=False,
                                sasrec_overrides={"max_len": 10, "batch_size": 16})
    for k in out:
        assert torch.equal(out[k][0], again[k][0]) and torch.equal(out[k][1], again[k][1])
    # changing the interactions makes the collab entry stale (SASRec would be retrained)
    p.dataset.sequences[0] = p.dataset.sequences[0][::-1].copy()
    with pytest.raises(AssertionError, match="retrained"):
        build_item_features(p, dataclasses.replace(cfg, modalities=["collab"]), store_root=tmp_path / "store",
                            progress=False, sasrec_overrides={"max_len": 10, "batch_size": 16})


def test_absent_image_modality_is_skipped(tmp_path):
    import logging

    p = toy_prepared(n_users=10, n_items=20, seed=1)
    tok, w = _tiny_llm()
    cfg = FeatureConfig(modalities=["text", "image"])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("speeder_fast.features")
    logger.addHandler(handler)
    try:
        out = build_item_features(p, cfg, llm=(tok, w), store_root=tmp_path, progress=False)
    finally:
        logger.removeHandler(handler)
    assert set(out) == {"text"}
    assert any("modality 'image' skipped" in r.getMessage() for r in records)


def test_build_item_features_rejects_unknown_modality(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        build_item_features(toy_prepared(n_users=5), FeatureConfig(modalities=["audio"]), store_root=tmp_path)


def test_module_exports():
    assert build_mod.MODALITIES == ("text", "image", "collab")


def test_text_store_entry_changes_with_encoder_layer_and_pooling(tmp_path, monkeypatch):
    """Switching features.text_encoder / text_hidden_layer never reuses another encoder's entry."""
    import tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    from speeder_fast.features import text as text_mod
    from speeder_fast.features.build import text_store_entry

    p = toy_prepared(n_users=10, n_items=28, seed=3)
    tok = tiny.make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    calls = []
    real = text_mod.encode_item_texts

    def counting(ds, enc, *a, **k):
        calls.append(enc.encoder_id)
        return real(ds, enc, *a, **k)

    monkeypatch.setattr(text_mod, "encode_item_texts", counting)
    store = FeatureStore(tmp_path)
    cfgs = {"llm": FeatureConfig(modalities=["text"], store_dtype="float32"),
            "hidden-l1": FeatureConfig(modalities=["text"], text_encoder="llm-hidden", text_hidden_layer=1,
                                       store_dtype="float32"),
            "hidden-l2": FeatureConfig(modalities=["text"], text_encoder="llm-hidden", text_hidden_layer=-1,
                                       store_dtype="float32")}
    keys, feats = {}, {}
    for name, cfg in cfgs.items():
        enc = text_mod.make_text_encoder(cfg.text_encoder, (tok, model), hidden_layer=cfg.text_hidden_layer)
        enc_id, opts = text_store_entry(enc, cfg)
        keys[name] = FeatureStore.key(p.dataset, "text", enc_id, opts, cfg.store_dtype)
        assert store.stale_reason(p.dataset, "text", enc_id, opts, "float32") == "not built yet"
        feats[name] = build_item_features(p, cfg, llm=(tok, model), store_root=tmp_path, progress=False)["text"]
        assert store.stale_reason(p.dataset, "text", enc_id, opts, "float32") is None
    assert len(set(keys.values())) == 3 and len(calls) == 3 and len(set(calls)) == 3
    assert len(list((tmp_path / p.dataset.name / "text").glob("*.safetensors"))) == 3  # one file per encoder/layer
    assert not torch.allclose(feats["hidden-l1"][0].float(), feats["hidden-l2"][0].float())
    # back to layer 1: served from the store, nothing encoded
    again = build_item_features(p, cfgs["hidden-l1"], llm=(tok, model), store_root=tmp_path, progress=False)["text"]
    assert len(calls) == 3 and torch.equal(again[0], feats["hidden-l1"][0])
    # another pooling of the same encoder is another key even with the same encoder id
    enc = text_mod.make_text_encoder("llm-hidden", (tok, model), hidden_layer=1)
    enc_id, opts = text_store_entry(enc, cfgs["hidden-l1"])
    assert FeatureStore.key(p.dataset, "text", enc_id, {**opts, "pooling": "other"}, "float32") != keys["hidden-l1"]
