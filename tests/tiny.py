"""Tiny offline fixtures for model/training tests: a BPE tokenizer, a random Llama, a toy dataset.

Everything here is built in a few hundred milliseconds on CPU, with no downloads.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

from speeder_fast.data.dataset import PreparedData, RecDataset, SplitArrays

COLORS = ["red", "blue", "green", "black", "white", "yellow", "pink", "gray"]
THINGS = ["pen", "pencil", "stapler", "folder", "binder", "marker", "eraser", "notebook", "tape", "clip"]


def item_titles(n_items: int) -> list[str]:
    return [f"{COLORS[i % len(COLORS)]} {THINGS[(i // len(COLORS)) % len(THINGS)]} {i}" for i in range(n_items)]


def make_tokenizer(path: Path | None = None, vocab_size: int = 384, letters: bool = True):
    """A byte-level BPE tokenizer trained on toy office-product strings (+ ' A'..' T' when ``letters``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(item_titles(80))] * 20
    corpus += ["You are a recommender. History (oldest to newest): Candidates: Answer: Description: item 1st 2nd 3rd"] * 20
    if letters:
        corpus += [" ".join(" " + c for c in string.ascii_uppercase[:20])] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def make_llm_dir(path: Path, hidden: int = 64, layers: int = 2, letters: bool = True, seed: int = 0) -> Path:
    """Save a random tiny Llama + tokenizer to ``path`` (all Linear out_features are multiples of 64)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = make_tokenizer(path, letters=letters)
    vocab = ((len(tok) + 63) // 64) * 64
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(path))
    return path


def make_prepared(n_users: int = 40, n_items: int = 60, n_candidates: int = 8, max_history: int = 5, seed: int = 0) -> PreparedData:
    """A toy dataset with a learnable pattern (next item = previous item + 1 mod n_items, mostly)."""
    rng = np.random.default_rng(seed)
    titles = item_titles(n_items)
    descs = [f"A {t} for the office, durable and cheap. " * 3 for t in titles]
    seqs = []
    for _ in range(n_users):
        n = int(rng.integers(4, 9))
        start = int(rng.integers(0, n_items))
        seqs.append(np.asarray([(start + j) % n_items for j in range(n)], dtype=np.int64))
    ds = RecDataset(
        name="tiny",
        user_ids=[f"u{i}" for i in range(n_users)],
        item_ids=[str(i) for i in range(n_items)],
        sequences=seqs,
        item_text={"title": titles, "description": descs},
    )

    def windows(kind: str) -> SplitArrays:
        us, hs, ls, ts = [], [], [], []
        for u, s in enumerate(seqs):
            if kind == "train":
                ends = range(1, len(s) - 2)
            elif kind == "valid":
                ends = [len(s) - 2]
            else:
                ends = [len(s) - 1]
            for e in ends:
                h = s[max(0, e - max_history) : e]
                row = np.full(max_history, -1, np.int64)
                row[: len(h)] = h
                us.append(u)
                hs.append(row)
                ls.append(len(h))
                ts.append(s[e])
        return SplitArrays(np.asarray(us), np.stack(hs), np.asarray(ls), np.asarray(ts))

    def cands(split: SplitArrays) -> np.ndarray:
        out = np.zeros((len(split), n_candidates), np.int64)
        for i in range(len(split)):
            others = rng.choice(np.setdiff1d(np.arange(n_items), [split.targets[i]]), n_candidates - 1, replace=False)
            row = np.concatenate([[split.targets[i]], others])
            rng.shuffle(row)
            out[i] = row
        return out

    valid, test = windows("valid"), windows("test")
    return PreparedData(ds, windows("train"), valid, test, cands(valid), cands(test))


def tiny_features(prepared: PreparedData, dims: dict | None = None, seed: int = 0):
    """Random per-modality item features {m: (float tensor [n_items, d], bool mask [n_items])}."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = prepared.dataset.n_items
    dims = dims or {"text": 32, "collab": 16}
    out = {}
    for m, d in dims.items():
        out[m] = (torch.randn(n, d, generator=g), torch.ones(n, dtype=torch.bool))
    return out



def make_rec_model(llm_dir, paradigm: str = "speeder", mode: str = "score", k: int = 2, lora_b_noise: bool = False,
                   **model_cfg):
    """``(cfg, prepared, builder, SpeederRecModel)`` on the tiny Llama in ``llm_dir`` (8 candidates,
    history <= 5, LoRA dropout 0). ``model_cfg`` sets ``cfg.model`` fields (``precision``,
    ``attn_impl``, ``liger``, ...). ``lora_b_noise`` fills LoRA B with seeded values so LoRA changes
    the forward pass (peft starts it at zero)."""
    import torch

    from speeder_fast.config import Config
    from speeder_fast.model import MoME, PromptBuilder, SPAE, SpeederRecModel, embedding_rms, load_llm, load_tokenizer

    cfg = Config()
    cfg.model.llm = str(llm_dir)
    cfg.model.n_item_tokens = k
    cfg.model.lora_dropout = 0.0
    for key, value in model_cfg.items():
        setattr(cfg.model, key, value)
    cfg.prompt.paradigm = paradigm
    cfg.prompt.answer_mode = mode
    prepared = make_prepared(n_candidates=8, max_history=5)
    tok = load_tokenizer(str(llm_dir))
    builder = PromptBuilder(tok, prepared.dataset, cfg.prompt, 8, 5, k, False)
    llm = load_llm(cfg.model, torch.device("cpu"), tok, seed=0)
    mome = spae = None
    if paradigm == "speeder":
        torch.manual_seed(0)
        mome = MoME(tiny_features(prepared), 64, k, 32, False, embedding_rms(llm))
        spae = SPAE(64, 16)
    if lora_b_noise:
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for n, p in llm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return cfg, prepared, builder, SpeederRecModel(llm, mome, spae)


def train_config(llm_dir, out, run_name: str = "run"):
    """The settings every tiny training test shares: CPU, the tiny Llama in ``llm_dir`` with LoRA
    dropout 0, k = 2 soft tokens, expert hidden 32, 8 candidates, history <= 5, batch 4, runs
    under ``out``, the label protocol (``prompt.answer_mode="score"``) with one learning rate
    (``train.adapter_lr_scale=1``). Tests set the rest (stages, evaluation, checkpoints) themselves."""
    from speeder_fast.config import Config

    cfg = Config()
    cfg.output_dir, cfg.run_name, cfg.device = str(out), run_name, "cpu"
    cfg.model.llm = str(llm_dir)
    cfg.model.lora_dropout = 0.0
    cfg.model.n_item_tokens = 2
    cfg.model.expert_hidden = 32
    cfg.data.n_candidates, cfg.data.max_history = 8, 5
    cfg.train.batch_size = 4
    # the label protocol and one learning rate, as these tests were written for (item-mode tests set
    # prompt.answer_mode="item" themselves)
    cfg.prompt.answer_mode = "score"
    cfg.train.adapter_lr_scale = 1.0
    return cfg
