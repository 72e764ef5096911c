"""SASRec (Kang & McAuley, ICDM 2018) in plain PyTorch: the collaborative item-feature encoder.

Model
    item embedding (ids shifted by +1, row 0 = padding) + learned position embeddings, dropout,
    ``n_layers`` causal transformer blocks with **pre-LayerNorm** (LayerNorm before attention and
    before the feed-forward net, as in the original SASRec), a final LayerNorm, and scoring by dot
    product with the *shared* item embedding table.
    Positions count from the oldest item kept in the window (0, 1, 2, ...), so the output at a
    position depends only on that position's prefix: the model is exactly causal, and a training
    prefix gets the same representation as the same prefix at evaluation time.

Training (the standard SASRec formulation)
    Each user's training prefix ``seq[:-2]`` (its last ``max_len + 1`` items) is one sequence:
    inputs ``prefix[:-1]``, per-position targets ``prefix[1:]``. Loss ``ce`` = full softmax
    cross-entropy over all items (default); ``bce`` = the original paper's binary cross-entropy
    with one sampled negative per position. Only positions with a target are scored (their flat
    indices are computed on the host from numpy, so there is no device sync in the loop).
    Early stopping on validation NDCG@10 (full ranking), best weights restored.

Evaluation
    * full ranking: the target is ranked among **all** items; items in the user's history (every
      item before the target) are **excluded** (score ``-inf``), except the target itself when it
      is a repeat. This is the convention of RecBole (DuoRec) and of the S3-Rec/CL4SRec/ICLRec
      code. The same ranks *with* history items kept are also reported (``*_full_with_history``).
    * candidates: the persisted candidate sets of :class:`PreparedData` (target + never-interacted
      items), ranked by raw score: the HR@1 here is the number the LLM recommender must beat.
    Ties are pessimistic (see :mod:`speeder_fast.metrics`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.dataset import PreparedData
from ..metrics import full_ranks, rank_of_target, ranking_metrics
from ..utils import atomic_save_safetensors, get_logger, seed_everything

log = get_logger("speeder_fast.features.sasrec")


@dataclass
class SASRecConfig:
    """Hyper-parameters of SASRec training (defaults: the usual Amazon-Beauty setting)."""

    dim: int = 64  # hidden size = item embedding size
    n_layers: int = 2
    n_heads: int = 2
    ffn_mult: int = 4  # feed-forward inner size = ffn_mult * dim
    dropout: float = 0.5  # embedding / residual / attention dropout (0.5 for sparse Amazon data)
    max_len: int = 50  # items per input window
    epochs: int = 200
    batch_size: int = 256  # users (sequences) per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "ce"  # ce | bce
    patience: int = 10  # epochs without validation NDCG@10 improvement before stopping (0 = never)
    seed: int = 42
    eval_batch_size: int = 1024
    exclude_history: bool = True  # full ranking: drop history items (except the target)
    threads: int = 0  # CPU threads for torch (0 = leave as is)

    def validate(self) -> None:
        errs = []
        if self.loss not in ("ce", "bce"):
            errs.append(f"loss: {self.loss!r} is not ce or bce")
        if self.dim < 1 or self.dim % self.n_heads:
            errs.append(f"dim ({self.dim}) must be a positive multiple of n_heads ({self.n_heads})")
        for name in ("n_layers", "max_len", "batch_size", "eval_batch_size", "ffn_mult"):
            if getattr(self, name) < 1:
                errs.append(f"{name} must be >= 1")
        if self.epochs < 0 or self.patience < 0:
            errs.append("epochs and patience must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            errs.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            errs.append(f"lr must be > 0, got {self.lr}")
        if errs:
            from speeder_fast.errors import ConfigError

            raise ConfigError("invalid SASRecConfig: " + "; ".join(errs))


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))`` then ``x + FFN(LN(x))``."""

    def __init__(self, dim: int, n_heads: int, inner: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, inner)
        self.ff2 = nn.Linear(inner, dim)
        self.drop = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, l, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, l, d)))
        return x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.ln2(x))))))


class SASRec(nn.Module):
    """Causal self-attentive sequence encoder with a shared item embedding for scoring.

    Inputs are *shifted* item ids (item ``i`` -> ``i + 1``, 0 = padding), left-padded:
    ``seq[b, -1]`` is the newest item.
    """

    def __init__(self, n_items: int, dim: int = 64, n_layers: int = 2, n_heads: int = 2,
                 max_len: int = 50, dropout: float = 0.5, ffn_mult: int = 4) -> None:
        super().__init__()
        self.n_items, self.dim, self.max_len = n_items, dim, max_len
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, n_heads, ffn_mult * dim, dropout) for _ in range(n_layers))
        self.final_ln = nn.LayerNorm(dim)
        self.apply(self._init)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq`` [B, L] shifted ids (L <= max_len) -> hidden states [B, L, dim]."""
        b, l = seq.shape
        valid = seq > 0
        # position = index from the oldest real item in the window (pads -> 0, masked anyway)
        pos = (valid.long().cumsum(1) - 1).clamp_(min=0)
        x = self.item_emb(seq) * math.sqrt(self.dim) + self.pos_emb(pos)
        vmask = valid.unsqueeze(-1).to(x.dtype)
        x = self.emb_drop(x) * vmask
        causal = torch.ones(l, l, dtype=torch.bool, device=seq.device).tril_()
        # a query may attend to earlier real items and always to itself (pads would otherwise
        # have an empty row -> NaN); [B, 1, L, L]
        attn_mask = (causal & (valid[:, None, :] | torch.eye(l, dtype=torch.bool, device=seq.device))).unsqueeze(1)
        for blk in self.blocks:
            x = blk(x, attn_mask) * vmask
        return self.final_ln(x)

    def item_table(self) -> torch.Tensor:
        """Scoring table [n_items, dim] (row ``i`` = item ``i``, padding row dropped)."""
        return self.item_emb.weight[1:]

    def score_all(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of every item for hidden states ``h`` [..., dim] -> [..., n_items]."""
        return h @ self.item_table().t()

    def config_dict(self) -> dict:
        blk = self.blocks[0]
        return {"n_items": self.n_items, "dim": self.dim, "n_layers": len(self.blocks), "n_heads": blk.n_heads,
                "max_len": self.max_len, "dropout": blk.attn_dropout, "ffn_mult": blk.ff1.out_features // self.dim}


# ----------------------------------------------------------------------------------------------
# data -> dense arrays (host side, once)


def _left_pad(seqs: list[np.ndarray], width: int) -> np.ndarray:
    """Shifted (+1) ids of the last ``width`` items of each sequence, left-padded with 0."""
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-width:]
        if len(s):
            out[i, width - len(s):] = s + 1
    return out


def _train_arrays(prepared: PreparedData, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs [U, L], targets [U, L], lengths [U]) over users whose training prefix has >= 2 items."""
    prefixes = [s[:-2][-(max_len + 1):] for s in prepared.dataset.sequences]
    prefixes = [p for p in prefixes if len(p) >= 2]
    if not prefixes:
        from speeder_fast.errors import DataError

        raise DataError("SASRec: no user has a training prefix of >= 2 items (sequences[u][:-2]); the data is too "
                        "short for the collab modality (drop it from features.modalities, or use longer sequences)")
    inp = _left_pad([p[:-1] for p in prefixes], max_len)
    tgt = _left_pad([p[1:] for p in prefixes], max_len)
    return inp, tgt, np.asarray([len(p) - 1 for p in prefixes], dtype=np.int64)


@dataclass
class _EvalSet:
    """Inputs, targets and history (for exclusion) of one evaluation split."""

    inputs: np.ndarray  # [n, L] shifted, left-padded
    targets: np.ndarray  # [n] unshifted item ids
    hist_rows: np.ndarray  # flat row index of each history item (for -inf exclusion)
    hist_items: np.ndarray  # flat (unshifted) history item ids
    hist_offsets: np.ndarray  # [n + 1] CSR offsets into hist_rows/hist_items
    candidates: np.ndarray | None  # [n, N] or None


def _eval_set(prepared: PreparedData, split: str, max_len: int) -> _EvalSet:
    """Build the leave-one-out evaluation arrays; checks the split agrees with the sequences."""
    sa = prepared.split(split)
    seqs = prepared.dataset.sequences
    cut = 2 if split == "valid" else 1
    users = sa.users
    lens = np.asarray([len(seqs[u]) for u in users], dtype=np.int64)
    if len(users) and lens.min() < cut + 1:
        raise ValueError(f"PreparedData.{split}: user with < {cut + 1} events in dataset.sequences")
    targets = np.asarray([seqs[u][len(seqs[u]) - cut] for u in users], dtype=np.int64)
    bad = int((targets != sa.targets).sum())
    if bad:
        raise ValueError(f"PreparedData.{split}.targets disagree with dataset.sequences[u][-{cut}] for "
                         f"{bad} of {len(users)} users (data contract: leave-one-out)")
    hists = [seqs[u][: len(seqs[u]) - cut] for u in users]
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(h) for h in hists])
    flat = np.concatenate(hists) if hists else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(users), dtype=np.int64), [len(h) for h in hists])
    cands = prepared.candidates(split) if split in ("valid", "test") else None
    if cands is not None and len(cands) != len(users):
        raise ValueError(f"PreparedData.{split}_candidates has {len(cands)} rows, {split} split has {len(users)}")
    return _EvalSet(_left_pad(hists, max_len), targets, rows, flat.astype(np.int64), offsets, cands)


@torch.no_grad()
def evaluate(model: SASRec, es: _EvalSet, device: torch.device, batch_size: int = 1024,
             exclude_history: bool = True, with_history_variant: bool = True) -> dict[str, dict]:
    """Full-ranking (and candidate-set) metrics of ``model`` on one prepared split."""
    model.eval()
    n = len(es.targets)
    ranks_full, ranks_hist, ranks_cand = [], [], []
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        seq = torch.from_numpy(es.inputs[s:e]).to(device)
        lb = int((es.inputs[s:e] > 0).sum(1).max()) if e > s else 1
        h = model(seq[:, -max(lb, 1):])[:, -1]
        scores = model.score_all(h).float()  # [b, n_items]
        tgt = torch.from_numpy(es.targets[s:e]).to(device)
        if with_history_variant:
            ranks_hist.append(rank_of_target(scores, tgt, check=False).cpu())
        if es.candidates is not None:
            cand = torch.from_numpy(es.candidates[s:e]).to(device)
            cidx = (cand == tgt[:, None]).long().argmax(1)
            ranks_cand.append(rank_of_target(scores.gather(1, cand), cidx, check=False).cpu())
        if exclude_history:
            a, b = es.hist_offsets[s], es.hist_offsets[e]
            ranks_full.append(full_ranks(scores, tgt, es.hist_rows[a:b] - s, es.hist_items[a:b]).cpu())
        else:
            ranks_full.append(rank_of_target(scores, tgt, check=False).cpu())
    out = {"full": ranking_metrics(torch.cat(ranks_full))}
    if with_history_variant:
        out["full_with_history"] = ranking_metrics(torch.cat(ranks_hist))
    if ranks_cand:
        out["candidates"] = ranking_metrics(torch.cat(ranks_cand), hr_ks=(1, 5, 10), ndcg_ks=(5, 10))
    return out


def _check_candidates(es: _EvalSet, split: str) -> None:
    if es.candidates is None:
        return
    hits = (es.candidates == es.targets[:, None]).sum(1)
    if (hits != 1).any():
        raise ValueError(f"PreparedData.{split}_candidates: {int((hits != 1).sum())} rows do not contain "
                         "the target exactly once (data contract)")


def length_bucketed_batches(lens: np.ndarray, batch_size: int, rng: np.random.Generator,
                            pool_batches: int = 16) -> list[np.ndarray]:
    """Shuffled batches of sequence indices with similar lengths (less padding per batch).

    The indices are shuffled, cut into pools of ``pool_batches * batch_size``, each pool is
    sorted by length (stable) and cut into batches, and the batch order is shuffled. Every index
    appears exactly once per epoch. Amazon-Beauty has a median training prefix of 3 items but a
    maximum of 50, so a purely random batch is mostly padding.
    """
    order = rng.permutation(len(lens))
    pool = batch_size * pool_batches
    batches: list[np.ndarray] = []
    for s in range(0, len(order), pool):
        chunk = order[s:s + pool]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def train_sasrec(prepared: PreparedData, cfg: SASRecConfig | None = None, device: str | torch.device = "cpu",
                 progress: bool = True, on_epoch: Callable[[dict], None] | None = None,
                 **overrides: Any) -> tuple[SASRec, dict]:
    """Train SASRec on ``prepared``'s training prefixes; return (best model, metrics dict).

    ``overrides`` replace fields of ``cfg`` (e.g. ``epochs=5``). The metrics dict has
    ``valid_full``, ``test_full``, ``test_full_with_history``, ``test_candidates``,
    ``valid_candidates`` (each ``{"HR@k", "NDCG@k", "MRR", "n"}``), ``best_epoch``,
    ``epochs_run``, ``epoch_seconds`` / ``epoch_cpu_seconds`` (mean wall / process CPU time of a
    training epoch, evaluation excluded), ``history`` (per
    epoch loss and validation NDCG@10) and ``config``.
    """
    cfg = dataclasses.replace(cfg or SASRecConfig(), **overrides)
    cfg.validate()
    device = torch.device(device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    n_items = prepared.dataset.n_items
    inp, tgt, lens = _train_arrays(prepared, cfg.max_len)
    valid_es = _eval_set(prepared, "valid", cfg.max_len)
    test_es = _eval_set(prepared, "test", cfg.max_len)
    _check_candidates(valid_es, "valid")
    _check_candidates(test_es, "test")

    model = SASRec(n_items, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.max_len, cfg.dropout, cfg.ffn_mult).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n_seq = len(inp)
    n_batches = math.ceil(n_seq / cfg.batch_size)
    log.info("SASRec: %d items, %d training sequences (%d target positions), %d valid / %d test users, "
             "loss=%s dim=%d layers=%d max_len=%d on %s", n_items, n_seq, int(lens.sum()), len(valid_es.targets),
             len(test_es.targets), cfg.loss, cfg.dim, cfg.n_layers, cfg.max_len, device)

    from tqdm.auto import tqdm

    best = (-1.0, -1, None)  # (ndcg@10, epoch, state)
    history: list[dict] = []
    epoch_times: list[float] = []
    epoch_cpu: list[float] = []  # process CPU time (all threads): less sensitive to other load
    bad_epochs = 0
    bar = tqdm(total=cfg.epochs * n_batches, desc="SASRec", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        batches = length_bucketed_batches(lens, cfg.batch_size, rng)
        loss_sum = torch.zeros((), device=device)
        for bi, rows in enumerate(batches):
            lb = int(lens[rows].max())
            x_np, y_np = inp[rows, -lb:], tgt[rows, -lb:]
            flat = np.flatnonzero(y_np.reshape(-1) > 0)  # host-side: positions with a target
            x = torch.from_numpy(x_np).to(device, non_blocking=True)
            flat_t = torch.from_numpy(flat).to(device, non_blocking=True)
            y = torch.from_numpy(y_np.reshape(-1)[flat] - 1).to(device, non_blocking=True)
            h = model(x).reshape(-1, cfg.dim).index_select(0, flat_t)  # [P, d]
            if cfg.loss == "ce":
                loss = F.cross_entropy(model.score_all(h), y)
            else:
                neg = (y + torch.randint(1, n_items, y.shape, device=device, generator=gen)) % n_items
                table = model.item_table()
                pos_l = (h * table[y]).sum(-1)
                neg_l = (h * table[neg]).sum(-1)
                loss = (F.binary_cross_entropy_with_logits(pos_l, torch.ones_like(pos_l))
                        + F.binary_cross_entropy_with_logits(neg_l, torch.zeros_like(neg_l)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            bar.update(1)
            if progress and bi % 50 == 0:  # occasional host sync for the bar only
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.4f}")
        epoch_times.append(time.perf_counter() - t0)
        epoch_cpu.append(time.process_time() - c0)
        val = evaluate(model, valid_es, device, cfg.eval_batch_size, cfg.exclude_history, with_history_variant=False)
        v_ndcg = val["full"]["NDCG@10"]
        rec = {"epoch": epoch, "loss": float(loss_sum) / len(batches), "valid_NDCG@10": v_ndcg,
               "valid_HR@10": val["full"]["HR@10"], "epoch_s": epoch_times[-1]}
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        bar.set_postfix(epoch=epoch, loss=f"{rec['loss']:.4f}", vNDCG10=f"{v_ndcg:.4f}")
        log.log(20 if not progress else 10, "epoch %d: loss %.4f  valid NDCG@10 %.4f HR@10 %.4f  (%.1f s train)",
                epoch, rec["loss"], v_ndcg, rec["valid_HR@10"], epoch_times[-1])
        if v_ndcg > best[0]:
            best = (v_ndcg, epoch, copy.deepcopy(model.state_dict()))
            bad_epochs = 0
        else:
            bad_epochs += 1
            if cfg.patience and bad_epochs >= cfg.patience:
                log.info("SASRec: early stop at epoch %d (best valid NDCG@10 %.4f at epoch %d)", epoch, best[0], best[1])
                break
    bar.close()
    if best[2] is not None:
        model.load_state_dict(best[2])
    val = evaluate(model, valid_es, device, cfg.eval_batch_size, cfg.exclude_history)
    test = evaluate(model, test_es, device, cfg.eval_batch_size, cfg.exclude_history)
    metrics = {
        "valid_full": val["full"], "valid_full_with_history": val["full_with_history"],
        "test_full": test["full"], "test_full_with_history": test["full_with_history"],
        "best_epoch": best[1], "epochs_run": len(history),
        "epoch_seconds": float(np.mean(epoch_times)) if epoch_times else 0.0,
        "epoch_cpu_seconds": float(np.mean(epoch_cpu)) if epoch_cpu else 0.0,
        "history": history, "config": dataclasses.asdict(cfg),
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "n_items": n_items, "n_train_sequences": n_seq, "n_train_positions": int(lens.sum()),
    }
    if "candidates" in val:
        metrics["valid_candidates"] = val["candidates"]
    if "candidates" in test:
        metrics["test_candidates"] = test["candidates"]
    model.eval()
    return model, metrics


def trained_item_mask(prepared: PreparedData, max_len: int | None = None) -> torch.Tensor:
    """[n_items] bool: items that occur in some user's training prefix ``seq[:-2]``.

    Items seen only as validation/test targets keep their random initial embedding; the
    collaborative feature of such an item is marked absent (mask 0) rather than passed off as
    learned.
    """
    seen = np.zeros(prepared.dataset.n_items, dtype=bool)
    for s in prepared.dataset.sequences:
        p = s[:-2]
        if max_len is not None:
            p = p[-(max_len + 1):]
        if len(p) >= 2:
            seen[p] = True
    return torch.from_numpy(seen)


def sasrec_item_embeddings(model: SASRec, prepared: PreparedData | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n_items, dim] float32 on CPU, mask [n_items] bool) from a trained SASRec.

    With ``prepared`` the mask is :func:`trained_item_mask` (items never trained on -> 0);
    without it every item is marked present.
    """
    feats = model.item_table().detach().float().cpu().clone()
    if prepared is None:
        mask = torch.ones(feats.shape[0], dtype=torch.bool)
    else:
        if prepared.dataset.n_items != feats.shape[0]:
            raise ValueError(f"model has {feats.shape[0]} items, dataset {prepared.dataset.n_items}")
        mask = trained_item_mask(prepared, model.max_len)
    feats[~mask] = 0.0
    return feats, mask


def save_sasrec(model: SASRec, path: str | Path, extra: dict | None = None) -> None:
    """Write the weights (safetensors, atomic) with the architecture in the metadata."""
    meta = {"format": "speeder_fast.sasrec/1", "config": json.dumps(model.config_dict())}
    if extra:
        meta["extra"] = json.dumps(extra, default=str)
    atomic_save_safetensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, path, metadata=meta)


def load_sasrec(path: str | Path, device: str | torch.device = "cpu") -> SASRec:
    """Rebuild a :class:`SASRec` saved by :func:`save_sasrec`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "speeder_fast.sasrec/1":
        raise ValueError(f"{path}: not a speeder_fast SASRec checkpoint (metadata format={meta.get('format')!r})")
    model = SASRec(**json.loads(meta["config"]))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def default_threads() -> int:
    """CPU cores available to this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1
