"""A 30-step run of the real SmolLM2-135M on a real MovieLens-100K slice (CPU, ~2-3 min).

What it checks: the whole training path (prompt builder -> MoME -> SPAE splice -> frozen SmolLM2
+ LoRA -> label loss -> AdamW) can FIT a fixed set of 8 real examples in 30 steps, scored with
the evaluation code: VHR@1 well above random choice (1/20). Candidates are held fixed (the
per-epoch resampling is replaced) so the task is learnable in 30 steps; generalization to unseen
users needs far more steps than a CI budget allows (see docs/speeder.md for measured numbers).
"""

import dataclasses
import json

import numpy as np
import pytest

from speeder_fast.config import Config, StageConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def smollm2():
    from speeder_fast.assets import AssetError, resolve_model

    try:
        return resolve_model("smollm2-135m")
    except (AssetError, OSError) as e:  # offline machine without the cached asset
        pytest.skip(f"SmolLM2 asset unavailable: {e}")


def test_30_steps_fit_real_slice_beats_random(smollm2, tmp_path, monkeypatch):
    import speeder_fast.data as data_mod
    from speeder_fast.data import prepare
    from speeder_fast.evaluate import evaluate_split
    from speeder_fast.training import train

    cfg = Config()
    cfg.output_dir = str(tmp_path)
    cfg.run_name = "real30"
    cfg.device = "cpu"
    cfg.data.max_users = 40
    cfg.data.max_train_examples = 8
    cfg.features.modalities = ["text"]
    cfg.prompt.answer_mode = "score"  # the label protocol (the default is the next-item head)
    cfg.train.adapter_lr_scale = 1.0
    cfg.model.lora_dropout = 0.0
    cfg.train.batch_size = 8
    cfg.train.eval_max_examples = 8
    cfg.train.warmup_ratio = 0.1
    cfg.train.stages = [StageConfig(modalities=["text"], epochs=30.0, max_steps=30, lr=1e-2)]
    prepared = prepare(cfg.data)
    assert len(prepared.train) == 8
    fixed = data_mod.sample_train_candidates(prepared, 0, cfg.data.n_candidates, cfg.data.seed)
    monkeypatch.setattr(data_mod, "sample_train_candidates", lambda p, epoch, n, seed: fixed)
    # validation = the 8 training examples with their fixed candidates
    fit = dataclasses.replace(prepared, valid=prepared.train, valid_candidates=fixed)

    res = train(cfg, progress=False, prepared=fit)
    comp = res.components
    out = evaluate_split(comp.model, comp.builder, fit, "valid", "score", 0, 8, device="cpu", progress=False)
    assert out["n"] == 8 and out["ValidRatio"] == 1.0
    # random choice: HR@1 = 0.05, HR@5 = 0.25, NDCG@10 = 0.227 per example. Measured on the dev
    # machine: VHR@1 0.25, HR@5 1.0, NDCG@10 0.63. HR@5 >= 7/8 happens by chance with p ~ 4e-4.
    assert out["VHR@1"] >= 0.125, out
    assert out["HR@5"] >= 0.875, out
    assert out["NDCG@10"] >= 0.5, out
    losses = [json.loads(x)["loss"] for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["type"] == "train"]
    assert losses[-1] < losses[0], losses
    assert np.isfinite(res.epoch_seconds) and res.steps == 30
