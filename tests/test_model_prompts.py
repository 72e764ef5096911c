"""Prompt builder: placeholders, truncation budgets, templates from config, labels, answers."""

import numpy as np
import pytest

import tiny
from speeder_fast.config import PromptConfig
from speeder_fast.model.prompts import PromptBuilder, ordinal_word


def _build(tok, prepared, n=5, k=1, ordinal=False, **cfg):
    b = PromptBuilder(tok, prepared.dataset, PromptConfig(**{"answer_mode": "score", **cfg}), 8, 5, n_item_tokens=k, ordinal_text=ordinal)
    v = prepared.valid
    return b, b.build(v.histories[:n], v.lengths[:n], prepared.valid_candidates[:n], v.targets[:n])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_speeder_placeholders_k_per_item(tok, prepared, k):
    b, batch = _build(tok, prepared, k=k, paradigm="speeder")
    for i in range(batch.input_ids.shape[0]):
        n_items = int(batch.history_lengths[i]) + 8
        assert int((batch.slot_item[i] >= 0).sum()) == k * n_items
        # the item's tokens are never spelled out as text in a speeder prompt
        text = b.render(batch, i)
        assert text.count("<item:") == n_items
    # each unique item is compressed once
    assert len(set(batch.unique_items.tolist())) == len(batch.unique_items)
    needed = set(np.concatenate([prepared.valid.histories[:5][prepared.valid.histories[:5] >= 0],
                                 prepared.valid_candidates[:5].ravel()]).tolist())
    assert set(batch.unique_items.tolist()) == needed


def test_verbose_truncation_budget(tok, prepared):
    for budget in (3, 12):
        b, batch = _build(tok, prepared, paradigm="verbose", description_tokens=budget, title_tokens=4)
        full = tok(" " + prepared.dataset.item_text["description"][0].strip(), add_special_tokens=False)["input_ids"]
        assert len(full) > 12
        for item in range(prepared.dataset.n_items):
            t = b.title_ids[item]
            v = b.verbose_ids[item]
            assert len(t) <= 4
            # verbose item = template pieces + title (<= 4) + description (<= budget)
            fixed = len(b._encode(". Description:"))
            assert len(v) <= 4 + fixed + budget
        assert (batch.slot_item == -1).all()
    # a bigger budget gives longer prompts
    _, small = _build(tok, prepared, paradigm="verbose", description_tokens=3)
    _, big = _build(tok, prepared, paradigm="verbose", description_tokens=12)
    assert int(big.prompt_tokens.sum()) > int(small.prompt_tokens.sum())
    _, titles = _build(tok, prepared, paradigm="titles")
    assert int(small.prompt_tokens.sum()) > int(titles.prompt_tokens.sum())


def test_templates_come_from_config(tok, prepared):
    b, batch = _build(tok, prepared, paradigm="titles", system="Pick one.", history_header="Seen:",
                      candidates_header="Options:", answer_prefix="Choice:", candidate_item="({label}){item};\n",
                      history_item="*{item}\n")
    text = b.render(batch, 0)
    assert text.startswith("Pick one.\nSeen:\n* ")
    assert "Options:\n( A) " in text and text.rstrip().endswith("Choice:" + b.label_strings[int(batch.target_idx[0])])
    with pytest.raises(ValueError, match="candidate_item"):
        _build(tok, prepared, paradigm="titles", candidate_item="{item} only")


def test_ordinals_and_answers(tok, prepared):
    assert [ordinal_word(i) for i in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"]
    b, batch = _build(tok, prepared, paradigm="speeder", ordinal=True)
    text = b.render(batch, 0)
    n = int(batch.history_lengths[0])
    assert all(f"{ordinal_word(i + 1)} item:" in text for i in range(n))
    # score mode: one answer token = the label of the target, predicted at answer_pos
    assert len(batch.loss_pos) == batch.input_ids.shape[0]
    L = batch.input_ids.shape[1]
    for i in range(batch.input_ids.shape[0]):
        p = int(batch.answer_pos[i])
        assert int(batch.loss_pos[i]) == i * L + p
        assert int(batch.input_ids[i, p + 1]) == int(batch.label_token_ids[batch.target_idx[i]]) == int(batch.loss_targets[i])
        assert int(batch.prompt_tokens[i]) == p + 1
    # generate mode: title + eos, labels aligned
    b2, g = _build(tok, prepared, paradigm="titles", answer_mode="generate")
    for i in range(g.input_ids.shape[0]):
        ans = g.labels[i][g.labels[i] != -100].tolist()
        tgt_item = int(g.candidates[i, g.target_idx[i]])
        assert ans == b2.title_ids[tgt_item].tolist() + [b2.eos_id]


def test_labels_single_tokens_or_special_fallback(prepared):
    tok_letters = tiny.make_tokenizer(letters=True)
    b = PromptBuilder(tok_letters, prepared.dataset, PromptConfig(answer_mode="score"), 8, 5)
    assert b.added_tokens == [] and b.label_strings[:2] == [" A", " B"]
    tok_plain = tiny.make_tokenizer(letters=False, vocab_size=300)
    b2 = PromptBuilder(tok_plain, prepared.dataset, PromptConfig(answer_mode="score"), 8, 5)
    assert b2.added_tokens == [f"<|cand_{i}|>" for i in range(8)]
    assert all(len(tok_plain(s, add_special_tokens=False)["input_ids"]) == 1 for s in b2.label_strings)
    assert len(set(b2.label_ids.tolist())) == 8


def test_target_must_be_in_candidates(tok, prepared):
    b = PromptBuilder(tok, prepared.dataset, PromptConfig(answer_mode="score"), 8, 5)
    v = prepared.valid
    cands = prepared.valid_candidates[:2].copy()
    cands[0] = np.where(cands[0] == v.targets[0], (v.targets[0] + 1) % prepared.dataset.n_items, cands[0])
    with pytest.raises(ValueError, match="exactly once"):
        b.build(v.histories[:2], v.lengths[:2], cands, v.targets[:2])


def test_text_only_curriculum_rows(tok, prepared):
    b = PromptBuilder(tok, prepared.dataset, PromptConfig(answer_mode="score", paradigm="speeder"), 8, 5)
    v = prepared.valid
    batch = b.build(v.histories[:4], v.lengths[:4], prepared.valid_candidates[:4], v.targets[:4],
                    text_only=np.array([True, False, True, False]))
    has_slots = (batch.slot_item >= 0).any(1).tolist()
    assert has_slots == [False, True, False, True]


def test_titles_colliding_after_truncation_warn_and_match_full_title(tok):
    """Issue 14: items whose titles share their first prompt.title_tokens tokens are counted at build time, and
    a generation is matched against the full title when the truncated one is ambiguous."""
    import logging
    import re

    import torch

    from speeder_fast.data.dataset import RecDataset
    from speeder_fast.model.llm import match_generated

    titles = ["blue pen refill", "blue pen cap", "blue pen", "red stapler", "red stapler", "green folder"]
    ds = RecDataset("t", ["u"], [f"i{i}" for i in range(len(titles))], [np.arange(len(titles))],
                    {"title": titles})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    lg = logging.getLogger("speeder_fast")
    lg.addHandler(handler)
    try:
        b = PromptBuilder(tok, ds, PromptConfig(paradigm="titles", answer_mode="generate", title_tokens=2), 3, 2)
    finally:
        lg.removeHandler(handler)
    assert b.title_text[0] == b.title_text[1] == b.title_text[2] == "blue pen"
    msg = "\n".join(r.getMessage() for r in records)
    assert "prompt.title_tokens=2: 5 items share their truncated title with another item (2 titles" in msg, msg
    assert "2 of them have identical full titles (never separable)" in msg
    assert int(re.search(r"prompt\.title_tokens=(\d+) would separate", msg)[1]) >= 3
    assert sorted(b.full_title_text) == [0, 1, 2, 3, 4]

    def gen(text):
        return torch.tensor([tok(" " + text, add_special_tokens=False)["input_ids"] + [b.eos_id]])

    cands = torch.tensor([[0, 1, 5]])
    assert match_generated(b, gen("blue pen refill"), cands)[1].tolist() == [0]  # full title: item 0
    assert match_generated(b, gen("blue pen cap"), cands)[1].tolist() == [1]
    assert match_generated(b, gen("blue pen"), cands)[1].tolist() == [-1]  # ambiguous, no full title equals it
    assert match_generated(b, gen("blue pen"), torch.tensor([[0, 2, 5]]))[1].tolist() == [1]  # item 2 is "blue pen"
    assert match_generated(b, gen("red stapler"), torch.tensor([[3, 4, 5]]))[1].tolist() == [-1]
    assert match_generated(b, gen("green folder"), cands)[1].tolist() == [2]
