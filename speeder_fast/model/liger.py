"""Liger-Kernel fused RMSNorm / RoPE / SwiGLU on a loaded model instance, with honest fallbacks.

``apply_liger(model, mode)`` calls liger's ``apply_liger_kernel_to_<arch>(model=..., rope=True,
rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)`` through
liger's own ``MODEL_TYPE_TO_APPLY_LIGER_FN`` table (llama, mistral, qwen2, qwen3, gemma, phi3,
... whatever the installed liger offers). The answer-token loss is fused separately
(:mod:`speeder_fast.model.loss`), so liger's ``lce_forward`` is never installed.

Instance patching: liger binds new ``forward`` methods onto the model's existing RMSNorm and MLP
modules, so it works under a peft ``PeftModel`` (unwrapped here with ``get_base_model()``) and
with bitsandbytes 4-bit linears (SwiGLU calls ``gate_proj``/``up_proj``/``down_proj`` as modules).
Liger also rebinds module-level names in the transformers modeling file (the RMSNorm and MLP
classes, ``apply_rotary_pos_emb``). We restore the class names right after the call, so models
built later in the process are untouched; the RoPE function has to stay (the attention forward
looks it up at call time), which makes RoPE a process-wide patch for that architecture --
:func:`restore_liger_globals` undoes it.

liger-kernel is imported lazily (it needs Triton on a GPU); on CPU or without liger the model is
left as is and one line says why. ``mode='on'`` turns those situations into errors.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from types import ModuleType
from typing import Any

import torch

from speeder_fast.utils import get_logger

log = get_logger("speeder_fast.liger")

MODES = ("auto", "on", "off")
__all__ = ["MODES", "apply_liger", "liger_available", "liger_supported_model_types", "restore_liger_globals",
           "unwrap_model"]

# Names liger rebinds in a modeling module that are needed at call time by patched instances.
_KEEP_PATCHED = ("apply_rotary_pos_emb",)
_SAVED_GLOBALS: dict[str, dict[str, Any]] = {}


def liger_available() -> bool:
    """True when the ``liger_kernel`` package is installed (not imported)."""
    return importlib.util.find_spec("liger_kernel") is not None


def _liger_table() -> dict:
    """liger's model_type -> apply function table (imports liger)."""
    mp = importlib.import_module("liger_kernel.transformers.monkey_patch")
    return dict(mp.MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger_supported_model_types() -> frozenset[str]:
    """Architectures the installed liger can patch (empty when liger is missing or fails to import)."""
    if not liger_available():
        return frozenset()
    try:
        return frozenset(_liger_table())
    except Exception as e:  # pragma: no cover - broken install
        log.info(f"liger_kernel does not import ({type(e).__name__}: {e})")
        return frozenset()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under peft wrappers (``PeftModel.get_base_model()``), else ``model``."""
    seen = 0
    while hasattr(model, "get_base_model") and seen < 4:
        inner = model.get_base_model()
        if inner is model:
            break
        model, seen = inner, seen + 1
    return model


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _modeling_module(model: torch.nn.Module) -> ModuleType | None:
    try:
        return importlib.import_module(type(model).__module__)
    except Exception:  # pragma: no cover
        return None


def restore_liger_globals() -> None:
    """Undo the module-level rebinding (RoPE) left by :func:`apply_liger` in every modeling module.
    Instances already patched keep their fused RMSNorm/SwiGLU but use the original RoPE again."""
    for modname, saved in list(_SAVED_GLOBALS.items()):
        mod = importlib.import_module(modname)
        for name, val in saved.items():
            setattr(mod, name, val)
        del _SAVED_GLOBALS[modname]


def apply_liger(model: torch.nn.Module, mode: str = "auto", *, device: torch.device | str | None = None,
                logger: logging.Logger | None = None) -> bool:
    """Patch ``model`` in place with liger's fused RMSNorm, RoPE and SwiGLU kernels.

    Args:
        model: a transformers causal LM / base model, possibly peft-wrapped or 4-bit.
        mode: ``auto`` (apply on CUDA for supported architectures, else keep torch), ``on`` (apply
            or raise), ``off`` (keep torch).
        device: where the model runs (default: the device of its first parameter).
        logger: where the one-line decision goes.

    Returns:
        True when liger kernels were applied.

    Raises:
        ValueError: unknown mode.
        RuntimeError: ``mode='on'`` without CUDA, without liger, or for an unsupported architecture.
    """
    lg = logger or log
    mode = (mode or "auto").lower()
    if mode not in MODES:
        raise ValueError(f"model.liger: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "off":
        lg.info("liger: off (requested); plain torch RMSNorm/RoPE/SwiGLU")
        return False
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    dev = torch.device(device) if device is not None else _model_device(base)

    def skip(reason: str) -> bool:
        if mode == "on":
            raise RuntimeError(f"model.liger=on but {reason}")
        lg.info(f"liger: not applied ({reason}); plain torch RMSNorm/RoPE/SwiGLU")
        return False

    if dev.type != "cuda":
        return skip(f"the model is on {dev.type}, liger's Triton kernels need CUDA")
    if not liger_available():
        return skip("liger-kernel is not installed (pip install liger-kernel)")
    try:
        table = _liger_table()
    except Exception as e:
        return skip(f"liger_kernel does not import ({type(e).__name__}: {e})")
    if model_type not in table:
        return skip(f"liger has no kernels for model_type={model_type!r}")
    fn = table[model_type]
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
              "fused_linear_cross_entropy": False}
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        wanted["swiglu"] = False
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    modeling = _modeling_module(base)
    before = dict(vars(modeling)) if modeling is not None else {}
    fn(model=base, **kwargs)
    if modeling is not None:
        changed = {k: v for k, v in before.items() if vars(modeling).get(k) is not v}
        saved = _SAVED_GLOBALS.setdefault(modeling.__name__, {})
        for name, orig in changed.items():
            if name in _KEEP_PATCHED:
                saved.setdefault(name, orig)
            else:
                setattr(modeling, name, orig)  # instance-only: later models get the original classes
    on = [k for k in ("rms_norm", "rope", "swiglu") if kwargs.get(k)]
    lg.info(f"liger: applied {', '.join(on)} kernels to {type(base).__name__} (model_type={model_type}, "
            f"instance patch; RoPE is process-wide for {model_type})")
    return True
