"""Text modality: template rendering, empty-text masks, the LLM-embedding encoder, a sentence encoder."""

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
