"""Model side of Speeder: prompts, MRC (MoME), SPAE position embeddings, the collaborative user state, the
LLM wrapper."""

from .llm import SpeederRecModel, embedding_rms, load_llm, load_tokenizer, match_generated
from .mome import MoME
from .positions import SPAE
from .prompts import PromptBatch, PromptBuilder
from .user_state import UserState

__all__ = [
    "MoME",
    "PromptBatch",
    "PromptBuilder",
    "SPAE",
    "SpeederRecModel",
    "UserState",
    "embedding_rms",
    "load_llm",
    "load_tokenizer",
    "match_generated",
]
