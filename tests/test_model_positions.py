"""SPAE splice: item tokens (+ absolute / relative cues) land exactly at the slots of a real batch."""

import numpy as np
import torch

import tiny
from speeder_fast.config import PromptConfig
from speeder_fast.model.positions import SPAE
from speeder_fast.model.prompts import PromptBuilder


def _batch(k=2):
    tok = tiny.make_tokenizer()
    p = tiny.make_prepared(max_history=5)
    b = PromptBuilder(tok, p.dataset, PromptConfig(answer_mode="score", paradigm="speeder"), 8, 5, n_item_tokens=k)
    v = p.valid
    return b, b.build(v.histories[:4], v.lengths[:4], p.valid_candidates[:4], v.targets[:4]), len(tok)


def test_splice_places_item_tokens_and_cues_exactly():
    k, H = 2, 16
    b, batch, V = _batch(k)
    torch.manual_seed(0)
    table = torch.randn(V, H)
    U = batch.unique_items.shape[0]
    items = torch.randn(U, k, H)
    for absolute, relative in ((True, True), (True, False), (False, True), (False, False)):
        spae = SPAE(H, 16, absolute, relative, init_std=1.0, abs_scale=0.5)
        out = spae.splice(batch.input_ids, table, batch.slot_item, batch.slot_abs, batch.slot_rel, items)
        assert out.shape == (*batch.input_ids.shape, H)
        B, L = batch.input_ids.shape
        for bi in range(B):
            for p in range(L):
                s = int(batch.slot_item[bi, p])
                if s < 0:
                    torch.testing.assert_close(out[bi, p], table[batch.input_ids[bi, p]])
                    continue
                want = items.view(-1, H)[s].clone()
                a, r = int(batch.slot_abs[bi, p]), int(batch.slot_rel[bi, p])
                if absolute and a >= 0:
                    want += 0.5 * spae.abs_table[a]
                if relative and r >= 0:
                    want += spae.rel_table[r]
                torch.testing.assert_close(out[bi, p], want.detach())


def test_slot_layout_matches_history_order():
    k = 3
    b, batch, _ = _batch(k)
    for bi in range(batch.input_ids.shape[0]):
        n = int(batch.history_lengths[bi])
        slots = batch.slot_item[bi]
        a = batch.slot_abs[bi][slots >= 0]
        r = batch.slot_rel[bi][slots >= 0]
        hist = a >= 0
        # k consecutive slots per history item, absolute 0..n-1 oldest first, relative n-1..0
        assert a[hist].tolist() == [i for i in range(n) for _ in range(k)]
        assert r[hist].tolist() == [n - 1 - i for i in range(n) for _ in range(k)]
        # candidates carry no position cue
        assert (r[~hist] == -1).all() and int((~hist).sum()) == 8 * k
        # slot -> the right item: unique_items[slot // k] is the history / candidate item, token index slot % k
        ids = batch.unique_items[slots[slots >= 0] // k]
        want_hist = np.repeat(tiny.make_prepared(max_history=5).valid.histories[bi, :n], k)
        assert ids[hist].tolist() == want_hist.tolist()
        assert ids[~hist].tolist() == np.repeat(batch.candidates[bi].numpy(), k).tolist()
        assert (slots[slots >= 0] % k).tolist() == [t for _ in range(n + 8) for t in range(k)]


def test_splice_gradients_reach_items_and_tables_not_text():
    k, H = 1, 8
    b, batch, V = _batch(k)
    table = torch.randn(V, H, requires_grad=False)
    items = torch.randn(batch.unique_items.shape[0], k, H, requires_grad=True)
    spae = SPAE(H, 16)
    out = spae.splice(batch.input_ids, table, batch.slot_item, batch.slot_abs, batch.slot_rel, items)
    out.sum().backward()
    assert items.grad.abs().sum() > 0
    n_hist = int(batch.history_lengths.max())
    assert spae.abs_table.grad[:n_hist].abs().sum() > 0 and spae.abs_table.grad[n_hist:].abs().sum() == 0
    assert spae.rel_table.grad[:n_hist].abs().sum() > 0
