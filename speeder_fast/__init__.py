"""speeder_fast: a kernel-optimized training stack for multimodal-LLM sequential recommendation."""

from speeder_fast import _hf_kernels

__version__ = "0.1.0"

# before transformers / bitsandbytes load: the checkout's kernels/ folder is never the Hugging Face
# `kernels` package, and bitsandbytes' CPU "pip install kernels" advice is not printed (_hf_kernels)
_hf_kernels.install()
