"""MRC (MoME): the mixture equals a hand computation; masks (absent / stage-inactive) are respected."""

import torch
import torch.nn.functional as F

import tiny  # noqa: F401  (test helpers)
from speeder_fast.model.mome import MoME


def _features(n=6, dims=(5, 3), present=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for i, (m, d) in enumerate(zip(("text", "collab"), dims)):
        mask = torch.ones(n, dtype=torch.bool) if present is None else present[i]
        feats[m] = (torch.randn(n, d, generator=g) * (i + 1) * 3, mask)
    return feats


def _hand(mome: MoME, feats, items, active):
    """Independent re-computation of the MoME output for ``items``."""
    k, H = mome.k, mome.hidden_size
    outs, xs, masks = [], [], []
    for m, (x, mask) in feats.items():
        xn = F.layer_norm(x.float(), (x.shape[1],)) * mask[:, None]
        xs.append(xn[items])
        outs.append(mome.experts[m](xn[items]).view(len(items), k, H) if m in active else torch.zeros(len(items), k, H))
        masks.append(mask[items] & (m in active))
    logits = mome.gate(torch.cat(xs, 1)).view(len(items), len(feats), -1)
    res = torch.zeros(len(items), k, H)
    for u in range(len(items)):
        present = [j for j in range(len(feats)) if masks[j][u]]
        for t in range(k):
            mixed = torch.zeros(H)
            if present:
                g = logits[u, present, t if logits.shape[-1] > 1 else 0]
                w = torch.softmax(g, 0)
                for wi, j in zip(w, present):
                    mixed = mixed + wi * outs[j][u, t]
            res[u, t] = F.layer_norm(mixed, (H,), mome.ln_weight, mome.ln_bias, 1e-5)
    return res


def _randomize(mome: MoME):
    torch.manual_seed(1)
    with torch.no_grad():
        mome.gate.weight.normal_(0, 0.5)
        mome.gate.bias.normal_(0, 0.5)
        mome.ln_bias.normal_(0, 0.1)


def test_mixture_matches_hand_computation_per_item_and_per_token_gate():
    for per_token in (False, True):
        feats = _features()
        mome = MoME(feats, hidden_size=8, n_tokens=3, expert_hidden=7, per_token_gate=per_token, token_rms=0.7)
        _randomize(mome)
        items = torch.tensor([0, 3, 5, 3])
        out = mome.encode(items)
        assert out.shape == (4, 3, 8)
        torch.testing.assert_close(out, _hand(mome, feats, items, set(mome.modalities)), atol=1e-5, rtol=1e-5)
        # gate really matters: per-token gates differ across tokens
        logits = mome.gate(torch.cat([mome.features_of(m)[items] for m in mome.modalities], 1))
        assert logits.shape[1] == 2 * (3 if per_token else 1)


def test_absent_modality_is_masked_out():
    n = 6
    collab_present = torch.tensor([True, False, True, False, True, True])
    feats = _features(n, present=[torch.ones(n, dtype=torch.bool), collab_present])
    mome = MoME(feats, hidden_size=8, n_tokens=2, expert_hidden=7, token_rms=1.0)
    _randomize(mome)
    items = torch.arange(n)
    out = mome.encode(items)
    torch.testing.assert_close(out, _hand(mome, feats, items, set(mome.modalities)), atol=1e-5, rtol=1e-5)
    # an item without collab equals the text expert alone (weight 1 on text)
    text_only = F.layer_norm(
        mome.experts["text"](mome.features_of("text")[1:2]).view(1, 2, 8), (8,), mome.ln_weight, mome.ln_bias, 1e-5
    )
    torch.testing.assert_close(out[1:2], text_only, atol=1e-5, rtol=1e-5)
    # changing the collab expert cannot change the item without collab (but changes the others)
    with torch.no_grad():
        mome.experts["collab"][2].bias.add_(torch.linspace(-2, 2, 16))
    torch.testing.assert_close(mome.encode(items)[1], out[1], atol=1e-6, rtol=0)
    assert not torch.allclose(mome.encode(items)[0], out[0])


def test_stage_inactive_modality_ignored_and_gets_no_gradient():
    feats = _features()
    mome = MoME(feats, hidden_size=8, n_tokens=1, expert_hidden=7)
    _randomize(mome)
    mome.set_active(["text"])
    items = torch.tensor([0, 1, 2])
    out = mome.encode(items)
    torch.testing.assert_close(out, _hand(mome, feats, items, {"text"}), atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in mome.experts["collab"].parameters())
    assert mome.experts["text"][0].weight.grad.abs().sum() > 0
    mome.set_active(["text", "collab"])
    assert not torch.allclose(mome.encode(items), out.detach())


def test_no_modality_item_gives_bias_and_ln_weight_matches_rms():
    n = 4
    none = torch.tensor([True, False, True, True])
    feats = _features(n, present=[none, none])
    mome = MoME(feats, hidden_size=8, n_tokens=1, expert_hidden=7, token_rms=0.37)
    with torch.no_grad():
        mome.ln_bias.fill_(0.25)
    out = mome.encode(torch.arange(n))
    torch.testing.assert_close(out[1], torch.full((1, 8), 0.25))
    assert torch.isfinite(out).all()
    # fresh tokens have the requested RMS (LayerNorm output * weight, bias 0)
    mome2 = MoME(_features(n), hidden_size=64, n_tokens=1, expert_hidden=7, token_rms=0.37)
    rms = mome2.encode(torch.arange(n)).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.37), atol=1e-3, rtol=1e-3)


def test_catalog_cache_invalidated_by_training():
    mome = MoME(_features(), hidden_size=8, n_tokens=2, expert_hidden=7)
    mome.eval()
    c1 = mome.encode_catalog()
    assert c1.shape == (6, 2, 8)
    assert mome.encode_catalog() is c1  # cached
    torch.testing.assert_close(c1[2:4], mome.encode(torch.tensor([2, 3])))
    mome.train()
    with torch.no_grad():
        mome.ln_bias.add_(1.0)
    mome.eval()
    c2 = mome.encode_catalog()
    assert c2 is not c1 and torch.allclose(c2, c1 + 1.0, atol=1e-6)


def test_modality_dropout_uses_one_modality_mixtures_in_training_only():
    """ModDrop: in training every item's tokens equal its all-modality, text-only or collab-only
    mixture (never the empty one); in eval they equal the all-modality mixture exactly."""
    import pytest

    n = 64
    feats = _features(n)
    mome = MoME(feats, hidden_size=8, n_tokens=1, expert_hidden=7, modality_dropout=0.5)
    _randomize(mome)
    items = torch.arange(n)
    mome.eval()
    full = mome.encode(items)
    torch.testing.assert_close(full, _hand(mome, feats, items, {"text", "collab"}))
    only = {m: _hand(mome, feats, items, {m}) for m in ("text", "collab")}
    mome.train()
    torch.manual_seed(3)
    with torch.no_grad():
        out = mome.encode(items)
    kinds = []
    for u in range(n):
        match = [name for name, ref in (("both", full), ("text", only["text"]), ("collab", only["collab"]))
                 if torch.allclose(out[u], ref[u], atol=1e-5)]
        assert match, f"item {u}: not one of the three mixtures"
        kinds.append(match[0])
    # p = 0.5 per modality, all-dropped rows keep both: P(both) = 1/2, P(one only) = 1/4 each
    assert 15 < kinds.count("both") < 50 and kinds.count("text") > 5 and kinds.count("collab") > 5
    with pytest.raises(ValueError, match="modality_dropout"):
        MoME(feats, hidden_size=8, modality_dropout=1.0)
