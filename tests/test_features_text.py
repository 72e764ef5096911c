"""Text modality: template rendering, empty-text masks, the LLM-embedding encoder, a sentence encoder."""

import json

import numpy as np
import pytest
import torch

from speeder_fast.data.dataset import RecDataset
from speeder_fast.features.text import (
    LLMEmbeddingTextEncoder,
    SentenceTextEncoder,
    encode_item_texts,
    make_text_encoder,
    render_item_texts,
    render_template,
    template_fields,
)

TEMPLATE = "{title}. {brand}. {categories}. {description}"
WORDS = ["[UNK]", "[PAD]", "lamp", "desk", "acme", "light", "a", "for", "blue", "mug", ".", ",", "tea"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _dataset():
    return RecDataset(
        name="txt", user_ids=["u"], item_ids=["a", "b", "c", "d"], sequences=[np.array([0, 1, 2, 3])],
        item_text={
            "title": ["Lamp", "", "Mug", "  "],
            "description": ["A   lamp\nfor desk", "", "", ""],
            "brand": ["Acme", "", "", ""],
            "categories": ["light", "", "blue", ""],
        })


def test_template_rendering_rules():
    assert template_fields(TEMPLATE) == ["title", "brand", "categories", "description"]
    assert render_template(TEMPLATE, {"title": "Lamp", "description": "A  lamp\n\tfor desks."}) == \
        "Lamp. A lamp for desks."
    assert render_template(TEMPLATE, {"brand": "Acme", "description": "d"}) == "Acme. d"
    assert render_template("{title}, {brand}", {"title": "T"}) == "T"
    assert render_template("Item: {title} by {brand}", {"title": "T", "brand": "B"}) == "Item: T by B"
    with pytest.raises(ValueError, match="malformed"):
        template_fields("{title")
    with pytest.raises(ValueError, match="format spec"):
        template_fields("{title:>10}")


def test_render_item_texts_masks_empty_items_and_extra_fields():
    ds = _dataset()
    texts, present = render_item_texts(ds, TEMPLATE)
    assert texts[0] == "Lamp. Acme. light. A lamp for desk"
    assert texts[2] == "Mug. blue."
    assert present.tolist() == [True, False, True, False]
    assert texts[1] == "" and texts[3] == ""
    ds.item_text["year"] = ["1999", "", "", ""]
    texts, _ = render_item_texts(ds, "{title} ({year})")
    assert texts[0] == "Lamp (1999)"
    texts, present = render_item_texts(ds, "{title} {nonexistent}")  # unknown field -> empty, warned
    assert texts[0] == "Lamp" and present[3] == False  # noqa: E712


def test_llm_embedding_encoder_is_mean_of_token_rows_and_deterministic():
    tok = _tokenizer()
    torch.manual_seed(0)
    w = torch.randn(len(WORDS), 8)
    enc = LLMEmbeddingTextEncoder(tok, w, name="tiny")
    feats, mask = enc.encode(["lamp desk", "", "tea tea mug", "zzz"], max_tokens=16, batch_size=2, progress=False)
    assert feats.shape == (4, 8) and mask.tolist() == [True, False, True, True]
    assert torch.allclose(feats[0], (w[2] + w[3]) / 2, atol=1e-6)
    assert torch.allclose(feats[2], (2 * w[12] + w[9]) / 3, atol=1e-6)
    assert torch.allclose(feats[3], w[0])  # unknown word -> [UNK] row
    assert torch.count_nonzero(feats[1]) == 0
    # truncation to max_tokens
    f2, _ = enc.encode(["lamp desk tea"], max_tokens=1, progress=False)
    assert torch.allclose(f2[0], w[2])
    # deterministic and batch-size independent
    again, _ = enc.encode(["lamp desk", "", "tea tea mug", "zzz"], max_tokens=16, batch_size=3, progress=False)
    assert torch.equal(feats, again)
    assert enc.encoder_id == LLMEmbeddingTextEncoder(tok, w.clone(), name="tiny").encoder_id
    assert enc.encoder_id != LLMEmbeddingTextEncoder(tok, w + 1e-3, name="tiny").encoder_id


def test_encode_item_texts_with_tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ds = _dataset()
    enc = make_text_encoder("llm", (tok, model))
    feats, mask = encode_item_texts(ds, enc, TEMPLATE, max_tokens=32, progress=False)
    assert feats.shape == (4, 16) and mask.tolist() == [True, False, True, False]
    assert torch.count_nonzero(feats[~mask]) == 0
    w = model.get_input_embeddings().weight.detach()
    ids = tok(render_item_texts(ds, TEMPLATE)[0][2], add_special_tokens=False)["input_ids"]
    assert torch.allclose(feats[2], w[ids].mean(0), atol=1e-6)
    # the same from a saved model folder (embedding read from the safetensors shard)
    model.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    enc2 = make_text_encoder("llm", str(tmp_path / "llm"))
    feats2, mask2 = encode_item_texts(ds, enc2, TEMPLATE, max_tokens=32, progress=False)
    assert torch.allclose(feats, feats2, atol=1e-6) and torch.equal(mask, mask2)
    with pytest.raises(ValueError, match="needs the LLM"):
        make_text_encoder("llm", None)


def test_sentence_encoder_mean_pooling(tmp_path):
    from transformers import BertConfig, BertModel

    tok = _tokenizer()
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))
    bert.save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")
    enc = SentenceTextEncoder(tmp_path / "enc")
    feats, mask = enc.encode(["lamp desk", "", "mug"], max_tokens=8, batch_size=2, progress=False)
    assert feats.shape == (3, 16) and mask.tolist() == [True, False, True]
    with torch.no_grad():
        ids = tok(["mug"], return_tensors="pt")
        want = bert.eval()(**ids).last_hidden_state.mean(1)[0]
    assert torch.allclose(feats[2], want, atol=1e-5)
    again, _ = enc.encode(["lamp desk", "", "mug"], max_tokens=8, batch_size=3, progress=False)
    assert torch.allclose(feats, again, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="local model folder"):
        SentenceTextEncoder(tmp_path / "missing")


# ------------------------------------------------------------------------------ llm-hidden
def _tiny_causal_lm(layers: int = 3, hidden: int = 16, seed: int = 0):
    """(byte-level BPE tokenizer with eos/pad and no bos, random tiny Llama) from tests/tiny.py."""
    import tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny.make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return tok, LlamaForCausalLM(cfg).eval()


HIDDEN_TEXTS = ["red pen 3 for the office", "blue stapler", "", "green folder 12 black binder 7 white marker 2", "x"]


def _hand_pooled(tok, model, text, layer, pooling="mean"):
    """Reference: the text alone (no padding), ``[eos] + tokens``, transformers' hidden_states[layer]."""
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    h = hs[layer][0, 1:]
    return h.mean(0) if pooling == "mean" else h[-1]


def test_llm_hidden_pooling_equals_hand_computation_per_layer_and_pooling():
    from speeder_fast.features.text import LLMHiddenTextEncoder

    tok, model = _tiny_causal_lm()
    enc = LLMHiddenTextEncoder(tok, model, layer=-1)
    assert enc.layer == 3 and enc.sink_id == tok.eos_token_id and enc.dim == 16
    feats, mask = enc.encode_layers(HIDDEN_TEXTS, poolings=["mean", "last"], batch_size=8, progress=False)
    assert mask.tolist() == [True, True, False, True, True]
    assert set(feats) == {(p, ly) for p in ("mean", "last") for ly in range(4)}
    for (pool, ly), x in feats.items():
        assert x.shape == (5, 16) and x.dtype == torch.float32
        assert torch.count_nonzero(x[2]) == 0
        for i in (0, 1, 3, 4):
            assert torch.allclose(x[i], _hand_pooled(tok, model, HIDDEN_TEXTS[i], ly, pool), atol=1e-5), (pool, ly, i)
    # layer 0 + mean = the input-embedding mean of the "llm" encoder
    base, _ = LLMEmbeddingTextEncoder.from_model(tok, model).encode(HIDDEN_TEXTS, progress=False)
    assert torch.allclose(feats[("mean", 0)], base, atol=1e-6)
    # the last layer is after the final norm (last_hidden_state)
    ids = torch.tensor([[tok.eos_token_id] + tok(HIDDEN_TEXTS[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = model.model(input_ids=ids).last_hidden_state[0, 1:].mean(0)
    assert torch.allclose(feats[("mean", 3)][1], want, atol=1e-5)


def test_llm_hidden_padding_batching_and_early_exit_do_not_change_rows():
    from speeder_fast.features.text import LLMHiddenTextEncoder

    tok, model = _tiny_causal_lm()
    for layer in range(4):  # 1..2 stop early at a pre-hook, 3 runs the whole stack, 0 stops at layer 1's input
        enc = LLMHiddenTextEncoder(tok, model, layer=layer)
        batched, mask = enc.encode(HIDDEN_TEXTS, batch_size=8, progress=False)  # one padded batch
        full, _ = enc.encode_layers(HIDDEN_TEXTS, layers=None, batch_size=8, progress=False)
        assert torch.allclose(batched, full[("mean", layer)], atol=1e-6)
        for i, text in enumerate(HIDDEN_TEXTS):
            alone, m = enc.encode([text], progress=False)  # no padding at all
            assert bool(m[0]) == bool(mask[i])
            assert torch.allclose(alone[0], batched[i], atol=1e-5), (layer, i)
        again, _ = enc.encode(HIDDEN_TEXTS, batch_size=2, progress=False)
        assert torch.allclose(again, batched, atol=1e-5)
        assert torch.equal(enc.encode(HIDDEN_TEXTS, batch_size=8, progress=False)[0], batched)  # deterministic
    # truncation to max_tokens (the sink is not counted)
    enc = LLMHiddenTextEncoder(tok, model, layer=2)
    ids = [tok.eos_token_id] + tok(HIDDEN_TEXTS[3], add_special_tokens=False)["input_ids"][:4]
    with torch.no_grad():
        want = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, 1:].mean(0)
    short, _ = enc.encode([HIDDEN_TEXTS[3]], max_tokens=4, progress=False)
    assert torch.allclose(short[0], want, atol=1e-5)


def test_llm_hidden_layer_pooling_and_tokenizer_errors():
    from speeder_fast.features.text import LLMHiddenTextEncoder

    tok, model = _tiny_causal_lm()
    assert LLMHiddenTextEncoder(tok, model, layer=-4).layer == 0
    for bad in (4, -5):
        with pytest.raises(ValueError, match="text_hidden_layer"):
            LLMHiddenTextEncoder(tok, model, layer=bad)
    with pytest.raises(ValueError, match="pooling"):
        LLMHiddenTextEncoder(tok, model, pooling="max")
    with pytest.raises(ValueError, match="bos nor an eos"):
        LLMHiddenTextEncoder(_tokenizer(), model)
    with pytest.raises(ValueError, match="whole model"):
        make_text_encoder("llm-hidden", (tok, torch.zeros(3, 16)))
    with pytest.raises(ValueError, match="needs the LLM"):
        make_text_encoder("llm-hidden", None)


def test_llm_hidden_encoder_id_names_layer_and_pooling_and_fingerprints_weights(tmp_path):
    from speeder_fast.features.store import encoder_name
    from speeder_fast.features.text import LLMHiddenTextEncoder

    tok, model = _tiny_causal_lm()
    ids = {(ly, p): LLMHiddenTextEncoder(tok, model, layer=ly, pooling=p).encoder_id
           for ly in (1, 2) for p in ("mean", "last")}
    assert len(set(ids.values())) == 4 and len({encoder_name(i) for i in ids.values()}) == 4  # separate store files
    assert encoder_name(ids[(2, "mean")]).startswith("llm-hidden-mean-l2:")
    assert LLMHiddenTextEncoder(tok, model, layer=-2).encoder_id == ids[(2, "mean")]
    _, other = _tiny_causal_lm(seed=1)
    assert LLMHiddenTextEncoder(tok, other, layer=2).encoder_id != ids[(2, "mean")]
    # from a saved folder (float32 AutoModel, no LM head): same features, same fingerprint
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    enc = make_text_encoder("llm-hidden", str(tmp_path / "lm"), hidden_layer=2)
    assert isinstance(enc, LLMHiddenTextEncoder) and enc.encoder_id.split(":")[2] == ids[(2, "mean")].split(":")[2]
    a, _ = enc.encode(HIDDEN_TEXTS, progress=False)
    b, _ = LLMHiddenTextEncoder(tok, model, layer=2).encode(HIDDEN_TEXTS, progress=False)
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_text_encoder("llm-hidden", str(tmp_path / "missing"))


def test_llm_hidden_bypasses_lora_and_restores_the_model():
    from peft import LoraConfig, get_peft_model

    from speeder_fast.features.text import LLMHiddenTextEncoder

    tok, model = _tiny_causal_lm()
    plain = LLMHiddenTextEncoder(tok, model, layer=3)
    want, _ = plain.encode(HIDDEN_TEXTS, progress=False)
    want_id = plain.encoder_id
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        lora_out = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(input_ids=ids).logits, lora_out, atol=1e-3)  # LoRA matters here
    peft_model.train()
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    enc = make_text_encoder("llm-hidden", (tok, peft_model), hidden_layer=3)
    got, _ = enc.encode(HIDDEN_TEXTS, progress=False)
    assert torch.allclose(got, want, atol=1e-5)  # features of the frozen base model
    assert enc.encoder_id == want_id
    assert peft_model.training and grads == {n: p.requires_grad for n, p in peft_model.named_parameters()}
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, lora_out)  # adapters active again


# ------------------------------------------------------------------ sentence-transformers folders
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lamp", "desk", "acme", "light", "a", "for", "blue", "mug",
              ".", ",", "tea"]


def _st_folder(path, modes=("mean_tokens",), normalize=True, max_seq_length=5, lower=True, seed=0):
    """A tiny BERT saved as a sentence-transformers folder (Transformer -> Pooling -> Normalize)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)).eval()
    bert.save_pretrained(str(path))
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(mods))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 16, **{f"pooling_mode_{m}": m in modes for m in
                                            ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")}}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                "do_lower_case": lower}))
    return tok, bert


def test_st_pool_modes_by_hand():
    from speeder_fast.features.text import st_pool

    x = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]], [[0.5, 0.0], [9.0, 9.0], [9.0, 9.0]]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(st_pool(x, m, ["cls_token"], False), x[:, 0])
    assert torch.equal(st_pool(x, m, ["max_tokens"], False), torch.tensor([[3.0, 2.0], [0.5, 0.0]]))
    assert torch.allclose(st_pool(x, m, ["mean_tokens"], False), torch.tensor([[2.0, -1.0], [0.5, 0.0]]))
    assert torch.allclose(st_pool(x, m, ["mean_sqrt_len_tokens"], False),
                          torch.tensor([[4.0, -2.0], [0.5, 0.0]]) / torch.tensor([[2 ** 0.5], [1.0]]))
    both = st_pool(x, m, ["mean_tokens", "cls_token"], True)  # concatenated in sentence-transformers' order: cls, mean
    raw = torch.cat([x[:, 0], torch.tensor([[2.0, -1.0], [0.5, 0.0]])], 1)
    assert torch.allclose(both, raw / raw.norm(dim=1, keepdim=True))
    assert torch.allclose(both.norm(dim=1), torch.ones(2))


def test_sentence_transformers_folder_mean_pooling_normalised_truncated_lowercased(tmp_path):
    tok, bert = _st_folder(tmp_path / "st", max_seq_length=4)
    enc = SentenceTextEncoder(tmp_path / "st")
    assert enc.pooling == "st:mean_tokens+l2" and enc.dim == 16 and enc.max_length(128) == 4 and enc.max_length(3) == 3
    texts = ["  Lamp DESK  ", "", "lamp desk tea mug", "mug", "a blue mug for tea"]
    feats, mask = enc.encode(texts, max_tokens=128, batch_size=8, progress=False)
    assert mask.tolist() == [True, False, True, True, True]
    with torch.no_grad():
        ids = tok(["lamp desk"], return_tensors="pt")  # [CLS] lamp desk [SEP]: 4 tokens, nothing cut
        hand = bert(**ids).last_hidden_state[0].mean(0)
    assert ids["input_ids"].shape[1] == 4
    assert torch.allclose(feats[0], hand / hand.norm(), atol=1e-5)
    assert torch.allclose(feats[2], feats[0], atol=1e-5)  # truncated to [CLS] lamp desk [SEP]
    assert torch.allclose(feats[mask].norm(dim=1), torch.ones(4), atol=1e-5) and torch.count_nonzero(feats[1]) == 0
    for i, t in enumerate(texts):  # padding does not change a row
        alone, _ = enc.encode([t], max_tokens=128, progress=False)
        assert torch.allclose(alone[0], feats[i], atol=1e-5)
    # without modules.json: the old recipe (mean, no normalisation) and its store label
    (tmp_path / "st" / "modules.json").unlink()
    legacy = SentenceTextEncoder(tmp_path / "st")
    assert legacy.pooling == "mean-last-hidden" and legacy.max_length(128) == 128
    f2, _ = legacy.encode(["lamp desk"], progress=False)
    assert torch.allclose(f2[0], hand, atol=1e-5)


def test_sentence_transformers_folder_other_modes_and_unsupported_modules(tmp_path):
    from speeder_fast.features.text import sentence_transformers_layout

    tok, bert = _st_folder(tmp_path / "cls", modes=("cls_token",), normalize=False)
    enc = SentenceTextEncoder(tmp_path / "cls")
    assert enc.pooling == "st:cls_token"
    with torch.no_grad():
        want = bert(**tok(["mug"], return_tensors="pt")).last_hidden_state[0, 0]
    assert torch.allclose(enc.encode(["MUG"], progress=False)[0][0], want, atol=1e-5)
    lay = sentence_transformers_layout(tmp_path / "cls")
    assert lay == {"transformer_path": "", "modes": ["cls_token"], "normalize": False, "max_seq_length": 5,
                   "do_lower_case": True}
    mods = json.loads((tmp_path / "cls" / "modules.json").read_text())
    mods.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "cls" / "modules.json").write_text(json.dumps(mods))
    with pytest.raises(ValueError, match="Dense"):
        SentenceTextEncoder(tmp_path / "cls")
    _st_folder(tmp_path / "none", modes=())
    with pytest.raises(ValueError, match="pooling"):
        sentence_transformers_layout(tmp_path / "none")


def test_minilm_spec_resolves_to_the_asset(tmp_path, monkeypatch):
    from speeder_fast import assets

    _st_folder(tmp_path / "all-MiniLM-L6-v2")
    monkeypatch.setattr(assets, "minilm_path", lambda: tmp_path / "all-MiniLM-L6-v2")
    enc = make_text_encoder("minilm")
    assert isinstance(enc, SentenceTextEncoder) and enc.encoder_id.startswith("hf:all-MiniLM-L6-v2:")
    assert enc.pooling == "st:mean_tokens+l2"
