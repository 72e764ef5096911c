"""How much better a run's SASRec ranks the transitions it was trained on than held-out ones.

    python benchmarks/sasrec_leakage_check.py --run RUN [--window 10] [--dropout]

``model.user_state=sasrec`` feeds SASRec's state at every history slot to the LLM. In training those
slots are positions of the training prefixes (``sequence[:-2]``), whose next items SASRec itself was
trained to predict; at test time they are not. This script measures the gap with the run's own
SASRec (``RUN/sasrec.safetensors``, or ``--model-file``) and data (``RUN/config.toml``): full-ranking NDCG@10 and HR@10
(history items excluded, pessimistic ties, as :mod:`speeder_fast.metrics`) of the state after the
last ``--window`` items, for three next-item positions of every user long enough:

* ``train_last``: ``sequence[:-3] -> sequence[-3]``, the last transition SASRec trained on;
* ``valid``: ``sequence[:-2] -> sequence[-2]`` (SASRec's early-stopping split);
* ``test``: ``sequence[:-1] -> sequence[-1]``.

``--dropout`` keeps SASRec's dropout on (train mode), to see whether noise closes the gap.
``--refit-half EPOCHS`` locates the memory: it trains a fresh SASRec transformer (positions,
blocks, final norm) for that many epochs on the even-numbered users' training prefixes, with the
run's item embedding table frozen, and reports it on the odd-numbered users, whose sequences that
transformer never saw (``refit_on_unseen``), next to the run's model on the same users
(``full_on_unseen``). Prints one JSON object; ``--out`` also writes it (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def next_item_metrics(model, prefixes: list, targets: list, window: int, batch: int = 512) -> dict:
    """Full-ranking metrics (:func:`speeder_fast.metrics.full_ranks`: history excluded, pessimistic
    ties; :func:`~speeder_fast.metrics.ranking_metrics`) of ``model``'s state after each prefix's
    last ``window`` items."""
    from speeder_fast.metrics import full_ranks, ranking_metrics

    ranks = []
    for a in range(0, len(prefixes), batch):
        chunk = prefixes[a:a + batch]
        x = torch.zeros(len(chunk), window, dtype=torch.long)
        for i, p in enumerate(chunk):
            p = p[-window:]
            x[i, window - len(p):] = torch.as_tensor(p) + 1
        with torch.no_grad():
            s = model.score_all(model(x)[:, -1])
        rows = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(chunk)])
        items = torch.cat([torch.as_tensor(p, dtype=torch.long) for p in chunk])
        ranks.append(full_ranks(s, torch.as_tensor(targets[a:a + batch]), rows, items))
    return ranking_metrics(torch.cat(ranks))


def positions_metrics(model, seqs: list, users: list[int], window: int) -> dict:
    """:func:`next_item_metrics` at the train_last / valid / test positions of ``users``."""
    out = {}
    for name, cut in (("train_last", 3), ("valid", 2), ("test", 1)):
        us = [u for u in users if len(seqs[u]) > cut]
        out[name] = next_item_metrics(model, [seqs[u][:-cut] for u in us], [int(seqs[u][-cut]) for u in us], window)
    return out


def refit_transformer(full, seqs: list, users: list[int], epochs: int, seed: int, batch: int = 256):
    """A fresh SASRec with ``full``'s item table (frozen) and its own transformer, trained with the
    full-softmax loss on the training prefixes (``sequence[:-2]``) of ``users``."""
    import torch.nn.functional as F

    from speeder_fast.features.sasrec import SASRec

    cfg = full.config_dict()
    torch.manual_seed(seed)
    m = SASRec(**cfg)
    with torch.no_grad():
        m.item_emb.weight.copy_(full.item_emb.weight)
    m.item_emb.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    L = cfg["max_len"]
    pre = [p for p in (seqs[u][:-2][-(L + 1):] for u in users) if len(p) >= 2]
    inp = torch.zeros(len(pre), L, dtype=torch.long)
    tgt = torch.full((len(pre), L), -100, dtype=torch.long)
    for i, p in enumerate(pre):
        inp[i, L - len(p) + 1:] = torch.as_tensor(p[:-1]) + 1
        tgt[i, L - len(p) + 1:] = torch.as_tensor(p[1:])
    m.train()
    for _ in range(epochs):
        perm = torch.randperm(len(pre))
        for a in range(0, len(pre), batch):
            idx = perm[a:a + batch]
            x, y = inp[idx], tgt[idx]
            w = int((x > 0).sum(1).max())
            x, y = x[:, -w:], y[:, -w:]
            keep = y >= 0
            loss = F.cross_entropy(m.score_all(m(x)[keep]), y[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder with config.toml and sasrec.safetensors")
    ap.add_argument("--model-file", default="sasrec.safetensors",
                    help="the SASRec in RUN to check (default sasrec.safetensors, the reference row's; "
                         "sasrec_features.safetensors is the collab encoder of a features.sasrec_holdout run)")
    ap.add_argument("--window", type=int, default=10, help="items SASRec reads (default 10 = data.max_history's default)")
    ap.add_argument("--dropout", action="store_true", help="keep SASRec's dropout on (train mode)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed (matters with --dropout)")
    ap.add_argument("--refit-half", type=int, default=0, metavar="EPOCHS",
                    help="also train a fresh transformer on half of the users over the run's frozen item table "
                         "for EPOCHS epochs and report it on the other half (0 = skip, default)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    from speeder_fast.data import prepare
    from speeder_fast.features.sasrec import load_sasrec
    from speeder_fast.training.run import load_run_config
    from speeder_fast.utils import atomic_write_json

    torch.manual_seed(args.seed)
    run = Path(args.run)
    cfg = load_run_config(run / "config.toml")
    prepared = prepare(cfg.data)
    model = load_sasrec(run / args.model_file)
    model.train(args.dropout)
    seqs = prepared.dataset.sequences
    out = {"run": str(run), "model_file": args.model_file, "dataset": prepared.dataset.name, "window": args.window, "dropout": args.dropout,
           "machine": "see benchmarks/RESULTS.md (CPU)", "date": time.strftime("%Y-%m-%d")}
    out.update(positions_metrics(model, seqs, list(range(len(seqs))), args.window))
    if args.refit_half > 0:
        unseen = list(range(1, len(seqs), 2))
        t0 = time.perf_counter()
        refit = refit_transformer(model, seqs, list(range(0, len(seqs), 2)), args.refit_half, args.seed)
        out["refit_epochs"], out["refit_seconds"] = args.refit_half, time.perf_counter() - t0
        out["full_on_unseen"] = positions_metrics(model.eval(), seqs, unseen, args.window)
        out["refit_on_unseen"] = positions_metrics(refit, seqs, unseen, args.window)
    print(json.dumps(out, indent=1))
    if args.out:
        atomic_write_json(Path(args.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
