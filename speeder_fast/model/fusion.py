"""Score fusion with the run's SASRec (``model.sasrec_fusion``).

The next-item head ranks the catalogue from the LLM's hidden state. With ``model.sasrec_fusion`` the
run's reference SASRec (``RUN/sasrec.safetensors``, the model of the SASRec reference row: trained on
every sequence without its last two items) also reads each prompt's history, and the two
distributions are combined in log space, a product of experts::

    score(i) = log_softmax(head)(i) + w * log_softmax(SASRec)(i)          w >= 0

This is late (score-level) fusion of two rankers, the standard ensemble of recommender systems, with
one weight ``w`` chosen on the validation split (``model.sasrec_fusion=auto``: the grid
:data:`FUSION_GRID`, best full-catalogue NDCG@10; :func:`speeder_fast.training.fusion.tune_fusion_weight`)
or fixed (``model.sasrec_fusion=fixed``, ``model.sasrec_fusion_weight``). It is applied when scoring
(evaluation, ``recommend``, serving) and never in the training loss: the head is trained alone.

Why it is there (docs/speeder.md, "SASRec leakage"): SASRec's item table remembers the transitions
it trained on, so a collab encoder that the LLM can trust during training (``features.sasrec_holdout``)
has to give up the newest transition of every user, and is weaker at test. Fusion puts the full
SASRec back at scoring time, where it cannot leak: the validation and test targets are the two items
it never saw.

The history each prompt holds (``data.max_history`` items) is what SASRec reads here, rebuilt on the
device from the slot arrays (:func:`~speeder_fast.model.user_state.histories_from_slots`), so the same
code serves the padded, packed, prefix-cached and static (compiled) scoring paths. The SASRec
reference row of the report reads up to SASRec's own window (50 items) instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .user_state import histories_from_slots

__all__ = ["FUSION_GRID", "SasrecFusion", "fuse_scores"]

#: ``model.sasrec_fusion=auto``: the weights tried on the validation split (0 = the head alone)
FUSION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def fuse_scores(head_scores: torch.Tensor, sasrec_log_probs: torch.Tensor, weight: float) -> torch.Tensor:
    """``log_softmax(head_scores) + weight * sasrec_log_probs``, fp32 ``[B, n_items]``.

    Args:
        head_scores: ``[B, n_items]`` item logits of the next-item head (any float dtype).
        sasrec_log_probs: fp32 ``[B, n_items]``, :meth:`SasrecFusion.log_probs`.
        weight: ``w >= 0``; 0 gives the head's log-probabilities (the same ranking as the head).
    """
    return torch.log_softmax(head_scores.float(), -1) + float(weight) * sasrec_log_probs


class SasrecFusion(nn.Module):
    """Frozen SASRec next-item log-probabilities of each prompt's history, for :func:`fuse_scores`.

    Args:
        sasrec: a trained :class:`~speeder_fast.features.sasrec.SASRec` over the same catalogue as the
            head (frozen here: ``requires_grad=False``, eval mode, fp32).
        weight: the fusion weight ``w >= 0`` (:attr:`weight`, a host float; 0 = off).

    Raises:
        ValueError: a negative weight.

    Nothing here is trained or saved in checkpoints: the SASRec is ``RUN/sasrec.safetensors`` and the
    weight is the config's or ``RUN/sasrec_fusion.json``'s.
    """

    def __init__(self, sasrec: nn.Module, weight: float = 0.0) -> None:
        super().__init__()
        self.sasrec = sasrec.float().eval()
        for p in self.sasrec.parameters():
            p.requires_grad_(False)
        self.max_len = int(sasrec.max_len)
        self.n_items = int(sasrec.n_items)
        self.weight = 0.0
        self.set_weight(weight)

    def set_weight(self, weight: float) -> None:
        w = float(weight)
        if not w >= 0.0:
            raise ValueError(f"fusion weight must be >= 0, got {weight}")
        self.weight = w

    def train(self, mode: bool = True) -> "SasrecFusion":
        super().train(mode)
        self.sasrec.eval()  # frozen: never dropout
        return self

    def log_probs(self, slot_item: torch.Tensor, slot_abs: torch.Tensor, rows: torch.Tensor, n_rows: int,
                  token_items: torch.Tensor, k: int) -> torch.Tensor:
        """fp32 ``[n_rows, n_items]``: SASRec's log-softmax over the catalogue after each prompt's newest
        history item (the slot arrays as in :func:`~speeder_fast.model.user_state.histories_from_slots`).
        A prompt without history items gets SASRec's state of an empty window (a constant row)."""
        L = self.max_len
        seq, _, _ = histories_from_slots(slot_item, slot_abs, rows, n_rows, token_items, k, L)
        n = (seq > 0).sum(1)  # history length per prompt (<= L)
        with torch.no_grad():
            h = self.sasrec(seq)  # [n_rows, L, d], right-padded: position n-1 is the newest item
            last = h.gather(1, (n - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, h.shape[-1]))[:, 0]
            return F.log_softmax(self.sasrec.score_all(last).float(), -1)
