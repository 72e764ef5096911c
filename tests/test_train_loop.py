"""Training loop, run folder, reload + evaluation, CLI (tiny random Llama, CPU)."""

import importlib.util
import json

import pytest
import torch

import tiny
from speeder_fast.config import Config, StageConfig, load_config, to_toml
from speeder_fast.training import lr_at, resolve_stages, train


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(llm_dir, out, paradigm="speeder", mode="score"):
    cfg = tiny.train_config(llm_dir, out, f"{paradigm}-{mode}")
    cfg.prompt.paradigm = paradigm
    cfg.prompt.answer_mode = mode
    cfg.features.sasrec_epochs = 2
    cfg.features.sasrec_dim = 16
    cfg.train.grad_accum = 2
    cfg.train.log_every = 1
    cfg.train.eval_every = 3
    cfg.train.eval_max_examples = 12
    cfg.train.checkpoint_every = 2
    cfg.train.keep_checkpoints = 1
    cfg.train.stages = [StageConfig(modalities=["text"], max_steps=4, lr=3e-3, curriculum_ramp=0.5),
                        StageConfig(modalities=["text", "collab"], max_steps=4, lr=3e-3, freeze_previous_experts=True)]
    cfg.eval.max_examples = 16
    cfg.eval.batch_size = 8
    cfg.eval.generate_max_tokens = 12
    return cfg


def test_config_roundtrip_with_stages(tmp_path):
    cfg = _cfg("x", tmp_path)
    cfg.prompt.labels = [" A", " B"]
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    back = load_config(p)
    assert back == cfg
    assert back.train.stages[1].modalities == ["text", "collab"] and back.train.stages[1].freeze_previous_experts


def test_run_config_written_before_a_key_existed_keeps_the_trained_value(tmp_path):
    """A run folder's config.toml lists every key of its time: one without ``model.head_keys`` was
    trained with the mixture head (the default before late fusion) and must reload with it."""
    from speeder_fast.config import load_run_config

    cfg = _cfg("x", tmp_path)
    text = to_toml(cfg)
    new = tmp_path / "new.toml"
    new.write_text(text)
    assert load_run_config(new) == load_config(new) and load_run_config(new).model.head_keys == "experts"
    old = tmp_path / "old.toml"
    old.write_text("\n".join(ln for ln in text.splitlines()
                             if not ln.startswith(("head_keys", "item_modality_loss", "modality_dropout"))))
    back = load_run_config(old)
    assert back.model.head_keys == "mixture" and back.train.item_modality_loss == 0.0
    assert load_config(old).model.head_keys == "experts"  # a user's config file takes today's defaults


def test_default_stages_and_schedule():
    cfg = Config()
    st = resolve_stages(cfg, ["text", "collab"])
    assert [s.modalities for s in st] == [["text"], ["text", "collab"]]
    assert [s.modalities for s in resolve_stages(cfg, ["text"])] == [["text"]]  # collab absent -> skipped
    cfg.prompt.paradigm = "titles"
    assert [s.modalities for s in resolve_stages(cfg, [])] == [[]]
    lrs = [lr_at(i, 100, 1.0, 0.1) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_speeder_run_trains_checkpoints_and_reloads(llm_dir, tmp_path, cache):
    from speeder_fast.evaluate import evaluate_run, evaluate_split

    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    cfg = _cfg(llm_dir, tmp_path)
    res = train(cfg, progress=False, prepared=prepared)
    d = res.run_dir
    for f in ("config.toml", "metrics.jsonl", "item_features.safetensors", "sasrec.safetensors", "tokenizer_additions.json",
              "train_summary.json"):
        assert (d / f).is_file(), f
    ck = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert {"final", "best", "stage1", "stage2"} <= set(ck)
    assert [c for c in ck if c.startswith("step")] == ["step-00000008"]  # keep_checkpoints=1 pruned step-2..6
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["type"] == "train"]
    assert [r["global_step"] for r in train_recs] == list(range(1, 9))
    assert train_recs[0]["hybrid_share"] == 0.0 and train_recs[3]["hybrid_share"] == 1.0  # curriculum ramp
    assert all(r["tokens_per_s"] > 0 for r in train_recs)
    assert {r["tag"] for r in recs if r["type"] == "eval"} >= {"step3", "stage1", "stage2"}
    assert load_config(d / "config.toml") == cfg
    state = json.loads((d / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["extra"]["active_modalities"] == ["text", "collab"] and state["step"] == 8
    assert (d / "FINISHED.json").is_file()

    # the reloaded run scores exactly like the trained model in memory
    comp = res.components
    direct = evaluate_split(comp.model, comp.builder, prepared, "test", "score", 16, 8, device="cpu", progress=False)
    result, sas, md = evaluate_run(d, split="test", mode="score", max_examples=16, checkpoint="final", progress=False,
                                   prepared=prepared)
    for k in ("VHR@1", "HR@1", "NDCG@10", "ValidRatio"):
        assert result[k] == pytest.approx(direct[k])
    assert result["ValidRatio"] == 1.0 and result["n"] == 16
    assert sas is not None and sas["n"] == 16 and 0.0 <= sas["HR@1"] <= 1.0
    # not the train CLI's own evaluation (that one scores eval.checkpoint=best): a file of its own
    assert result["report"] == "eval_test_score_final_n16"
    assert "SASRec" in md and (d / "eval_test_score_final_n16.json").is_file() and (d / "eval_test_score_final_n16.md").is_file()
    saved = json.loads((d / "eval_test_score_final_n16.json").read_text())
    assert "Popularity" in md and saved["popularity"]["n"] == 16
    # the run's own settings (best, eval.max_examples=16) write the plain name; a subset never replaces it
    own, _, _ = evaluate_run(d, split="test", mode="score", progress=False, prepared=prepared)
    assert own["report"] == "eval_test_score" and own["checkpoint"] == "best" and own["n"] == 16
    before = (d / "eval_test_score.json").read_bytes()
    sub, _, _ = evaluate_run(d, split="test", mode="score", max_examples=8, progress=False, prepared=prepared)
    assert sub["report"] == "eval_test_score_best_n8" and (d / "eval_test_score_best_n8.json").is_file()
    assert (d / "eval_test_score.json").read_bytes() == before
    # the CLI's last line names the resolved checkpoint, never "None" for the default
    from speeder_fast.evaluate import written_line

    line = written_line(sub, d)
    assert line.startswith("checkpoint best evaluated on 8 examples; eval_test_score_best_n8.json/.md written to ")


def test_stage_freezing_and_lora_flags(llm_dir, tmp_path, cache):
    """Stage 2 with freeze_previous_experts leaves the text expert untouched; train_lora=False freezes LoRA."""
    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    cfg = _cfg(llm_dir, tmp_path)
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 0
    cfg.train.stages[1].train_lora = False
    res = train(cfg, progress=False, prepared=prepared)
    from safetensors.torch import load_file

    s1 = load_file(str(res.run_dir / "checkpoints" / "stage1" / "trainable.safetensors"))
    s2 = load_file(str(res.run_dir / "checkpoints" / "stage2" / "trainable.safetensors"))
    text_keys = [k for k in s1 if k.startswith("mome.experts.text")]
    collab_keys = [k for k in s1 if k.startswith("mome.experts.collab")]
    lora_keys = [k for k in s1 if "lora_" in k]
    assert text_keys and collab_keys and lora_keys
    assert all(torch.equal(s1[k], s2[k]) for k in text_keys)  # frozen in stage 2
    assert all(torch.equal(s1[k], s2[k]) for k in lora_keys)  # train_lora = False
    assert any(not torch.equal(s1[k], s2[k]) for k in collab_keys)  # new expert trained
    assert not torch.equal(s1["mome.gate.weight"], s2["mome.gate.weight"])


@pytest.mark.parametrize("paradigm,mode", [("titles", "generate"), ("verbose", "score")])
def test_text_paradigms_train_and_evaluate(llm_dir, tmp_path, cache, paradigm, mode):
    from speeder_fast.evaluate import evaluate_run

    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    cfg = _cfg(llm_dir, tmp_path, paradigm, mode)
    cfg.prompt.description_tokens = 8
    cfg.train.eval_every = 0
    res = train(cfg, progress=False, prepared=prepared)
    ck = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert "stage1" in ck and "stage2" not in ck  # one stage for text paradigms
    assert not (res.run_dir / "item_features.safetensors").exists()
    result, sas, _ = evaluate_run(res.run_dir, split="valid", max_examples=8, progress=False, prepared=prepared)
    assert result["mode"] == mode and result["n"] == 8 and sas is None
    assert 0.0 <= result["VHR@1"] <= result["ValidRatio"] <= 1.0
    if mode == "score":
        assert result["ValidRatio"] == 1.0 and "NDCG@10" in result
    else:
        assert "NDCG@10" not in result


def test_cli_help_config_and_presets(capsys):
    from speeder_fast.train import build_parser, main, resolve_config

    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("data.source", "model.precision", "prompt.candidate_item", "train.stages", "eval.max_examples"):
        assert key in out
    cfg = resolve_config(build_parser().parse_args([]))
    assert cfg.data.max_users == 300 and cfg.prompt.paradigm == "speeder" and cfg.prompt.answer_mode == "item"
    assert [st.modalities for st in cfg.train.stages] == [["text", "collab"]] and cfg.features.text_encoder == "minilm"
    cfg = resolve_config(build_parser().parse_args(["--preset", "none", "--paradigm", "titles", "--set", "train.batch_size=3"]))
    assert cfg.data.max_users == 0 and cfg.prompt.paradigm == "titles" and cfg.train.batch_size == 3
    assert main(["--set", "nope.x=1"]) == 2


def test_adapter_lr_scale_groups_and_run(llm_dir, tmp_path, cache):
    """train.adapter_lr_scale puts MoME/SPAE in their own AdamW group at scale x the stage lr; 1.0
    keeps one group (old checkpoints' optimizer state still loads); a run with a scale trains."""
    from speeder_fast.config import ConfigError, validate
    from speeder_fast.training.step import param_groups, set_trainable
    from speeder_fast.training.run import build_components

    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    cfg = _cfg(llm_dir, tmp_path)
    comp = build_components(cfg, run_dir=tmp_path / "feat", progress=False, prepared=prepared)
    comp.model.set_stage(["text", "collab"])
    params = set_trainable(comp, StageConfig(modalities=["text", "collab"]), set())
    assert len(param_groups(comp, params, 1.0)) == 1
    lora, rest = param_groups(comp, params, 5.0)
    names = {id(p): n for n, p in comp.model.named_parameters()}
    assert lora["lr_scale"] == 1.0 and all("lora_" in names[id(p)] for p in lora["params"])
    assert rest["lr_scale"] == 5.0 and all("lora_" not in names[id(p)] for p in rest["params"])
    assert any(names[id(p)].startswith("mome.") for p in rest["params"])
    assert any(names[id(p)].startswith("positions.") for p in rest["params"])
    assert len(lora["params"]) + len(rest["params"]) == len(params)

    cfg.train.adapter_lr_scale = 0.0
    with pytest.raises(ConfigError, match="adapter_lr_scale"):
        validate(cfg)
    cfg.train.adapter_lr_scale = 5.0
    cfg.train.eval_every = 0
    cfg.train.grad_accum = 1
    cfg.train.stages = [StageConfig(modalities=["text", "collab"], max_steps=3, lr=3e-3)]
    cfg.train.checkpoint_every = 2  # a mid-stage checkpoint keeps the optimizer state
    cfg.train.keep_checkpoints = 5
    res = train(cfg, progress=False, prepared=prepared)
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    lr2 = [r["lr"] for r in recs if r["type"] == "train" and r["global_step"] == 2][0]
    from speeder_fast.checkpoint import load_checkpoint

    groups = load_checkpoint(res.run_dir / "checkpoints" / "step-00000002").optimizer["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 5.0]
    assert groups[0]["lr"] == pytest.approx(lr2) and groups[1]["lr"] == pytest.approx(5.0 * lr2)


def test_hf_adapter_loads_with_peft_and_tensorboard_curves(llm_dir, tmp_path, cache):
    """best/final checkpoints hold the LoRA adapter in peft's own format: PeftModel.from_pretrained on the
    base model gives the run's logits. train.report_to=tensorboard writes the curves as event files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from speeder_fast.checkpoint import verify_checkpoint

    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    cfg = _cfg(llm_dir, tmp_path)
    cfg.train.report_to = "tensorboard"
    cfg.train.stages = [StageConfig(modalities=["text", "collab"], max_steps=3, lr=5e-3)]
    cfg.train.eval_every = 0
    res = train(cfg, progress=False, prepared=prepared)
    ck = res.run_dir / "checkpoints"
    for name in ("final", "best"):
        files = verify_checkpoint(ck / name)["files"]  # the adapter is listed in (and verified by) the manifest
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(files), files
    assert not (ck / "step-00000002" / "adapter").exists()  # a plain step checkpoint has none
    config = json.loads((ck / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == cfg.model.lora_r

    base = AutoModelForCausalLM.from_pretrained(str(llm_dir)).eval()
    ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        hf = PeftModel.from_pretrained(base, str(ck / "final" / "adapter")).eval()(input_ids=ids).logits
        ours = res.components.model.llm.eval()(input_ids=ids).logits
    torch.testing.assert_close(hf, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hf, plain, atol=1e-4)  # the trained LoRA is in it (peft starts B at zero)

    if importlib.util.find_spec("tensorboard") is None:  # an optional extra (pip install -e ".[dev]" has it)
        assert not (res.run_dir / "tensorboard").exists()
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(res.run_dir / "tensorboard"))
    acc.Reload()
    jsonl = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["global_step"]: r["loss"] for r in jsonl if r["type"] == "train"}
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(losses)
    assert [e.step for e in acc.Scalars("eval/NDCG_10")] == [3]


def test_report_to_tensorboard_without_the_package_is_one_line(llm_dir, tmp_path, cache, monkeypatch, caplog):
    import logging
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    cfg = _cfg(llm_dir, tmp_path)
    cfg.train.report_to = "tensorboard"
    cfg.train.stages = [StageConfig(modalities=["text"], max_steps=1, lr=3e-3)]
    lg = logging.getLogger("speeder_fast")
    lg.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="speeder_fast"):
            res = train(cfg, progress=False, prepared=prepared)
    finally:
        lg.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if "report_to" in r.getMessage()]
    assert len(lines) == 1 and "tensorboard package is not installed" in lines[0] and "pip install tensorboard" in lines[0]
    assert (res.run_dir / "metrics.jsonl").is_file() and not (res.run_dir / "tensorboard").exists()


def test_choices_defined_once_and_config_resolve(tmp_path):
    """Each set of choices is one tuple in speeder_fast.config: argparse choices, validate() and the
    modules that dispatch on a value read it. config.resolve(preset, toml, sets) is the public resolution."""
    import argparse

    from speeder_fast import config as C
    from speeder_fast import profile
    from speeder_fast.kernels._common import FORCE_CHOICES
    from speeder_fast.model import prompts
    from speeder_fast.train import build_parser

    def choices(parser):
        return {a.dest: tuple(a.choices) for a in parser._actions if a.choices and not isinstance(a.choices, dict)}

    tr = choices(build_parser())
    assert (tr["paradigm"], tr["precision"], tr["mode"], tr["device"]) == (C.PARADIGMS, C.PRECISIONS, C.ANSWER_MODES,
                                                                          C.DEVICES)
    sub = next(a for a in profile.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert choices(sub["train"])["paradigm"] == C.PARADIGMS and choices(sub["train"])["precision"] == C.PRECISIONS
    assert choices(sub["kernels"])["force"] == C.KERNEL_CHOICES and choices(sub["infer"])["split"] == C.SPLITS
    assert FORCE_CHOICES is C.KERNEL_CHOICES and prompts.PARADIGMS is C.PARADIGMS
    for key, allowed in C.CHOICE_FIELDS:  # validate names the key and the allowed values
        cfg = Config()
        *path, last = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, "bogus")
        with pytest.raises(C.ConfigError, match=rf"{key}: 'bogus' is not {C.one_of(allowed)}"):
            C.validate(cfg)

    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nbatch_size = 3\nnum_workers = 4\n")  # num_workers: removed, old files still load
    cfg = C.resolve("quick", toml, ["prompt.paradigm=titles"])
    assert cfg.data.max_users == 300 and cfg.train.batch_size == 3 and cfg.prompt.paradigm == "titles"
    assert len(cfg.train.stages) == 1 and not hasattr(cfg.train, "num_workers")  # text paradigms: one stage
    assert C.resolve() == Config() and C.load_config(toml).train.batch_size == 3
    with pytest.raises(C.ConfigError, match="unknown preset 'fast'"):
        C.resolve("fast")
    with pytest.raises(C.ConfigError, match="unknown config key 'train.num_worker'"):
        C.resolve(None, None, ["train.num_worker=1"])
