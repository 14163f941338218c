#!/usr/bin/env bash
# GPU device check, one script, < 8 minutes on one H200 (bare machine with jax[cuda], torch,
# transformers, flax, optax, orbax preinstalled for python3; no internet; this repo as the cwd):
#   1. environment (GPU, versions)
#   2. parity tests against transformers: tests/test_gpt2.py tests/test_hf.py (on the CPU, in the
#      background, while the GPU runs step 3)
#   3. throughput at the reference shapes (gpt2-config teacher -> 6-layer student, batch 8 x seq
#      1024, bf16, remat on): distil_jax vs the Distily-equivalent PyTorch baseline on padded rows
#      (24 % padding); then distil_jax alone with cuDNN flash attention, with packed rows, both,
#      and both without remat; the two padded runs also trace 2 steps with jax.profiler (top ops)
#   4. a short summary table
# What comes back is kept to a few files in "$OUT" (default ./device_check_out; the device tool
# returns at most 8), each rewritten after every part so that a run cut short still returns
# what it did: device_check.log (every part's output), results.json (each benchmark's JSON by
# run name), top_ops_<run>.txt (the profiles), summary.txt. Scratch files go to $WORK.
# Each part has its own `timeout`, and the whole script keeps to a global deadline (DEADLINE_S,
# default 465 s), so a hung part cannot eat the budget; a failed part is reported and the script
# goes on, exiting non-zero at the end.
#
#   bash tools/device_check.sh            # or: OUT=/somewhere bash tools/device_check.sh
#   DEVICE_CHECK_SMOKE=1 bash tools/device_check.sh   # tiny shapes: checks the script on a CPU
set -euo pipefail
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export TOKENIZERS_PARALLELISM=false TF_CPP_MIN_LOG_LEVEL=2

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/device_check_out}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/device_check.log"
: > "$LOG"
DEADLINE_S="${DEADLINE_S:-465}"
START=$(date +%s)
FAILED=()

# collect: merge the benchmarks' JSON into $OUT/results.json and copy the profiles' top ops.
collect() {
  "$PY" - "$WORK" "$OUT" <<'EOF' || true
import json, shutil, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
results = {f.stem[len("bench_"):]: json.loads(f.read_text()) for f in sorted(work.glob("bench_*.json"))}
(out / "results.json").write_text(json.dumps(results, indent=1))
for top in work.glob("profile_*/top_ops.txt"):
    shutil.copy(top, out / f"top_ops_{top.parent.name[len('profile_'):]}.txt")
EOF
}

# run_part NAME SECONDS CMD... : run CMD with `timeout`, capped by the time left before the
# deadline; its output to the terminal and $LOG; never aborts the script.
run_part() {
  local name="$1" limit="$2"; shift 2
  local left=$(( DEADLINE_S - ($(date +%s) - START) ))
  if (( left < 20 )); then
    echo "== $name: SKIPPED (only ${left}s left before the ${DEADLINE_S}s deadline)" | tee -a "$LOG"
    FAILED+=("$name(skipped)"); return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local t0=$(date +%s) rc=0
  set +e
  timeout --kill-after=10 "$limit" "$@" > >(tee -a "$LOG") 2>&1
  rc=$?
  set -e
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  if (( rc != 0 )); then FAILED+=("$name(rc=$rc)"); fi
  collect
  return 0
}

run_part env 45 bash -c '
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  '"$PY"' - <<EOF
import jax, torch, transformers, flax, optax
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("transformers", transformers.__version__, "flax", flax.__version__, "optax", optax.__version__)
EOF'

# The parity tests (against transformers, as the test suite defines them: jax on the CPU, float32)
# need no GPU: they run in the background on the upper half of the CPU cores while the GPU
# benchmarks run, and are collected at the end.
PARITY_LIMIT=240
PIN_TESTS=() PIN_BENCH=()
NCPU=$(nproc)
if command -v taskset >/dev/null && (( NCPU >= 8 )); then
  PIN_TESTS=(taskset -c "$(( NCPU / 2 ))-$(( NCPU - 1 ))") PIN_BENCH=(taskset -c "0-$(( NCPU / 2 - 1 ))")
fi
echo "== parity_tests (background, timeout ${PARITY_LIMIT}s): tests/test_gpt2.py tests/test_hf.py" | tee -a "$LOG"
( set +e; JAX_PLATFORMS=cpu timeout --kill-after=10 "$PARITY_LIMIT" "${PIN_TESTS[@]}" "$PY" -m pytest -q \
    -p no:cacheprovider tests/test_gpt2.py tests/test_hf.py > "$WORK/parity_tests.log" 2>&1
  echo $? > "$WORK/parity_tests.rc" ) &
PARITY_PID=$!

BENCH=(tools/bench_throughput.py --teacher gpt2-config --student-layers 6 --batch 8 --seq-len 1024
       --dtype bfloat16 --remat --warmup-steps 3 --steps 12 --windows 3)
CUDNN=(--attention cudnn)
if [[ "${DEVICE_CHECK_SMOKE:-0}" == 1 ]]; then  # a dry run of this script's logic on a CPU
  BENCH=(tools/bench_throughput.py --teacher tiny --batch 2 --seq-len 32 --dtype float32 --remat
         --warmup-steps 1 --steps 2 --windows 1)
  CUDNN=()  # no cuDNN on a CPU: those runs use xla
fi
# In order of importance: the baseline comparison first (both sides), then distil_jax alone with
# cuDNN flash attention and with packed rows. The baseline computes on every position whatever
# the layout, so its padded step time is also its packed step time.
run_part bench_padded 200 "${PIN_BENCH[@]}" "$PY" "${BENCH[@]}" --layout padded --pad-fraction 0.24 \
  --jax-profile "$WORK/profile_padded" --json "$WORK/bench_padded.json"
run_part bench_padded_cudnn 110 "${PIN_BENCH[@]}" "$PY" "${BENCH[@]}" "${CUDNN[@]}" --sides jax \
  --layout padded --pad-fraction 0.24 --jax-profile "$WORK/profile_padded_cudnn" \
  --json "$WORK/bench_padded_cudnn.json"
run_part bench_packed 90 "${PIN_BENCH[@]}" "$PY" "${BENCH[@]}" --sides jax --layout packed \
  --json "$WORK/bench_packed.json"
run_part bench_packed_cudnn 90 "${PIN_BENCH[@]}" "$PY" "${BENCH[@]}" "${CUDNN[@]}" --sides jax \
  --layout packed --json "$WORK/bench_packed_cudnn.json"
# Last, if time is left: what gradient checkpointing costs (the reference run keeps it on, as
# Distily does; an H200 has the memory to do without).
run_part bench_packed_cudnn_noremat 90 "${PIN_BENCH[@]}" "$PY" "${BENCH[@]}" "${CUDNN[@]}" --no-remat \
  --sides jax --layout packed --json "$WORK/bench_packed_cudnn_noremat.json"

left=$(( DEADLINE_S - ($(date +%s) - START) ))
echo "== waiting for parity_tests (at most ${left}s)" | tee -a "$LOG"
( sleep "$(( left > 5 ? left : 5 ))"; pkill -P "$PARITY_PID" 2>/dev/null; kill "$PARITY_PID" 2>/dev/null ) &
WATCH=$!
wait "$PARITY_PID" 2>/dev/null || true
kill "$WATCH" 2>/dev/null || true
cat "$WORK/parity_tests.log" >> "$LOG" 2>/dev/null || true
tail -3 "$WORK/parity_tests.log" 2>/dev/null || true
PRC=$(cat "$WORK/parity_tests.rc" 2>/dev/null || echo "killed")
echo "== parity_tests: rc=$PRC" | tee -a "$LOG"
[[ "$PRC" == 0 ]] || FAILED+=("parity_tests(rc=$PRC)")

echo "== summary (reference shapes: gpt2-config -> 6 layers, 8 x 1024, bf16, remat)"
"$PY" - "$OUT/results.json" <<'EOF' | tee "$OUT/summary.txt" || true
import json, sys
results = json.load(open(sys.argv[1]))
print(f"{'run':<20} {'side':<6} {'attn':<6} {'step s':>8} {'tok/s all':>11} {'tok/s real':>11} "
      f"{'peak GiB':>9} {'MFU':>7} {'compile s':>9}")
torch_real = None
for run in ("padded", "padded_cudnn", "packed", "packed_cudnn", "packed_cudnn_noremat"):
    d = results.get(run)
    if d is None:
        print(f"{run:<20} (no result)"); continue
    for side in ("jax", "torch"):
        r = d.get(side)
        if not r:
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        print(f"{run:<20} {side:<6} {r.get('attention', 'eager'):<6} {r['step_time_s_median']:>8.3f} "
              f"{r['tokens_per_s']:>11,.0f} {r['real_tokens_per_s']:>11,.0f} "
              f"{r['peak_memory_bytes'] / 2**30:>9.2f} {mfu:>7} {r['compile_s']:>9.1f}")
        if side == "torch" and run == "padded":
            torch_real = r["real_tokens_per_s"]
    if "ratio_real_tokens_per_s" in d:
        print(f"{run:<20} ratio jax/torch: real tokens/s {d['ratio_real_tokens_per_s']:.2f}x, "
              f"peak memory {d['ratio_peak_memory']:.2f}x")
    elif torch_real and "jax" in d:
        print(f"{run:<20} real tokens/s against the baseline's padded run: "
              f"{d['jax']['real_tokens_per_s'] / torch_real:.2f}x")
EOF

echo "== total $(( $(date +%s) - START ))s; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')" | tee -a "$LOG"
if (( ${#FAILED[@]} )); then
  echo "== FAILED parts: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "== all parts passed" | tee -a "$LOG"
