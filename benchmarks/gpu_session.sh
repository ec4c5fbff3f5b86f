#!/usr/bin/env bash
# The issue-5 GPU session in one prepared call: environment, compiled-kernel tests, benchmarks; everything to $OUT.
#
# On the lent GPU machine (device tool), from the repository root, with the higher wheel and the
# kernels compiled for sm_90 carried (both git-ignored; see benchmarks/GPU_NOTES.md):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".triton-sm90"], timeout_s=600)
# Locally (the plumbing only, no GPU):
#   DEVICE=cpu STEPS="env tests unroll" OUT=runs/gpu-session bash benchmarks/gpu_session.sh
#
# Why it is shaped this way (see benchmarks/GPU_NOTES.md):
# - the machine has torch 2.11 and Triton 3.6 but no package index and no `higher`: the wheel in
#   .whl/ is installed with --no-index, and l2l itself without its dependencies or build isolation;
# - a session has about 12 minutes of device time once the machine has started, so every step has
#   a time limit inside one overall budget (BUDGET_S), the steps run most important first, and a
#   step that does not fit is skipped and named, to be rerun with STEPS=...;
# - Triton compiles each kernel variant on one CPU core (15-30 s for the backward kernel): the
#   `cache` step installs the variants compiled ahead of time on the development machine
#   (benchmarks/kernel_cache.py build), every step reports how many it still had to compile, and
#   what is left compiles in parallel processes (pytest-xdist, unroll_throughput.py --workers);
# - at most 8 files come back from $OUT: one log plus one JSON per benchmark.
#
# Environment: STEPS (default "cache env tests unroll sweep tf32 step"), BUDGET_S (default 540),
# DEVICE (default cuda), PYTHON (default python3), WORKERS (default: the CPU count, at most 16),
# TEST_TIMEOUT_S (default 120: one CUDA test's limit), TRITON_CACHE_DIR (default /tmp/l2l-triton-cache).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/gpu-session}
mkdir -p "$OUT"
LOG=$OUT/session.log
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-cache env tests unroll sweep tf32 step}
WORKERS=${WORKERS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-120}
DEADLINE=$(( SECONDS + ${BUDGET_S:-540} ))
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/l2l-triton-cache}
FAILED=()

say() { echo "$*" | tee -a "$LOG"; }
compiled() { find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l; }

# step NAME LIMIT_S COMMAND...: runs COMMAND under the smaller of LIMIT_S and the budget left.
step() {
    local name=$1 limit=$2 left rc begin kernels
    shift 2
    left=$(( DEADLINE - SECONDS ))
    if (( left < 30 )); then
        say "== SKIPPED $name: ${left} s of the budget left (rerun with STEPS=\"$name ...\")"
        FAILED+=("$name(skipped)")
        return
    fi
    (( limit > left )) && limit=$left
    say "== $name (limit ${limit} s, $(date -u +%H:%M:%S)): $*"
    begin=$SECONDS
    kernels=$(compiled)
    set -o pipefail
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=$?
    set +o pipefail
    say "== $name: exit $rc after $(( SECONDS - begin )) s; Triton's cache gained $(( $(compiled) - kernels )) kernels"
    (( rc != 0 )) && FAILED+=("$name(exit $rc)")
}

setup() {
    local site=/tmp/l2l-site
    # Importable from elsewhere means installed already (the development venv, CI).
    (cd /tmp && "$PY" -c "import higher, l2l" 2>/dev/null) && return
    if ! "$PY" -c "import higher" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! "$PY" -c "import higher" 2>/dev/null; then
        say "higher is missing: on the development machine run
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux2014_x86_64 -d .whl higher==0.2.1
and carry .whl (it is git-ignored)"
        exit 3
    fi
    # Install without the index or build isolation (nothing can be fetched there); else the source tree.
    if ! (cd /tmp && "$PY" -c "import l2l" 2>/dev/null); then
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
        (cd /tmp && "$PY" -c "import l2l" 2>/dev/null) || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
}

environment() {
    "$PY" - <<'EOF'
import os, platform, torch, l2l
from l2l.kernels import fused
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {fused.triton_version()}, "
      f"l2l {l2l.__version__} from {os.path.dirname(l2l.__file__)}, {os.cpu_count()} CPUs")
if torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    print(f"GPU {properties.name}, {properties.multi_processor_count} SMs, {properties.total_memory / 2**30:.0f} GiB, "
          f"sm_{properties.major}{properties.minor}; fused available: {fused.fused_available('cuda')} "
          f"({fused.unavailable_reason('cuda') or 'ok'}); defaults {fused.get_config()}")
else:
    print("no CUDA device")
EOF
}

run_tests() {
    local parallel=() limit=(-o "faulthandler_timeout=$TEST_TIMEOUT_S")
    "$PY" -c "import xdist" 2>/dev/null && parallel=(-n "$(( WORKERS < 8 ? WORKERS : 8 ))")
    # A test past TEST_TIMEOUT_S has its stack logged; with pytest-timeout (on the GPU machine) it
    # also fails, so that a hung test does not hold its worker, and the step, until the step's limit.
    "$PY" -c "import pytest_timeout" 2>/dev/null && limit=(--timeout "$TEST_TIMEOUT_S")
    # -v: each test's result is logged as it ends, so a step cut short still says which passed.
    OMP_NUM_THREADS=2 "$PY" -m pytest -v -m cuda -p no:cacheprovider "${parallel[@]}" "${limit[@]}" tests/
}

for name in $STEPS; do
    case $name in
        cache | env | tests | unroll | sweep | tf32 | step) ;;
        *) echo "unknown step '$name' (steps: cache env tests unroll sweep tf32 step)" >&2; exit 2 ;;
    esac
done
: >"$LOG"
export PY WORKERS TEST_TIMEOUT_S
export -f environment run_tests  # timeout runs commands, not functions: the steps call them through bash -c
say "gpu_session: steps '$STEPS', budget ${BUDGET_S:-540} s, device $DEVICE, $WORKERS workers, out $OUT"
setup
for name in $STEPS; do
    case $name in
        cache) step cache 60 "$PY" benchmarks/kernel_cache.py install .triton-sm90 ;;
        env) step env 60 bash -c environment ;;
        tests) step tests 240 bash -c run_tests ;;
        unroll) step unroll 200 "$PY" benchmarks/unroll_throughput.py --device "$DEVICE" --workers "$WORKERS" \
                     --json "$OUT/unroll-$DEVICE.json" ;;
        sweep) step sweep 200 "$PY" benchmarks/unroll_throughput.py --device "$DEVICE" --sweep --workers "$WORKERS" \
                    --json "$OUT/sweep-$DEVICE.json" ;;
        tf32) step tf32 150 "$PY" benchmarks/unroll_throughput.py --device "$DEVICE" --precision tf32 --kernels fused \
                   --workers "$WORKERS" --json "$OUT/unroll-$DEVICE-tf32.json" ;;
        step) step step 90 "$PY" benchmarks/optimizer_step.py --device "$DEVICE" --json "$OUT/step-$DEVICE.json" ;;
    esac
done
say "gpu_session done in $SECONDS s; ${#FAILED[@]} steps failed or skipped: ${FAILED[*]:-none}"
(( ${#FAILED[@]} == 0 ))
