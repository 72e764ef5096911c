"""Static-shape scoring: fixed ``[batch, length bucket]`` inputs, optionally compiled (CUDA graphs).

:meth:`SpeederRecModel.score` runs eagerly on the exact batch shape: every batch of a different
size or prompt length is a new shape, and a small model at a small batch is launch-bound on a GPU
(hundreds of kernel launches per forward, each a few microseconds of host time).
:class:`StaticScorer` gives the same scores with shapes that repeat, so a compiled forward can be
replayed:

* the batch is right-padded to ``[batch_size, ceil(L / length_multiple) * length_multiple]``
  (extra rows are all padding, their answer position is 0, their scores are dropped);
* item slots address the cached catalogue (:meth:`MoME.encode_catalog`, cast once to the
  embedding dtype) instead of the batch's unique items, so no shape depends on the batch contents:
  ``row = unique_items[slot // k] * k + slot % k``, computed on the device (no host sync);
* the forward is :meth:`SpeederRecModel.score_inputs`, the scoring path :meth:`SpeederRecModel.score`
  runs too (splice, decoder without a padding mask, the label rows of the LM head or the item head
  at the answer position), called on fixed-shape tensors and compiled with
  ``torch.compile(mode=..., dynamic=False)``; ``reduce-overhead`` records a CUDA graph per shape
  bucket and replays it (inputs are copied into the graph's static buffers; the output is cloned
  before the next replay overwrites it).

Exactness: right padding never changes a real position's hidden state under a causal mask (the
same argument that lets :meth:`SpeederRecModel.hidden_states` drop the padding mask), and a
catalogue row is exactly the token the eager path gathers, so the static scores equal the eager
ones up to floating-point reassociation inside compiled kernels (tests check both, on CPU).

``compile`` values (config ``eval.compile``): ``off`` (eager :meth:`score`, this class unused),
``static`` (static shapes, eager: the padding logic without a compiler), ``default`` |
``reduce-overhead`` | ``max-autotune`` (torch.compile modes), ``auto`` (``reduce-overhead`` on
CUDA, ``off`` elsewhere). Each distinct length bucket compiles once (the first call per bucket is
slow: warm up before timing); torch's recompile limit is raised to cover ``max_buckets`` buckets.
Packing is not used here: a packed row's length changes with every batch.

Prefix KV cache (``eval.prefix_cache``, :mod:`.prefix_cache`): when the model serves the batch's
prefix from its cache, only the columns after the ``P`` prefix tokens are padded to the bucket and
run; the prefix keys/values and hidden states are inputs of the (compiled) function, which pre-fills
a ``DynamicCache`` with them (one graph, no breaks; the tensors change only when the weights do).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from speeder_fast.config import COMPILE_MODES
from speeder_fast.utils import get_logger

from .prefix_cache import PrefixKV

log = get_logger(__name__)

__all__ = ["COMPILE_MODES", "StaticScorer", "resolve_compile", "score_function"]


def resolve_compile(mode: str, device: torch.device | str) -> str:
    """``eval.compile`` -> the mode used on ``device`` (``auto``: reduce-overhead on CUDA, else off)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"eval.compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "reduce-overhead" if torch.device(device).type == "cuda" else "off"
    return mode


def score_function(model: Any, compile_mode: str, device: torch.device | str, batch_size: int,
                   length_multiple: int, pad_id: int) -> Callable[[Any], torch.Tensor]:
    """``batch -> [B, N]`` label logits: ``model.score`` when ``compile_mode`` resolves to ``off`` on
    ``device``, else a :class:`StaticScorer` (the one switch behind ``eval.compile``)."""
    mode = resolve_compile(compile_mode, device)
    if mode == "off":
        return model.score
    return StaticScorer(model, batch_size, length_multiple, mode, pad_id=pad_id)


class StaticScorer:
    """``scorer(batch) -> [B, N]`` float32 scores (label logits, or ``[B, n_items]`` item scores with the
    next-item head), like ``model.score(batch)``, on static shapes.

    Args:
        model: a :class:`~speeder_fast.model.llm.SpeederRecModel` (put in eval mode by each call).
        batch_size: the fixed batch; a larger batch is scored in chunks of this size.
        length_multiple: prompt lengths are padded up to a multiple of this.
        compile: ``static`` | ``default`` | ``reduce-overhead`` | ``max-autotune`` (see module doc).
        pad_id: token id written at padding positions (any valid row of the embedding table).
        backend: torch.compile backend (``None``: inductor); tests use ``aot_eager`` on CPU.
        max_buckets: recompile limit for the compiled function (distinct length buckets).
    """

    def __init__(self, model: Any, batch_size: int, length_multiple: int = 16, compile: str = "reduce-overhead",
                 pad_id: int = 0, backend: str | None = None, max_buckets: int = 32) -> None:
        if compile in ("off", "auto"):
            raise ValueError(f"StaticScorer needs a resolved mode (static or a torch.compile mode), got {compile!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        if batch_size < 1 or length_multiple < 1:
            raise ValueError(f"batch_size and length_multiple must be >= 1, got {batch_size}, {length_multiple}")
        self.model = model
        self.batch_size = int(batch_size)
        self.length_multiple = int(length_multiple)
        self.pad_id = int(pad_id)
        self._catalog_src: torch.Tensor | None = None
        self._catalog: torch.Tensor | None = None
        self.shapes_seen: set[tuple[int, int]] = set()
        self._keys_marked: torch.Tensor | None = None
        self._prefix_ids: tuple[int, ...] = ()
        self._prefix_marked: Any = None
        fn: Callable[..., torch.Tensor] = self._forward
        if compile != "static":
            import torch._dynamo

            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, name, max(int(getattr(cfg, name)), int(max_buckets)))
            kw: dict[str, Any] = {"dynamic": False}
            if backend is not None:
                kw["backend"] = backend
            else:
                kw["mode"] = compile
            fn = torch.compile(self._forward, **kw)
        self._fn = fn
        self._cudagraphs = compile == "reduce-overhead" and backend is None
        log.info(f"static scoring: batch {self.batch_size}, length multiple {self.length_multiple}, "
                 f"{'eager' if compile == 'static' else f'torch.compile {compile}' + (f' ({backend})' if backend else '')}")

    # ------------------------------------------------------------------ pieces
    def catalog(self) -> torch.Tensor | None:
        """The MRC catalogue [n_items, k, H] in the embedding dtype (recast only when it changes)."""
        mome = self.model.mome
        if mome is None:
            return None
        src = mome.encode_catalog()
        if src is not self._catalog_src:
            self._catalog_src = src
            self._catalog = src.to(self.model.embed.weight.dtype)
            if self._cudagraphs:  # same storage every replay: no copy into the graph's input buffer
                torch._dynamo.mark_static_address(self._catalog)
        return self._catalog

    def _forward(self, input_ids: torch.Tensor, slot_item: torch.Tensor, slot_abs: torch.Tensor,
                 slot_rel: torch.Tensor, answer_pos: torch.Tensor, label_ids: torch.Tensor,
                 catalog: torch.Tensor | None, item_keys: torch.Tensor | None = None,
                 prefix: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Scores of fixed-shape inputs through :meth:`SpeederRecModel.score_inputs`. ``prefix`` =
        ``(keys, values, hidden)`` of the cached prefix (``[1, Hkv, P, D]`` per layer, ``[1, P, H]``):
        the inputs are then the columns after it, and ``answer_pos`` still counts from the prompt start."""
        m = self.model
        Bs, Lb = input_ids.shape
        pkv = None
        if prefix is not None:
            pkv = PrefixKV(self._prefix_ids, prefix[0], prefix[1], prefix[2], m._decoder_config())
            Lb += prefix[2].shape[1]
        rows = torch.arange(Bs, device=input_ids.device) * Lb + answer_pos
        return m.score_inputs(input_ids, slot_item, slot_abs, slot_rel, catalog, rows, label_ids, item_keys, pkv)

    def padded_inputs(self, batch: Any, start: int = 0, stop: int | None = None,
                      n_prefix: int = 0) -> tuple[torch.Tensor, ...]:
        """The fixed-shape inputs of rows ``start:stop`` of ``batch`` (at most ``batch_size`` rows);
        with ``n_prefix = P`` only the columns after the cached prefix (bucketed by their length)."""
        if not getattr(batch, "right_padded", True):
            raise ValueError("StaticScorer scores right-padded batches (build them with padding_side='right')")
        rows = slice(start, stop)
        cols = slice(n_prefix, None)
        ids = batch.input_ids[rows, cols]
        B, L = ids.shape
        if B > self.batch_size:
            raise ValueError(f"batch of {B} > StaticScorer.batch_size {self.batch_size}")
        Bs, Lb = self.batch_size, max(1, math.ceil(L / self.length_multiple)) * self.length_multiple

        def pad(x: torch.Tensor, value: int) -> torch.Tensor:
            return F.pad(x, (0, Lb - L, 0, Bs - B), value=value)

        slot = batch.slot_item[rows, cols]
        k = self.model.mome.k if self.model.mome is not None else 1
        if batch.unique_items.numel() > 0:  # batch-local rows u*k+t -> catalogue rows item*k+t
            s = slot.clamp(min=0)
            slot = torch.where(slot >= 0, batch.unique_items.index_select(0, (s // k).reshape(-1)).view_as(s) * k + s % k, -1)
        answer = F.pad(batch.answer_pos[rows], (0, Bs - B), value=0)
        return (pad(ids, self.pad_id), pad(slot, -1), pad(batch.slot_abs[rows, cols], -1),
                pad(batch.slot_rel[rows, cols], -1), answer, batch.label_token_ids)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, batch: Any) -> torch.Tensor:
        """[B, N] float32 label logits of ``batch`` (already on the model's device); a batch larger
        than ``batch_size`` is scored in chunks of ``batch_size`` rows. A batch with a ``fold``
        (cross-fitting) reads that fold's collab table, as ``model.score`` does."""
        with self.model.fold_scope(getattr(batch, "fold", None)):
            return self._call(batch)

    def _call(self, batch: Any) -> torch.Tensor:
        self.model.eval()
        B = int(batch.input_ids.shape[0])
        cat = self.catalog() if batch.unique_items.numel() > 0 else None
        keys = self.model.catalog_keys() if self.model.item_head is not None else None  # item mode: [n_items, H]
        if keys is not None and self._cudagraphs and keys is not self._keys_marked:
            torch._dynamo.mark_static_address(keys)  # cached between calls: no copy into the graph's buffer
            self._keys_marked = keys
        pkv = self.model.prefix_for(batch, packed=False)  # eval mode + no_grad: the cached prefix, or None
        prefix = None if pkv is None else (pkv.keys, pkv.values, pkv.hidden)
        if pkv is not None and self._cudagraphs and pkv is not self._prefix_marked:
            for t in (*pkv.keys, *pkv.values, pkv.hidden):  # cached between calls: no copy per replay
                torch._dynamo.mark_static_address(t)
            self._prefix_marked = pkv
        n_prefix = 0 if pkv is None else pkv.length
        self._prefix_ids = () if pkv is None else pkv.ids
        outs = []
        for start in range(0, B, self.batch_size):
            inputs = self.padded_inputs(batch, start, start + self.batch_size, n_prefix)
            self.shapes_seen.add(tuple(inputs[0].shape))
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            n = min(self.batch_size, B - start)
            outs.append(self._fn(*inputs, cat, keys, prefix)[:n].float().clone())  # clone: the next replay overwrites
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
