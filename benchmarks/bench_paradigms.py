"""Paradigm benchmarks: ``verbose`` vs ``titles`` vs ``speeder`` on the real code path.

Shared by ``benchmarks/test_bench_paradigms.py`` (pytest-benchmark) and usable from any script:
everything here is plain Python, nothing depends on pytest.

What one measurement is (the code a training run / an evaluation runs, nothing re-implemented):

* ``train``: ``PromptBuilder.build`` from the :class:`~speeder_fast.data.dataset.PreparedData`
  arrays -> :func:`speeder_fast.training.step.train_step`, the step the training loop runs:
  ``PromptBatch.to(device)`` -> ``SpeederRecModel.forward`` with the configured loss (score mode,
  ``train.score_loss=labels``: cross-entropy over the candidate label logits) -> ``backward`` ->
  ``clip_grad_norm_(train.grad_clip)`` -> ``AdamW.step`` (``train.weight_decay``, parameter groups of
  ``train.adapter_lr_scale``, warmup + cosine lr) -> ``zero_grad``; the stage comes from
  ``prepare_stage`` for the last MPO stage: LoRA + every MoME expert + gate/norm + SPAE for
  ``speeder``, LoRA only otherwise. Records carry ``loss`` (``label``).
* ``score``: build (no answer) -> ``SpeederRecModel.score`` under ``no_grad`` -> argmax (the
  ``speeder_fast.evaluate`` score path; MoME tokens come from the cached catalogue, as in eval).
* ``score_compiled``: the same scoring through ``speeder_fast.model.static.StaticScorer`` (what
  ``eval.compile`` selects): static ``[B, 16-multiple]`` shapes, ``torch.compile`` with
  ``reduce-overhead`` on CUDA (CUDA graphs; compile + graph capture happen in the warm-up calls,
  which are not timed), eager static shapes on CPU (``info["compile"]`` says which).
* item paradigms (``speeder-item``, ``titles-item``: ``prompt.answer_mode=item``, the recommended
  path): ``train`` = the same ``train_step`` with the next-item loss (every history slot predicts the
  next item, full softmax over the catalogue; records carry ``loss`` ``next-item``); ``score`` = the
  same ``SpeederRecModel.score`` returning catalogue scores ``[B, n_items]`` -> history masked ->
  top-10 (what ``speeder_fast.recommend`` and full-ranking evaluation compute). The model is built by
  ``speeder_fast.training.run.build_model``, as in training (item head with popularity-initialised
  bias; ``titles-item`` gets a text-only MoME for the head's item vectors).
* ``recommend`` (item paradigms): ``speeder_fast.recommend.recommend`` -- what ``python -m
  speeder_fast.recommend --users ...`` runs per batch of users: build -> score the whole catalogue ->
  the user's own items excluded -> top-10 records with item ids, titles, scores and probabilities.
* ``generate_constrained``: build left-padded -> ``SpeederRecModel.generate_constrained`` (the
  evaluation default, ``eval.constrained``: greedy decoding masked to the candidates' title tokens,
  each row stopped at its first unique prefix) -> candidate index; ``gen_new_tokens_mean`` = tokens
  decoded per user.
* ``generate``: build left-padded -> ``SpeederRecModel.generate`` (greedy, LLaRA protocol,
  ``max_new_tokens`` capped) -> ``match_generated`` against the candidate titles.

Same LLM object, same LoRA settings (``ModelConfig`` defaults: r=8, alpha=16, dropout 0.05, all
seven projections) and the same users and persisted test candidates for every paradigm. Users:
a seeded permutation of the test split of ``amazon-office`` (real titles/descriptions), the first
``B`` rows for batch ``B``; their persisted candidates (20) and targets (the training answer).
Speeder's MRC input features are real: ``text`` = mean of the LLM input embeddings of the item
text (``speeder_fast.features``), ``collab`` = SASRec item embeddings trained for only
``SASREC_EPOCHS`` epochs (quality is irrelevant to speed; the expert compute is the same).

Long histories (``history`` = 10 / 50 / 200): the dataset's histories hold at most 10 items, so a
length-``H`` history is the user's real history preceded by ``H - len`` real catalogue items
drawn with a seeded generator (never one of the user's candidates or history items).

Models (:func:`model_specs`):

* ``smollm2-135m``: on CPU the real SmolLM2-135M-Instruct weights (fp32); on CUDA the same config
  with *random* weights (bf16) and the real tokenizer, because the 517 MB weights cannot be
  carried to the GPU machine -- speed does not depend on weight values.
* ``llama2-7b-nf4`` (CUDA only): Llama-2-7B shape (h 4096, 32 layers, i 11008), random weights,
  NF4 (double quant) via ``benchmarks/fastpath_check.quantize_nf4`` then the post-load steps of
  ``load_llm`` (``prepare_model_for_kbit_training`` + the same LoRA); vocabulary = the SmolLM2
  tokenizer's (49152) so the prompts are token-for-token the SmolLM2 ones.
* ``tiny`` (smoke mode only): SmolLM2 config shrunk to 2 layers x 64 hidden, random weights.

Memory: ``bench_utils.PeakMemory``: CUDA ``max_memory_allocated`` (peak; ``step_mem_mb`` = peak minus
what was allocated before the case); CPU: the process peak RSS during the case and its growth over
the RSS before it -- coarse (allocator caching, other threads), labelled ``cpu_peak_rss``.

CPU: torch runs with ONE thread by default (:func:`cpu_threads`: on the shared 2-core machine two
OpenMP threads were 10x slower), training batch 2 (a verbose step at batch 2 already peaks at
~12 GB RSS: eager attention probabilities of ~1400-token prompts), inference batch 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import bench_utils  # noqa: E402  (benchmarks/ is on sys.path)
from bench_utils import PeakMemory, card_name, free_memory, has_weights  # noqa: E402,F401

PARADIGMS = ("verbose", "titles", "speeder")
#: the next-item head (``prompt.answer_mode=item``) over the same prompts: no candidates in the prompt,
#: every history slot trained, the whole catalogue scored (train and score phases only)
ITEM_PARADIGMS = ("speeder-item", "titles-item")
PHASES = ("train", "score", "generate", "generate_constrained")


def split_paradigm(name: str) -> tuple[str, str]:
    """``(prompt.paradigm, prompt.answer_mode)`` of a benchmark paradigm name: ``speeder-item`` ->
    ``("speeder", "item")``; the plain names use the LLaRA label protocol (``"score"``)."""
    if name.endswith("-item"):
        return name[: -len("-item")], "item"
    return name, "score"

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "amazon-office"
SASREC_EPOCHS = 2
N_CANDIDATES = 20
MAX_HISTORY = 10  # the real-data window (data.max_history default)
LONG_HISTORIES = (10, 50, 200)
BUILDER_HISTORY = max(LONG_HISTORIES)  # one builder per paradigm serves every history length
SEED = 0
#: rough seconds to build a model + its features on a GPU; a case that needs a new model is skipped
#: when less than this is left of SPEEDER_BENCH_BUDGET_S (a timeout mid-load loses the step)
LOAD_ESTIMATE_S = {"llama2-7b-nf4": 75.0, "smollm2-135m": 25.0, "tiny": 5.0}
# on CPU a case whose longest prompt exceeds this is skipped (SPEEDER_BENCH_CPU_MAX_TOKENS); the
# default admits everything that fits SmolLM2's 8192-token context (verbose, history 50: ~6000)
CPU_MAX_PROMPT_TOKENS = 8192


# ----------------------------------------------------------------------------------------------
# environment switches
# ----------------------------------------------------------------------------------------------
def is_smoke() -> bool:
    """Tiny-size mode (CI smoke: ``--benchmark-disable`` sets ``SPEEDER_BENCH_SMOKE=1``)."""
    return os.environ.get("SPEEDER_BENCH_SMOKE", "0") not in ("", "0")


def data_dir() -> Path:
    """``$SPEEDER_BENCH_DATA`` or ``../shared/data/amazon-office`` (may not exist)."""
    return Path(os.environ.get("SPEEDER_BENCH_DATA") or DEFAULT_DATA).expanduser()


def bench_device() -> torch.device:
    name = os.environ.get("SPEEDER_BENCH_DEVICE", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_threads() -> int:
    """Torch CPU threads for the benchmarks: ``$SPEEDER_BENCH_THREADS``, default 1.

    Measured on the shared 2-core development machine (other jobs running): a SmolLM2-135M forward
    of 2 x 135 tokens took 0.59 s with 1 thread and 7.5 s with 2 (OpenMP threads waiting on a
    descheduled sibling), so the default is 1; set it to the core count on a dedicated machine.
    """
    try:
        return max(1, int(os.environ.get("SPEEDER_BENCH_THREADS", "1")))
    except ValueError:
        return 1


def budget_seconds() -> float:
    """``$SPEEDER_BENCH_BUDGET_S`` (0 = unlimited): later cases are skipped once it is spent."""
    try:
        return float(os.environ.get("SPEEDER_BENCH_BUDGET_S", "0") or 0)
    except ValueError:
        return 0.0


def environment_info(device: torch.device) -> dict[str, Any]:
    """Card, versions, date, load (``bench_utils.environment_info``) + smoke mode and data folder."""
    return bench_utils.environment_info(device, smoke=is_smoke(), data=str(data_dir()))


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    precision: str  # fp32 | bf16 | nf4
    weights: str  # real | random
    gpu_only: bool = False
    note: str = ""


def smollm2_source() -> Path:
    """Folder with the SmolLM2 tokenizer + config (+ weights on CPU): ``$SPEEDER_BENCH_SMOLLM2`` or the asset."""
    env = os.environ.get("SPEEDER_BENCH_SMOLLM2")
    if env:
        p = Path(env).expanduser()
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"SPEEDER_BENCH_SMOLLM2={p}: no config.json there "
                                    "(python benchmarks/prepare_gpu_assets.py writes one)")
        return p
    from speeder_fast.assets import resolve_model

    return Path(resolve_model("smollm2-135m"))


def model_specs(device: torch.device, smoke: bool) -> list[ModelSpec]:
    """The models benchmarked on ``device`` (smoke: the tiny model only)."""
    if smoke:
        return [ModelSpec("tiny", "tiny llama (SmolLM2 config, 2x64, random)", "fp32", "random",
                          note="smoke mode: shapes tiny, numbers meaningless")]
    cuda = device.type == "cuda"
    specs = [ModelSpec("smollm2-135m", "SmolLM2-135M", "bf16" if cuda else "fp32", "random" if cuda else "real",
                       note="random weights + real tokenizer (speed does not depend on weight values)" if cuda
                       else "real weights")]
    specs.append(ModelSpec("llama2-7b-nf4", "Llama-2-7B shape, NF4 + LoRA", "nf4", "random", gpu_only=True,
                           note="random weights, vocab = SmolLM2 tokenizer (49152)"))
    return specs


TINY_OVERRIDES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16}
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32}


def load_llama_nf4(tokenizer: Any, device: torch.device, seed: int = SEED, shape: dict | None = None) -> torch.nn.Module:
    """Random Llama (default: Llama-2-7B shape), NF4 base, then ``load_llm``'s post-load steps + LoRA.

    ``load_llm`` itself needs a checkpoint on disk (13 GB for 7B: too slow to write and read in a
    device session), so the base is built in memory and quantized layer by layer
    (``fastpath_check.quantize_nf4``); what follows is ``load_llm``'s NF4 branch: freeze,
    ``prepare_model_for_kbit_training`` (norms/embeddings/head upcast to fp32), LoRA with the
    ``ModelConfig`` defaults. Compute dtype bf16 on CUDA, fp32 on CPU (bitsandbytes' CPU path).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpath_check import quantize_nf4  # benchmarks/ is on sys.path
    from speeder_fast.config import ModelConfig

    import speeder_fast.model.attention as attention  # registers the speeder_varlen* implementations
    from speeder_fast.model.liger import apply_liger

    mc = ModelConfig()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impl = attention.select_attention(mc.attn_impl, device, dtype=dtype)  # as load_llm does
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, use_cache=True,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **(shape or LLAMA2_7B))
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=dtype)
    finally:
        torch.set_default_dtype(prev)
    quantize_nf4(model, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    lcfg = LoraConfig(r=mc.lora_r, lora_alpha=mc.lora_alpha, lora_dropout=mc.lora_dropout,
                      target_modules=list(mc.lora_targets), task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model.speeder_liger = apply_liger(model, mc.liger, device=device)  # load_llm's last steps
    model.speeder_attn_impl = impl
    return model


def load_model(spec: ModelSpec, device: torch.device, seed: int = SEED) -> tuple[Any, torch.nn.Module, dict]:
    """``(tokenizer, llm with LoRA, info)`` for ``spec`` (through ``load_llm`` except for 7B NF4)."""
    from speeder_fast.config import ModelConfig
    from speeder_fast.model import load_llm, load_tokenizer
    from speeder_fast.profile import materialize_model_dir

    src = smollm2_source()
    t0 = time.perf_counter()
    if spec.key == "llama2-7b-nf4":
        if device.type != "cuda":
            raise RuntimeError("the 7B NF4 model is benchmarked on CUDA only")
        tok = load_tokenizer(str(src))
        llm = load_llama_nf4(tok, device, seed)
        path = "random (in memory)"
    else:
        overrides = TINY_OVERRIDES if spec.key == "tiny" else None
        if spec.weights == "real" and has_weights(src) and overrides is None:
            path = src
        else:
            from speeder_fast.utils import cache_root

            path = materialize_model_dir(src, cache_root() / "bench_models", seed=seed, overrides=overrides,
                                         dtype="bfloat16" if spec.precision == "bf16" else "float32")
        tok = load_tokenizer(str(path))
        llm = load_llm(ModelConfig(llm=str(path), precision=spec.precision), device, tok, seed=seed)
    from speeder_fast.model.llm import base_model

    hf_cfg = base_model(llm).config
    info = {"model_path": str(path), "load_s": round(time.perf_counter() - t0, 2),
            "hidden_size": hf_cfg.hidden_size, "layers": hf_cfg.num_hidden_layers,
            "vocab_size": hf_cfg.vocab_size, "max_positions": getattr(hf_cfg, "max_position_embeddings", None),
            "lora_params": sum(p.numel() for n, p in llm.named_parameters() if "lora_" in n)}
    return tok, llm, info


def compute_dtype_name(spec: ModelSpec, device: torch.device) -> str:
    if spec.precision == "nf4":
        return "nf4 (bf16 compute)" if device.type == "cuda" else "nf4 (fp32 compute)"
    return spec.precision


# ----------------------------------------------------------------------------------------------
# data and users
# ----------------------------------------------------------------------------------------------
def load_prepared(path: Path | None = None) -> Any:
    """The prepared dataset (cached by ``speeder_fast.data.prepare``), histories of up to 10 items."""
    from speeder_fast.config import DataConfig
    from speeder_fast.data import prepare

    p = Path(path) if path else data_dir()
    if not p.is_dir():
        raise FileNotFoundError(f"benchmark data {p} is absent (set SPEEDER_BENCH_DATA or provide ../shared/data)")
    return prepare(DataConfig(source=str(p), max_history=MAX_HISTORY, n_candidates=N_CANDIDATES))


def user_rows(prepared: Any, n: int, seed: int = SEED) -> np.ndarray:
    """The first ``n`` rows of a seeded permutation of the test split (repeats past its size)."""
    perm = np.random.default_rng(seed).permutation(len(prepared.test))
    return np.resize(perm, n).astype(np.int64)


def long_histories(prepared: Any, rows: np.ndarray, history: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(histories [B, history], lengths [B])``: real catalogue items, then the user's real history."""
    te, cands = prepared.test, prepared.test_candidates
    n_items = prepared.dataset.n_items
    out = np.full((len(rows), history), -1, np.int64)
    for i, r in enumerate(rows):
        real = te.histories[r, : te.lengths[r]][-history:]
        need = history - len(real)
        if need > 0:
            rng = np.random.default_rng([seed, int(r), history])
            banned = np.zeros(n_items, bool)
            banned[cands[r]] = True
            banned[real] = True
            pool = np.flatnonzero(~banned)
            fill = rng.choice(pool, size=need, replace=need > len(pool))
            out[i] = np.concatenate([fill, real])
        else:
            out[i] = real
    return out, np.full(len(rows), history, np.int64)


def token_stats(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {}
    return {"mean": round(float(x.mean()), 1), "max": int(x.max()), "p50": float(np.percentile(x, 50)),
            "p90": float(np.percentile(x, 90))}


# ----------------------------------------------------------------------------------------------
# the runner: one per (model, paradigm), all sharing one LLM
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One measurement: ``model`` x ``phase`` x ``paradigm`` x ``batch`` (x ``history``)."""

    model: str
    phase: str  # train | score | generate
    paradigm: str
    batch: int | str  # an int, or "max" (largest batch that fits, found by doubling; CUDA only)
    history: int | None = None  # None: real histories (<= 10); else long-history case
    rounds: int = 3
    warmup: int = 1
    max_new_tokens: int = 16

    @property
    def case_id(self) -> str:
        h = "" if self.history is None else f"-h{self.history}"
        return f"{self.model}-{self.phase}-{self.paradigm}-b{self.batch}{h}"

    def __str__(self) -> str:
        return self.case_id


class CaseSkipped(Exception):
    """A case that cannot run here (context, cap, memory, budget); the message says why."""


class ParadigmRunner:
    """Prompt builder + SpeederRecModel (+ MoME/SPAE for speeder) over a shared LLM."""

    def __init__(self, env: "BenchEnv", spec: ModelSpec, paradigm: str) -> None:
        from speeder_fast.config import Config
        from speeder_fast.model import PromptBuilder
        from speeder_fast.training.run import build_model

        self.env, self.spec, self.paradigm = env, spec, paradigm
        tok, llm = env.tokenizer, env.llm
        self.device = env.device
        base, mode = split_paradigm(paradigm)
        self.item_mode = mode == "item"
        self.cfg = Config()
        self.cfg.prompt.paradigm = base
        self.cfg.prompt.answer_mode = mode
        self.cfg.features.modalities = list(env.features)
        n_cand = int(env.prepared.test_candidates.shape[1])  # the persisted candidates (20 for the real data)
        self.builder = PromptBuilder(tok, env.prepared.dataset, self.cfg.prompt, n_cand,
                                     BUILDER_HISTORY, self.cfg.model.n_item_tokens, self.cfg.model.spae_ordinal_text)
        # the training code's own model construction: MoME + SPAE (speeder), the item head (item mode;
        # a text-only MoME for the text paradigms' head), nothing for the label-protocol text paradigms
        feats = dict(env.features) if base == "speeder" else (
            {"text": env.features["text"]} if self.item_mode else {})
        self.model, self.modalities = build_model(self.cfg, llm, feats, env.prepared, self.device)

    # ---------------------------------------------------------------- batches
    def arrays(self, batch: int, history: int | None) -> tuple[np.ndarray, ...]:
        p = self.env.prepared
        rows = user_rows(p, batch)
        if history is None:
            hist, lens = p.test.histories[rows], p.test.lengths[rows]
        else:
            hist, lens = long_histories(p, rows, history)
        return hist, lens, p.test_candidates[rows], p.test.targets[rows]

    def build(self, batch: int, history: int | None, phase: str) -> Any:
        hist, lens, cands, tgts = self.arrays(batch, history)
        return self.builder.build(hist, lens, cands, tgts, with_answer=phase == "train",
                                  padding_side="left" if phase.startswith("generate") else "right")

    def check_fits(self, pb: Any) -> None:
        L = int(pb.input_ids.shape[1])
        ctx = self.env.info.get("max_positions")
        if ctx and L > ctx:
            raise CaseSkipped(f"prompt of {L} tokens exceeds the model context ({ctx})")
        if self.device.type == "cpu" and not is_smoke() and int(pb.prompt_tokens.max()) > self.env.cpu_max_tokens:
            raise CaseSkipped(f"CPU cap: longest prompt {int(pb.prompt_tokens.max())} tokens > "
                              f"{self.env.cpu_max_tokens} (SPEEDER_BENCH_CPU_MAX_TOKENS); minutes per step on 2 cores")

    # ---------------------------------------------------------------- step functions
    def make_fn(self, case: Case) -> tuple[Callable[[], Any], dict[str, Any]]:
        """``(fn, info)``: ``fn()`` runs one full step of ``case`` and synchronizes the device."""
        from speeder_fast.model import match_generated
        from speeder_fast.training.batches import MicroBatch
        from speeder_fast.training.loop import resolve_stages
        from speeder_fast.training.run import Components
        from speeder_fast.training.step import loss_name, prepare_stage, train_step

        model, builder, dev = self.model, self.builder, self.device
        B = int(case.batch)
        hist, lens, cands, tgts = self.arrays(B, case.history)
        phase = case.phase
        probe = builder.build(hist, lens, cands, tgts, with_answer=phase == "train",
                              padding_side="left" if phase.startswith("generate") else "right")
        self.check_fits(probe)
        t0 = time.perf_counter()
        for _ in range(3):
            builder.build(hist, lens, cands, tgts, with_answer=phase == "train",
                          padding_side="left" if phase.startswith("generate") else "right")
        build_ms = (time.perf_counter() - t0) / 3 * 1000
        info: dict[str, Any] = {
            "prompt_tokens_mean": round(float(probe.prompt_tokens.float().mean()), 1),
            "prompt_tokens_max": int(probe.prompt_tokens.max()),
            "padded_len": int(probe.input_ids.shape[1]),
            "tokens": int(probe.attention_mask.sum()),
            "history_mean": round(float(np.minimum(lens, BUILDER_HISTORY).mean()), 2),
            "build_ms": round(build_ms, 3),
            # fast-path state of the model as the training code set it up (None: not wired)
            "packing": getattr(model, "packing", None), "attn_impl": getattr(model, "attn_impl", None),
            "liger": getattr(model, "use_liger", None),
        }
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

        if phase == "train":
            # the training loop's own step (speeder_fast.training.step.train_step): the configured loss
            # (label cross-entropy: score mode, train.score_loss=labels), parameter groups, weight decay and
            # clipping of the last MPO stage, and its warmup + cosine schedule
            comp = Components(self.cfg, dev, self.env.prepared, self.env.tokenizer, builder, model, self.modalities)
            stage = resolve_stages(self.cfg, self.modalities)[-1]
            ctx = prepare_stage(comp, stage, total=max(1, case.warmup + case.rounds))
            info["trainable_params"] = int(sum(p.numel() for p in ctx.params))
            info["stage_modalities"] = list(stage.modalities)
            info["loss"] = loss_name(self.cfg)
            model.train()
            steps = itertools.count()

            def fn() -> Any:
                batch = builder.build(hist, lens, cands, tgts, with_answer=True)
                stats = train_step(ctx, next(steps), [MicroBatch(batch, 1.0, B)])
                sync()
                return stats.loss

            return fn, info

        model.eval()
        model.set_stage(self.modalities)
        if phase == "score_compiled":
            from speeder_fast.model.static import StaticScorer

            mode = "reduce-overhead" if dev.type == "cuda" else "static"
            scorer = StaticScorer(model, B, 16, mode, pad_id=builder.pad_id)
            info["compile"] = mode
            info["padded_len"] = int(math.ceil(info["padded_len"] / scorer.length_multiple) * scorer.length_multiple)

            def fn() -> Any:
                batch = builder.build(hist, lens, cands, None, with_answer=False)
                pred = scorer(batch.to(dev)).argmax(1).cpu()
                sync()
                return pred

            return fn, info

        if phase == "recommend":
            # python -m speeder_fast.recommend's own ranking loop: build -> score -> the user's items
            # excluded -> top-10 records (item ids, titles, scores), here for B users per call
            from speeder_fast.recommend import recommend
            from speeder_fast.training.run import Components

            if not self.item_mode:
                raise CaseSkipped("the recommend case is measured for the next-item head (item paradigms)")
            comp = Components(self.cfg, dev, self.env.prepared, self.env.tokenizer, builder, model, self.modalities)
            ds = self.env.prepared.dataset
            users = [(None, ds.user_ids[int(u)], int(u)) for u in self.env.prepared.test.users[user_rows(self.env.prepared, B)]]
            info["ranked_items"] = int(ds.n_items)

            def fn() -> Any:
                with torch.no_grad():
                    out = list(recommend(comp, users, top_k=10, split="test", candidates="catalogue",
                                         batch_size=B, progress=False))
                sync()
                return out

            return fn, info

        if phase == "score" and self.item_mode:
            from speeder_fast.metrics import exclude_items

            seen_rows, seen_cols = np.nonzero(hist >= 0)
            seen_items = hist[seen_rows, seen_cols]
            info["ranked_items"] = int(self.env.prepared.dataset.n_items)

            def fn() -> Any:
                with torch.no_grad():
                    batch = builder.build(hist, lens, None, None, with_answer=False)
                    scores = model.score(batch.to(dev))  # [B, n_items], the full catalogue
                    exclude_items(scores, seen_rows, seen_items)  # the user's own items, as recommend does
                    pred = scores.topk(10, dim=1).indices.cpu()
                sync()
                return pred

            return fn, info

        if phase == "score":
            def fn() -> Any:
                with torch.no_grad():
                    batch = builder.build(hist, lens, cands, None, with_answer=False)
                    pred = model.score(batch.to(dev)).argmax(1).cpu()
                sync()
                return pred

            return fn, info

        max_new = int(case.max_new_tokens)
        info["max_new_tokens"] = max_new
        gen_lens: list[float] = []
        if phase == "generate_constrained":
            # the evaluation's default generate path (eval.constrained): decoding only inside the
            # candidates' titles, each row stopped at its first unique prefix (no token cap applies)
            seqs = torch.from_numpy(builder.answer_sequences(cands)).to(dev)
            info["max_new_tokens"] = int(seqs.shape[-1])

            def fn() -> Any:
                batch = builder.build(hist, lens, cands, None, with_answer=False, padding_side="left")
                res = model.generate_constrained(batch.to(dev), seqs, builder.eos_id, builder.pad_id)
                gen_lens.append(float(res.n_decoded.float().mean()))
                pred = res.choice.cpu()
                sync()
                return pred

            info["_gen_lens"] = gen_lens
            return fn, info

        def fn() -> Any:
            batch = builder.build(hist, lens, cands, None, with_answer=False, padding_side="left")
            out = model.generate(batch.to(dev), max_new, builder.eos_id, builder.pad_id)
            texts, pred = match_generated(builder, out, batch.candidates)
            o = out.cpu()
            is_eos = o == builder.eos_id
            first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((o.shape[0],), o.shape[1]))
            gen_lens.append(float(first.float().mean()))
            sync()
            return pred

        info["_gen_lens"] = gen_lens
        return fn, info


class BenchEnv:
    """Data, tokenizer, features and the current LLM; runners are created per paradigm, lazily.

    Only one model is held at a time: asking for another model key frees the current one.
    """

    def __init__(self, device: torch.device | None = None, prepared: Any = None) -> None:
        self.device = device or bench_device()
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads())
        self.prepared = prepared if prepared is not None else load_prepared()
        self.spec: ModelSpec | None = None
        self.tokenizer: Any = None
        self.llm: Any = None
        self.features: dict = {}
        self.info: dict[str, Any] = {}
        self.runners: dict[str, ParadigmRunner] = {}
        self.cpu_max_tokens = int(os.environ.get("SPEEDER_BENCH_CPU_MAX_TOKENS", CPU_MAX_PROMPT_TOKENS))
        self.failed: dict[str, str] = {}

    def use(self, spec: ModelSpec) -> None:
        if self.spec is not None and self.spec.key == spec.key:
            return
        if spec.key in self.failed:
            raise CaseSkipped(self.failed[spec.key])
        self.release()
        try:
            self.tokenizer, self.llm, self.info = load_model(spec, self.device)
            self.features = self._features()
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            self.failed[spec.key] = f"CUDA OOM loading {spec.key}: {str(e).splitlines()[0]}"
        except Exception as e:  # the first case fails visibly; later ones of this model skip
            self.failed[spec.key] = f"loading {spec.key} failed earlier: {type(e).__name__}: {e}"
            self.release()
            raise
        if spec.key in self.failed:  # raised outside the except block, so the partial model is freed
            self.release()
            raise CaseSkipped(self.failed[spec.key])
        self.spec = spec

    def _features(self) -> dict:
        from speeder_fast.config import FeatureConfig
        from speeder_fast.features import build_item_features
        from speeder_fast.model.llm import base_model

        t0 = time.perf_counter()
        fcfg = FeatureConfig(modalities=["text", "collab"], sasrec_epochs=SASREC_EPOCHS)
        raw = build_item_features(self.prepared, fcfg, (self.tokenizer, base_model(self.llm)), self.device,
                                  sasrec_overrides={"epochs": SASREC_EPOCHS, "patience": 0}, progress=False)
        feats = {m: (torch.as_tensor(x).float().cpu(), torch.as_tensor(mk).bool().cpu()) for m, (x, mk) in raw.items()}
        self.info["features"] = {m: {"dim": int(x.shape[1]), "present": float(mk.float().mean())} for m, (x, mk) in feats.items()}
        self.info["features_s"] = round(time.perf_counter() - t0, 2)
        return feats

    def runner(self, spec: ModelSpec, paradigm: str) -> ParadigmRunner:
        self.use(spec)
        if paradigm not in self.runners:
            self.runners[paradigm] = ParadigmRunner(self, spec, paradigm)
        return self.runners[paradigm]

    def release(self) -> None:
        self.runners.clear()
        self.llm = None
        self.spec = None
        free_memory(self.device)

    def prompt_token_summary(self, paradigm: str) -> dict[str, Any]:
        """Prompt-token stats of ``paradigm`` over every test user (tokenizer-only, no model)."""
        from speeder_fast.config import PromptConfig
        from speeder_fast.model import PromptBuilder

        if self.tokenizer is None:
            raise RuntimeError("no model loaded (call use() first)")
        base, mode = split_paradigm(paradigm)
        b = self.runners[paradigm].builder if paradigm in self.runners else PromptBuilder(
            self.tokenizer, self.prepared.dataset, PromptConfig(paradigm=base, answer_mode=mode),
            int(self.prepared.test_candidates.shape[1]), BUILDER_HISTORY)
        te, n = self.prepared.test, len(self.prepared.test)
        toks = []
        for s in range(0, n, 512):
            rows = np.arange(s, min(n, s + 512))
            pb = b.build(te.histories[rows], te.lengths[rows], self.prepared.test_candidates[rows], None, with_answer=False)
            toks.append(pb.prompt_tokens.numpy())
        return {"paradigm": paradigm, "users": n, **token_stats(np.concatenate(toks))}


# ----------------------------------------------------------------------------------------------
# running one case
# ----------------------------------------------------------------------------------------------
class Recorder:
    """Wraps a step function: records each call's wall time (warm-up calls dropped later)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.times: list[float] = []

    def __call__(self) -> Any:
        t0 = time.perf_counter()
        out = self.fn()
        self.times.append(time.perf_counter() - t0)
        return out


def find_max_batch(runner: ParadigmRunner, case: Case, start: int = 128, limit: int = 4096,
                   step_time_cap_s: float = 8.0) -> tuple[int, str]:
    """Largest batch (doubling from ``start``) whose training step runs; ``(batch, why it stopped)``."""
    best, why, B = 0, f"search limit {limit}", start
    while B <= limit:
        fn = None
        try:
            fn, _ = runner.make_fn(dataclasses.replace(case, batch=B))
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            why = f"CUDA OOM at batch {B}"
            fn = None
            free_memory(runner.device)
            break
        except CaseSkipped as e:
            why = f"batch {B}: {e}"
            break
        finally:
            del fn
            free_memory(runner.device)
        best = B
        if dt > step_time_cap_s:
            why = f"one step at batch {B} took {dt:.1f}s > {step_time_cap_s}s (time cap)"
            break
        B *= 2
    if best == 0:
        raise CaseSkipped(f"no batch >= {start} fits ({why})")
    return best, why


def run_case(env: BenchEnv, spec: ModelSpec, case: Case,
             timer: Callable[[Callable[[], Any], Case], None] | None = None) -> dict[str, Any]:
    """Run one case and return its record (raises :class:`CaseSkipped` when it cannot run here).

    ``timer(fn, case)`` drives the calls (pytest-benchmark's ``pedantic``); by default the case's
    warm-up + rounds are simply called in a loop. Times always come from the wall clock around
    each call (the step function synchronizes the device itself).
    """
    runner = env.runner(spec, case.paradigm)
    extra: dict[str, Any] = {}
    if case.batch == "max":
        if env.device.type != "cuda":
            raise CaseSkipped("largest-batch search is CUDA only")
        B, why = find_max_batch(runner, case)
        extra = {"max_batch_fits": B, "max_batch_stop": why}
        case = dataclasses.replace(case, batch=B)
    mem = PeakMemory(env.device)
    mem.start()
    oom = ""
    try:
        fn, info = runner.make_fn(case)
        rec = Recorder(fn)
        if timer is None:
            for _ in range(case.warmup + case.rounds):
                rec()
        else:
            timer(rec, case)
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
        oom = str(e).splitlines()[0]
    if oom:  # outside the except block: the traceback (and the tensors its frames hold) is gone
        fn = rec = None
        free_memory(env.device)
        raise CaseSkipped(f"CUDA OOM at batch {case.batch}: {oom}")
    memory = mem.stop()
    times = rec.times[case.warmup:] if len(rec.times) > case.warmup else rec.times
    gen_lens = info.pop("_gen_lens", None)
    B = int(case.batch)
    med = float(np.median(times))
    record = {
        "bench": "paradigm", "case_id": case.case_id, "model": spec.key, "model_label": spec.label,
        "weights": spec.weights, "precision": spec.precision, "dtype": compute_dtype_name(spec, env.device),
        "device": env.device.type, "card": card_name(env.device), "paradigm": case.paradigm, "phase": case.phase,
        "batch": B, "batch_kind": "max" if extra else "fixed", "history": case.history,
        "history_source": "real (<= 10)" if case.history is None else f"padded to {case.history} with real items",
        "rounds": len(times), "warmup": case.warmup, "times_s": [round(t, 6) for t in times],
        "median_s": med, "mean_s": float(np.mean(times)), "min_s": float(np.min(times)),
        "samples_per_s": B / med, "ms_per_sample": 1000 * med / B, "smoke": is_smoke(),
        **info, **memory, **extra,
    }
    if gen_lens:
        record["gen_new_tokens_mean"] = round(float(np.mean(gen_lens)), 2)
    if env.device.type == "cpu" and hasattr(os, "getloadavg"):
        record["loadavg"] = list(os.getloadavg())
    if case.phase == "train":
        free_memory(env.device)
    return record


# ----------------------------------------------------------------------------------------------
# the case plan
# ----------------------------------------------------------------------------------------------
def plan_cases(device: torch.device | None = None, smoke: bool | None = None) -> list[tuple[ModelSpec, Case]]:
    """Every case for this device, in run order (cheap, important ones first; 7B last)."""
    device = device or bench_device()
    smoke = is_smoke() if smoke is None else smoke
    out: list[tuple[ModelSpec, Case]] = []
    specs = model_specs(device, smoke)
    cuda = device.type == "cuda"
    for spec in specs:
        m = spec.key
        if smoke:
            for ph in PHASES:
                for p in PARADIGMS + (ITEM_PARADIGMS if not ph.startswith("generate") else ()):
                    out.append((spec, Case(m, ph, p, 2, rounds=1, warmup=0, max_new_tokens=4)))
            for h in LONG_HISTORIES:
                for p in ("speeder", "speeder-item", "verbose"):
                    out.append((spec, Case(m, "score", p, 1, history=h, rounds=1, warmup=0)))
            out.append((spec, Case(m, "score_compiled", "speeder", 2, rounds=1, warmup=1)))
            out.append((spec, Case(m, "recommend", "speeder-item", 2, rounds=1, warmup=0)))
            continue
        if spec.key == "smollm2-135m" and not cuda:
            # 2 shared CPU cores: small batches, few rounds (see benchmarks/RESULTS.md)
            for p in PARADIGMS + ITEM_PARADIGMS:
                out.append((spec, Case(m, "train", p, 2, rounds=3 if p.startswith("speeder") else 2, warmup=1)))
            for p in PARADIGMS + ITEM_PARADIGMS:
                out.append((spec, Case(m, "score", p, 1, rounds=3, warmup=1)))
            out.append((spec, Case(m, "recommend", "speeder-item", 16, rounds=3, warmup=1)))
            for p in PARADIGMS:
                out.append((spec, Case(m, "generate_constrained", p, 1, rounds=2, warmup=1)))
            for p in PARADIGMS:
                out.append((spec, Case(m, "generate", p, 1, rounds=2, warmup=1, max_new_tokens=16)))
            for h in LONG_HISTORIES:
                for p in ("speeder", "speeder-item", "verbose"):
                    slow = p == "verbose" and h > MAX_HISTORY  # ~6000 tokens: ~20 s per forward
                    out.append((spec, Case(m, "score", p, 1, history=h, rounds=1 if slow else 2, warmup=1)))
            continue
        if spec.key == "smollm2-135m":
            for B in (16, 64):
                for p in PARADIGMS + ITEM_PARADIGMS:
                    out.append((spec, Case(m, "train", p, B, rounds=5, warmup=2)))
            for B in (1, 64):
                for p in PARADIGMS + ITEM_PARADIGMS:
                    out.append((spec, Case(m, "score", p, B, rounds=10 if B == 1 else 5, warmup=2)))
            # static shapes + CUDA graphs (eval.compile=reduce-overhead); 3 warm-up calls: compile,
            # cudagraph warm-up run, graph capture; then replays are timed
            # (speeder only: each compile of the 30-layer model costs tens of seconds of the budget)
            for B in (1, 64):
                out.append((spec, Case(m, "score_compiled", "speeder", B, rounds=10 if B == 1 else 5, warmup=3)))
            out.append((spec, Case(m, "recommend", "speeder-item", 64, rounds=5, warmup=2)))
            for B in (1, 64):
                for p in PARADIGMS:
                    out.append((spec, Case(m, "generate_constrained", p, B, rounds=3, warmup=1)))
                    out.append((spec, Case(m, "generate", p, B, rounds=3, warmup=1, max_new_tokens=32)))
            for h in LONG_HISTORIES:
                for p in ("speeder", "speeder-item", "verbose"):
                    out.append((spec, Case(m, "train", p, 16, history=h, rounds=3, warmup=1)))
                    out.append((spec, Case(m, "score", p, 16, history=h, rounds=3, warmup=1)))
            continue
        # 7B NF4 (CUDA only; on CPU the cases are collected and skipped with the reason)
        for p in PARADIGMS + ("speeder-item",):
            out.append((spec, Case(m, "train", p, 16, rounds=3, warmup=1)))
        for B in (1, 16):
            for p in PARADIGMS + ("speeder-item",):
                out.append((spec, Case(m, "score", p, B, rounds=3, warmup=1)))
        for p in PARADIGMS:
            out.append((spec, Case(m, "generate", p, 16, rounds=2, warmup=1, max_new_tokens=16)))
        for h in LONG_HISTORIES:
            for p in ("speeder", "verbose"):
                out.append((spec, Case(m, "score", p, 4, history=h, rounds=2, warmup=1)))
    if cuda and not smoke:
        # largest batch that fits: last, so that a tight time budget drops these first
        small = next(s for s in specs if s.key == "smollm2-135m")
        for p in PARADIGMS + ("speeder-item",):
            out.append((small, Case(small.key, "train", p, "max", rounds=2, warmup=1)))
    return out


def write_summary(path: str | Path, records: list[dict], skipped: list[dict], meta: dict,
                  token_summary: dict | None = None) -> dict:
    """Collector JSON: records, skips, ratios (``report.compute_ratios``), prompt-token stats, environment."""
    from report import compute_ratios
    from speeder_fast.utils import atomic_write_json

    if hasattr(os, "getloadavg"):
        meta = {**meta, "loadavg_end": list(os.getloadavg())}
    out = {"kind": "speeder_paradigm_bench", "meta": meta, "records": records, "skipped": skipped,
           "ratios": compute_ratios(records), "token_summary": token_summary or {}}
    atomic_write_json(path, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the plan without pytest: ``python benchmarks/bench_paradigms.py --out FILE [--only SUBSTR]``."""
    import argparse

    ap = argparse.ArgumentParser(description="paradigm benchmarks without pytest")
    ap.add_argument("--out", default="runs/bench/paradigms_summary.json")
    ap.add_argument("--only", default="", help="run cases whose id contains this substring")
    ap.add_argument("--smoke", action="store_true", help="tiny model, one round")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["SPEEDER_BENCH_SMOKE"] = "1"
    device = bench_device()
    env = BenchEnv(device)
    meta = environment_info(device)
    records, skipped, tokens = [], [], {}
    for spec, case in plan_cases(device):
        if args.only and args.only not in case.case_id:
            continue
        if spec.gpu_only and device.type != "cuda":
            skipped.append({"case_id": case.case_id, "why": "GPU only"})
            continue
        try:
            r = run_case(env, spec, case)
        except CaseSkipped as e:
            skipped.append({"case_id": case.case_id, "why": str(e)})
            print(f"skip {case.case_id}: {e}", flush=True)
            continue
        records.append(r)
        if case.paradigm not in tokens:
            tokens[case.paradigm] = env.prompt_token_summary(case.paradigm)
        print(f"{case.case_id:45s} {1000 * r['median_s']:10.1f} ms  {r['samples_per_s']:8.2f} samples/s  "
              f"prompt {r['prompt_tokens_mean']} tok", flush=True)
    write_summary(args.out, records, skipped, meta, tokens)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
