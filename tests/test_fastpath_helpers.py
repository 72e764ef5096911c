"""Shared builders for the fast-path tests (tiny random Llama models, variable-length batches)."""

from __future__ import annotations

import copy

import torch

from speeder_fast.model.loss import IGNORE_INDEX

VOCAB = 97


def tiny_config(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, use_cache=False,
                tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(attn: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", **kw):
    """A random 2-layer Llama (hidden 64, 4 heads, 2 KV heads) with its own config object."""
    from transformers import LlamaForCausalLM

    import speeder_fast.model.attention  # noqa: F401  (registers speeder_varlen*)

    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(tiny_config(**kw), attn_implementation=attn, dtype=dtype)
    return model.to(device)


def twin(model, attn: str):
    """A copy of ``model`` with identical weights and another attention implementation."""
    other = copy.deepcopy(model)
    other.set_attn_implementation(attn)
    return other


def var_batch(lengths: list[int], seed: int = 1, answer_len: int = 2, left: bool = False):
    """(input_ids [B, L], attention_mask [B, L], labels [B, L]); the last ``answer_len`` real tokens
    of every example are its answer (labels elsewhere = -100)."""
    g = torch.Generator().manual_seed(seed)
    b, length = len(lengths), max(lengths)
    ids = torch.randint(1, VOCAB, (b, length), generator=g)
    lens = torch.tensor(lengths)
    j = torch.arange(length)[None]
    if left:
        mask = j >= (length - lens[:, None])
    else:
        mask = j < lens[:, None]
    ids = ids.masked_fill(~mask, 0)
    # answer = last answer_len real tokens
    rank = mask.long().cumsum(1)  # 1..len on real tokens
    is_answer = mask & (rank > (lens[:, None] - answer_len))
    labels = torch.where(is_answer, ids, torch.full_like(ids, IGNORE_INDEX))
    return ids, mask.long(), labels


def decoder_of(model):
    """The LlamaModel body under a LlamaForCausalLM, possibly peft-wrapped."""
    from speeder_fast.model.liger import unwrap_model

    return unwrap_model(model).model


def lm_head_of(model):
    from speeder_fast.model.liger import unwrap_model

    return unwrap_model(model).lm_head
