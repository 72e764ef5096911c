"""Paradigm benchmarks (pytest-benchmark): verbose vs titles vs speeder on the real code path.

    python -m pytest benchmarks/test_bench_paradigms.py --benchmark-only \\
        --benchmark-json runs/bench/cpu.json [--paradigm-summary runs/bench/paradigms_summary.json]
    python benchmarks/report.py --json runs/bench/cpu.json --json runs/bench/paradigms_summary.json \\
        --out-md runs/bench/RESULTS_cpu.md --plots runs/bench/plots

What is measured, on which users, models and shapes: ``benchmarks/bench_paradigms.py``. Every
case (``test_paradigm[<model>-<phase>-<paradigm>-b<batch>[-h<history>]]``) records its numbers in
``extra_info`` and in the session collector; the LAST test of this module,
:func:`test_speedup_bars`, computes the speeder/verbose and speeder/titles ratios from the
measurements of this same session and asserts the paper's bars (train >= 2.5x, inference >= 4x)
per protocol: ``speeder`` vs ``verbose`` (both LLaRA label scoring) and ``speeder-item`` (the
next-item head, the recommended path) vs ``verbose`` (see ``report.PAIRS`` and
``report.compute_ratios`` for which pairs are asserted). A bar that is missed fails that
test visibly; nothing is tuned to pass it.

Environment switches: ``SPEEDER_BENCH_DATA`` (default ``../shared/data/amazon-office``; cases skip
when absent), ``SPEEDER_BENCH_SMOLLM2`` (tokenizer + config folder; default the offline asset),
``SPEEDER_BENCH_BUDGET_S`` (skip later cases once spent), ``SPEEDER_BENCH_THREADS`` (CPU threads,
default 1), ``SPEEDER_BENCH_CPU_MAX_TOKENS`` (CPU prompt cap, default 2048),
``SPEEDER_BENCH_SMOKE=1`` (tiny model, one call per case; set automatically by
``--benchmark-disable``, the CI smoke).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from bench_paradigms import LOAD_ESTIMATE_S, CaseSkipped, bench_device, budget_seconds, is_smoke, plan_cases, run_case
from report import compute_ratios

CASES = plan_cases(bench_device(), is_smoke())


def _json_safe(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


@pytest.mark.parametrize("spec,case", CASES, ids=[c.case_id for _, c in CASES])
def test_paradigm(benchmark: Any, paradigm_env: Any, paradigm_collector: Any, spec: Any, case: Any) -> None:
    env = paradigm_env
    if spec.gpu_only and env.device.type != "cuda":
        why = f"{spec.label} is benchmarked on CUDA only (7B on a 2-core CPU is not meaningful)"
        paradigm_collector.skip(case.case_id, why)
        pytest.skip(why)
    budget = budget_seconds()
    if budget > 0:
        left = budget - paradigm_collector.elapsed()
        need = LOAD_ESTIMATE_S.get(spec.key, 30.0) if (env.spec is None or env.spec.key != spec.key) else 0.0
        if left <= need:
            why = (f"benchmark time budget SPEEDER_BENCH_BUDGET_S={budget:.0f}s spent" if left <= 0 else
                   f"{left:.0f}s left of SPEEDER_BENCH_BUDGET_S={budget:.0f}s < ~{need:.0f}s to load {spec.key}")
            paradigm_collector.skip(case.case_id, why)
            pytest.skip(why)
    benchmark.group = f"{case.model} {case.phase} B={case.batch}" + (f" H={case.history}" if case.history else "")

    def timer(rec: Any, c: Any) -> None:
        benchmark.pedantic(rec, rounds=c.rounds, iterations=1, warmup_rounds=c.warmup)

    try:
        record = run_case(env, spec, case, timer)
    except CaseSkipped as e:
        paradigm_collector.skip(case.case_id, str(e))
        pytest.skip(str(e))
    if case.paradigm not in paradigm_collector.token_summary and env.tokenizer is not None:
        paradigm_collector.token_summary[case.paradigm] = env.prompt_token_summary(case.paradigm)
    paradigm_collector.add(record)
    benchmark.extra_info.update(_json_safe(record))
    assert record["median_s"] > 0 and math.isfinite(record["median_s"])
    assert record["prompt_tokens_mean"] > 0
    if case.phase == "train" and case.paradigm.startswith("speeder"):
        assert "collab" in record.get("stage_modalities", []) and "text" in record["stage_modalities"]


def test_speedup_bars(benchmark: Any, paradigm_collector: Any) -> None:
    """Ratios from THIS session's measurements; asserts the paper's bars where they apply."""
    records = paradigm_collector.records
    if not records:
        pytest.skip("no paradigm measurements in this session (data absent, or cases deselected)")
    ratios = benchmark.pedantic(compute_ratios, args=(records,), rounds=1, iterations=1)
    benchmark.extra_info.update({"bench": "paradigm_ratios", **_json_safe(ratios)})
    if paradigm_collector.token_summary:
        benchmark.extra_info["token_summary"] = _json_safe(paradigm_collector.token_summary)
    for p in ratios["pairs"]:
        assert p["speedup"] > 0 and math.isfinite(p["speedup"])
    lines = [f"{p['model']} {p['device']} {p['phase']} B={p['batch']} H={p['history']} {p['speeder']} vs "
             f"{p['baseline']} ({p['protocol']}): "
             f"{p['speedup']:.2f}x (tokens {p['token_ratio']:.2f}x)" for p in ratios["pairs"]]
    print("\n".join(["speeder speedups (same session):"] + lines))
    if any(r.get("smoke") for r in records):
        # the tiny random model's timings are launch overhead, not a speedup measurement
        assert ratios["pairs"], "smoke run produced no speeder/baseline pair"
        pytest.skip("smoke mode: ratios computed, paper bars not asserted")
    checks = ratios["bar_checks"]
    if not checks:
        pytest.skip("no speeder/verbose pair at an asserted batch was measured in this session")
    failed = [c for c in checks if not c["passes"]]
    assert not failed, "paper bars missed: " + "; ".join(
        f"{c['model']} {c['device']} {c['phase']} B={c['batch']} {c['speeder']} vs {c['baseline']} "
        f"({c['protocol']}): {c['speedup']:.2f}x < {c['bar']}x" for c in failed)
