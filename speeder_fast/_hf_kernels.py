"""Keep the checkout's ``kernels/`` folder away from the Hugging Face ``kernels`` package name.

The Triton kernels live in the top-level folder ``kernels/``, installed as ``speeder_fast.kernels``.
From the checkout's root (the current directory of ``python -m speeder_fast.<cli>``, or a
``PYTHONPATH`` entry) Python could also import that folder as a top-level module ``kernels``: the
name of the Hugging Face ``kernels`` package, which transformers (``is_kernels_available``) and
bitsandbytes probe for. bitsandbytes 0.50 on a CPU with AVX512-BF16 runs ``from kernels import
get_kernel`` when it is imported and, failing, logs ``Failed to load CPU gemm_4bit_forward from
kernels-community: ... Please make sure you already pip install kernels`` (``cannot import name
'get_kernel' from 'kernels'`` from the checkout's root, where it had found our folder).

:func:`install` (run by ``import speeder_fast``, so by every CLI before transformers or bitsandbytes
load) does two narrow things:

* the path finder of the checkout's root no longer resolves the top-level name ``kernels`` (a real
  ``kernels`` distribution elsewhere on ``sys.path`` is still found; ``speeder_fast.kernels`` is
  unaffected), and an empty top-level ``kernels`` already imported from our folder is dropped;
* that one bitsandbytes record is filtered from its ``bitsandbytes.backends.cpu.ops`` logger: the
  project does not use the optional ``kernels`` gemm (bitsandbytes falls back to its own CPU 4-bit
  kernels); ``load_llm`` logs one line about the CPU 4-bit path instead. No other warning is touched.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.machinery import (BYTECODE_SUFFIXES, EXTENSION_SUFFIXES, SOURCE_SUFFIXES, ExtensionFileLoader,
                                 FileFinder, SourceFileLoader, SourcelessFileLoader)
from typing import Any

HF_NAME = "kernels"
#: the start of bitsandbytes' message (bitsandbytes/backends/cpu/ops.py, 0.50)
BNB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CheckoutFinder(FileFinder):
    """The path-entry finder of the checkout's root: a plain ``FileFinder`` that does not resolve the
    top-level name ``kernels`` (our folder is ``speeder_fast.kernels`` only)."""

    def find_spec(self, fullname: str, target: Any = None) -> Any:
        if fullname == HF_NAME:
            return None
        return super().find_spec(fullname, target)


class DropKernelsCommunity(logging.Filter):
    """Drops bitsandbytes' ``kernels-community`` record; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_MESSAGE)


def _is_checkout(entry: str) -> bool:
    try:
        return os.path.realpath(entry or os.getcwd()) == os.path.realpath(_CHECKOUT)
    except OSError:
        return False


def install() -> None:
    """Apply both guards (idempotent; a no-op outside a checkout for the finder part)."""
    logger = logging.getLogger(BNB_LOGGER)
    if not any(isinstance(f, DropKernelsCommunity) for f in logger.filters):
        logger.addFilter(DropKernelsCommunity())
    if not os.path.isfile(os.path.join(_CHECKOUT, HF_NAME, "__init__.py")):
        return  # an installed wheel: no top-level kernels/ next to the package
    details = [(ExtensionFileLoader, EXTENSION_SUFFIXES), (SourceFileLoader, SOURCE_SUFFIXES),
               (SourcelessFileLoader, BYTECODE_SUFFIXES)]
    keys = {os.path.realpath(_CHECKOUT), _CHECKOUT}
    keys |= {os.getcwd() if e == "" else e for e in sys.path if isinstance(e, str) and _is_checkout(e)}
    for key in keys:
        if not isinstance(sys.path_importer_cache.get(key), CheckoutFinder):
            sys.path_importer_cache[key] = CheckoutFinder(key, *details)
    mod = sys.modules.get(HF_NAME)
    if mod is not None and any(_is_checkout(os.path.dirname(p)) for p in getattr(mod, "__path__", [])):
        del sys.modules[HF_NAME]  # our folder, imported under the HF name before speeder_fast was
