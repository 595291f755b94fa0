#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (one GPU, Python 3.12, torch + transformers +
# pytest-xdist, no network, no megatron-core / Transformer Engine / SGLang). Prepare the wheels
# here with `make gpu-wheels` (.whl/gpu, carried along), then run there:
#
#     bash tools/gpu_check.sh --out DIR            # < 8 minutes, each step time-boxed
#     bash tools/gpu_check.sh --out DIR --dry-run  # the same steps at tiny sizes, on CPU
#
# Steps, most valuable first (a step that runs out of time is interrupted, SIGINT then KILL, and
# recorded as timed out; pytest steps still report the tests that ran):
#   1 install    the wheels into temporary --target folders (megatron-core 0.16.1, the newest
#                megatron-core, light test deps); nothing is installed into the system
#   2 gpu-tests  tests/gpu cases needing neither TE nor SGLang: model build, weight sync over
#                NCCL into the HF engine, shared-prefix layout, activation recomputation
#   3 bench-*    log-prob memory at 8k x 152k; bf16 train-step MFU at a 1B shape; weight sync
#                vs a device copy (random-init SmolLM2); shared prefix at 4k ctx / 1k resp / G=8
#   4 cpu-suite  the CPU unit tests + doctests under the newest megatron-core, pytest -n 16
#                (dry run: a small subset, no xdist)
# Writes DIR/gpu_check.log (everything), DIR/steps/*.log, DIR/bench/*.json and DIR/results.json.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="" DRY=0 WHEELS="$ROOT/.whl/gpu" BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --wheels) WHEELS=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check.sh: --out DIR is required" >&2; exit 2; }
# The dry run's CPU steps are slow on a shared 2-core machine: its time boxes are stretched.
SCALE=1
[ "$DRY" = 1 ] && SCALE=${GPU_CHECK_DRY_SCALE:-8} && BUDGET_S=$((BUDGET_S * SCALE))
PY=${RPT_PYTHON:-python3}
mkdir -p "$OUT/steps" "$OUT/bench"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: > "$LOG"
: > "$OUT/steps/steps.jsonl"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
START=$(date +%s)
cd "$ROOT"

export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 RPT_BENCH_RESULTS="$OUT/bench"
if [ -d "$WHEELS/smollm2-tokenizer" ]; then
  # The embedded SmolLM2's tokenizer and config (its weights do not travel): tests and benches
  # that need only those find them where megatron_rpt.assets looks.
  export MEGATRON_RPT_CACHE="$TMP/cache"
  mkdir -p "$MEGATRON_RPT_CACHE"
  cp -r "$WHEELS/smollm2-tokenizer" "$MEGATRON_RPT_CACHE/smollm2-135m-instruct-v1-fp32"
fi

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD under a time box (never past the overall budget), log it,
# record {name, rc, seconds, limit} in steps.jsonl.
step() {
  local name=$1 limit=$(($2 * SCALE)); shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    log "$name: skipped (overall budget of ${BUDGET_S}s spent)"
    echo "{\"name\": \"$name\", \"rc\": null, \"seconds\": 0, \"limit_s\": 0, \"status\": \"no time left\"}" >> "$OUT/steps/steps.jsonl"
    return
  fi
  log "$name: start (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  # SIGINT first: pytest then still writes its summary and JUnit XML (partial results)
  timeout -s INT -k 20 "$limit" "$@" > "$OUT/steps/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0)) status=ok
  [ "$rc" -ne 0 ] && status=failed
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status="timed out"
  tail -n 25 "$OUT/steps/$name.log" >> "$LOG"
  log "$name: $status (rc $rc, ${took}s)"
  echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"limit_s\": $limit, \"status\": \"$status\"}" >> "$OUT/steps/steps.jsonl"
}

# ---------------------------------------------------------------- 1. install
MCORE_PIN=$(ls "$WHEELS"/megatron_core-0.16.1-*.whl 2>/dev/null | head -1)
MCORE_NEW=$(ls "$WHEELS"/megatron_core-*.whl 2>/dev/null | grep -v 'megatron_core-0\.16\.1-' | sort -V | tail -1)
DEPS=$(ls "$WHEELS"/*.whl 2>/dev/null | grep -v '/megatron_core-' | tr '\n' ' ')
install_wheels() {
  # Dry run (Python 3.11 here): install for 3.12 without importing, to prove the step works.
  local target_py=()
  [ "$DRY" = 1 ] && target_py=(--python-version 3.12 --only-binary=:all:)
  [ -n "$MCORE_PIN$MCORE_NEW$DEPS" ] || { echo "no wheels in $WHEELS (run make gpu-wheels)"; return 3; }
  [ -z "$MCORE_PIN" ] || "$PY" -m pip install -q --no-index --no-deps "${target_py[@]}" --target "$TMP/mcore-pin" "$MCORE_PIN" || return 1
  [ -z "$MCORE_NEW" ] || "$PY" -m pip install -q --no-index --no-deps "${target_py[@]}" --target "$TMP/mcore-new" "$MCORE_NEW" || return 1
  # shellcheck disable=SC2086
  [ -z "$DEPS" ] || "$PY" -m pip install -q --no-index --no-deps "${target_py[@]}" --target "$TMP/deps" $DEPS || return 1
  ls "$TMP"/*/ | head -50
}
export PY DRY TMP WHEELS MCORE_PIN MCORE_NEW DEPS
export -f install_wheels
step install 60 bash -c install_wheels
if [ "$DRY" = 1 ]; then
  PP_PIN="$ROOT" PP_NEW="$ROOT"   # the dry run imports this environment's packages
else
  PP_PIN="$TMP/deps:$TMP/mcore-pin:$ROOT" PP_NEW="$TMP/deps:$TMP/mcore-new:$ROOT"
fi
env PYTHONPATH="$PP_PIN" "$PY" - > "$OUT/steps/versions.json" 2>>"$LOG" <<'EOF'
import json, platform, sys
info = {"python": platform.python_version()}
try:
    import torch
    info |= {"torch": torch.__version__, "cuda": torch.version.cuda,
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
except Exception as exc:  # noqa: BLE001
    info["torch"] = f"unavailable: {exc}"
for mod in ("megatron.core", "transformers"):
    try:
        m = __import__(mod, fromlist=["__version__"])
        info[mod] = getattr(m, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        info[mod] = f"unavailable: {exc}"
json.dump(info, sys.stdout)
EOF

# ---------------------------------------------------------------- 2. tests/gpu without TE/SGLang
step gpu-tests 120 env PYTHONPATH="$PP_PIN" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
  -m "gpu and not te and not sglang_runtime and not slow" tests/gpu --junitxml="$OUT/steps/gpu-tests.xml"

# ---------------------------------------------------------------- 3. benchmarks (random init)
if [ "$DRY" = 1 ]; then
  LP=(--tokens 256 --vocab 4096 --reps 1) TS=(--size tiny --recipes --steps 1)
  SP=(--shapes 64x16 --group 2 --layers 1 --reps 1) RM=(--tiny)
else
  LP=(--tokens 8192 --vocab 152064 --hidden 4096 --reps 1 --device cuda) TS=(--size 1b --recipes --steps 2)
  SP=(--shapes 4096x1024 --group 8 --layers 30 --dtype bf16 --reps 2) RM=()
fi
step bench-logprobs 45 env PYTHONPATH="$PP_PIN" "$PY" bench/bench_logprobs.py "${LP[@]}"
step bench-train-step 75 env PYTHONPATH="$PP_PIN" "$PY" bench/bench_train_step.py "${TS[@]}"
if [ -n "${MEGATRON_RPT_CACHE:-}" ] || [ "$DRY" = 1 ]; then
  step random-model 30 env PYTHONPATH="$PP_PIN" "$PY" tools/gpu_check_assets.py random-model \
    "$(env PYTHONPATH="$PP_PIN" "$PY" -c 'from megatron_rpt.assets import smollm2_dir; print(smollm2_dir())' 2>>"$LOG")" \
    "$TMP/smollm2-random" "${RM[@]}"
  step bench-weight-sync 60 env PYTHONPATH="$PP_PIN" "$PY" bench/bench_weight_sync.py --quick --model "$TMP/smollm2-random"
  step bench-shared-prefix 60 env PYTHONPATH="$PP_PIN" "$PY" bench/bench_shared_prefix.py "${SP[@]}"
fi

# ---------------------------------------------------------------- 4. CPU suite, newest megatron-core
if [ "$DRY" = 1 ]; then
  step cpu-suite 120 env PYTHONPATH="$PP_NEW" "$PY" -m pytest -q -p no:cacheprovider -rfE \
    -m "not gpu" tests/unit/test_model_config.py tests/unit/test_fp8_config.py --junitxml="$OUT/steps/cpu-suite.xml"
else
  step cpu-suite 110 env CUDA_VISIBLE_DEVICES= PYTHONPATH="$PP_NEW" "$PY" -m pytest -q -p no:cacheprovider -rfE \
    -n 16 -m "not gpu" tests/unit megatron_rpt --junitxml="$OUT/steps/cpu-suite.xml"
fi

"$PY" "$ROOT/tools/gpu_check_report.py" "$OUT" --dry-run "$DRY" --mcore-pin "$(basename "${MCORE_PIN:-none}")" \
  --mcore-new "$(basename "${MCORE_NEW:-none}")" | tee -a "$LOG"
log "done in $(($(date +%s) - START))s; results in $OUT/results.json"
