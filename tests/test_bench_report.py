"""benchmarks/report.py on synthetic JSON (rows, ratios, PNGs), bench_paradigms helpers, and the
``python -m speeder_fast.profile train|infer`` subcommands on a tiny offline model + toy data."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rec(paradigm: str, phase: str, batch: int, sps: float, tokens: float, history: int | None = None,
         device: str = "cuda", model: str = "smollm2-135m", **kw) -> dict:
    med = batch / sps
    r = {"bench": "paradigm", "case_id": f"{model}-{phase}-{paradigm}-b{batch}" + (f"-h{history}" if history else ""),
         "model": model, "device": device, "card": "NVIDIA H100 80GB HBM3" if device == "cuda" else "CPU x2",
         "dtype": "bf16", "weights": "random", "paradigm": paradigm, "phase": phase, "batch": batch, "batch_kind": "fixed",
         "history": history, "rounds": 3, "median_s": med, "mean_s": med, "min_s": med, "samples_per_s": sps,
         "ms_per_sample": 1000 / sps, "prompt_tokens_mean": tokens, "prompt_tokens_max": int(tokens) + 5,
         "padded_len": int(tokens) + 6, "peak_mem_mb": 2048.0, "step_mem_mb": 512.0, "mem_kind": "cuda_max_allocated",
         "smoke": False}
    r.update(kw)
    return r


def synthetic_records() -> list[dict]:
    recs = []
    tokens = {"verbose": 1300.0, "titles": 780.0, "speeder": 135.0}
    train_sps = {"verbose": 10.0, "titles": 16.0, "speeder": 50.0}  # speeder 5x verbose
    for p in ("verbose", "titles", "speeder"):
        for b in (16, 64):
            recs.append(_rec(p, "train", b, train_sps[p] * (1.5 if b == 64 else 1.0), tokens[p]))
    score_sps = {"verbose": 40.0, "titles": 70.0, "speeder": 120.0}  # 3x verbose at B=64: misses the 4x bar
    for p in ("verbose", "titles", "speeder"):
        recs.append(_rec(p, "score", 1, score_sps[p] / 10, tokens[p]))  # B=1: not asserted on a GPU
        recs.append(_rec(p, "score", 64, score_sps[p], tokens[p]))
    for h, (vs, ss) in {10: (20.0, 90.0), 50: (4.0, 80.0)}.items():
        recs.append(_rec("verbose", "train", 16, vs, 1300.0 * h / 10, history=h))
        recs.append(_rec("speeder", "train", 16, ss, 135.0 + 8 * h, history=h))
    recs.append(_rec("speeder", "train", 512, 300.0, 135.0, batch_kind="max", case_id="smollm2-135m-train-speeder-bmax"))
    recs.append(_rec("verbose", "train", 64, 15.0, 1300.0, batch_kind="max", case_id="smollm2-135m-train-verbose-bmax"))
    return recs


def collector_json(records: list[dict]) -> dict:
    return {"kind": "speeder_paradigm_bench", "records": records,
            "skipped": [{"case_id": "llama2-7b-nf4-score-verbose-b4-h50", "why": "prompt of 7001 tokens exceeds the model context (4096)"}],
            "meta": {"device": "cuda", "card": "NVIDIA H100 80GB HBM3", "date": "2026-01-01 00:00:00",
                     "versions": {"torch": "2.11.0", "transformers": "5.17.0"}, "python": "3.12.3", "smoke": False},
            "token_summary": {"speeder": {"paradigm": "speeder", "users": 3231, "mean": 135.5, "p50": 134, "p90": 144, "max": 144}},
            "ratios": {}}


def pytest_benchmark_json(records: list[dict]) -> dict:
    benches = [{"name": f"test_paradigm[{r['case_id']}]", "group": "g", "extra_info": r,
                "stats": {"median": r["median_s"], "rounds": 3}} for r in records]
    benches.append({"name": "test_bench_mome_cpu_reference[fwd]", "group": "cpu mome", "extra_info": {"impl": "eager", "mode": "fwd"},
                    "stats": {"median": 0.00123, "rounds": 100}})
    return {"machine_info": {"node": "n", "cpu": {"brand_raw": "Xeon"}}, "commit_info": {"id": "abcdef0123"},
            "datetime": "2026-01-01T00:00:00", "version": "5.2.3", "benchmarks": benches}


def test_compute_ratios_pairs_and_bar_checks() -> None:
    out = report.compute_ratios(synthetic_records())
    pairs = {(p["phase"], str(p["batch"]), p["history"], p["baseline"]): p for p in out["pairs"]}
    assert pairs[("train", "16", None, "verbose")]["speedup"] == pytest.approx(5.0)
    assert pairs[("train", "16", None, "titles")]["speedup"] == pytest.approx(50 / 16)
    assert pairs[("train", "16", None, "verbose")]["token_ratio"] == pytest.approx(1300 / 135)
    assert pairs[("train", "16", 50, "verbose")]["speedup"] == pytest.approx(20.0)
    mx = pairs[("train", "max", None, "verbose")]
    assert (mx["batch_speeder"], mx["batch_baseline"]) == (512, 64)
    assert mx["speedup"] == pytest.approx(20.0)
    checks = {(c["phase"], str(c["batch"])): c for c in out["bar_checks"]}
    # asserted: verbose baseline, real histories, fixed batches; inference only at the largest batch
    assert set(checks) == {("train", "16"), ("train", "64"), ("score", "64")}
    assert checks[("train", "16")]["passes"] and checks[("train", "16")]["bar"] == 2.5
    assert not checks[("score", "64")]["passes"] and checks[("score", "64")]["bar"] == 4.0


def test_compute_ratios_per_protocol() -> None:
    """The next-item path is compared with the verbose label protocol (bars asserted) and with
    titles-item (same protocol, reported); pairs say which speeder and which protocol."""
    recs = synthetic_records()
    recs += [_rec("speeder-item", "train", 16, 80.0, 30.0), _rec("titles-item", "train", 16, 20.0, 200.0),
             _rec("speeder-item", "score", 64, 100.0, 30.0)]  # 2.5x verbose's 40/s: misses the 4x bar
    out = report.compute_ratios(recs)
    pairs = {(p["speeder"], p["phase"], str(p["batch"]), p["baseline"]): p for p in out["pairs"]}
    assert pairs[("speeder-item", "train", "16", "verbose")]["speedup"] == pytest.approx(8.0)
    assert pairs[("speeder-item", "train", "16", "verbose")]["protocol"] == "item vs label"
    assert pairs[("speeder-item", "train", "16", "titles-item")]["speedup"] == pytest.approx(4.0)
    assert pairs[("speeder-item", "train", "16", "titles-item")]["protocol"] == "item"
    assert pairs[("speeder", "train", "16", "verbose")]["protocol"] == "label"
    assert ("speeder-item", "train", "16", "titles") not in pairs  # protocols are not mixed at will
    checks = {(c["speeder"], c["phase"], str(c["batch"])): c for c in out["bar_checks"]}
    assert checks[("speeder-item", "train", "16")]["passes"]
    assert not checks[("speeder-item", "score", "64")]["passes"]
    assert all(c["baseline"] == "verbose" for c in out["bar_checks"])
    # plain free-text generation is reported, not asserted; constrained generation (the default) is
    recs += [_rec(p, ph, 64, sps, 100.0) for ph, sps in (("generate", 1.0), ("generate_constrained", 1.0))
             for p in ("verbose", "speeder")]
    out = report.compute_ratios(recs)
    phases = {c["phase"] for c in out["bar_checks"]}
    assert "generate_constrained" in phases and "generate" not in phases
    assert any(p["phase"] == "generate" for p in out["pairs"])


def test_compute_ratios_ignores_smoke_for_bars() -> None:
    recs = [dict(r, smoke=True) for r in synthetic_records()]
    out = report.compute_ratios(recs)
    assert out["pairs"] and not out["bar_checks"]


def test_report_markdown_and_plots(tmp_path: Path) -> None:
    recs = synthetic_records()
    coll = tmp_path / "summary.json"
    coll.write_text(json.dumps(collector_json(recs)))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(pytest_benchmark_json(copy.deepcopy(recs))))
    kern = tmp_path / "kernels.json"
    kern.write_text(json.dumps({"card": "H200", "copy_gbs": 4164.0, "rows": [
        {"case": "mome N=2048", "mode": "fwd", "triton_ms": 0.125, "eager_ms": 0.79, "compile_ms": 0.45,
         "speedup_vs_eager": 6.31, "speedup_vs_compile": 3.61, "triton_gbs": 1074.0, "pct_of_copy_bw": 26.0}]}))
    md_path, plots = tmp_path / "out" / "RESULTS.md", tmp_path / "plots"
    assert report.main(["--json", str(coll), "--json", str(bench), "--json", str(kern), "--out-md", str(md_path),
                        "--plots", str(plots), "--title", "Synthetic"]) == 0
    md = md_path.read_text()
    assert md.startswith("### Synthetic")
    lines = md.splitlines()
    # every record appears exactly once although it is in both files
    train_rows = [ln for ln in lines if ln.startswith("| smollm2-135m | bf16 | ") and "samples" not in ln]
    assert len([ln for ln in train_rows if " | 16 | " in ln]) == 3
    assert "| smollm2-135m | cuda | train | 16 | real | speeder | verbose | label | 5.00x | 9.63x | >= 2.5x | **pass** |" in md
    assert "| smollm2-135m | cuda | score | 64 | real | speeder | verbose | label | 3.00x | 9.63x | >= 4.0x | **FAIL** |" in md
    assert "| smollm2-135m | cuda | score | 1 | real | speeder | verbose | label | 3.00x | 9.63x | - | reported |" in md
    assert "max (512 vs 64)" in md
    assert "exceeds the model context (4096)" in md
    assert "| speeder | 3231 | 135.5 | 134 | 144 | 144 |" in md
    assert "torch 2.11.0" in md and "NVIDIA H100 80GB HBM3" in md
    assert "| mome N=2048 | fwd | 0.1250 |" in md
    assert "test_bench_mome_cpu_reference[fwd]" in md and "| 1.23 |" in md
    assert "| smollm2-135m | train | 16 | 50 | speeder |" in md
    for name in ("history_scaling.png", "speedups.png"):
        p = plots / name
        assert p.is_file() and p.stat().st_size > 5000
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_report_only_pytest_benchmark_json(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(pytest_benchmark_json(synthetic_records())))
    data = report.load_inputs([bench])
    assert len(data["records"]) == len(synthetic_records())
    md = report.markdown(data)
    assert "#### Speeder speedups" in md and "pytest-benchmark run" in md


def test_report_rejects_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json is not valid JSON"):
        report.load_inputs([bad])
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit, match="unknown JSON"):
        report.load_inputs([unknown])
    broken = tmp_path / "broken.json"
    rec = synthetic_records()[0]
    del rec["samples_per_s"]
    broken.write_text(json.dumps(collector_json([rec])))
    with pytest.raises(SystemExit, match="lacks \\['samples_per_s'\\]"):
        report.load_inputs([broken])


# ---------------------------------------------------------------------------------------------- helpers
def test_long_histories_and_user_rows() -> None:
    from tiny import make_prepared

    import bench_paradigms as bp

    prep = make_prepared(n_users=30, n_items=60, n_candidates=8, max_history=5)
    rows = bp.user_rows(prep, 50)
    assert rows.shape == (50,) and len(set(rows[:30].tolist())) == 30  # a permutation, then repeats
    assert np.array_equal(rows, bp.user_rows(prep, 50))
    hist, lens = bp.long_histories(prep, rows[:6], 20)
    assert hist.shape == (6, 20) and np.all(lens == 20) and np.all(hist >= 0)
    for i, r in enumerate(rows[:6]):
        real = prep.test.histories[r, : prep.test.lengths[r]]
        assert np.array_equal(hist[i, -len(real):], real)  # the real history is the newest part
        filler = hist[i, : 20 - len(real)]
        assert not np.isin(filler, prep.test_candidates[r]).any()
    h3, _ = bp.long_histories(prep, rows[:2], 3)  # shorter than the real history: its newest items
    r0 = rows[0]
    assert np.array_equal(h3[0], prep.test.histories[r0, : prep.test.lengths[r0]][-3:])


def test_peak_memory_cpu_reports_rss() -> None:
    import torch

    import bench_paradigms as bp

    m = bp.PeakMemory(torch.device("cpu"))
    m.start()
    x = np.ones(40 * 2**20 // 8)  # 40 MB, touched
    x += 1
    out = m.stop()
    del x
    assert out["mem_kind"] == "cpu_peak_rss"
    assert out["peak_mem_mb"] > 0
    if Path("/proc/self/clear_refs").exists():
        assert out["step_mem_mb"] >= 30


# ---------------------------------------------------------------------------------------------- profile CLI
def _write_recbole(prep, folder: Path) -> Path:
    """The toy dataset as RecBole atomic files (what ``--data`` reads)."""
    folder.mkdir(parents=True)
    ds = prep.dataset
    with open(folder / "toy.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, seq in enumerate(ds.sequences):
            for t, it in enumerate(seq):
                f.write(f"{ds.user_ids[u]}\t{ds.item_ids[int(it)]}\t{t}\n")
    with open(folder / "toy.item", "w") as f:
        f.write("item_id:token\ttitle:token_seq\tdescription:token_seq\n")
        for i, iid in enumerate(ds.item_ids):
            f.write(f"{iid}\t{ds.title(i)}\ta useful {ds.title(i)} for the office\n")
    return folder


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory):
    from tiny import make_llm_dir, make_prepared

    root = tmp_path_factory.mktemp("prof")
    llm = make_llm_dir(root / "llm")
    data = _write_recbole(make_prepared(n_users=24, n_items=40, n_candidates=6, max_history=4), root / "toy")
    return root, llm, data


def test_materialize_model_dir_random_weights(tiny_setup, tmp_path: Path) -> None:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from speeder_fast.hardware import has_weights
    from speeder_fast.profile import materialize_model_dir

    _, llm, _ = tiny_setup
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    for f in llm.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, cfg_only / f.name)
    assert not has_weights(cfg_only)
    a = materialize_model_dir(cfg_only, tmp_path / "cache", seed=3)
    b = materialize_model_dir(cfg_only, tmp_path / "cache", seed=3)
    c = materialize_model_dir(cfg_only, tmp_path / "cache", seed=4, overrides={"num_hidden_layers": 1})
    assert a == b and a != c and has_weights(a) and (a / "tokenizer.json").is_file()
    m = AutoModelForCausalLM.from_pretrained(str(c), dtype=torch.float32)
    assert m.config.num_hidden_layers == 1
    with pytest.raises(FileNotFoundError, match="no config.json"):
        materialize_model_dir(tmp_path, tmp_path / "cache")


@pytest.mark.parametrize("sub,extra", [("train", ["--set", "prompt.answer_mode=score"]), ("train", []),
                                       ("infer", ["--mode", "score"]),
                                       ("infer", ["--mode", "generate", "--max-new-tokens", "3"])])
def test_profile_train_infer_cli(tiny_setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sub: str, extra: list) -> None:
    from speeder_fast import profile

    root, llm, data = tiny_setup
    monkeypatch.setenv("SPEEDER_CACHE", str(root / "cache"))
    out = tmp_path / "prof"
    rc = profile.main([sub, "--paradigm", "speeder", "--data", str(data), "--model", str(llm), "--device", "cpu",
                       "--modalities", "text", "--batch-size", "2", "--steps", "2", "--profile-steps", "1",
                       "--rows", "8", "--set", "data.n_candidates=6", "--set", "data.max_history=4",
                       "--out", str(out), *extra])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert (out / "trace.json").stat().st_size > 1000 and json.loads((out / "trace.json").read_text())
    assert "Name" in (out / "top_ops.txt").read_text()
    assert s["paradigm"] == "speeder" and s["device"] == "cpu" and s["mfu"] is None and "n/a" in s["mfu_note"]
    assert len(s["step_s"]) == 2 and s["tflops_per_s"] > 0 and s["work"]["tokens"] > 0
    n, toks = s["N_linear"], s["work"]["tokens"]
    if sub == "train":
        assert s["mode"] == "train" and s["flops"] >= 4 * n * toks and s["stage_modalities"] == ["text"]
        if extra:  # the training loop's step and loss (score mode: label cross-entropy over the 6 candidate labels)
            assert s["loss"] == "label" and s["head_width"] == 6 and s["work"]["answer_rows"] == 2 * 2  # 2 steps x 2
        else:  # the default: the next-item loss over the catalogue at every history slot (>= 1 per example)
            assert s["loss"] == "next-item" and s["head_width"] == 40 and s["work"]["answer_rows"] >= 2 * 2
    elif s["mode"] == "score":
        assert 2 * n * toks <= s["flops"] < 4 * n * toks
    else:
        assert s["work"]["generated"] > 0 and s["flops"] > 2 * n * toks


def test_flop_formulas_and_peaks() -> None:
    from speeder_fast.hardware import peak_tflops
    from speeder_fast.profile import step_flops

    assert step_flops("train", 100, 10, 4, tokens=50, answer_rows=2) == 4 * 100 * 50 + 4 * 10 * 4 * 2
    assert step_flops("score", 100, 10, 4, tokens=50, answer_rows=2) == 2 * 100 * 50 + 2 * 10 * 4 * 2
    assert step_flops("generate", 100, 10, 4, tokens=50, answer_rows=2, generated=6) == 2 * 100 * 56 + 2 * 40 * 8
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "fp32") == 494.7
    assert peak_tflops("some cpu", "bf16") is None
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # bf16 by default


def test_machine_helpers_have_one_source() -> None:
    """Card name, peak FLOP/s, versions and has_weights are defined once (speeder_fast.hardware); the
    profiler and every benchmark script use those (benchmarks/bench_utils.py re-exports them)."""
    import torch

    import bench_kernels
    import bench_paradigms
    import bench_utils
    import fastpath_check
    from speeder_fast import hardware, profile

    for name in ("card_name", "peak_tflops", "has_weights", "versions"):
        assert getattr(bench_utils, name) is getattr(hardware, name), name
    assert profile.card_name is bench_kernels.card_name is bench_paradigms.card_name is hardware.card_name
    assert fastpath_check.peak_tflops is profile.peak_tflops is hardware.peak_tflops
    assert fastpath_check.Timer is bench_utils.Timer and bench_paradigms.PeakMemory is bench_utils.PeakMemory
    card = hardware.card_name(torch.device("cpu"))
    assert card.startswith("CPU ") and "torch threads" in card and hardware.peak_tflops(card) is None
    v = hardware.versions()
    assert v["torch"] == torch.__version__.split("+")[0] or v["torch"] == torch.__version__
    t, out = bench_utils.Timer(torch.device("cpu"))(lambda: 3, warmup=1, steps=2)
    assert t >= 0 and out == 3
    mem = bench_utils.PeakMemory(torch.device("cpu"))
    mem.start()
    assert mem.stop()["mem_kind"] == "cpu_peak_rss"


def test_paradigm_cases_on_nf4_llama_cpu(tiny_setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's measured path end to end on CPU: a tiny NF4 Llama built like the 7B case,
    three paradigms, train / score / generate, records and same-run ratios."""
    import torch

    pytest.importorskip("bitsandbytes")
    import bench_paradigms as bp
    from tiny import make_prepared

    from speeder_fast.model import load_tokenizer

    root, llm_dir, _ = tiny_setup
    monkeypatch.setenv("SPEEDER_CACHE", str(root / "cache_nf4"))
    threads = torch.get_num_threads()
    try:
        tok = load_tokenizer(str(llm_dir))
        shape = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 2}
        llm = bp.load_llama_nf4(tok, torch.device("cpu"), 0, shape)
        import bitsandbytes as bnb

        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in llm.modules()) == 2 * 7
        env = bp.BenchEnv(torch.device("cpu"), make_prepared(n_users=30, n_items=50, n_candidates=6, max_history=5))
        env.tokenizer, env.llm, env.info = tok, llm, {"max_positions": 4096}
        env.features = env._features()
        assert set(env.features) == {"text", "collab"}
        spec = bp.ModelSpec("nf4-tiny", "tiny NF4 llama", "nf4", "random")
        env.spec = spec
        records = []
        for phase in ("train", "score", "generate"):
            for p in bp.PARADIGMS:
                r = bp.run_case(env, spec, bp.Case("nf4-tiny", phase, p, 2, rounds=2, warmup=1, max_new_tokens=3))
                assert r["rounds"] == 2 and r["median_s"] > 0 and r["batch"] == 2 and r["mem_kind"] == "cpu_peak_rss"
                records.append(r)
        by = {(r["phase"], r["paradigm"]): r for r in records}
        assert by[("train", "speeder")]["stage_modalities"] == ["text", "collab"]
        assert by[("train", "speeder")]["trainable_params"] > by[("train", "verbose")]["trainable_params"]
        assert by[("train", "verbose")]["prompt_tokens_mean"] > by[("train", "titles")]["prompt_tokens_mean"] \
            > by[("train", "speeder")]["prompt_tokens_mean"]
        assert by[("generate", "speeder")]["gen_new_tokens_mean"] <= 3
        long = bp.run_case(env, spec, bp.Case("nf4-tiny", "score", "speeder", 2, history=40, rounds=1, warmup=0))
        assert long["history"] == 40 and long["prompt_tokens_mean"] > by[("score", "speeder")]["prompt_tokens_mean"]
        ratios = report.compute_ratios(records)
        assert {(p["phase"], p["baseline"]) for p in ratios["pairs"]} == {
            (ph, b) for ph in ("train", "score", "generate") for b in ("verbose", "titles")}
        assert len(env.prompt_token_summary("speeder")) > 3
    finally:
        torch.set_num_threads(threads)
