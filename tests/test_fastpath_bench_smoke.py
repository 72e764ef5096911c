"""benchmarks/fastpath_check.py must keep running: a tiny CPU smoke run of every CPU-capable path."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "fastpath_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("fastpath_check", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastpath_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_fastpath_check_cpu_smoke(tmp_path, capsys):
    pytest.importorskip("peft")
    fc = _load()
    out = tmp_path / "fp.json"
    argv = ["--device", "cpu", "--layers", "2", "--hidden", "64", "--heads", "2", "--batch", "3",
            "--prompt-len", "16", "--len-jitter", "4", "--vocab", "256", "--warmup", "1", "--steps", "1",
            "--precisions", "bf16", "--out", str(out)]
    assert fc.main(argv) == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["results"]}
    assert set(rows) == {"hf_full_logits", "sdpa_padded", "packed_varlen"}
    assert rows["packed_varlen"]["attn_impl"] == "speeder_varlen_sdpa"
    assert all(r["precision"] == "float32" and r["train_ms_per_sample"] > 0 and r["infer_ms_per_sample"] > 0
               for r in rows.values())
    # every variant starts from the same LoRA weights: the step-0 losses agree (fp32)
    losses = [r["loss"] for r in rows.values()]
    assert max(losses) - min(losses) < 1e-4, losses
    assert rows["packed_varlen"]["real_tokens"] <= rows["packed_varlen"]["padded_tokens"]
    assert any(s["run"].endswith("packed_liger") and "CUDA" in s["why"] for s in data["skipped"])
    printed = capsys.readouterr().out
    assert "| float32 | packed_varlen | speeder_varlen_sdpa |" in printed


def test_fastpath_check_no_cuda_exits_cleanly(tmp_path, monkeypatch, capsys):
    import torch

    fc = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "none.json"
    assert fc.main(["--out", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert json.loads(out.read_text()) == {"skipped": "no CUDA device"}


def test_peak_table_and_flops():
    fc = _load()
    assert fc.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert fc.peak_tflops("NVIDIA H200") == 989.0
    assert fc.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert fc.peak_tflops("Some GPU") is None
    args = fc.parse_args([])
    cfg = fc.llama_config(args)
    # Llama-2-7B: 6.74e9 params = body + 2 x (32000 x 4096) embeddings + norms
    body = fc.body_params(cfg)
    assert abs(body + 2 * 32000 * 4096 - 6.738e9) / 6.738e9 < 1e-3
