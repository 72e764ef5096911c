"""Next-item head (``prompt.answer_mode = "item"``): the LLM hidden state scores the whole catalogue.

The head is *tied* to the MoME that writes the input soft tokens: item ``i``'s output vector is
the mean of its ``k`` MRC tokens (:meth:`MoME.encode`), so every item, seen in training or not,
has a vector, and one forward pass plus one matmul against the cached catalogue ranks every item
(every answer is a valid item). With ``cosine`` similarity (default)::

    logit(h, i) = s * <normalize(W h), normalize(e_i)> + b_i        s = exp(log_scale), learned

``W`` (``model.head_projection``) is a learned ``H x H`` map of the decoder's last hidden state,
``s`` starts at ``1 / model.head_temperature`` and ``b`` (``model.head_item_bias``) is a learned
per-item bias. ``dot`` similarity drops both normalisations and ``s``.

With ``model.head_keys = "experts"`` the head scores each modality separately and adds the scores
(late fusion): ``e_{m,i}`` is modality ``m``'s expert vector of item ``i`` (:meth:`MoME.expert_vectors`,
the same experts that write the input tokens, before the mixture), and::

    logit(h, i) = sum_m s_m * <normalize(W_m h), normalize(e_{m,i})> + b_i

summed over the modalities present for ``i`` (and active in the MPO stage). Implemented as one dot
product of concatenations, ``query = [s_m normalize(W_m h)]_m`` and ``key = [normalize(e_{m,i})]_m``
(``M * H`` wide, zero blocks for absent modalities), so the losses below apply unchanged.

Training (SASRec's objective, Kang & McAuley 2018): every history position predicts the next item
with a softmax cross-entropy over the catalogue:

* :func:`chunked_softmax_ce`: the exact full softmax, computed over catalogue chunks with an online
  log-sum-exp and recomputed chunk by chunk in backward, so memory is ``positions x chunk``, never
  ``positions x n_items`` (the pattern of Liger-Kernel's fused linear cross-entropy, here over item
  vectors instead of the vocabulary);
* :func:`sampled_softmax_ce`: sampled softmax with logQ correction (Bengio & Senecal 2008; Yi et al.,
  RecSys 2019) for catalogues beyond ``train.item_full_max`` items: ``S`` negatives drawn with
  replacement from a proposal ``Q`` and shared by all positions, logits corrected by
  ``-log(S * Q_j)``, accidental hits of the target masked. As ``S`` grows the loss converges to the
  full-softmax loss (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from speeder_fast.errors import ConfigError

__all__ = ["ItemHead", "chunked_softmax_ce", "sampled_softmax_ce", "full_softmax_ce_reference"]


class ItemHead(nn.Module):
    """Query projection, temperature and item bias of the next-item head.

    Args:
        hidden_size: H (LLM hidden size; the MRC item vectors have the same width).
        n_items: catalogue size (rows of the item bias).
        similarity: ``cosine`` | ``dot``.
        temperature: initial temperature for ``cosine`` (``s = 1 / temperature``, learned).
        projection: learn an ``H x H`` projection of the hidden state (identity at init).
        item_bias: learn a per-item bias (zeros at init).
        parts: ``1`` (keys from the MRC mixture, ``model.head_keys=mixture``) or ``M`` > 1, the number
            of modalities scored separately (``model.head_keys=experts``): one projection block and
            one scale per modality.
        collab_keys: optional fixed fp32 ``[n_items, d]`` item vectors scored by a plain dot product
            with a learned ``d x H`` map of the hidden state (``model.head_collab_dot``: the raw SASRec
            item embeddings, SASRec's own scoring geometry), appended to the query and the keys as one
            more block. The map starts at zero, so the block adds nothing at init.

    Raises:
        ConfigError: unknown ``similarity``, ``temperature <= 0`` or ``parts < 1``.
    """

    def __init__(self, hidden_size: int, n_items: int, similarity: str = "cosine", temperature: float = 0.07,
                 projection: bool = True, item_bias: bool = True, parts: int = 1,
                 collab_keys: torch.Tensor | None = None) -> None:
        super().__init__()
        if similarity not in ("cosine", "dot"):
            raise ConfigError(f"model.head_similarity: {similarity!r} is not cosine or dot")
        if not temperature > 0:
            raise ConfigError(f"model.head_temperature must be > 0, got {temperature}")
        if parts < 1:
            raise ConfigError(f"item head parts must be >= 1, got {parts}")
        self.similarity = similarity
        self.parts = int(parts)
        self.hidden_size = int(hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size * self.parts, bias=False) if projection else None
        if self.proj is not None:  # identity per block
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(hidden_size).repeat(self.parts, 1))
        if similarity == "cosine":
            init = torch.tensor(math.log(1.0 / temperature))
            self.log_scale = nn.Parameter(init if self.parts == 1 else init.repeat(self.parts))
        else:
            self.log_scale = None
        self.bias = nn.Parameter(torch.zeros(n_items)) if item_bias else None
        self.collab_proj = None
        if collab_keys is not None:
            if collab_keys.dim() != 2 or collab_keys.shape[0] != n_items:
                raise ValueError(f"collab_keys must be [{n_items}, d], got {tuple(collab_keys.shape)}")
            self.register_buffer("collab_keys", collab_keys.detach().float().clone(), persistent=False)
            self.collab_proj = nn.Linear(hidden_size, collab_keys.shape[1], bias=False)
            nn.init.zeros_(self.collab_proj.weight)

    def query(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 queries ``[P, D]`` from hidden states ``h [P, H]`` (projected; normalised and scaled
        by ``s`` for cosine, per block with ``parts > 1``; ``D = parts * H``), so that
        ``logits = query @ keys.T + bias``."""
        q = h.float()
        if self.proj is not None:
            q = F.linear(q, self.proj.weight.float())
        elif self.parts > 1:
            q = q.repeat(1, self.parts)
        if self.similarity == "cosine":  # each H-wide block normalised and scaled by its own s
            P = q.shape[0]
            q = (F.normalize(q.view(P, self.parts, -1), dim=-1) * self.log_scale.exp().reshape(-1, 1)).view(P, -1)
        if self.collab_proj is not None:  # the fixed collab block: a plain dot product
            q = torch.cat([q, F.linear(h.float(), self.collab_proj.weight.float())], 1)
        return q

    def keys(self, item_vectors: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 item vectors ``[N, D]``: from MRC tokens ``[N, k, H]`` (``parts == 1``: mean over the
        k tokens) or per-modality expert vectors ``[N, M, H]`` (``parts == M``: concatenated, each
        block on its own, zero blocks stay zero); normalised for cosine. With ``collab_keys`` their
        rows of ``items`` (int64 ``[N]``; None = the whole catalogue in order) are appended."""
        e = item_vectors.float()
        if self.parts == 1:
            e = e.mean(1)
            e = F.normalize(e, dim=-1) if self.similarity == "cosine" else e
        else:
            if e.shape[1] != self.parts:
                raise ValueError(f"expected {self.parts} modality blocks, got item vectors of shape {tuple(e.shape)}")
            if self.similarity == "cosine":
                e = F.normalize(e, dim=-1)
            e = e.reshape(e.shape[0], -1)
        if self.collab_proj is not None:
            c = self.collab_keys if items is None else self.collab_keys.index_select(0, items)
            e = torch.cat([e, c], 1)
        return e

    def item_bias(self, items: torch.Tensor | None = None) -> torch.Tensor | None:
        """The bias of ``items`` (all items when None), or None without a bias."""
        if self.bias is None:
            return None
        return self.bias if items is None else self.bias.index_select(0, items)

    def scores(self, h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` fp32 scores of the catalogue ``keys [N, D]`` (:meth:`keys`) for hidden states ``h [B, H]``."""
        s = self.query(h) @ keys.t()
        b = self.item_bias()
        return s if b is None else s + b


# --------------------------------------------------------------------------------------------- losses
def full_softmax_ce_reference(q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None,
                              targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``softmax(q @ keys.T + bias)`` at ``targets``, materialising all logits
    (the pure-torch reference :func:`chunked_softmax_ce` must match)."""
    logits = q @ keys.t()
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, targets)


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Full-softmax CE over catalogue chunks: forward keeps ``[P]`` log-sum-exps, backward recomputes
    each chunk's probabilities (no ``[P, N]`` tensor is ever saved)."""

    @staticmethod
    def forward(ctx, q, keys, bias, targets, chunk: int):  # noqa: D401 - autograd API
        P, N = q.shape[0], keys.shape[0]
        m = q.new_full((P,), -math.inf)
        s = q.new_zeros(P)
        for a in range(0, N, chunk):
            logits = q @ keys[a:a + chunk].t()
            if bias is not None:
                logits = logits + bias[a:a + chunk]
            cm = logits.amax(1)
            new_m = torch.maximum(m, cm)
            s = s * torch.exp(m - new_m) + torch.exp(logits - new_m[:, None]).sum(1)
            m = new_m
        lse = m + torch.log(s)
        tgt = (q * keys.index_select(0, targets)).sum(1)
        if bias is not None:
            tgt = tgt + bias.index_select(0, targets)
        ctx.save_for_backward(q, keys, bias if bias is not None else q.new_zeros(0), targets, lse)
        ctx.has_bias, ctx.chunk = bias is not None, int(chunk)
        return (lse - tgt).mean()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D401 - autograd API
        q, keys, bias, targets, lse = ctx.saved_tensors
        P, N, chunk = q.shape[0], keys.shape[0], ctx.chunk
        g = grad_out / P
        need_q, need_k, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        gq = torch.zeros_like(q) if need_q else None
        gk = torch.zeros_like(keys) if need_k else None
        gb = torch.zeros_like(bias) if need_b else None
        rows = torch.arange(P, device=q.device)
        for a in range(0, N, chunk):
            kc = keys[a:a + chunk]
            logits = q @ kc.t()
            if ctx.has_bias:
                logits = logits + bias[a:a + chunk]
            p = torch.exp(logits - lse[:, None])  # softmax probabilities of this chunk
            inside = (targets >= a) & (targets < a + kc.shape[0])
            p[rows[inside], targets[inside] - a] -= 1.0  # d(lse - tgt)/d logit
            p = p * g
            if need_q:
                gq += p @ kc
            if need_k:
                gk[a:a + chunk] = p.t() @ q
            if need_b:
                gb[a:a + chunk] = p.sum(0)
        return gq, gk, gb, None, None


def chunked_softmax_ce(q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                       chunk: int = 16384) -> torch.Tensor:
    """Mean full-softmax cross-entropy over the catalogue, ``chunk`` items at a time.

    Args:
        q: fp32 queries ``[P, D]`` (:meth:`ItemHead.query`).
        keys: fp32 item vectors ``[N, D]`` (:meth:`ItemHead.keys`).
        bias: fp32 ``[N]`` item bias, or None.
        targets: int64 ``[P]`` item indices in ``0..N-1``.
        chunk: items per logit chunk; catalogues of at most ``chunk`` items take the plain
            (one-matmul) path, which equals the reference exactly.

    Returns:
        The scalar mean loss; gradients flow to ``q``, ``keys`` and ``bias``. Peak extra memory is
        ``P x min(N, chunk)`` floats.
    """
    if q.shape[0] == 0:
        return q.sum() * 0.0
    if keys.shape[0] <= chunk:
        return full_softmax_ce_reference(q, keys, bias, targets)
    return _ChunkedSoftmaxCE.apply(q, keys, bias, targets, int(chunk))


def sampled_softmax_ce(q: torch.Tensor, target_keys: torch.Tensor, target_bias: torch.Tensor | None,
                       neg_keys: torch.Tensor, neg_bias: torch.Tensor | None, neg_log_q: torch.Tensor,
                       targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Sampled softmax with logQ correction (negatives shared by all positions).

    Args:
        q: fp32 queries ``[P, D]``.
        target_keys / target_bias: vectors ``[P, D]`` and bias ``[P]`` (or None) of each position's target.
        neg_keys / neg_bias: vectors ``[S, D]`` and bias ``[S]`` (or None) of the sampled negatives.
        neg_log_q: ``[S]`` log proposal probability of each negative, ``log Q_j``.
        targets: int64 ``[P]`` target item ids; negatives: int64 ``[S]`` negative item ids (an
            accidental hit, ``negatives[j] == targets[p]``, is masked for that position).

    Returns:
        ``mean_p( -l_t + log(exp(l_t) + sum_j exp(l_j - log(S * Q_j))) )``: the logQ-corrected
        estimate of the full softmax loss (consistent as ``S`` grows: the sum over samples estimates
        the partition function of the non-target items).
    """
    if q.shape[0] == 0:
        return q.sum() * 0.0
    S = negatives.shape[0]
    pos = (q * target_keys).sum(1, keepdim=True)  # [P, 1]
    if target_bias is not None:
        pos = pos + target_bias[:, None]
    neg = q @ neg_keys.t()  # [P, S]
    if neg_bias is not None:
        neg = neg + neg_bias
    neg = neg - (neg_log_q + math.log(S))
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], -math.inf)
    logits = torch.cat([pos, neg], 1)
    return F.cross_entropy(logits, torch.zeros_like(targets))
