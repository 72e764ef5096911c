#!/usr/bin/env bash
# GPU check for a lent-GPU session: one prepared script, ~8 minutes, degrades gracefully.
#
# Prepare ONCE on the development machine (from the repository root):
#   ../shared/gpu/fetch-wheels.sh .whl                      # bitsandbytes + liger-kernel wheels (py3.12)
#   mkdir -p .gpu_data && cp -r ../shared/data/amazon-office .gpu_data/
#   python benchmarks/prepare_gpu_assets.py                 # SmolLM2 tokenizer + config -> .gpu_assets/smollm2
#   printf '/.whl/\n/.gpu_data/\n/.gpu_assets/\n' >> .git/info/exclude   # keep them out of git
# Then run it on the device (tool `run`), e.g.
#   command: bash benchmarks/gpu_check.sh        carry: [".whl", ".gpu_data", ".gpu_assets"]    timeout_s: 540
#
# Steps (each under its own `timeout`, capped so that the whole script ends within GPU_CHECK_TOTAL_S,
# default 480 s; a failed or timed-out step is logged and the script goes on):
#   1. install the wheels into /tmp/site (PYTHONPATH) and the project without deps (editable; falls
#      back to a non-editable install into /tmp/site); print versions and nvidia-smi
#   2. GPU tests: pytest -m gpu tests
#   3. python benchmarks/bench_kernels.py --out $OUT/kernels.json; python -m speeder_fast.profile kernels
#   4. python benchmarks/fastpath_check.py --out $OUT/fastpath.json
#   5. paradigm benchmarks: pytest benchmarks/test_bench_paradigms.py --benchmark-only
#      (--benchmark-json $OUT/paradigms.json, collector $OUT/paradigms_summary.json);
#      SmolLM2-135M config with random weights (bf16) + real tokenizer, then Llama-2-7B shape NF4
#   6. python -m speeder_fast.profile train (speeder, 1 profiled step) -> plots.tgz/profile/
#   7. python benchmarks/report.py -> $OUT/RESULTS_gpu.md + plots (bundled in $OUT/plots.tgz)
# Outputs in $OUT (7 files, the device tool returns at most 8): gpu_check.log, kernels.json,
# fastpath.json, paradigms.json, paradigms_summary.json, RESULTS_gpu.md, plots.tgz.
# Exit status: 0 when every step succeeded, 1 otherwise (the failed steps are listed at the end).
#
# Local dry run on a CPU machine (GPU-only steps skip or fail fast, the rest runs):
#   OUT=/tmp/out GPU_CHECK_TOTAL_S=900 bash benchmarks/gpu_check.sh
# Per-step caps (seconds) can be changed with CAP_TESTS, CAP_KERNELS, CAP_FASTPATH, CAP_PARADIGMS,
# CAP_PROFILE_KERNELS, CAP_PROFILE; the paradigm benchmarks stop starting new cases after PARADIGM_BUDGET_S.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1

T0=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_S:-480}
RESERVE=25   # kept for the report at the end
FAILED=()
PY=${PYTHON:-python3}

elapsed() { echo $(( $(date +%s) - T0 )); }

# step NAME CAP CMD...: run CMD under timeout min(CAP, time left - RESERVE); record failures
step() {
  local name=$1 cap=$2; shift 2
  local left=$(( TOTAL - $(elapsed) - RESERVE ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 15 ]; then
    echo "=== $name: SKIPPED (only ${left}s left of GPU_CHECK_TOTAL_S=$TOTAL) ==="
    FAILED+=("$name(skipped:time)")
    return 0
  fi
  echo "=== $name (timeout ${limit}s, t=$(elapsed)s) ==="
  local s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - s ))s ==="
  if [ $rc -ne 0 ]; then
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then FAILED+=("$name(timeout)"); else FAILED+=("$name(rc=$rc)"); fi
  fi
  return 0
}

# ---------------------------------------------------------------- 1. install + environment
echo "=== install (t=$(elapsed)s) ==="
if ls .whl/*.whl >/dev/null 2>&1; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "wheel install failed"; FAILED+=("wheels")
  fi
else
  echo "no wheels in .whl/ (run ../shared/gpu/fetch-wheels.sh .whl here first): bitsandbytes/liger may be missing"
  FAILED+=("wheels(missing)")
fi
if ! $PY -c "import speeder_fast.kernels" >/dev/null 2>&1; then
  if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . ; then
    echo "editable install failed; trying a plain install into /tmp/site"
    mkdir -p /tmp/site
    $PY -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . || FAILED+=("install")
    case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH};; esac
  fi
fi
# data: tests and benchmarks read ../shared/data; the carried copy lives in .gpu_data
if [ -d .gpu_data/amazon-office ]; then
  export SPEEDER_BENCH_DATA=$ROOT/.gpu_data/amazon-office
  if [ ! -e ../shared/data ]; then mkdir -p ../shared && ln -sfn "$ROOT/.gpu_data" ../shared/data; fi
else
  echo "no .gpu_data/amazon-office (see the top of this script): the paradigm benchmarks will skip"
  FAILED+=("data(missing)")
fi
if [ -f .gpu_assets/smollm2/config.json ]; then
  export SPEEDER_BENCH_SMOLLM2=$ROOT/.gpu_assets/smollm2
else
  echo "no .gpu_assets/smollm2 (python benchmarks/prepare_gpu_assets.py): SmolLM2 cases will fail to load"
  FAILED+=("assets(missing)")
fi
export SPEEDER_CACHE=${SPEEDER_CACHE:-/tmp/speeder_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi unavailable"
$PY - <<'PY'
import importlib.metadata as md
import sys
print("python", sys.version.split()[0])
for p in ("torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "flash-attn", "pytest",
          "pytest-benchmark", "matplotlib", "numpy", "speeder-fast"):
    try:
        print(f"  {p} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p} MISSING")
try:
    import torch
    print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
    import speeder_fast.kernels  # noqa: F401
    print("speeder_fast import ok")
except Exception as e:  # noqa: BLE001
    print("import problem:", type(e).__name__, e)
PY

# ---------------------------------------------------------------- 2-6. checks
step "gpu-tests" "${CAP_TESTS:-90}" $PY -m pytest -q -m gpu tests -p no:cacheprovider -rs
step "bench-kernels" "${CAP_KERNELS:-70}" $PY benchmarks/bench_kernels.py --out "$OUT/kernels.json" --reps 20
PROF=/tmp/gpu_check_extra/profile
mkdir -p "$PROF"
# where the inject fwd+bwd time goes (GPU kernels vs host; Triton metadata), trace bundled in plots.tgz
step "profile-kernels" "${CAP_PROFILE_KERNELS:-30}" $PY -m speeder_fast.profile kernels --out "$PROF/kernels_trace.json"
step "fastpath" "${CAP_FASTPATH:-85}" $PY benchmarks/fastpath_check.py --out "$OUT/fastpath.json" --time-budget 55 --steps 3
SPEEDER_BENCH_BUDGET_S=${PARADIGM_BUDGET_S:-140} \
  step "paradigms" "${CAP_PARADIGMS:-160}" $PY -m pytest benchmarks/test_bench_paradigms.py --benchmark-only -q -rs \
  -p no:cacheprovider --benchmark-json "$OUT/paradigms.json" --paradigm-summary "$OUT/paradigms_summary.json"
step "profile-train" "${CAP_PROFILE:-45}" $PY -m speeder_fast.profile train --paradigm speeder \
  --data "${SPEEDER_BENCH_DATA:-../shared/data/amazon-office}" --model "${SPEEDER_BENCH_SMOLLM2:-smollm2-135m}" \
  --batch-size 16 --steps 3 --profile-steps 1 --out "$PROF"

# ---------------------------------------------------------------- 7. report
echo "=== report (t=$(elapsed)s) ==="
INPUTS=()
for f in paradigms.json paradigms_summary.json kernels.json fastpath.json; do
  [ -s "$OUT/$f" ] && INPUTS+=(--json "$OUT/$f")
done
PLOTS=/tmp/gpu_check_extra/plots
if [ ${#INPUTS[@]} -gt 0 ]; then
  if ! timeout 60 $PY benchmarks/report.py "${INPUTS[@]}" --out-md "$OUT/RESULTS_gpu.md" --plots "$PLOTS" \
      --title "GPU check $(date +%Y-%m-%d)" > /tmp/gpu_check_extra/report_stdout.md; then
    FAILED+=("report")
  fi
else
  echo "no JSON results to report"; FAILED+=("report(no inputs)")
fi
tar -czf "$OUT/plots.tgz" -C /tmp/gpu_check_extra plots profile 2>/dev/null \
  || tar -czf "$OUT/plots.tgz" -C /tmp/gpu_check_extra . 2>/dev/null || true

echo
echo "=== short table ==="
if [ -s "$OUT/RESULTS_gpu.md" ]; then
  # the speedup table, then the training rows
  awk '/^#### Speeder speedups/{p=1} /^#### Skipped/{p=0} p' "$OUT/RESULTS_gpu.md" | head -40
  awk '/^#### Training/{p=1} /^#### Inference/{p=0} p' "$OUT/RESULTS_gpu.md" | head -25
fi
echo
echo "finished in $(elapsed)s; outputs: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED steps: ${FAILED[*]}"
  exit 1
fi
echo "all steps succeeded"
exit 0
