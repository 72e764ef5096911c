"""Packing-aware attention registered with transformers' ``AttentionInterface``.

Four implementations are registered (no model file is patched); pick one with
``attn_implementation=NAME`` at load time or ``model.set_attn_implementation(NAME)``:

* ``speeder_varlen``        -- picks a backend per call: flash-attn's ``flash_attn_varlen_func`` on
  CUDA when importable, else torch's ``torch.nn.attention.varlen.varlen_attn`` on CUDA, else SDPA.
* ``speeder_varlen_fa``     -- always flash-attn (CUDA, fp16/bf16; fp32 inputs are cast to bf16).
* ``speeder_varlen_torch``  -- always torch ``varlen_attn`` (CUDA, fp16/bf16; same cast).
* ``speeder_varlen_sdpa``   -- always ``scaled_dot_product_attention`` (any device, any dtype).

Packed boundaries come from the transformers ``FlashAttentionKwargs`` names that the decoder
forwards to the attention function: ``cu_seq_lens_q/k`` (int32 ``[B+1]``) and
``max_length_q/k`` (Python ints), as produced by
:meth:`speeder_fast.model.packing.PackedBatch.model_kwargs`; the same dict drives HF's own
``flash_attention_2``. Without them, boundaries are derived from ``position_ids`` (a position that
does not follow its predecessor by 1 starts a new example), which costs one host sync per forward
on the flash/varlen backends (cached across layers).

The SDPA backend never syncs: with ``cu_seq_lens``/``max_length`` it gathers every example into a
right-padded ``[B, max_len]`` block by index and runs causal SDPA (cost ``B * max_len^2``); with
only ``position_ids`` it builds a block-diagonal causal mask (cost ``T^2``; correct, slower). A 2-D
padding ``attention_mask`` (padded batches) always goes through SDPA with a causal & key-padding
mask: the final fallback.

GQA (fewer key/value heads) is handled natively by flash-attn and by ``varlen_attn``'s
``enable_gqa`` when present, else by repeating K/V heads.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F

from speeder_fast.utils import get_logger

log = get_logger("speeder_fast.attention")

IMPL_AUTO = "speeder_varlen"
IMPL_FA = "speeder_varlen_fa"
IMPL_TORCH = "speeder_varlen_torch"
IMPL_SDPA = "speeder_varlen_sdpa"
IMPLEMENTATIONS = {IMPL_AUTO: "auto", IMPL_FA: "flash", IMPL_TORCH: "varlen", IMPL_SDPA: "sdpa"}
REQUESTS = ("auto", "flash", "varlen", "sdpa", "eager")

__all__ = [
    "IMPL_AUTO", "IMPL_FA", "IMPL_TORCH", "IMPL_SDPA", "IMPLEMENTATIONS",
    "available_backends", "flash_attn_available", "torch_varlen_available",
    "register_attention", "select_attention", "speeder_varlen_attention",
]

_HALF = (torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


# ----------------------------------------------------------------------------------------- capability


_FA_FN: Callable | None = None
_FA_CHECKED = False


def _flash_fn() -> Callable | None:
    """``flash_attn.flash_attn_varlen_func`` or None (import attempted once)."""
    global _FA_FN, _FA_CHECKED
    if not _FA_CHECKED:
        _FA_CHECKED = True
        if importlib.util.find_spec("flash_attn") is not None:
            try:
                _FA_FN = importlib.import_module("flash_attn").flash_attn_varlen_func
            except Exception as e:  # broken build (ABI mismatch with torch, no GPU lib...)
                log.info(f"flash_attn is installed but does not import ({type(e).__name__}: {e})")
                _FA_FN = None
    return _FA_FN


def flash_attn_available() -> bool:
    """True when ``flash_attn.flash_attn_varlen_func`` imports."""
    return _flash_fn() is not None


def _torch_varlen() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def torch_varlen_available() -> bool:
    """True when this torch has ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10)."""
    return _torch_varlen() is not None


def available_backends(device: torch.device | str | None = None) -> dict[str, bool]:
    """Which backends could run on ``device`` (default: cuda if available)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    return {"flash": cuda and flash_attn_available(), "varlen": cuda and torch_varlen_available(), "sdpa": True,
            "eager": True}


# ------------------------------------------------------------------------------------------- helpers


def _repeat_kv(x: torch.Tensor, n_rep: int, dim: int = 1) -> torch.Tensor:
    """Repeat K/V heads ``n_rep`` times along the head axis ``dim`` (GQA -> MHA)."""
    if n_rep == 1:
        return x
    return torch.repeat_interleave(x, n_rep, dim=dim)


_POS_CACHE: dict[str, tuple[weakref.ref, Any]] = {}


def _cached(key: str, t: torch.Tensor, make: Callable[[], Any]) -> Any:
    """Per-forward cache keyed on the identity of ``t`` (the same position_ids object is passed to
    every layer); a new batch is a new tensor object, so a stale entry can never match."""
    hit = _POS_CACHE.get(key)
    if hit is not None and hit[0]() is t:
        return hit[1]
    val = make()
    try:
        _POS_CACHE[key] = (weakref.ref(t), val)
    except TypeError:  # pragma: no cover - tensors are weak-referenceable
        pass
    return val


def _segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` example index within each row: a new example starts where pos != prev + 1."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def _cu_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and max length of a packed ``[1, T]`` row. Host sync (nonzero, max)."""
    pos = position_ids.reshape(-1)
    t = pos.shape[0]
    starts = torch.ones(t, dtype=torch.bool, device=pos.device)
    starts[1:] = pos[1:] != pos[:-1] + 1
    idx = starts.nonzero().reshape(-1).to(torch.int32)
    cu = torch.cat([idx, torch.tensor([t], dtype=torch.int32, device=pos.device)])
    return cu, int((cu[1:] - cu[:-1]).max())


def _compiling() -> bool:
    """Under torch.compile, example boundaries are never derived from ``position_ids`` (that is
    data-dependent: a graph break, or a host sync inside a CUDA graph): a compiled caller passes
    ``cu_seq_lens_q/k`` + ``max_length_q/k`` for packed rows (``PackedBatch.model_kwargs()``), and
    a row without them is one example (padded / static-shape batches)."""
    return bool(torch.compiler.is_compiling())


def _as_int(x: Any, name: str) -> int:
    if isinstance(x, torch.Tensor):
        _warn_once(f"int-{name}", f"speeder_varlen: {name} was a tensor; pass a Python int (PackedBatch.max_seqlen) "
                                  "to avoid a host sync per layer")
        return int(x.max())
    return int(x)


def _varlen_info(query: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """(cu_q, cu_k, max_q, max_k) for the flattened layout, or None when no packing info exists."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        cu_q = cu_q if cu_q is not None else cu_k
        cu_k = cu_k if cu_k is not None else cu_q
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if max_q is None and max_k is None:
            _warn_once("nomax", "speeder_varlen: cu_seq_lens given without max_length_q/k; deriving it syncs the host")
            m = _cached("max", cu_q, lambda: int((cu_q[1:] - cu_q[:-1]).max()))
            max_q = max_k = m
        max_q = _as_int(max_q if max_q is not None else max_k, "max_length_q")
        max_k = _as_int(max_k if max_k is not None else max_q, "max_length_k")
        if query.shape[0] != 1:
            raise ValueError(f"speeder_varlen: cu_seq_lens given but the batch has {query.shape[0]} rows; "
                             "packed input must be one row [1, T]")
        return cu_q.to(device=query.device, dtype=torch.int32), cu_k.to(device=query.device, dtype=torch.int32), \
            max_q, max_k
    pos = kwargs.get("position_ids")
    if pos is not None and query.shape[0] == 1 and pos.shape[-1] == query.shape[2] and not _compiling():
        pos2 = pos.reshape(1, -1)
        _warn_once("posderive", "speeder_varlen: packing boundaries derived from position_ids (one host sync per "
                                "forward); pass PackedBatch.model_kwargs() to avoid it")
        cu, m = _cached("cu", pos, lambda: _cu_from_positions(pos2))
        return cu, cu, m, m
    return None


def _to_half(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module: Any) -> tuple:
    """Cast fp32 q/k/v to a dtype flash kernels accept (autocast dtype, else the module's half
    weight dtype, else bf16). Returns (q, k, v, original dtype)."""
    orig = q.dtype
    if orig in _HALF:
        return q, k, v, orig
    target = torch.bfloat16
    if torch.is_autocast_enabled("cuda"):
        target = torch.get_autocast_dtype("cuda")
    else:
        for p in getattr(module, "parameters", lambda: iter(()))():
            if p.dtype in _HALF:
                target = p.dtype
                break
    _warn_once("cast", f"speeder_varlen: casting {orig} q/k/v to {target} for the flash kernel")
    return q.to(target), k.to(target), v.to(target), orig


# -------------------------------------------------------------------------------------- the kernels


def _run_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
               max_q: int, max_k: int, dropout: float, scaling: float | None, causal: bool) -> torch.Tensor:
    """q/k/v ``[N, H, D]``; returns ``[N, Hq, D]``."""
    fn = _flash_fn()
    if fn is None:
        raise RuntimeError("flash-attn is not importable (pip install flash-attn); use attn_impl=auto or varlen")
    out = fn(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=causal)
    return out[0] if isinstance(out, tuple) else out


def _run_torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                      max_q: int, max_k: int, dropout: float, scaling: float | None, causal: bool) -> torch.Tensor:
    """torch ``varlen_attn`` across its API changes: torch 2.10 takes ``is_causal``; later versions
    take ``window_size=(-1, 0)`` for causal and may accept ``enable_gqa``."""
    fn = _torch_varlen()
    if fn is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (needs >= 2.10)")
    if dropout > 0:
        raise ValueError("speeder_varlen_torch: torch varlen_attn has no dropout; set attention_dropout=0 "
                         "or use attn_impl=flash/sdpa")
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {"scale": scaling}
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float,
          scaling: float | None, causal: bool) -> torch.Tensor:
    """Plain SDPA on ``[B, H, L, D]``, GQA by repeating K/V; returns ``[B, Hq, L, D]``."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          is_causal=causal and mask is None)


def _sdpa_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                   dropout: float, scaling: float | None, causal: bool, n_prefix: int = 0) -> torch.Tensor:
    """Packed ``[1, H, T, D]`` -> per-example right-padded blocks ``[B, H, max_len, D]`` by index,
    causal SDPA (right padding is never seen by a real query under a causal mask), and back.
    No host sync: ``max_len`` is an int and every index is computed on the device.

    ``n_prefix = P > 0`` (prefix KV cache): ``k`` / ``v`` are ``[1, Hkv, P + T, D]`` whose first ``P``
    keys are a prefix shared by every example; each block's keys become ``[prefix | own tokens]``
    (``[B, Hkv, P + max_len, D]``) under a bottom-right causal mask (query ``i`` sees the prefix and
    its own tokens ``<= i``)."""
    if n_prefix:
        if not causal:
            raise ValueError("speeder_varlen: a shared key prefix needs causal attention")
        pk, pv = k[:, :, :n_prefix], v[:, :, :n_prefix]
        k, v = k[:, :, n_prefix:], v[:, :, n_prefix:]
    t = q.shape[2]
    b = cu.shape[0] - 1
    cu = cu.long()
    lens = cu[1:] - cu[:-1]
    j = torch.arange(max_len, device=q.device)
    src = (cu[:-1, None] + j[None, :]).clamp_max(t - 1)  # [B, max_len]
    valid = j[None, :] < lens[:, None]

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [B, H, max_len, D]
        g = x[0].index_select(1, src.reshape(-1))  # [H, B*max_len, D]
        return g.view(x.shape[1], b, max_len, x.shape[-1]).transpose(0, 1)

    mask = None
    if not causal:  # keys beyond an example's end must be hidden explicitly
        mask = valid[:, None, None, :]
    kb, vb = blocks(k), blocks(v)
    if n_prefix:
        kb = torch.cat([pk.expand(b, -1, -1, -1), kb], 2)
        vb = torch.cat([pv.expand(b, -1, -1, -1), vb], 2)
        mask = _causal_bool(max_len, n_prefix + max_len, q.device)[None, None]
    out = _sdpa(blocks(q), kb, vb, mask, dropout, scaling, causal and not n_prefix)  # [B, H, max_len, D]
    seg = torch.searchsorted(cu[1:], torch.arange(t, device=q.device), right=True)  # [T]
    flat = seg * max_len + (torch.arange(t, device=q.device) - cu[seg])
    out = out.transpose(1, 2).reshape(b * max_len, out.shape[1], out.shape[-1])  # [B*max_len, H, D]
    return out.index_select(0, flat).unsqueeze(0)  # [1, T, H, D]


def prefix_key_index(cu_q: torch.Tensor, n_prefix: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key layout of a packed row whose examples share a ``P``-token key prefix.

    The keys arrive as one row ``[prefix (P) | packed suffix tokens (T)]``; varlen kernels need every
    example's keys contiguous: ``[prefix | example 0] [prefix | example 1] ...``. Returns
    ``(index [B*P + T], cu_k [B + 1] int32)``: rows of the incoming ``P + T`` keys in that order, and
    the key row's cumulative lengths (``cu_q + P * i``). Device ops only (``n_tokens`` = T is the
    query row's length, a host int)."""
    b = cu_q.shape[0] - 1
    cu = cu_q.long()
    cu_k = cu + n_prefix * torch.arange(b + 1, device=cu.device)
    j = torch.arange(b * n_prefix + n_tokens, device=cu.device)
    seg = torch.searchsorted(cu_k[1:], j, right=True)
    local = j - cu_k[seg]
    index = torch.where(local < n_prefix, local, n_prefix + cu[seg] + local - n_prefix)
    return index, cu_k.to(torch.int32)


def _causal_bool(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """``[lq, lk]`` causal mask aligned bottom-right (query i sits at absolute key position lk-lq+i)."""
    return torch.arange(lk, device=device)[None, :] <= (torch.arange(lq, device=device)[:, None] + (lk - lq))


def _padded_mask(attention_mask: torch.Tensor, lq: int, lk: int, causal: bool) -> torch.Tensor:
    """2-D key-padding mask ``[B, Lk]`` -> 4-D bool ``[B, 1, Lq, Lk]`` (causal & valid keys). A query
    that would see no key (left padding) is allowed its own diagonal so SDPA stays finite."""
    keys = attention_mask[:, -lk:].bool()[:, None, None, :]
    m = keys
    if causal:
        m = m & _causal_bool(lq, lk, attention_mask.device)[None, None]
    diag = torch.arange(lk, device=attention_mask.device)[None, :] == (
        torch.arange(lq, device=attention_mask.device)[:, None] + (lk - lq))
    return m | (diag[None, None] & ~m.any(-1, keepdim=True))


# ---------------------------------------------------------------------------------------- interface


def speeder_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, backend: str = "auto", **kwargs: Any
                             ) -> tuple[torch.Tensor, None]:
    """Attention function with the transformers ``AttentionInterface`` signature.

    Args:
        module: the attention module (``is_causal`` is read from it when not passed).
        query: ``[B, Hq, Lq, D]``; key/value: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0``.
        attention_mask: None (padding-free / packed), a 2-D ``[B, Lk]`` padding mask, or a
            prepared 4-D mask (bool or additive).
        dropout: attention dropout (0 at eval; torch ``varlen_attn`` supports only 0).
        scaling: softmax scale (default ``1/sqrt(D)``).
        is_causal: causal masking (default ``module.is_causal``, else True).
        backend: ``auto`` | ``flash`` | ``varlen`` | ``sdpa`` (bound per registered name).
        **kwargs: ``cu_seq_lens_q/k``, ``max_length_q/k``, ``position_ids`` (others ignored).

    Returns:
        ``([B, Lq, Hq, D], None)`` like transformers' own attention functions.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("speeder_varlen does not support softcap; use attn_impl=eager")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    b, hq, lq, d = query.shape
    lk = key.shape[2]

    use = backend
    if use == "auto":
        if query.is_cuda and query.dtype in _HALF and flash_attn_available():
            use = "flash"
        elif query.is_cuda and query.dtype in _HALF and torch_varlen_available():
            use = "varlen"
        else:
            use = "sdpa"

    # Packed row + prefix KV cache: the first Lk - Lq keys are a prefix shared by every example.
    cu_q = kwargs.get("cu_seq_lens_q")
    if attention_mask is None and lk > lq and b == 1 and cu_q is not None:
        return _packed_prefix_attention(module, query, key, value, kwargs, lk - lq, use, dropout, scaling,
                                        causal), None

    # Padded batches, prepared masks, KV-cache decoding: SDPA with an explicit mask.
    if attention_mask is not None or lq != lk:
        if attention_mask is None:
            mask = _causal_bool(lq, lk, query.device)[None, None] if causal else None
        elif attention_mask.dim() == 2:
            mask = _padded_mask(attention_mask.to(query.device), lq, lk, causal)
        else:
            mask = attention_mask
            if mask.dtype == torch.bool and causal:
                mask = mask & _causal_bool(lq, lk, query.device)[None, None]
            elif causal:
                mask = mask + torch.zeros(lq, lk, dtype=mask.dtype, device=mask.device).masked_fill(
                    ~_causal_bool(lq, lk, query.device), torch.finfo(mask.dtype).min)
        return _sdpa(query, key, value, mask, dropout, scaling, False).transpose(1, 2).contiguous(), None

    if use in ("flash", "varlen"):
        if not query.is_cuda:
            raise RuntimeError(f"speeder_varlen backend {use!r} needs CUDA tensors, got {query.device}")
        info = _varlen_info(query, kwargs)
        if info is None:  # padding-free rows without packing: one example per row
            cu = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=query.device)
            info = (cu, cu, lq, lk)
        cu_q, cu_k, max_q, max_k = info
        q = query.transpose(1, 2).reshape(b * lq, hq, d)
        k = key.transpose(1, 2).reshape(b * lk, key.shape[1], d)
        v = value.transpose(1, 2).reshape(b * lk, value.shape[1], value.shape[-1])
        q, k, v, orig = _to_half(q, k, v, module)
        run = _run_flash if use == "flash" else _run_torch_varlen
        out = run(q, k, v, cu_q, cu_k, max_q, max_k, dropout, scaling, causal)
        return out.to(orig).view(b, lq, hq, -1), None

    if use != "sdpa":
        raise ValueError(f"speeder_varlen: unknown backend {backend!r}")
    cu_q = kwargs.get("cu_seq_lens_q")
    max_q = kwargs.get("max_length_q")
    if cu_q is not None and max_q is not None and b == 1:
        return _sdpa_gathered(query, key, value, cu_q.to(query.device), _as_int(max_q, "max_length_q"), dropout,
                              scaling, causal), None
    pos = kwargs.get("position_ids")
    if cu_q is not None and b == 1:  # cu without max: block-diagonal from cu, no sync
        seg = torch.searchsorted(cu_q.to(query.device).long()[1:], torch.arange(lq, device=query.device),
                                 right=True)[None]
    elif pos is not None and pos.shape[-1] == lq and not _compiling():
        seg = _cached("seg", pos, lambda: _segments_from_positions(pos.reshape(-1, lq)))
    else:
        seg = None
    if seg is None or (not seg.is_cuda and not bool((seg[:, -1] != 0).any())):  # one example per row
        out = _sdpa(query, key, value, None, dropout, scaling, causal)
    else:
        mask = seg[:, None, :, None] == seg[:, None, None, :]  # [B|1, 1, L, L]
        if causal:
            mask = mask & _causal_bool(lq, lk, query.device)[None, None]
        out = _sdpa(query, key, value, mask, dropout, scaling, False)
    return out.transpose(1, 2).contiguous(), None


def _packed_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             kwargs: dict, n_prefix: int, use: str, dropout: float, scaling: float | None,
                             causal: bool) -> torch.Tensor:
    """Packed query row ``[1, Hq, T, D]`` against keys ``[1, Hkv, P + T, D]`` = a shared prefix (the
    prefix KV cache) + the packed tokens; returns ``[1, T, Hq, D]``. flash / varlen: keys laid out
    per example (:func:`prefix_key_index`), bottom-right causal (``seqlen_k = P + seqlen_q``); SDPA:
    per-example blocks with the prefix prepended (:func:`_sdpa_gathered`). Needs ``cu_seq_lens_q``
    and ``max_length_q`` (host int); ``cu_seq_lens_k`` / ``max_length_k`` are derived if absent."""
    if not causal:
        raise ValueError("speeder_varlen: a shared key prefix (prefix KV cache) needs causal attention")
    cu_q = kwargs["cu_seq_lens_q"].to(query.device)
    max_q = kwargs.get("max_length_q")
    if max_q is None:
        raise ValueError("speeder_varlen: a packed row with a cached prefix needs max_length_q (a host int)")
    max_q = _as_int(max_q, "max_length_q")
    t, hq, d = query.shape[2], query.shape[1], query.shape[3]
    if use in ("flash", "varlen"):
        if not query.is_cuda:
            raise RuntimeError(f"speeder_varlen backend {use!r} needs CUDA tensors, got {query.device}")
        index, cu_k = prefix_key_index(cu_q, n_prefix, t)
        q = query[0].transpose(0, 1)  # [T, Hq, D]
        k = key[0].transpose(0, 1).index_select(0, index)  # [B*P + T, Hkv, D]
        v = value[0].transpose(0, 1).index_select(0, index)
        q, k, v, orig = _to_half(q, k, v, module)
        run = _run_flash if use == "flash" else _run_torch_varlen
        out = run(q, k, v, cu_q.to(torch.int32), cu_k, max_q, max_q + n_prefix, dropout, scaling, True)
        return out.to(orig).view(1, t, hq, -1)
    if use != "sdpa":
        raise ValueError(f"speeder_varlen: unknown backend {use!r}")
    return _sdpa_gathered(query, key, value, cu_q, max_q, dropout, scaling, True, n_prefix=n_prefix)


def _make(backend: str) -> Callable:
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        return speeder_varlen_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        is_causal=is_causal, backend=backend, **kwargs)

    fn.__name__ = f"speeder_varlen_{backend}"
    fn.__doc__ = f"speeder_varlen_attention pinned to backend={backend!r}."
    return fn


def _passthrough_mask(*args: Any, attention_mask: torch.Tensor | None = None, kv_length: int | None = None,
                      **kwargs: Any) -> torch.Tensor | None:
    """Mask hook for ``AttentionMaskInterface``: hand the 2-D padding mask (or None) to the attention
    function unchanged. Registering it keeps transformers from dropping a padding mask for an
    unknown implementation; it does no ``.all()`` check, hence no sync."""
    if attention_mask is not None and attention_mask.dim() == 2 and kv_length is not None:
        attention_mask = attention_mask[:, -kv_length:]
    return attention_mask


_REGISTERED = False


def register_attention() -> None:
    """Register the four ``speeder_varlen*`` names (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers < 4.53
        AttentionMaskInterface = None
    for name, backend in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _make(backend))
        if AttentionMaskInterface is not None:
            AttentionMaskInterface.register(name, _passthrough_mask)
    _REGISTERED = True


def select_attention(requested: str = "auto", device: torch.device | str | None = None,
                     logger: logging.Logger | None = None, dtype: torch.dtype | None = None) -> str:
    """Choose the ``attn_implementation`` name for ``requested`` on ``device`` and log why.

    ``auto``: flash-attn (CUDA + importable) > torch varlen (CUDA + torch >= 2.10) > SDPA
    (``speeder_varlen_sdpa``, the CPU path). With ``dtype`` float32 (an fp32 model) ``auto``
    keeps SDPA, since the flash kernels would need a cast to bf16; explicit ``flash``/``varlen``
    cast q/k/v to bf16 (one warning). ``flash`` / ``varlen`` raise RuntimeError when
    unavailable (no silent downgrade). ``sdpa`` and ``eager`` return transformers' own names (the
    padded baselines; packed batches still work there through HF's 4-D mask from position_ids).
    """
    register_attention()
    req = (requested or "auto").lower()
    if req not in REQUESTS:
        raise ValueError(f"model.attn_impl: {requested!r} is not one of {', '.join(REQUESTS)}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    fa, tv = flash_attn_available(), torch_varlen_available()
    if req == "eager":
        impl, why = "eager", "requested"
    elif req == "sdpa":
        impl, why = "sdpa", "requested (transformers SDPA, padded batches)"
    elif req == "flash":
        if not cuda:
            raise RuntimeError(f"attn_impl=flash needs a CUDA device (device is {dev}); use auto or sdpa")
        if not fa:
            raise RuntimeError("attn_impl=flash but flash-attn is not importable (pip install flash-attn, "
                               "or use attn_impl=varlen / auto)")
        impl, why = IMPL_FA, "requested; flash_attn_varlen_func on packed rows"
    elif req == "varlen":
        if not cuda:
            raise RuntimeError(f"attn_impl=varlen needs a CUDA device (device is {dev}); use auto or sdpa")
        if not tv:
            raise RuntimeError(f"attn_impl=varlen but torch {torch.__version__} has no "
                               "torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)")
        impl, why = IMPL_TORCH, "requested; torch varlen_attn on packed rows"
    elif cuda and dtype is not None and dtype not in _HALF:
        impl, why = IMPL_SDPA, f"auto: {str(dtype).replace('torch.', '')} model, flash kernels need fp16/bf16"
    elif cuda and fa:
        impl, why = IMPL_FA, "auto: CUDA and flash-attn importable"
    elif cuda and tv:
        impl, why = IMPL_TORCH, "auto: CUDA, flash-attn missing, torch varlen_attn present"
    else:
        reason = "no CUDA device" if not cuda else "no flash-attn and no torch varlen_attn"
        impl, why = IMPL_SDPA, f"auto: {reason}; SDPA over per-example blocks (correct, slower)"
    (logger or log).info(f"attention: {impl} ({why})")
    return impl


register_attention()
