"""speeder_fast: a kernel-optimized training stack for multimodal-LLM sequential recommendation."""

__version__ = "0.1.0"
