"""Collaborative user state at every history slot (``model.user_state = "sasrec"``).

The collab modality gives the LLM SASRec's *item* embeddings, one per soft token; the sequence model
that SASRec learned on top of them is not given, and the LLM has to learn its own from a few hundred
LoRA steps. With ``model.user_state = "sasrec"`` the frozen SASRec of the run (the one that produced
the collab features, ``RUN/sasrec.safetensors``) reads each prompt's history, and its output state
at history position ``t`` (a function of items ``0..t`` only: SASRec is causal) is added, through a
learned projection, to the soft tokens of history item ``t``::

    token(t) = MRC(item_t) + SPAE(t) + W_u h_sasrec(items_0..t)        W_u: Linear(d_sasrec -> H), zero at init

The idea follows A-LLMRec (Kim et al., KDD 2024) and E4SRec, which feed a collaborative model's user
representation to the LLM; here it is per slot, so the all-position loss still holds (slot ``t``
predicts item ``t + 1`` from inputs that depend on items ``<= t``). The projection starts at zero,
so a fresh model equals the model without the user state. SASRec stays frozen and in eval mode (no
dropout), and runs in fp32 whatever the LLM's precision. The state is used only while the collab
modality is active in the MPO stage.

Layout: the history of each prompt is rebuilt on the device from the slot arrays (``slot_abs`` = the
history index, 0 = oldest; ``slot_item`` = the row of the item-token table, ``u * k + t``) and a row
id per token (the batch row when padded, :attr:`PackedBatch.seq_index` when packed), so the same code
serves the padded, packed and prefix-cached paths without a host sync.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["UserState", "histories_from_slots"]


def histories_from_slots(slot_item: torch.Tensor, slot_abs: torch.Tensor, rows: torch.Tensor, n_rows: int,
                         token_items: torch.Tensor, k: int, max_len: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt's history as a SASRec input, rebuilt on the device from the slot arrays (no host sync).

    Args:
        slot_item: int64 ``[*shape]``, row of the item-token table (``u * k + t``), -1 on text.
        slot_abs: int64 ``[*shape]``, history index from the oldest (0-based), -1 off history slots.
        rows: int64 ``[*shape]``, the prompt each position belongs to, in ``0..n_rows-1``.
        n_rows: number of prompts (host int).
        token_items: int64 ``[U]``, the item id of each row ``u`` of the item-token table.
        k: soft tokens per item.
        max_len: SASRec's window L; history positions ``>= L`` are left out.

    Returns:
        ``(seq, hist, gather)``: ``seq`` int64 ``[n_rows, L]``, the shifted item ids (item + 1, 0 =
        padding) *right*-padded, oldest first (exact for a causal SASRec whose positions count from
        the first real item, :class:`~speeder_fast.features.sasrec.SASRec`); ``hist`` bool ``[N]``
        (``N = slot_abs.numel()``), the flat positions that are history slots inside the window;
        ``gather`` int64 ``[N]``, the row of ``seq.view(-1)`` each such position reads (0 elsewhere).
    """
    a, s, r = slot_abs.reshape(-1), slot_item.reshape(-1), rows.reshape(-1)
    L = int(max_len)
    hist = (a >= 0) & (a < L)
    first = hist & (s.remainder(k) == 0)
    item = token_items.index_select(0, (s.clamp(min=0) // k).clamp(max=max(token_items.shape[0] - 1, 0)))
    dump = n_rows * L  # positions that are not a first item token write here, then it is dropped
    idx = torch.where(first, r * L + a, torch.full_like(a, dump))
    seq = torch.zeros(dump + 1, dtype=torch.long, device=a.device).index_copy(0, idx, item + 1)[:dump]
    # index_copy with repeated dump indices keeps one arbitrary value there: dropped above
    gather = torch.where(hist, r * L + a, torch.zeros_like(a))
    return seq.view(n_rows, L), hist, gather


class UserState(nn.Module):
    """Frozen SASRec + learned projection: per-slot collaborative user states.

    Args:
        sasrec: a trained :class:`~speeder_fast.features.sasrec.SASRec` (frozen here: its parameters
            get ``requires_grad=False`` and it is kept in eval mode).
        hidden_size: H, the LLM hidden size.

    Only :attr:`proj` is trained (:meth:`trainable_parameters`) and saved with the run's checkpoints;
    the SASRec weights come from ``RUN/sasrec.safetensors``.
    """

    def __init__(self, sasrec: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.sasrec = sasrec.float().eval()
        for p in self.sasrec.parameters():
            p.requires_grad_(False)
        self.max_len = int(sasrec.max_len)
        self.proj = nn.Linear(sasrec.dim, hidden_size, bias=False)
        nn.init.zeros_(self.proj.weight)

    def train(self, mode: bool = True) -> "UserState":
        super().train(mode)
        self.sasrec.eval()  # frozen: never dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.proj.parameters())

    def slot_states(self, slot_item: torch.Tensor, slot_abs: torch.Tensor, rows: torch.Tensor, n_rows: int,
                    token_items: torch.Tensor, k: int) -> torch.Tensor:
        """SASRec's fp32 state ``[*shape, d]`` at every position of the slot arrays (zero off history slots);
        the arguments are those of :func:`histories_from_slots` (without ``max_len``: SASRec's).

        Histories longer than SASRec's ``max_len`` keep their first ``max_len`` positions' states
        and get zero states beyond (:func:`speeder_fast.config.validate` rules such configs out).
        """
        shape = slot_abs.shape
        L = self.max_len
        seq, hist, gather = histories_from_slots(slot_item, slot_abs, rows, n_rows, token_items, k, L)
        dump = n_rows * L
        with torch.no_grad():
            h = self.sasrec(seq).reshape(dump, -1)  # right-padded: exact (causal)
        out = h.index_select(0, gather) * hist.unsqueeze(1).to(h.dtype)
        return out.view(*shape, -1)

    def forward(self, slot_item: torch.Tensor, slot_abs: torch.Tensor, rows: torch.Tensor, n_rows: int,
                token_items: torch.Tensor, k: int) -> torch.Tensor:
        """The fp32 additions ``[*shape, H]`` to the input embeddings: ``proj(slot_states(...))``."""
        return self.proj(self.slot_states(slot_item, slot_abs, rows, n_rows, token_items, k))
