"""Custom Triton kernels of speeder_fast, with a single dispatch point per kernel.

* :func:`mome_combine` -- masked gating of modality experts + weighted mix + output LayerNorm
  (``mome.py``, reference :func:`mome_combine_reference`).
* :func:`inject_positions` -- SPAE position cues added to item tokens, spliced into the text
  embeddings (``inject.py``, reference :func:`inject_positions_reference`).

``force``: ``"auto"`` runs Triton for CUDA tensors of a supported dtype (fp16/bf16/fp32) and the torch
reference otherwise; ``"triton"`` always runs Triton (CPU tensors need ``TRITON_INTERPRET=1``, as in
the tests); ``"torch"`` always runs the reference. Both paths are differentiable and work under
``torch.compile`` (the Triton launchers are ``torch.library`` custom ops with fake impls).
"""

# The dispatch functions live in ``dispatch.py``. This file only re-exports them, and only under the
# package name ``speeder_fast.kernels``: from a checkout's root, Python can also reach this folder as a
# top-level ``kernels`` module, a name that belongs to the Hugging Face ``kernels`` package which
# transformers and bitsandbytes probe for. Imported under that name it stays empty and, like a PEP 420
# namespace shadow, has no ``__file__``, so those probes report "not installed" instead of loading us.
if __name__ == "speeder_fast.kernels":
    from .dispatch import *  # noqa: F401,F403
    from .dispatch import __all__  # noqa: F401
else:
    __file__ = None  # noqa: A001
    __all__: list = []
