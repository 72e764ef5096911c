"""Configuration: one dataclass tree, loadable from TOML, overridable with ``--set a.b=c``.

Every field has a default, so ``python -m speeder_fast.train`` with no arguments runs the
embedded default (SmolLM2-135M on MovieLens-100K, paradigm ``speeder``). Each section is owned by
one part of the library; a field's help text is the ``metadata["help"]`` entry, which the CLI
prints with ``--help-config``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from speeder_fast.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# ---- every set of choices, defined once: validate(), the CLIs' argparse ``choices`` and the modules
# that dispatch on a value all read these tuples
#: ``prompt.paradigm`` values: title + description per item, titles only (LLaRA-like), MRC soft tokens
PARADIGMS = ("verbose", "titles", "speeder")
#: ``prompt.answer_mode`` values: LLaRA label scoring, LLaRA title generation, the next-item head
ANSWER_MODES = ("score", "generate", "item")
#: ``features.modalities`` / ``train.stages[i].modalities`` values
MODALITIES = ("text", "image", "collab")
#: ``model.precision`` values (nf4 = QLoRA: 4-bit NF4 base, double quantization)
PRECISIONS = ("fp32", "bf16", "nf4")
#: ``device`` values
DEVICES = ("auto", "cpu", "cuda")
#: ``model.use_kernels`` values = the kernels' ``force`` argument (``speeder_fast.kernels`` imports it)
KERNEL_CHOICES = ("auto", "triton", "torch")
#: ``model.attn_impl`` values (see :mod:`speeder_fast.model.attention`)
ATTN_IMPLS = ("auto", "flash", "varlen", "sdpa", "eager")
#: ``model.liger``, ``train.packing`` and ``data.drop_duplicates`` values
AUTO_ON_OFF = ("auto", "on", "off")
#: ``model.head_similarity`` / ``model.head_bias_init`` values (answer_mode=item)
HEAD_SIMILARITIES = ("cosine", "dot")
HEAD_BIAS_INITS = ("zeros", "popularity")
#: ``model.head_keys`` values (answer_mode=item; see :mod:`speeder_fast.model.item_head`)
HEAD_KEYS = ("mixture", "experts")
#: ``model.user_state`` values (see :mod:`speeder_fast.model.user_state`)
USER_STATES = ("none", "sasrec")
#: ``model.sasrec_fusion`` values (see :mod:`speeder_fast.model.fusion`)
SASREC_FUSIONS = ("off", "auto", "fixed")
#: SASRec's window (``SASRecConfig.max_len``): the longest history ``model.user_state=sasrec`` reads
USER_STATE_MAX_HISTORY = 50
#: ``train.item_loss`` / ``train.item_sampling`` values (answer_mode=item)
ITEM_LOSSES = ("auto", "full", "sampled")
ITEM_SAMPLINGS = ("uniform", "popularity")
#: ``train.score_loss`` values (score mode)
SCORE_LOSSES = ("labels", "vocab")
#: ``train.report_to`` values: JSONL only, or JSONL + TensorBoard event files
REPORT_TO = ("none", "tensorboard")
#: ``features.store_dtype`` values
STORE_DTYPES = ("float16", "float32")
#: evaluation splits (``eval.split``, the CLIs' ``--split``)
SPLITS = ("valid", "test")
#: ``eval.checkpoint`` values: the weights the train CLI's final evaluation scores
EVAL_CHECKPOINTS = ("best", "final")
#: ``eval.compile`` values (see :mod:`speeder_fast.model.static`)
COMPILE_MODES = ("off", "auto", "static", "default", "reduce-overhead", "max-autotune")


def one_of(choices: tuple[str, ...]) -> str:
    """``"a, b or c"``: how messages list a set of choices."""
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    source: str = _f("ml-100k", "dataset: 'ml-100k' (bundled via PyPI), a RecBole atomic folder "
                     "(NAME.inter/NAME.item), or a folder of raw Amazon 2018 (*.json[.gz]) / 2023 (*.jsonl[.gz]) files")
    user_kcore: int = _f(5, "drop users with fewer interactions (iterated with item_kcore until stable; 0 = off)")
    item_kcore: int = _f(0, "drop items with fewer interactions (0 = off, the default: the shipped sets are "
                         "already filtered and item 5-core would drop 66% of amazon-office's events; use 5 "
                         "for raw Amazon dumps)")
    drop_consecutive_duplicates: bool = _f(False, "drop an event whose item equals the user's previous item")
    drop_duplicates: str = _f("auto", "drop exact duplicate interactions (same user, item and timestamp, anywhere in "
                              "the sequence; the first is kept, the count is in the statistics): auto (on for raw "
                              "Amazon reviews, off for RecBole atomic files and ml-100k) | on | off")
    max_history: int = _f(10, "max history items per example (sliding-window length H)")
    n_candidates: int = _f(20, "candidates per evaluation example (target + N-1 never-interacted items)")
    seed: int = _f(42, "seed for candidate sampling (persisted) and training candidates (per epoch)")
    max_users: int = _f(0, "keep only the first N users after filtering (0 = all); a documented subset")
    max_train_examples: int = _f(0, "cap on sliding-window training examples (0 = all; keeps the most recent)")
    last_window_only: bool = _f(False, "answer_mode=item: train on each user's last sequence window only (the one "
                                "whose target is the last training item; with train.item_all_positions=false, one "
                                "target per user: the transition features.sasrec_holdout keeps from the collab encoder)")
    min_user_events: int = _f(3, "users with fewer events after filtering are skipped (leave-one-out needs 3)")
    cache_dir: str = _f("", "processed-data cache (default $SPEEDER_CACHE/data)")


@dataclass
class FeatureConfig:
    modalities: list = _f(["text", "collab"], "modalities to use: any of text, image, collab")
    text_encoder: str = _f("llm", "'llm' (mean of the LLM input embeddings; no forward pass), 'llm-hidden' (mean-pooled "
                           "LLM hidden states at text_hidden_layer), 'minilm' (all-MiniLM-L6-v2, offline asset, "
                           "384-d, L2-normalised) or a local sentence-encoder folder. Measured next-item signal "
                           "(docs/features.md 'Text encoders: measured'; amazon-office kNN NDCG@10 / trained-probe "
                           "NDCG@10, CPU s per 1k items at 1 thread): llm 0.078 / 0.101, 0.3 s; llm-hidden (layer 1) "
                           "0.085 / 0.099, 9.5 s; minilm 0.096 / 0.105, 31 s")
    text_hidden_layer: int = _f(1, "text_encoder 'llm-hidden': layer whose hidden states are mean-pooled (0 = embeddings, "
                                "L = last after the final norm, negative counts from the end); 1 = best on amazon-office "
                                "validation (kNN and trained probe), layers 0-30 all within 0.073-0.085 kNN NDCG@10")
    text_template: str = _f("{title}. {brand}. {categories}. {description}",
                            "item text template; fields: title, description, brand, categories, any extra field")
    text_max_tokens: int = _f(128, "max tokens of item text fed to the text encoder")
    image_source: str = _f("", "folder of images named by item id, a CSV item_id,path, or a .npy/.safetensors feature file")
    image_encoder: str = _f("", "CLIP vision encoder path/HF id for image files")
    sasrec_epochs: int = _f(30, "SASRec training epochs for the collaborative modality")
    sasrec_dim: int = _f(64, "SASRec hidden size")
    sasrec_holdout: int = _f(0, "collab features (and model.user_state) from a SASRec trained on every sequence "
                             "without its last N training items (sequence[:-2-N]), so the transitions into them are "
                             "unseen by the collab item table (it remembers the ones it trained on; "
                             "benchmarks/sasrec_leakage_check.py); the SASRec reference row is still trained on "
                             "sequence[:-2]; 0 = off (one SASRec for both)")
    sasrec_crossfit: int = _f(0, "K >= 2: cross-fitted collab features for training. Users are split into K seeded "
                              "folds, one SASRec per fold trains on the other folds' sequences, each is aligned to the "
                              "reference SASRec's item table (orthogonal Procrustes), and every batch (one fold) "
                              "reads the table that never saw its users, in training and in scoring (validation, "
                              "test, recommend), so no target the LLM trains on was seen by its collab features; "
                              "the reference SASRec still gives the reference row and model.sasrec_fusion; "
                              "item mode only; 0 = off")
    store_dtype: str = _f("float16", "feature store dtype: float16 or float32")


@dataclass
class ModelConfig:
    llm: str = _f("smollm2-135m", "HF causal-LM id or local path; 'smollm2-135m' = the offline bundled asset")
    precision: str = _f("fp32", "fp32 | bf16 | nf4 (QLoRA: 4-bit NF4 base, double quantization)")
    lora_r: int = _f(8, "LoRA rank (0 = no LoRA, base frozen)")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_targets: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                            "module names LoRA adapts")
    n_item_tokens: int = _f(1, "k: soft tokens per item (MRC)")
    expert_hidden: int = _f(256, "hidden size of each modality expert MLP")
    per_token_gate: bool = _f(False, "one gate per item token (k > 1) instead of one per item")
    modality_dropout: float = _f(0.0, "training only: probability of dropping each present modality of an item "
                                 "from the MoME mixture (ModDrop; an item never loses all of them); 0 = off")
    spae_absolute: bool = _f(True, "SPAE: add learned absolute history-position embeddings")
    spae_relative: bool = _f(True, "SPAE: add learned recency (distance from newest) embeddings")
    spae_ordinal_text: bool = _f(False, "SPAE: write textual ordinal markers ('1st', '2nd', ...) in the prompt")
    max_positions: int = _f(256, "size of the absolute/relative position tables (>= max_history)")
    use_kernels: str = _f("auto", "auto (Triton on CUDA, torch on CPU) | triton | torch")
    attn_impl: str = _f("auto", "auto | flash | varlen | sdpa | eager")
    liger: str = _f("auto", "auto (on CUDA for supported architectures) | on | off")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward")
    head_similarity: str = _f("cosine", "answer_mode=item: cosine (query and item vectors L2-normalised, times a "
                              "learned inverse temperature) | dot")
    head_keys: str = _f("experts", "answer_mode=item: what the head scores items against: experts (late fusion: "
                        "each modality expert's own vector scored separately, the scores summed; with one "
                        "modality this is the mixture) | mixture (the MRC tokens, the MoME output the prompt "
                        "also uses)")
    head_temperature: float = _f(0.07, "answer_mode=item, cosine: initial temperature of the item logits (learned)")
    head_projection: bool = _f(True, "answer_mode=item: a learned H x H projection of the LLM hidden state before "
                               "scoring the items")
    head_item_bias: bool = _f(True, "answer_mode=item: a learned per-item logit bias (it absorbs popularity)")
    head_bias_init: str = _f("popularity", "answer_mode=item: initial item bias, zeros | popularity (log of the "
                             "training counts + 1, centred: the head starts as the popularity ranking)")
    head_collab_dot: bool = _f(False, "answer_mode=item with the collab modality: one more head block, a plain dot "
                               "product of a learned map of the hidden state (zero at init) with the raw SASRec item "
                               "embeddings (SASRec's own scoring geometry), added to the item logits")
    user_state: str = _f("none", "none | sasrec: add the run's frozen SASRec state at each history position (a "
                         "function of the items up to it), through a learned projection (zero at init), to that "
                         "item's soft tokens; speeder paradigm with the collab modality, while collab is active")
    sasrec_fusion: str = _f("off", "off | auto | fixed: answer_mode=item, speeder paradigm with the collab modality: "
                            "when scoring (evaluate, recommend; never in the training loss) add w x the log-softmax "
                            "of the run's reference SASRec (RUN/sasrec.safetensors, on the prompt's history) to the "
                            "head's log-softmax. auto: w picked on the validation split after training (grid "
                            "0..3, best full-catalogue NDCG@10; RUN/sasrec_fusion.json); fixed: "
                            "model.sasrec_fusion_weight")
    sasrec_fusion_weight: float = _f(0.5, "model.sasrec_fusion=fixed: the weight w (>= 0) of SASRec's log-softmax")


@dataclass
class PromptConfig:
    paradigm: str = _f("speeder", " | ".join(PARADIGMS))
    answer_mode: str = _f("item", "score (LLaRA label protocol: label-token logits rank the candidates listed in the "
                          "prompt) | generate (LLaRA: greedy title) | item (next-item head: the hidden state after "
                          "each history item scores the whole catalogue against the MRC item vectors; no "
                          "candidates in the prompt, every history position is trained, SASRec-style)")
    description_tokens: int = _f(128, "verbose paradigm: description token budget per history item")
    title_tokens: int = _f(32, "max tokens of a title")
    item_instruction: str = _f("User history, oldest first:",
                               "answer_mode=item: the text before the history lines (replaces `system` and "
                               "`history_header`; short on purpose: every token of it is computed for every "
                               "training example)")
    system: str = _f("You are a recommender. Given the items a user interacted with, in order, pick the item "
                     "they will interact with next from the candidates.", "instruction text")
    history_header: str = _f("History (oldest to newest):", "text before the history")
    candidates_header: str = _f("Candidates:", "text before the candidates")
    answer_prefix: str = _f("Answer:", "text before the answer")
    history_item: str = _f("{ordinal}{item}\n", "one history line; {item} = the item (inserted with a leading "
                           "space), {ordinal} = ordinal_format when model.spae_ordinal_text else ''")
    ordinal_format: str = _f("{ordinal} item:", "textual ordinal cue; {ordinal} = 1st, 2nd, ... (oldest first)")
    candidate_item: str = _f("{label}.{item}\n", "one candidate line; {label} = the candidate's label token")
    verbose_item: str = _f("{title}. Description:{description}", "verbose paradigm item text; {title} and "
                           "{description} are inserted with a leading space")
    labels: list = _f([], "candidate label strings (each must be one token, written with a leading space: ' A'); "
                          "empty = ' A', ' B', ... (letters, then added special tokens if not single tokens)")


@dataclass
class StageConfig:
    modalities: list = _f(["text"], "modalities active in this stage")
    epochs: float = _f(1.0, "epochs (fractions allowed)")
    max_steps: int = _f(0, "cap on optimizer steps (0 = from epochs)")
    lr: float = _f(2e-4, "peak learning rate")
    freeze_previous_experts: bool = _f(False, "freeze experts trained in earlier stages")
    train_lora: bool = _f(True, "train LoRA in this stage")
    curriculum_ramp: float = _f(0.0, "fraction of the stage over which hybrid prompts ramp from 0 to 100% "
                                     "(the rest are text-only prompts); 0 = off")


@dataclass
class TrainConfig:
    stages: list = _f([], "MPO stages (list of StageConfig tables); empty = one stage per modality "
                          "in features.modalities order, cumulative")
    batch_size: int = _f(8, "micro-batch size (examples)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_tokens_per_batch: int = _f(0, "if > 0, micro-batches are sized by tokens, not examples")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.05, "linear warmup fraction of each stage")
    grad_clip: float = _f(1.0, "max gradient norm (0 = off)")
    adapter_lr_scale: float = _f(1.0, "learning-rate multiplier for the MoME, SPAE and item-head parameters (LoRA "
                                      "keeps the stage lr); 1 with the late-fusion head: 5 was level on ML-100K and "
                                      "below 1 on amazon-office (docs/speeder.md)")
    eval_every: int = _f(0, "evaluate on validation every N steps (0 = at stage ends)")
    eval_max_examples: int = _f(200, "validation examples used for periodic evaluation (0 = all)")
    checkpoint_every: int = _f(0, "checkpoint every N steps (0 = stage ends only)")
    keep_checkpoints: int = _f(2, "keep the last K step checkpoints (plus best)")
    log_every: int = _f(10, "log metrics every N steps")
    report_to: str = _f("none", "where training curves go besides RUN/metrics.jsonl: none | tensorboard (event files "
                                "in RUN/tensorboard/, needs the tensorboard package: pip install tensorboard)")
    packing: str = _f("auto", "auto | on | off: padding-free packing of examples")
    prefix_share: bool = _f(False, "run the fixed instruction prefix once per training forward ([1, P] with "
                                   "gradients, broadcast over the batch) instead of once per example: the same loss "
                                   "and gradients (with LoRA dropout > 0 the prefix shares one dropout mask); not with "
                                   "gradient checkpointing (transformers drops caches there)")
    item_loss: str = _f("auto", "answer_mode=item training loss: full (softmax over the whole catalogue, logits "
                                "chunked by item_logit_chunk) | sampled (sampled softmax with logQ correction, "
                                "item_negatives shared negatives per step) | auto (full up to item_full_max items)")
    item_full_max: int = _f(50000, "item_loss=auto: catalogues with more items use the sampled softmax")
    item_negatives: int = _f(8192, "item_loss=sampled: negatives drawn per step (with replacement, shared by all "
                                   "positions of the step; accidental hits of the target are masked)")
    item_sampling: str = _f("uniform", "item_loss=sampled: proposal distribution Q, uniform | popularity "
                                       "(training counts + 1); logits are corrected by -log(item_negatives * Q)")
    item_logit_chunk: int = _f(16384, "answer_mode=item: catalogue items per logit chunk in the full softmax "
                                      "(memory ~ positions x chunk, never positions x catalogue)")
    item_all_positions: bool = _f(True, "answer_mode=item: every history slot predicts the next item (SASRec "
                                        "objective); false = only the last position (one signal per window)")
    item_modality_loss: float = _f(1.0, "answer_mode=item with model.head_keys=experts and >= 2 modalities: weight "
                                        "of one extra softmax loss per modality on that modality's score alone, so "
                                        "each modality must rank the catalogue by itself; 0 = off")
    score_loss: str = _f("labels", "score mode training loss: 'labels' = cross-entropy over the N candidate label "
                                   "logits (what score() ranks), 'vocab' = full-vocabulary cross-entropy on the label token")


@dataclass
class EvalConfig:
    split: str = _f("test", "valid | test")
    max_examples: int = _f(0, "evaluate at most N examples (0 = all)")
    batch_size: int = _f(16, "evaluation batch size")
    generate_max_tokens: int = _f(48, "generate mode: max new tokens")
    checkpoint: str = _f("best", "which weights the final evaluation of `speeder_fast.train` scores: best (the "
                                 "checkpoint with the best validation metric: full-ranking NDCG@10 in item mode, "
                                 "candidate NDCG@10 in score mode, VHR@1 in generate mode; RecBole's convention) | final")
    compile: str = _f("off", "score mode on static shapes (speeder_fast.model.static): off | auto (reduce-overhead "
                             "on CUDA, off on CPU) | static (padded shapes, eager) | default | reduce-overhead "
                             "(CUDA graphs) | max-autotune (torch.compile modes)")
    length_multiple: int = _f(16, "eval.compile != off: prompts are padded to a multiple of this many tokens "
                                  "(one compiled graph per length bucket)")
    constrained: bool = _f(True, "generate mode: decode only continuations inside a candidate's title (prefix "
                                 "trie, logits masked to the allowed tokens) and stop at the first prefix that names "
                                 "one candidate: ValidRatio = 1, a few tokens per answer; false = the plain LLaRA "
                                 "protocol (free greedy text up to generate_max_tokens, string-matched to titles)")
    prefix_cache: bool = _f(True, "inference (evaluation, validation, recommend, generation): compute the keys/values "
                                  "of the fixed instruction that starts every prompt once per model state and run the "
                                  "decoder only on the rest of each prompt (same results to fp32 rounding); false = "
                                  "recompute it for every example")


@dataclass
class Config:
    seed: int = _f(0, "global seed (torch, numpy, python)")
    output_dir: str = _f("runs", "where runs are written (a timestamped subfolder unless run_name is set)")
    run_name: str = _f("", "run folder name (default: timestamp + paradigm)")
    device: str = _f("auto", " | ".join(DEVICES))
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert ``value`` (from TOML or a ``--set`` string) to the field type, or raise ConfigError."""
    if isinstance(typ, str):
        typ = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}.get(typ, typ)
    origin = typing.get_origin(typ) or typ
    if isinstance(value, str) and origin is not str:
        text = value.strip()
        if origin is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        if origin is list:
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = [p.strip() for p in text.split(",") if p.strip()]
            value = parsed
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: cannot parse {value!r} as {getattr(origin, '__name__', origin)}") from e
    if origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if origin is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    return value


#: keys older versions wrote to ``config.toml`` that no longer exist: ignored (with a log line) so that
#: their runs still resume and evaluate; anywhere else an unknown key is an error
REMOVED_KEYS = {"train.num_workers": "it was never read (batches are built in the training process)"}


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Set the fields of dataclass ``obj`` from the (nested) table ``data`` (keys under ``prefix``).

    Raises:
        ConfigError: an unknown key (naming the valid ones), a table where a value belongs, or a value
            of the wrong type.
    """
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in REMOVED_KEYS:
            import logging

            logging.getLogger("speeder_fast.config").info("config key %s is ignored: %s", full, REMOVED_KEYS[full])
            continue
        if key not in names:
            close = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {full!r} (valid here: {close})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a table, got {value!r}")
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, names[key].type, full))


def set_override(cfg: Config, assignment: str) -> None:
    """Apply one ``a.b=c`` override (value parsed as JSON when possible, else as a string)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    nested: dict = {}
    cur = nested
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = raw
    _apply(cfg, nested)


def read_toml(path: str | Path) -> dict:
    """Parse a TOML config file (UTF-8; a byte-order mark is allowed); a missing file, bytes that are
    not UTF-8 or bad TOML is a ConfigError naming the file (and the line)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {p}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        obj = bytes(e.object)  # without the byte-order mark, which e.start is relative to
        line = obj[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: byte 0x{obj[e.start]:02x} is not UTF-8 (save the file as UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e


def normalise_stages(cfg: Config) -> None:
    """Turn ``train.stages`` tables (from TOML or ``--set``) into StageConfig objects, checking keys."""
    stages = []
    for i, st in enumerate(cfg.train.stages):
        if isinstance(st, StageConfig):
            stages.append(st)
            continue
        if not isinstance(st, dict):
            raise ConfigError(f"train.stages[{i}]: expected a table, got {st!r}")
        s = StageConfig()
        _apply(s, st, f"train.stages[{i}].")
        stages.append(s)
    cfg.train.stages = stages


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path:
        _apply(cfg, read_toml(path))
    for o in overrides or []:
        set_override(cfg, o)
    normalise_stages(cfg)
    validate(cfg)
    return cfg


#: keys added after some run folders were written, with the value such a run was trained with: a
#: run's ``config.toml`` lists every key of its time, so a missing one means "before it existed"
RUN_KEYS_ADDED: dict[tuple[str, str], Any] = {
    ("model", "head_keys"): "mixture",  # late fusion became the default on 2026-12-01
    ("train", "item_modality_loss"): 0.0,
    ("model", "modality_dropout"): 0.0,
    ("model", "user_state"): "none",
    ("model", "head_collab_dot"): False,
    ("model", "sasrec_fusion"): "off",
    ("model", "sasrec_fusion_weight"): 0.5,
    ("data", "last_window_only"): False,
    ("features", "sasrec_holdout"): 0,
    ("features", "sasrec_crossfit"): 0,
}


def load_run_config(path: str | Path) -> Config:
    """The config of a run folder's ``config.toml``: :func:`load_config`, except that a key in
    :data:`RUN_KEYS_ADDED` the file lacks takes the value the run was trained with, not today's
    default (so older runs reload with the head they were trained with).

    Raises:
        ConfigError: as :func:`load_config`.
    """
    raw = read_toml(path)
    cfg = load_config(path)
    for (section, key), value in RUN_KEYS_ADDED.items():
        if key not in (raw.get(section) or {}):
            setattr(getattr(cfg, section), key, value)
    validate(cfg)
    return cfg


#: (key, choices) of every field with a fixed set of values, checked by :func:`validate`
CHOICE_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("device", DEVICES),
    ("data.drop_duplicates", AUTO_ON_OFF),
    ("features.store_dtype", STORE_DTYPES),
    ("model.precision", PRECISIONS),
    ("model.use_kernels", KERNEL_CHOICES),
    ("model.attn_impl", ATTN_IMPLS),
    ("model.liger", AUTO_ON_OFF),
    ("model.head_similarity", HEAD_SIMILARITIES),
    ("model.head_bias_init", HEAD_BIAS_INITS),
    ("model.head_keys", HEAD_KEYS),
    ("model.user_state", USER_STATES),
    ("model.sasrec_fusion", SASREC_FUSIONS),
    ("prompt.paradigm", PARADIGMS),
    ("prompt.answer_mode", ANSWER_MODES),
    ("train.packing", AUTO_ON_OFF),
    ("train.score_loss", SCORE_LOSSES),
    ("train.item_loss", ITEM_LOSSES),
    ("train.item_sampling", ITEM_SAMPLINGS),
    ("train.report_to", REPORT_TO),
    ("eval.split", SPLITS),
    ("eval.checkpoint", EVAL_CHECKPOINTS),
    ("eval.compile", COMPILE_MODES),
)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


#: Named presets: lists of ``--set`` assignments applied before the config file (:func:`resolve`).
PRESETS: dict[str, list[str]] = {
    # ~10 min budget on 2 CPU cores (measured: README "Default run"): 300 users of ML-100K, every
    # training window (all-position next-item loss), the next-item head (answer_mode=item), MiniLM
    # item text + SASRec (20 epochs) item vectors, one text+collab stage of 150 steps x 16 at lr 1e-3
    # (LoRA dropout off: its CPU RNG costs ~25% of a step), validation on 100 users at the stage end,
    # 200 test users evaluated (20 persisted candidates + the full catalogue). The one recipe for every
    # dataset (docs/speeder.md, "Cross-fitted collab features"): collab features cross-fitted over 4
    # user folds and the scores fused with SASRec (weight picked on validation); both are left off for
    # runs that cannot use them (another paradigm, a label head: resolve())
    "quick": [
        "data.max_users=300",
        "data.max_train_examples=0",
        "features.sasrec_epochs=20",
        "features.sasrec_crossfit=4",
        "model.sasrec_fusion=auto",
        "features.text_encoder=minilm",
        'train.stages=[{"modalities": ["text", "collab"], "max_steps": 150, "lr": 1e-3}]',
        "train.batch_size=16",
        "model.lora_dropout=0.0",
        "train.eval_max_examples=100",
        "eval.max_examples=200",
        "eval.batch_size=16",
    ],
    "none": [],
}


def resolve(preset: str | None = None, toml: str | Path | None = None, sets: Sequence[str] = ()) -> Config:
    """A run's configuration: the preset, then the TOML file, then the ``a.b=c`` assignments (later wins).

    The file's keys win over the preset's (its tables are applied on top); stage tables become
    :class:`StageConfig` objects; the ``verbose``/``titles`` paradigms keep only the first stage (their
    budget is the first stage's); then :func:`validate`. ``python -m speeder_fast.train`` resolves its
    ``--preset``, ``--config``, shortcuts and ``--set`` through this function.

    Args:
        preset: a name of :data:`PRESETS` (None = ``"none"``).
        toml: a TOML config file (UTF-8), or None.
        sets: ``key=value`` assignments (values parsed as JSON when possible; see :func:`set_override`).

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: an unknown preset, a missing/unreadable file, an unknown key, a bad value (all
            problems of :func:`validate` at once).
    """
    name = preset or "none"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (use {one_of(tuple(sorted(PRESETS)))})")
    cfg = Config()
    for s in PRESETS[name]:
        set_override(cfg, s)
    from_preset = {k: _get(cfg, k) for k in SPEEDER_ITEM_ONLY}
    if toml:
        raw = read_toml(toml)
        _apply(cfg, raw)
        for k in SPEEDER_ITEM_ONLY:
            section, key = k.split(".")
            if isinstance(raw.get(section), dict) and key in raw[section]:
                from_preset.pop(k, None)  # chosen by the file
    for s in sets:
        set_override(cfg, s)
        from_preset.pop(s.split("=", 1)[0].strip(), None)  # chosen by --set
    normalise_stages(cfg)
    if cfg.prompt.paradigm != "speeder" and len(cfg.train.stages) > 1:
        cfg.train.stages = cfg.train.stages[:1]
    _drop_inapplicable_preset_keys(cfg, from_preset)
    validate(cfg)
    return cfg


#: preset keys that only apply to some runs: a preset's value the file and ``--set`` left alone is
#: turned off where the resolved run cannot use it (see :func:`_inapplicable`), instead of failing
SPEEDER_ITEM_ONLY = ("features.sasrec_crossfit", "model.sasrec_fusion")


def _speeder_item_collab(cfg: Config) -> bool:
    """True for a speeder-paradigm, item-mode run with the collab modality (what cross-fitting and the
    SASRec fusion need)."""
    return (cfg.prompt.paradigm == "speeder" and cfg.prompt.answer_mode == "item"
            and "collab" in cfg.features.modalities)


def _crossfit_clashes(cfg: Config) -> list[str]:
    """The options of ``cfg`` that cannot go with ``features.sasrec_crossfit`` (each reads one collab
    table for every training example, or plans batches across folds)."""
    return [name for name, on in (("features.sasrec_holdout", cfg.features.sasrec_holdout > 0),
                                  ("model.user_state=sasrec", cfg.model.user_state == "sasrec"),
                                  ("model.head_collab_dot", cfg.model.head_collab_dot),
                                  ("train.max_tokens_per_batch", cfg.train.max_tokens_per_batch > 0)) if on]


def _inapplicable(cfg: Config, key: str) -> str:
    """Why ``key`` (of :data:`SPEEDER_ITEM_ONLY`) cannot apply to ``cfg`` ("" when it can)."""
    if not _speeder_item_collab(cfg):
        return "it needs speeder prompts, answer_mode=item and the collab modality"
    clash = _crossfit_clashes(cfg) if key == "features.sasrec_crossfit" else []
    if clash:
        return f"the run sets {', '.join(clash)}"
    if key == "model.sasrec_fusion" and cfg.data.max_history > USER_STATE_MAX_HISTORY:
        return f"data.max_history > {USER_STATE_MAX_HISTORY}"
    return ""


def _drop_inapplicable_preset_keys(cfg: Config, from_preset: dict[str, Any]) -> None:
    """Turn off (to the :class:`Config` default) each :data:`SPEEDER_ITEM_ONLY` value in ``from_preset``
    (the preset's values of the keys neither the file nor ``--set`` named) that cannot apply to the
    resolved run (e.g. the ``quick`` preset's cross-fitting with ``--paradigm titles``); a value
    chosen explicitly still fails :func:`validate` with its reason."""
    default = Config()
    for key, value in from_preset.items():
        if value == _get(default, key):
            continue
        why = _inapplicable(cfg, key)
        if why:
            section, field_name = key.split(".")
            setattr(getattr(cfg, section), field_name, _get(default, key))
            logging.getLogger("speeder_fast.config").info("preset setting %s=%s left off: %s", key, value, why)


def validate(cfg: Config) -> None:
    """Cheap checks before any heavy work; one clear message per problem.

    Raises:
        ConfigError: listing every problem found (each names its key).
    """
    errs = []
    for m in cfg.features.modalities:
        if m not in MODALITIES:
            errs.append(f"features.modalities: unknown modality {m!r} (use {list(MODALITIES)})")
    for i, st in enumerate(cfg.train.stages):
        for m in st.modalities:
            if m not in MODALITIES:
                errs.append(f"train.stages[{i}].modalities: unknown modality {m!r}")
    if cfg.train.item_modality_loss < 0:
        errs.append(f"train.item_modality_loss must be >= 0, got {cfg.train.item_modality_loss}")
    if not 0.0 <= cfg.model.modality_dropout < 1.0:
        errs.append(f"model.modality_dropout must be in [0, 1), got {cfg.model.modality_dropout}")
    if not cfg.model.head_temperature > 0:
        errs.append(f"model.head_temperature must be > 0, got {cfg.model.head_temperature}")
    for key in ("item_full_max", "item_negatives", "item_logit_chunk"):
        if getattr(cfg.train, key) < 1:
            errs.append(f"train.{key} must be >= 1, got {getattr(cfg.train, key)}")
    if cfg.data.max_history < 1:
        errs.append("data.max_history must be >= 1")
    if cfg.model.max_positions < cfg.data.max_history:
        errs.append(f"model.max_positions ({cfg.model.max_positions}) < data.max_history ({cfg.data.max_history})")
    if cfg.model.head_collab_dot and (cfg.prompt.answer_mode != "item" or "collab" not in cfg.features.modalities
                                      or cfg.prompt.paradigm != "speeder"):
        errs.append("model.head_collab_dot needs prompt.answer_mode=item, prompt.paradigm=speeder and the collab "
                    f"modality (got {cfg.prompt.answer_mode}, {cfg.prompt.paradigm}, {cfg.features.modalities})")
    # the features that read the run's SASRec on the prompt's history: its collab modality, its window
    sasrec_readers = ([("model.user_state=sasrec", False)] if cfg.model.user_state == "sasrec" else []) + (
        [("model.sasrec_fusion", True)] if cfg.model.sasrec_fusion != "off" else [])
    for name, item_only in sasrec_readers:
        if (cfg.prompt.paradigm != "speeder" or "collab" not in cfg.features.modalities
                or (item_only and cfg.prompt.answer_mode != "item")):
            errs.append(f"{name} needs prompt.paradigm=speeder{', prompt.answer_mode=item' if item_only else ''} and the "
                        f"collab modality in features.modalities (got paradigm {cfg.prompt.paradigm}, answer mode "
                        f"{cfg.prompt.answer_mode}, modalities {cfg.features.modalities})")
        if cfg.data.max_history > USER_STATE_MAX_HISTORY:
            errs.append(f"{name} reads at most SASRec's window of {USER_STATE_MAX_HISTORY} items, "
                        f"but data.max_history is {cfg.data.max_history}")
    if not cfg.model.sasrec_fusion_weight >= 0:
        errs.append(f"model.sasrec_fusion_weight must be >= 0, got {cfg.model.sasrec_fusion_weight}")
    if cfg.features.sasrec_holdout < 0:
        errs.append(f"features.sasrec_holdout must be >= 0, got {cfg.features.sasrec_holdout}")
    K = cfg.features.sasrec_crossfit
    if K == 1 or K < 0:
        errs.append(f"features.sasrec_crossfit must be 0 (off) or >= 2 folds, got {K}")
    elif K >= 2:
        if not _speeder_item_collab(cfg):
            errs.append("features.sasrec_crossfit needs prompt.paradigm=speeder, prompt.answer_mode=item and the "
                        f"collab modality (got {cfg.prompt.paradigm}, {cfg.prompt.answer_mode}, "
                        f"{cfg.features.modalities})")
        clash = _crossfit_clashes(cfg)
        if clash:
            errs.append(f"features.sasrec_crossfit cannot be combined with {', '.join(clash)} (they read one "
                        "collab table for every training example, or plan batches across folds)")
    if cfg.data.n_candidates < 2:
        errs.append("data.n_candidates must be >= 2")
    if cfg.model.n_item_tokens < 1:
        errs.append("model.n_item_tokens must be >= 1")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        errs.append("train.batch_size and train.grad_accum must be >= 1")
    # ---- production-training checks: impossible combinations and out-of-range values
    if cfg.model.precision == "nf4":
        import importlib.util

        try:
            has_bnb = importlib.util.find_spec("bitsandbytes") is not None
        except (ImportError, ValueError):
            has_bnb = False
        if not has_bnb:
            errs.append("model.precision: nf4 needs bitsandbytes, which is not importable "
                        "(pip install bitsandbytes, or use precision bf16/fp32)")
    mod_lists = [("features.modalities", cfg.features.modalities)]
    mod_lists += [(f"train.stages[{i}].modalities", st.modalities) for i, st in enumerate(cfg.train.stages)]
    for name, mods in mod_lists:
        dup = sorted({m for m in mods if mods.count(m) > 1})
        if dup:
            errs.append(f"{name}: duplicate modalities {dup}")
    if cfg.prompt.paradigm == "speeder":
        if not cfg.features.modalities:
            errs.append("features.modalities: empty, but prompt.paradigm=speeder needs at least one modality")
        for i, st in enumerate(cfg.train.stages):
            if st.modalities and not set(st.modalities) & set(cfg.features.modalities):
                errs.append(f"train.stages[{i}].modalities: none of {st.modalities} is in features.modalities "
                            f"{cfg.features.modalities}, so the stage would train nothing")
    for i, st in enumerate(cfg.train.stages):
        if not st.lr > 0:
            errs.append(f"train.stages[{i}].lr must be > 0, got {st.lr}")
        if not st.epochs >= 0 or st.max_steps < 0:
            errs.append(f"train.stages[{i}]: epochs and max_steps must be >= 0")
        elif st.epochs == 0 and st.max_steps == 0:
            errs.append(f"train.stages[{i}]: epochs = 0 and max_steps = 0 leaves nothing to train")
        if not 0 <= st.curriculum_ramp <= 1:
            errs.append(f"train.stages[{i}].curriculum_ramp must be in [0, 1], got {st.curriculum_ramp}")
    tc = cfg.train
    if tc.keep_checkpoints < 1:
        errs.append(f"train.keep_checkpoints must be >= 1 (the last checkpoint is needed to resume), got {tc.keep_checkpoints}")
    for key in ("checkpoint_every", "eval_every", "eval_max_examples", "max_tokens_per_batch", "log_every"):
        if getattr(tc, key) < 0:
            errs.append(f"train.{key} must be >= 0, got {getattr(tc, key)}")
    if not 0 <= tc.warmup_ratio <= 1:
        errs.append(f"train.warmup_ratio must be in [0, 1], got {tc.warmup_ratio}")
    if not tc.grad_clip >= 0 or not tc.weight_decay >= 0:
        errs.append("train.grad_clip and train.weight_decay must be >= 0")
    if not tc.adapter_lr_scale > 0:
        errs.append(f"train.adapter_lr_scale must be > 0, got {tc.adapter_lr_scale}")
    if cfg.model.lora_r < 0:
        errs.append(f"model.lora_r must be >= 0, got {cfg.model.lora_r}")
    if not 0 <= cfg.model.lora_dropout < 1:
        errs.append(f"model.lora_dropout must be in [0, 1), got {cfg.model.lora_dropout}")
    if cfg.eval.batch_size < 1 or cfg.eval.max_examples < 0:
        errs.append("eval.batch_size must be >= 1 and eval.max_examples >= 0")
    if cfg.eval.length_multiple < 1:
        errs.append("eval.length_multiple must be >= 1")
    for key, choices in CHOICE_FIELDS:
        value = _get(cfg, key)
        if value not in choices:
            errs.append(f"{key}: {value!r} is not {one_of(choices)}")
    if errs:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errs))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """Serialise a resolved config as TOML (round-trips through load_config)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(type(v))

    d = to_dict(cfg)
    lines = []
    for k, v in d.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {val(v)}")
    for sec, body in d.items():
        if not isinstance(body, dict):
            continue
        lines.append(f"\n[{sec}]")
        tables = []
        for k, v in body.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):
                tables.append((k, v))
            else:
                lines.append(f"{k} = {val(v)}")
        for k, rows in tables:
            for row in rows:
                lines.append(f"\n[[{sec}.{k}]]")
                for rk, rv in row.items():
                    lines.append(f"{rk} = {val(rv)}")
    return "\n".join(lines) + "\n"


def describe_fields(obj: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field, for ``--help-config``."""
    obj = obj if obj is not None else Config()
    rows = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            rows += describe_fields(v, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, json.dumps(v), f.metadata.get("help", "")))
    return rows
