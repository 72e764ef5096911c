"""Building the pieces of a run (data, tokenizer, prompt builder, LLM, MoME, SPAE) and its files.

A run folder holds::

    config.toml                    resolved configuration (round-trips through load_config)
    tokenizer_additions.json       special tokens added to the tokenizer (candidate labels), if any
    item_features.safetensors      MRC input features per modality (+ presence masks)
    sasrec.safetensors             the collaborative encoder, when the collab modality was built (the
                                   SASRec reference row; also model.user_state's and model.sasrec_fusion's SASRec)
    sasrec_features.safetensors    with features.sasrec_holdout > 0: the collab encoder (trained without each
                                   user's last training transitions), which model.user_state then reads
    collab_folds.safetensors       with features.sasrec_crossfit = K: the K cross-fitted collab tables (aligned to
                                   the reference SASRec's) and each user's fold (training, resume, evaluate, recommend)
    sasrec_fusion.json             with model.sasrec_fusion=auto: the fusion weight picked on validation after
                                   training, and every weight's validation metrics
    metrics.jsonl                  training/eval log, one JSON object per line
    checkpoints/step-<8 digits>/ + aliases final, best, stage<i>   (speeder_fast.checkpoint format:
                                   MANIFEST.json, trainable.safetensors, optimizer, rng, trainer_state.json;
                                   best and final also adapter/: the LoRA adapter in peft's format)
    tensorboard/                   TensorBoard event files (train.report_to=tensorboard)
    FINISHED.json                  written when the run completed (``--resume`` then exits 0)
    eval_<split>_<mode>.json/.md   evaluation results

Checkpoints hold only what is trained (LoRA, MoME, SPAE, and the embedding rows of added tokens);
the frozen base model is re-loaded from ``model.llm``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speeder_fast.config import Config, ConfigError, load_run_config, to_toml, validate
from speeder_fast.data.dataset import PreparedData
from speeder_fast.errors import CheckpointError
from speeder_fast.utils import atomic_save_safetensors, atomic_write_json, atomic_write_text, get_logger, resolve_device

log = get_logger("speeder_fast.training")

FEATURES_FILE = "item_features.safetensors"
SASREC_FILE = "sasrec.safetensors"
#: the collab encoder when ``features.sasrec_holdout > 0`` (``SASREC_FILE`` is then the reference row's)
SASREC_FEATURES_FILE = "sasrec_features.safetensors"
#: the cross-fitted collab tables and user folds (``features.sasrec_crossfit``)
COLLAB_FOLDS_FILE = "collab_folds.safetensors"
#: the cross-fitted tables in :func:`compute_features`' info (not serialised there)
CROSSFIT_KEY = "_crossfit"
#: the trained SASRec in :func:`compute_features`' info (not serialised)
SASREC_MODEL_KEY = "_sasrec_model"
ADDITIONS_FILE = "tokenizer_additions.json"
METRICS_FILE = "metrics.jsonl"


def is_run_folder(path: str | Path) -> bool:
    """True for a folder a run has started writing: ``config.toml`` plus one of the files written
    next to it (``tokenizer_additions.json``, ``metrics.jsonl``, ``item_features.safetensors``,
    ``checkpoints/``). A folder holding only a hand-written ``config.toml`` is not one."""
    p = Path(path)
    return (p / "config.toml").is_file() and any(
        (p / f).exists() for f in (ADDITIONS_FILE, METRICS_FILE, FEATURES_FILE, "checkpoints"))


def check_resumable(run_dir: str | Path) -> None:
    """Refuse ``--resume`` of a folder that is a checkpoint, or that holds no step checkpoint and is not a
    run folder (it would silently start a new run there).

    Raises:
        CheckpointError: naming the folder and what to pass instead.
    """
    from speeder_fast.checkpoint import CheckpointManager, refuse_checkpoint_dir

    run_dir = Path(run_dir)
    refuse_checkpoint_dir(run_dir, "--resume")
    if CheckpointManager(run_dir, clean_stale=False).list() or is_run_folder(run_dir):
        return
    raise CheckpointError(f"--resume {run_dir}: not a speeder_fast run folder (no checkpoint, no "
                          f"{ADDITIONS_FILE} or {METRICS_FILE}); a resume never starts a new run elsewhere: train "
                          "with --config/--output-dir/--run-name instead")


def cut_metrics_log(run_dir: str | Path, step: int) -> int:
    """Cut ``run_dir/metrics.jsonl`` back to the records of global steps ``<= step`` (atomically).

    A resumed run continues from its checkpoint's step, so the lines logged after that checkpoint by
    the interrupted run would otherwise appear twice. Records without ``global_step`` are kept; a
    line that is not JSON (the half-written last line of a killed run) is dropped.

    Returns:
        The number of lines removed (0 when nothing changed; the file is then not rewritten).
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            removed += bool(line.strip())
            continue
        gs = rec.get("global_step") if isinstance(rec, dict) else None
        if isinstance(gs, (int, float)) and gs > step:
            removed += 1
            continue
        kept.append(line)
    if removed:
        atomic_write_text(path, "".join(x + "\n" for x in kept))
        log.info("%s: removed %d records logged after step %d (they are trained again)", path, removed, step)
    return removed


@dataclass
class Components:
    """Everything training and evaluation need, built from one :class:`Config`."""

    cfg: Config
    device: torch.device
    prepared: PreparedData
    tokenizer: Any
    builder: Any  # PromptBuilder
    model: Any  # SpeederRecModel
    modalities: list[str] = field(default_factory=list)  # modalities with features (speeder paradigm)
    feature_info: dict = field(default_factory=dict)
    #: ``model.precision`` the trained weights come from (:func:`load_run`; ``cfg.model.precision``
    #: differs when a run is served at another precision); "" for components built for training
    trained_precision: str = ""
    #: the SASRec fusion of the model (:func:`speeder_fast.training.fusion.attach_fusion`: weight, source,
    #: and the validation grid when tuned); None without one
    fusion_info: dict | None = None


def make_run_dir(cfg: Config) -> Path:
    """``output_dir/run_name`` (default: timestamp + paradigm + data name); created."""
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.prompt.paradigm}-{Path(cfg.data.source).name}"
    d = Path(cfg.output_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    return d


# ------------------------------------------------------------------------------ item features
def save_features(path: Path, features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    tensors = {}
    for m, (x, mask) in features.items():
        tensors[f"{m}.features"] = x.detach().float().cpu()
        tensors[f"{m}.mask"] = mask.detach().to(torch.uint8).cpu()
    atomic_save_safetensors(tensors, path, metadata={"modalities": json.dumps(list(features))})


def load_features(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        mods = json.loads((f.metadata() or {}).get("modalities", "[]"))
    t = load_file(str(path))
    return {m: (t[f"{m}.features"], t[f"{m}.mask"].bool()) for m in mods}


def save_collab_folds(path: Path, tables: list[tuple[torch.Tensor, torch.Tensor]], folds: np.ndarray) -> None:
    """Write the cross-fitted collab tables and user folds (safetensors, temp file + rename)."""
    tensors = {"user_folds": torch.as_tensor(np.asarray(folds, np.int64))}
    for k, (x, mask) in enumerate(tables):
        tensors[f"fold{k}.features"] = x.detach().float().cpu()
        tensors[f"fold{k}.mask"] = mask.detach().to(torch.uint8).cpu()
    atomic_save_safetensors(tensors, path, metadata={"folds": str(len(tables))})


def load_collab_folds(path: Path) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    """``(tables, user_folds)`` written by :func:`save_collab_folds`.

    Raises:
        FileNotFoundError: no such file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: the cross-fitted collab tables of features.sasrec_crossfit are missing "
                                "(the run wrote them before training; copy the whole run folder, or train again)")
    with safe_open(str(path), framework="pt") as f:
        k = int((f.metadata() or {}).get("folds", "0"))
    t = load_file(str(path))
    return [(t[f"fold{i}.features"], t[f"fold{i}.mask"].bool()) for i in range(k)], t["user_folds"].numpy()


def compute_features(cfg: Config, prepared: PreparedData, llm: Any, tokenizer: Any, device: torch.device,
                     run_dir: Path | None, progress: bool = True) -> tuple[dict, dict]:
    """Item features for the configured modalities; returns ``(features, info)``.

    text/image come from ``speeder_fast.features.build_item_features`` (cached in the feature
    store). collab trains SASRec here (``train_sasrec``, a stage before the LLM) so that the model
    itself can be kept in ``run_dir/sasrec.safetensors`` for the SASRec reference row of the
    evaluation. Modalities the dataset lacks are skipped with a log line.
    """
    import dataclasses

    from speeder_fast.features import build_item_features
    from speeder_fast.features.sasrec import SASRecConfig, sasrec_item_embeddings, save_sasrec, train_sasrec
    from speeder_fast.model.llm import base_model

    info: dict = {}
    raw: dict = {}
    other = [m for m in cfg.features.modalities if m != "collab"]
    if other:
        fcfg = dataclasses.replace(cfg.features, modalities=other)
        raw.update(build_item_features(prepared, fcfg, (tokenizer, base_model(llm)), device, progress=progress))
    if "collab" in cfg.features.modalities:
        scfg = SASRecConfig(dim=cfg.features.sasrec_dim, epochs=cfg.features.sasrec_epochs, seed=cfg.seed)
        t0 = time.perf_counter()
        sas, metrics = train_sasrec(prepared, scfg, device=device, progress=progress)
        info["sasrec"] = {k: metrics.get(k) for k in ("test_candidates", "valid_candidates", "test_full", "best_epoch",
                                                      "epochs_run", "epoch_seconds")}
        info["sasrec"]["seconds"] = time.perf_counter() - t0
        if run_dir is not None:  # the reference row's model
            save_sasrec(sas.cpu(), run_dir / SASREC_FILE)
            atomic_write_json(run_dir / "sasrec_metrics.json", metrics)
        h = cfg.features.sasrec_holdout
        seen = prepared  # the data the collab encoder trained on (its item mask: items it never trained on -> 0)
        if h > 0:  # the collab encoder: trained without the transitions into each user's last h training items
            t0 = time.perf_counter()
            seen = prepared.without_last(h)
            sas, fmetrics = train_sasrec(seen, scfg, device=device, progress=progress)
            info["sasrec_features"] = {"holdout": h, "best_epoch": fmetrics.get("best_epoch"),
                                       "valid_full": fmetrics.get("valid_full"),
                                       "seconds": time.perf_counter() - t0}
            log.info("collab features: SASRec trained on sequence[:-%d] (best epoch %s)", 2 + h, fmetrics.get("best_epoch"))
            if run_dir is not None:
                save_sasrec(sas.cpu(), run_dir / SASREC_FEATURES_FILE)
        raw["collab"] = sasrec_item_embeddings(sas, seen)
        info[SASREC_MODEL_KEY] = sas  # for model.user_state=sasrec; popped by build_components
        if cfg.features.sasrec_crossfit >= 2:
            from speeder_fast.features.crossfit import crossfit_tables

            tables, folds, cinfo = crossfit_tables(prepared, scfg, cfg.features.sasrec_crossfit, *raw["collab"],
                                                   device=device, progress=progress)
            info["sasrec_crossfit"] = cinfo
            info[CROSSFIT_KEY] = (tables, folds)
            if run_dir is not None:
                save_collab_folds(run_dir / COLLAB_FOLDS_FILE, tables, folds)
    feats = {}
    for m in cfg.features.modalities:
        if m not in raw:
            log.info("modality %r: no features for dataset %s, skipped", m, prepared.dataset.name)
            continue
        x, mask = raw[m]
        mask = torch.as_tensor(mask).bool().cpu()
        if not bool(mask.any()):
            log.info("modality %r: no item has it in %s, skipped", m, prepared.dataset.name)
            continue
        feats[m] = (torch.as_tensor(x).float().cpu(), mask)
        log.info("modality %r: %d-dim features, %.1f%% of items present", m, x.shape[1], 100.0 * float(mask.float().mean()))
    return feats, info


# ------------------------------------------------------------------------------ components
def build_components(cfg: Config, run_dir: Path | None = None, features: dict | None = None,
                     added_tokens: list[str] | None = None, device: torch.device | None = None,
                     progress: bool = True, prepared: PreparedData | None = None,
                     user_encoder: Any = None, collab_folds: tuple | None = None) -> Components:
    """Prepare data, load tokenizer + LLM (+ LoRA), build MoME/SPAE (speeder paradigm).

    ``features``: precomputed item features (evaluation reloads them from the run); when None and
    the paradigm is ``speeder`` they are computed (and saved to ``run_dir``). ``prepared``: use this
    dataset instead of ``prepare(cfg.data)`` (tests, notebooks). ``user_encoder``: the trained SASRec
    for ``model.user_state=sasrec`` when ``features`` are given (default: :func:`load_user_encoder` from
    ``run_dir``; with computed features, the SASRec just trained). ``collab_folds``: ``(tables,
    user_folds)`` of :func:`load_collab_folds` for a cross-fitted run resumed with ``features`` given
    (with computed features, the ones just trained); they go to the MoME (:meth:`MoME.set_collab_folds`).

    Raises:
        ConfigError: no features for any modality; ``model.user_state=sasrec`` with features given and
            neither ``user_encoder`` nor ``run_dir``.
        FileNotFoundError: ``run_dir`` lacks the user-state SASRec (:func:`load_user_encoder`).
    """
    from speeder_fast.data import prepare
    from speeder_fast.model import PromptBuilder, load_llm, load_tokenizer
    from speeder_fast.utils import seed_everything

    seed_everything(cfg.seed)
    device = device or resolve_device(cfg.device)
    prepared = prepared if prepared is not None else prepare(cfg.data)
    item_mode = cfg.prompt.answer_mode == "item"
    if item_mode:  # all-position training: SASRec-style sequence windows instead of one window per target
        prepared = prepared.with_sequence_windows(cfg.data.max_history, cfg.data.max_train_examples,
                                                  cfg.data.last_window_only)
    tok = load_tokenizer(cfg.model.llm)
    if added_tokens:
        tok.add_tokens(list(added_tokens), special_tokens=True)
    builder = PromptBuilder(
        tok, prepared.dataset, cfg.prompt, cfg.data.n_candidates, cfg.data.max_history,
        cfg.model.n_item_tokens, cfg.model.spae_ordinal_text,
    )
    if added_tokens and not builder.added_tokens:
        builder.added_tokens = list(added_tokens)
    llm = load_llm(cfg.model, device, tok, seed=cfg.seed)
    info: dict = {}
    if uses_mome(cfg):
        if features is None:
            fcfg = cfg
            if cfg.prompt.paradigm != "speeder":  # text paradigms: the head's item vectors come from text only
                fcfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, modalities=["text"]))
            features, info = compute_features(fcfg, prepared, llm, tok, device, run_dir, progress)
            if run_dir is not None:
                save_features(run_dir / FEATURES_FILE, features)
        if not features:
            raise ConfigError(f"prompt.paradigm={cfg.prompt.paradigm}: none of the modalities features.modalities="
                              f"{cfg.features.modalities} has features for dataset {prepared.dataset.name} (add one "
                              "it has, e.g. collab, or use paradigm titles/verbose)")
    sas = info.pop(SASREC_MODEL_KEY, None)
    crossfit = info.pop(CROSSFIT_KEY, collab_folds)
    if cfg.model.user_state == "sasrec":
        user_encoder = user_encoder if user_encoder is not None else sas
        if user_encoder is None:  # features given (resume): the run folder's
            if run_dir is None:
                raise ConfigError("model.user_state=sasrec: no trained SASRec (none was trained here and there "
                                  "is no run folder to read it from)")
            user_encoder = load_user_encoder(cfg, Path(run_dir))
    model, mods = build_model(cfg, llm, features or {}, prepared, device, user_encoder=user_encoder)
    if crossfit is not None and model.mome is not None:
        tables, user_folds = crossfit
        model.mome.set_collab_folds(tables, user_folds)
        log.info("cross-fitted collab features: %d folds; every batch reads the table of its users' fold, in "
                 "training and scoring", len(tables))
    return Components(cfg, device, prepared, tok, builder, model, mods, info)


def build_model(cfg: Config, llm: Any, features: dict, prepared: PreparedData, device: torch.device,
                user_encoder: Any = None) -> tuple[Any, list[str]]:
    """The :class:`~speeder_fast.model.SpeederRecModel` of ``cfg`` around ``llm`` (LoRA already on).

    MoME over ``features`` (``{modality: (x [n_items, D] float, present [n_items] bool)}``) when
    :func:`uses_mome`; SPAE for the speeder paradigm; the next-item head (popularity-initialised bias
    with ``model.head_bias_init=popularity``) and its loss settings for ``answer_mode=item``; the
    per-slot user state around ``user_encoder`` (a trained SASRec) for ``model.user_state=sasrec``. New
    modules are seeded with ``cfg.seed`` and moved to ``device``. Shared by :func:`build_components`
    and the benchmarks (``benchmarks/bench_paradigms.py``), so both run the same model.

    Returns:
        ``(model, modalities)``: the model and the modalities its MoME has (empty without one).
    """
    from speeder_fast.model import MoME, SPAE, SpeederRecModel, embedding_rms
    from speeder_fast.model.item_head import ItemHead

    mome = positions = head = None
    mods: list[str] = []
    mc = cfg.model
    H = llm.get_input_embeddings().weight.shape[1]
    if uses_mome(cfg):
        mods = list(features)
        rms = embedding_rms(llm)
        torch.manual_seed(cfg.seed)
        mome = MoME(features, H, mc.n_item_tokens, mc.expert_hidden, mc.per_token_gate, rms,
                    kernels_force=mc.use_kernels, modality_dropout=mc.modality_dropout)
        if cfg.prompt.paradigm == "speeder":
            positions = SPAE(H, mc.max_positions, mc.spae_absolute, mc.spae_relative,
                             init_std=0.1 * rms, kernels_force=mc.use_kernels)
    item_mode = cfg.prompt.answer_mode == "item"
    if item_mode:
        # late fusion needs two modalities; with one, its expert vector is the mixture's only input
        parts = len(mome.modalities) if mc.head_keys == "experts" and len(mome.modalities) > 1 else 1
        collab_keys = None
        if mc.head_collab_dot:
            if "collab" not in features:
                raise ConfigError("model.head_collab_dot: the run has no collab features")
            collab_keys = torch.as_tensor(features["collab"][0]).float() * features["collab"][1].float()[:, None]
        head = ItemHead(H, prepared.dataset.n_items, mc.head_similarity, mc.head_temperature, mc.head_projection,
                        mc.head_item_bias, parts=parts, collab_keys=collab_keys)
        if head.bias is not None and mc.head_bias_init == "popularity":
            from speeder_fast.evaluate import item_popularity

            with torch.no_grad():
                logc = torch.from_numpy(np.log1p(item_popularity(prepared))).float()
                head.bias.copy_(logc - logc.mean())
    user_state = None
    if mc.user_state == "sasrec":
        from speeder_fast.model.user_state import UserState

        if user_encoder is None:
            raise ConfigError("model.user_state=sasrec: build_model needs the trained SASRec (user_encoder)")
        user_state = UserState(user_encoder, H)
    model = SpeederRecModel(llm, mome, positions, packing=cfg.train.packing, item_head=head,
                            prefix_cache=cfg.eval.prefix_cache, prefix_train=cfg.train.prefix_share,
                            user_state=user_state)
    if item_mode:
        model.item_loss = item_loss_settings(cfg, prepared)
    for mod in (mome, positions, head, user_state):
        if mod is not None:
            mod.to(device)
    return model, mods


def user_state_file(cfg: Config) -> str:
    """The run file holding the SASRec of ``model.user_state=sasrec``: the collab encoder's."""
    return SASREC_FEATURES_FILE if cfg.features.sasrec_holdout > 0 else SASREC_FILE


def load_user_encoder(cfg: Config, run_dir: Path) -> Any:
    """The SASRec of ``model.user_state=sasrec`` from ``run_dir`` (:func:`user_state_file`).

    Raises:
        FileNotFoundError: the run folder lacks that file.
    """
    from speeder_fast.features.sasrec import load_sasrec

    sp = Path(run_dir) / user_state_file(cfg)
    if not sp.is_file():
        raise FileNotFoundError(f"{sp} missing: model.user_state=sasrec runs read their SASRec from it")
    return load_sasrec(sp)


def uses_mome(cfg: Config) -> bool:
    """True when the run has a MoME: the speeder paradigm (soft tokens), or any paradigm with the
    next-item head (its item vectors; text paradigms build a text-only MoME for it)."""
    return cfg.prompt.paradigm == "speeder" or cfg.prompt.answer_mode == "item"


def item_loss_settings(cfg: Config, prepared: PreparedData) -> Any:
    """The :class:`~speeder_fast.model.llm.ItemLossSettings` of ``cfg.train`` for this catalogue
    (``item_loss=auto``: the full softmax up to ``train.item_full_max`` items, else sampled)."""
    from speeder_fast.evaluate import item_popularity
    from speeder_fast.model.llm import ItemLossSettings

    tc = cfg.train
    n_items = prepared.dataset.n_items
    sampled = tc.item_loss == "sampled" or (tc.item_loss == "auto" and n_items > tc.item_full_max)
    proposal = None
    if sampled and tc.item_sampling == "popularity":
        proposal = torch.from_numpy(item_popularity(prepared) + 1.0)
    st = ItemLossSettings(sampled, tc.item_logit_chunk, tc.item_negatives, proposal, tc.item_all_positions,
                          tc.item_modality_loss)  # applied only by a late-fusion head (ItemHead.parts > 1)
    log.info("next-item head: %s over %d items%s", "sampled softmax" if sampled else "full softmax", n_items,
             f" ({tc.item_negatives} {tc.item_sampling} negatives per step, logQ-corrected)" if sampled else
             f" (logit chunks of {tc.item_logit_chunk})")
    return st


# ------------------------------------------------------------------------------ run files and checkpoints
def write_run_files(run_dir: Path, comp: Components) -> None:
    """Resolved config + tokenizer additions (+ their embedding rows)."""
    atomic_write_text(run_dir / "config.toml", to_toml(comp.cfg))
    adds = comp.builder.added_tokens
    atomic_write_json(run_dir / ADDITIONS_FILE, {
        "added_special_tokens": adds,
        "label_strings": comp.builder.label_strings,
        "label_token_ids": [int(i) for i in comp.builder.label_ids],
    })


#: the LoRA adapter in peft's own format, inside the ``best`` and ``final`` checkpoints
ADAPTER_DIR = "adapter"


def export_adapter(model: Any, checkpoint_dir: Path) -> Path | None:
    """Write the LoRA adapter of ``model.llm`` (a peft ``PeftModel``) with peft's own
    ``save_pretrained`` to ``checkpoint_dir/adapter/``: ``adapter_config.json`` +
    ``adapter_model.safetensors`` (+ peft's ``README.md``), loadable on the base model with
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model.llm), path)``.

    Only the LoRA part: MoME, SPAE and the next-item head stay in the run's own checkpoint
    (``trainable.safetensors``). When the run added tokens to the tokenizer (candidate labels that are
    not single tokens, ``tokenizer_additions.json``), peft also saves the resized embedding layers;
    resize the base to the run's tokenizer (``resize_token_embeddings``) before loading then. Called
    inside the checkpoint's temp folder (:class:`~speeder_fast.checkpoint.CheckpointManager`
    ``export``), so the folder appears atomically with the checkpoint. Returns the folder, or None
    when the model has no LoRA (``model.lora_r=0``).
    """
    llm = model.llm
    if not hasattr(llm, "peft_config"):
        return None
    out = Path(checkpoint_dir) / ADAPTER_DIR
    # the LoRA tensors given explicitly: peft would otherwise call the whole model's state_dict(), and
    # bitsandbytes' 4-bit layers then undo their CPU weight packing, so this rank would compute the next
    # steps differently from the others (and from a run that did not export)
    lora = {n: p.detach() for n, p in llm.named_parameters() if "lora_" in n}
    llm.save_pretrained(str(out), state_dict=lora)
    return out


def added_embedding_rows(comp: Components) -> dict[str, torch.Tensor]:
    if not comp.builder.added_tokens:
        return {}
    ids = torch.tensor([comp.tokenizer.convert_tokens_to_ids(t) for t in comp.builder.added_tokens])
    w = comp.model.embed.weight.detach()
    return {"added_embeddings": w[ids.to(w.device)].float().cpu()}


def load_run(run_dir: str | Path, checkpoint: str = "final", device: str | None = None,
             prepared: PreparedData | None = None, precision: str | None = None,
             sasrec_fusion: str | None = None) -> Components:
    """Rebuild a trained run's components from its folder (config, features, trainable weights).

    ``precision`` (``fp32`` | ``bf16`` | ``nf4``, :data:`speeder_fast.config.PRECISIONS`) serves the
    run at another ``model.precision`` than it was trained at: the base model is loaded at that
    precision and the trained weights are cast to it (e.g. bf16 inference of an fp32 run on a CPU
    with AVX512-BF16/AMX). None keeps the run's. Raises ConfigError (a ValueError) when the precision
    is unknown or cannot run here, from the config's own validation. With ``model.sasrec_fusion`` the
    model scores fused with the run's SASRec (:func:`speeder_fast.training.fusion.attach_fusion`: a
    missing ``sasrec.safetensors``, or ``sasrec_fusion.json`` for ``auto``, raises FileNotFoundError);
    ``sasrec_fusion`` (``off`` | ``auto`` | a weight) overrides it, ``auto`` then picking the weight on the
    validation split now without writing it to the run folder. A cross-fitted run
    (``features.sasrec_crossfit``) reads its fold tables from ``collab_folds.safetensors`` (missing:
    FileNotFoundError) and scores each user through its own fold, as in training."""
    from speeder_fast.checkpoint import refuse_checkpoint_dir

    run_dir = Path(run_dir)
    refuse_checkpoint_dir(run_dir, "--run")
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.toml (is this a speeder_fast run folder?)")
    cfg = load_run_config(cfg_path)
    trained_precision = cfg.model.precision
    if device:
        cfg.device = device
    if precision is not None:
        cfg.model.precision = precision
        validate(cfg)  # the model.precision choices and what nf4 needs, as for any config
    ck = run_dir / "checkpoints" / checkpoint / "trainable.safetensors"
    if not ck.is_file():
        avail = sorted(p.name for p in (run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").is_dir() else []
        raise FileNotFoundError(f"{ck} not found (available checkpoints: {avail})")
    adds = json.loads((run_dir / ADDITIONS_FILE).read_text()).get("added_special_tokens", []) if (run_dir / ADDITIONS_FILE).is_file() else []
    feats = None
    if uses_mome(cfg):
        fp = run_dir / FEATURES_FILE
        if not fp.is_file():
            raise FileNotFoundError(f"{fp} missing: speeder runs store their item features there")
        feats = load_features(fp)
    from speeder_fast.checkpoint import load_checkpoint

    loaded = load_checkpoint(ck.parent)  # verifies the manifest first: a corrupt file raises CheckpointError naming it
    user_encoder = load_user_encoder(cfg, run_dir) if cfg.model.user_state == "sasrec" else None
    # cross-fitted runs score each user through its own fold's collab table, as in training
    folds = load_collab_folds(run_dir / COLLAB_FOLDS_FILE) if cfg.features.sasrec_crossfit >= 2 else None
    comp = build_components(cfg, run_dir=None, features=feats, added_tokens=adds, prepared=prepared,
                            user_encoder=user_encoder, collab_folds=folds)
    load_weights(comp, loaded)
    comp.trained_precision = trained_precision
    if cfg.model.sasrec_fusion != "off" or sasrec_fusion is not None:  # scoring-time fusion with RUN/sasrec.safetensors
        from speeder_fast.training.fusion import attach_fusion

        comp.fusion_info = attach_fusion(comp, run_dir, spec=sasrec_fusion)
    return comp


def load_weights(comp: Components, loaded: Any) -> None:
    """Put a loaded checkpoint's (:func:`speeder_fast.checkpoint.load_checkpoint`) trained weights and
    added-token embedding rows into ``comp.model``; set its active MPO modalities and eval mode."""
    sd = dict(loaded.weights)
    added = sd.pop("added_embeddings", None)
    comp.model.load_trainable_state_dict(sd)
    if added is not None:
        ids = torch.tensor([comp.tokenizer.convert_tokens_to_ids(t) for t in comp.builder.added_tokens])
        with torch.no_grad():
            w = comp.model.embed.weight
            w[ids.to(w.device)] = added.to(w.device, w.dtype)
    comp.model.set_stage(loaded.extra.get("active_modalities", comp.modalities))
    comp.model.eval()
