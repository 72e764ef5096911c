"""MRC: a Mixture of Modality Experts compresses each item's features into ``k`` soft tokens.

For an item with per-modality features ``x_m`` (text, image, collab; any subset may be absent)::

    e_m    = Expert_m(LN(x_m))                    # MLP d_m -> expert_hidden -> k*H, viewed [k, H]
    g      = Gate(concat_m(LN(x_m) * present_m))  # M logits (or M*k with per_token_gate)
    w      = softmax over modalities that are present AND active in the current MPO stage
    tokens = LayerNorm_H(sum_m w_m e_m) * ln_weight + ln_bias          -> [k, H]

In training, ``modality_dropout`` (``model.modality_dropout``) removes each present modality of an
item from the mixture with that probability, independently per item and per call (an item that
would lose all its modalities keeps them all), so that no expert can rely on another being there
(modality dropout, Neverova et al., ModDrop, TPAMI 2016). Evaluation always uses every present
modality.

``LN`` is a parameter-free per-item standardisation (features of different modalities live on very
different scales). The output LayerNorm weight starts at the RMS norm of the LLM's input
embeddings, so a fresh soft token has the same scale as a word embedding. The combine step runs
through :func:`speeder_fast.kernels.mome_combine` (Triton on CUDA, torch reference on CPU).

Features are fixed buffers (not trained, not saved with checkpoints); only experts, gate and
output LayerNorm are parameters.

Cross-fitting (``features.sasrec_crossfit``, :mod:`speeder_fast.features.crossfit`): with
:meth:`MoME.set_collab_folds` the MoME also holds one collab table per fold, and inside
:meth:`MoME.using_fold` every encoding reads that fold's table and presence mask instead of the
reference one (training batches of one fold); outside it, the reference table as always.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from speeder_fast import kernels


def _standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.float()
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class MoME(nn.Module):
    """Mixture of Modality Experts over a fixed item catalogue.

    Args:
        features: ``{modality: (features [n_items, d_m], present [n_items] bool)}`` in a fixed order.
        hidden_size: H, the LLM hidden size.
        n_tokens: k, soft tokens per item.
        expert_hidden: hidden width of each expert MLP.
        per_token_gate: one gate per soft token (``M*k`` logits) instead of one per item.
        token_rms: initial output LayerNorm weight (the LLM embedding RMS norm).
        kernels_force: ``auto`` (Triton on CUDA, torch on CPU) | ``triton`` | ``torch`` (``model.use_kernels``).
        modality_dropout: training-time probability of dropping a present modality of an item
            (``0 <= p < 1``; ValueError otherwise).
    """

    def __init__(
        self,
        features: dict[str, tuple[torch.Tensor, torch.Tensor]],
        hidden_size: int,
        n_tokens: int = 1,
        expert_hidden: int = 256,
        per_token_gate: bool = False,
        token_rms: float = 1.0,
        kernels_force: str = "auto",
        modality_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        self.modality_dropout = float(modality_dropout)
        if not features:
            raise ValueError("MoME needs at least one modality's features")
        self.modalities: list[str] = list(features)
        self.hidden_size = int(hidden_size)
        self.k = int(n_tokens)
        self.per_token_gate = bool(per_token_gate and n_tokens > 1)
        n_items = None
        dims = []
        present = []
        for m, (x, mask) in features.items():
            if x.dim() != 2:
                raise ValueError(f"features[{m!r}] must be [n_items, d], got shape {tuple(x.shape)}")
            if n_items is None:
                n_items = x.shape[0]
            elif x.shape[0] != n_items:
                raise ValueError(f"features[{m!r}] has {x.shape[0]} items, expected {n_items}")
            mask = mask.to(torch.bool).reshape(-1)
            # standardised once; rows of absent items are zeroed so they never leak into the gate
            xs = _standardize(x) * mask.unsqueeze(-1)
            self.register_buffer(f"feat_{m}", xs, persistent=False)
            dims.append(x.shape[1])
            present.append(mask)
        self.n_items = int(n_items)
        self.register_buffer("present", torch.stack(present, 1), persistent=False)  # [n_items, M]
        self.register_buffer("active_mask", torch.ones(len(self.modalities), dtype=torch.bool), persistent=False)
        self.active: list[str] = list(self.modalities)
        self.experts = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, expert_hidden), nn.GELU(), nn.Linear(expert_hidden, self.k * hidden_size))
                for m, d in zip(self.modalities, dims)
            }
        )
        g_out = len(self.modalities) * (self.k if self.per_token_gate else 1)
        self.gate = nn.Linear(sum(dims), g_out)
        nn.init.zeros_(self.gate.weight)  # start as a uniform mixture over present modalities
        nn.init.zeros_(self.gate.bias)
        self.ln_weight = nn.Parameter(torch.full((hidden_size,), float(token_rms)))
        self.ln_bias = nn.Parameter(torch.zeros(hidden_size))
        # cached catalogue tensors, per collab fold (None = the reference table)
        self._catalog: dict[int | None, torch.Tensor] = {}
        self._expert_catalog: dict[int | None, torch.Tensor] = {}
        self.kernels_force = kernels_force
        self.n_folds = 0  # cross-fitted collab tables (set_collab_folds)
        self.fold: int | None = None  # the fold whose collab table encodings read (using_fold)
        #: each user's collab fold (int64 [n_users]), whose table scores that user (set_collab_folds)
        self.user_folds = None

    # ------------------------------------------------------------------ cross-fitting
    def set_collab_folds(self, tables: list[tuple[torch.Tensor, torch.Tensor]], user_folds=None) -> None:
        """Hold ``K`` cross-fitted collab tables (``[(features [n_items, d_collab], present [n_items]
        bool), ...]``, already in the reference table's space), for :meth:`using_fold`, and each
        user's fold (int ``[n_users]`` in ``0..K-1``; :attr:`user_folds`, read by the scoring loops).
        Buffers, not saved with checkpoints (``RUN/collab_folds.safetensors`` keeps them).

        Raises:
            ValueError: no collab modality, a table of another shape, or a user fold outside ``0..K-1``.
        """
        if "collab" not in self.modalities:
            raise ValueError("set_collab_folds: this MoME has no collab modality")
        ref = self.features_of("collab")
        j = self.modalities.index("collab")
        feats, pres = [], []
        for i, (x, mask) in enumerate(tables):
            if tuple(x.shape) != tuple(ref.shape):
                raise ValueError(f"collab fold {i}: shape {tuple(x.shape)}, expected {tuple(ref.shape)}")
            mask = mask.to(torch.bool).reshape(-1).to(ref.device)
            feats.append(_standardize(x.to(ref.device)) * mask.unsqueeze(-1))
            p = self.present.clone()
            p[:, j] = mask
            pres.append(p)
        if user_folds is not None:
            import numpy as np

            user_folds = np.asarray(user_folds, dtype=np.int64)
            if user_folds.size and (user_folds.min() < 0 or user_folds.max() >= len(tables)):
                raise ValueError(f"user folds must be in 0..{len(tables) - 1}")
        self.register_buffer("feat_collab_folds", torch.stack(feats), persistent=False)  # [K, n_items, d]
        self.register_buffer("present_folds", torch.stack(pres), persistent=False)  # [K, n_items, M]
        self.n_folds = len(tables)
        self.user_folds = user_folds
        self.clear_cache()

    @contextlib.contextmanager
    def using_fold(self, fold: int | None) -> Iterator[None]:
        """Encodings inside read collab fold ``fold``'s table (None: the reference table).

        Raises:
            ValueError: ``fold`` is not in ``0..K-1`` for the ``K`` tables of :meth:`set_collab_folds`.
        """
        if fold is not None and not 0 <= int(fold) < self.n_folds:
            raise ValueError(f"collab fold {fold}: this MoME holds {self.n_folds} cross-fitted tables")
        prev, self.fold = self.fold, (None if fold is None else int(fold))
        try:
            yield
        finally:
            self.fold = prev

    def _present(self) -> torch.Tensor:
        """``[n_items, M]`` presence of each modality (the current fold's collab mask inside :meth:`using_fold`)."""
        return self.present if self.fold is None else self.present_folds[self.fold]

    # ------------------------------------------------------------------ stage control
    def set_active(self, modalities: Iterable[str]) -> None:
        """Restrict the mixture to ``modalities`` (MPO stage); unknown names are ignored."""
        wanted = set(modalities)
        self.active = [m for m in self.modalities if m in wanted]
        self.active_mask.copy_(torch.tensor([m in wanted for m in self.modalities], dtype=torch.bool))
        self.clear_cache()

    def train(self, mode: bool = True) -> "MoME":
        if mode:
            self.clear_cache()  # parameters are about to change
        return super().train(mode)

    def clear_cache(self) -> None:
        """Drop the cached catalogue tensors (:meth:`encode_catalog`, :meth:`expert_catalog`)."""
        self._catalog = {}
        self._expert_catalog = {}

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ encoding
    def features_of(self, m: str) -> torch.Tensor:
        """Standardised features ``[n_items, d_m]`` of modality ``m`` (the current fold's collab table
        inside :meth:`using_fold`)."""
        if m == "collab" and self.fold is not None:
            return self.feat_collab_folds[self.fold]
        return getattr(self, f"feat_{m}")

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Soft tokens of ``items`` (int64 [U]) -> [U, k, H] (float32)."""
        U = items.shape[0]
        M, k, H = len(self.modalities), self.k, self.hidden_size
        if U == 0:
            return self.ln_bias.new_zeros(0, k, H)
        feats = [self.features_of(m)[items] for m in self.modalities]
        outs = []
        for m, x in zip(self.modalities, feats):
            if m in self.active:
                outs.append(self.experts[m](x).view(U, k, H))
            else:  # inactive in this stage: weight 0, skip the compute
                outs.append(x.new_zeros(U, k, H))
        expert_out = torch.stack(outs, 1)  # [U, M, k, H]
        gate = self.gate(torch.cat(feats, 1)).view(U, M, -1)  # [U, M, G]
        mask = self._present()[items] & self.active_mask  # [U, M]
        if self.training and self.modality_dropout > 0 and M > 1:
            kept = mask & (torch.rand(mask.shape, device=mask.device) >= self.modality_dropout)
            mask = torch.where(kept.any(1, keepdim=True), kept, mask)
        return kernels.mome_combine(expert_out, gate, mask, self.ln_weight, self.ln_bias, force=self.kernels_force)

    @torch.no_grad()
    def encode_catalog(self, chunk: int = 4096) -> torch.Tensor:
        """Soft tokens of every item [n_items, k, H], cached until the next ``train()``/stage change
        (one cache per collab fold: inside :meth:`using_fold`, that fold's)."""
        if self.fold not in self._catalog:
            self._catalog[self.fold] = self._over_catalog(self.encode, chunk)
        return self._catalog[self.fold]

    def _over_catalog(self, fn, chunk: int) -> torch.Tensor:
        """``fn`` applied to every item id, ``chunk`` items at a time, concatenated along dim 0."""
        dev = self.present.device
        return torch.cat([fn(torch.arange(s, min(s + chunk, self.n_items), device=dev))
                          for s in range(0, self.n_items, chunk)], 0)

    def expert_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Each modality expert's own vector of ``items`` (int64 ``[U]``), before the mixture:
        ``[U, M, H]`` float32, the mean of the expert's ``k`` output tokens, zero where the modality
        is absent for the item or inactive in the current MPO stage. The late-fusion keys of the
        next-item head (``model.head_keys=experts``); no modality dropout is applied here."""
        U, M, k, H = items.shape[0], len(self.modalities), self.k, self.hidden_size
        if U == 0:
            return self.ln_bias.new_zeros(0, M, H)
        mask = (self._present()[items] & self.active_mask).float()  # [U, M]
        outs = []
        for j, m in enumerate(self.modalities):
            if m in self.active:
                outs.append(self.experts[m](self.features_of(m)[items]).view(U, k, H).mean(1) * mask[:, j:j + 1])
            else:
                outs.append(self.ln_bias.new_zeros(U, H))
        return torch.stack(outs, 1)

    @torch.no_grad()
    def expert_catalog(self, chunk: int = 4096) -> torch.Tensor:
        """:meth:`expert_vectors` of every item ``[n_items, M, H]``, cached like :meth:`encode_catalog`."""
        if self.fold not in self._expert_catalog:
            self._expert_catalog[self.fold] = self._over_catalog(self.expert_vectors, chunk)
        return self._expert_catalog[self.fold]

    def parameters_of(self, modalities: Iterable[str]) -> list[nn.Parameter]:
        """Parameters of the experts of ``modalities``."""
        return [p for m in modalities if m in self.experts for p in self.experts[m].parameters()]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Gate + output LayerNorm (trained in every stage)."""
        return list(self.gate.parameters()) + [self.ln_weight, self.ln_bias]
