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
"""

from __future__ import annotations

from typing import Iterable

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
        self._catalog: torch.Tensor | None = None
        self._expert_catalog: torch.Tensor | None = None
        self.kernels_force = kernels_force

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
        self._catalog = None
        self._expert_catalog = None

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ encoding
    def features_of(self, m: str) -> torch.Tensor:
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
        mask = self.present[items] & self.active_mask  # [U, M]
        if self.training and self.modality_dropout > 0 and M > 1:
            kept = mask & (torch.rand(mask.shape, device=mask.device) >= self.modality_dropout)
            mask = torch.where(kept.any(1, keepdim=True), kept, mask)
        return kernels.mome_combine(expert_out, gate, mask, self.ln_weight, self.ln_bias, force=self.kernels_force)

    @torch.no_grad()
    def encode_catalog(self, chunk: int = 4096) -> torch.Tensor:
        """Soft tokens of every item [n_items, k, H], cached until the next ``train()``/stage change."""
        if self._catalog is None:
            self._catalog = self._over_catalog(self.encode, chunk)
        return self._catalog

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
        mask = (self.present[items] & self.active_mask).float()  # [U, M]
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
        if self._expert_catalog is None:
            self._expert_catalog = self._over_catalog(self.expert_vectors, chunk)
        return self._expert_catalog

    def parameters_of(self, modalities: Iterable[str]) -> list[nn.Parameter]:
        """Parameters of the experts of ``modalities``."""
        return [p for m in modalities if m in self.experts for p in self.experts[m].parameters()]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Gate + output LayerNorm (trained in every stage)."""
        return list(self.gate.parameters()) + [self.ln_weight, self.ln_bias]
