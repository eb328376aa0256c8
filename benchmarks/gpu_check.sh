#!/usr/bin/env bash
# Everything a GPU must show, from a fresh checkout, offline, in one call of under 7 minutes:
#   bash benchmarks/gpu_check.sh OUT_DIR
# and the same sections on the CPU, with tiny shapes and the Pallas kernels in interpret mode (under 3 minutes on
# 2 cores; CI runs it in a virtualenv holding exactly the GPU image's packages):
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh OUT_DIR
#
# Needs JAX (with CUDA on a GPU), flax, optax, orbax, pytest and sentencepiece; the project is used from this
# checkout (no install, no network; `datasets` is not needed). Wheels for optional peers (tokamax and what it needs)
# are taken from .whl/ when that folder exists; a missing optional package is named in the pre-flight with the
# sections it changes.
#
# Writes into OUT_DIR, whatever happens (an exit trap and every section collect): gpu_check.log (everything
# printed), results.md (every table so far), results/ (each benchmark's .md and .json, rewritten after every row),
# kernel-tests.log and kernel-tests.xml (JUnit), results.tar.gz, and jax-cache/ (JAX's compilation cache: a rerun
# into the same OUT_DIR is warm; GPU_CHECK_CACHE=DIR puts it elsewhere, e.g. outside a folder that is shipped back).
# Each section has a time limit within the whole run's, and prints its exit status.
set -u
out=${1:?usage: [GPU_CHECK_DRY=1] bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out/results" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$out/gpu_check.log") 2>&1
exec 3>&1  # section status lines reach the log even when a command's own output goes to a file
dry=${GPU_CHECK_DRY:-0}
[ "$dry" = 1 ] || dry=0
total=$([ "$dry" = 1 ] && echo 170 || echo 410)  # seconds for the whole run: every section fits inside
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false FFL_RESULTS_DIR="$out/results"
export JAX_COMPILATION_CACHE_DIR="${GPU_CHECK_CACHE:-$out/jax-cache}" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
if [ "$dry" = 1 ]; then
  export JAX_PLATFORMS=cpu
  # As tests/conftest.py does on the CPU: compile time dominates tiny shapes, and LLVM's passes most of it.
  case "${XLA_FLAGS:-}" in *xla_backend_optimization_level*) ;; *) export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0" ;; esac
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ffl-site \
    .whl/*.whl && export PYTHONPATH=/tmp/ffl-site || echo "wheels in .whl/ did not install: peers skipped"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)

collect() {  # every table written so far, into results.md and results.tar.gz
  (cd "$out/results" && for f in *.md; do if [ -e "$f" ]; then cat "$f"; echo; fi; done) > "$out/results.md.tmp" \
    && mv "$out/results.md.tmp" "$out/results.md"
  (cd "$out" && tar czf results.tar.gz.tmp results kernel-tests.xml 2>/dev/null; mv results.tar.gz.tmp results.tar.gz)
}
trap 'collect; echo "gpu_check: done in $(( $(date +%s) - start ))s (dry=$dry); results in $out"' EXIT
# An outer limit (timeout(1) signals the whole process group, tee included) still collects: the EXIT trap runs, and
# a write to the dead tee no longer kills the script.
trap '' PIPE
trap 'echo "gpu_check: stopped by a signal at t=$(( $(date +%s) - start ))s" >> "$out/gpu_check.log"; exit 143' TERM INT

left() { echo $(( total - ($(date +%s) - start) )); }
section() {  # section TITLE LIMIT: a header, and the limit cut to what the run has left (5 s kept for collecting)
  limit=$2
  [ "$limit" -gt $(( $(left) - 5 )) ] && limit=$(( $(left) - 5 ))
  echo; echo "=== $1 (t=$(( $(date +%s) - start ))s, limit ${limit}s)"
}
run() {  # run CMD...: under the section's limit; says how it ended; never stops the script
  if [ "$limit" -lt 5 ]; then echo "--- skipped: no time left" >&3; return 0; fi
  # SIGINT first: pytest then still writes its summary and JUnit file, a benchmark's table is already on disk
  timeout -s INT -k 10 "$limit" "$@"
  local rc=$?
  case $rc in
    0) echo "--- exit 0" >&3 ;;
    124|137) echo "--- timed out after ${limit}s (exit $rc)" >&3 ;;
    *) echo "--- FAILED: exit $rc" >&3 ;;
  esac
  collect
  return 0
}
pick() { [ "$dry" = 1 ] && echo "$2" || echo "$1"; }  # pick GPU_VALUE DRY_VALUE

section "pre-flight: versions, device, imports, optional packages" 30
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found$( [ "$dry" = 1 ] && echo ' (dry run on the CPU)')"
run python3 benchmarks/preflight.py --expect "$(pick gpu cpu)"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadfile")

section "kernel tests: flash, linear Pallas, delta Pallas (highest matmul precision)" "$(pick 120 60)"
# A GPU runs every kernel test; the dry run a few of each file, to show the section works.
select=(); [ "$dry" = 1 ] && select=(-k "lowers_to_triton or precision or test_mha_and_mqa")
JAX_DEFAULT_MATMUL_PRECISION=highest run python3 -m pytest -v -rfE -p no:cacheprovider $xdist \
  --junitxml="$out/kernel-tests.xml" -o junit_family=xunit2 \
  tests/test_flash.py tests/test_linear_pallas.py tests/test_delta.py "${select[@]}" > "$out/kernel-tests.log" 2>&1
# One line per test in the log (-v), so a cut run still names what failed; then pytest's own summary.
grep -E "(FAILED|ERROR) tests/|^(FAILED|ERROR) |[0-9]+ (passed|failed|error)" "$out/kernel-tests.log" | tail -40

section "training step: GPT-2 small, bf16, impl auto (our Pallas flash on packed batches)" "$(pick 70 30)"
run python3 benchmarks/train_step.py --peers ours --set dtype=bfloat16 $(pick \
  "--preset gpt2-small --batch 16 --seq-len 1024 --repeats 10" "--preset gpt-tiny --batch 2 --seq-len 64 --repeats 2") \
  --name train_step-bf16-auto

section "fused attention: ours-Pallas, cuDNN, jax's Pallas mha, blockwise; causal, segments, prefix" "$(pick 80 40)"
run python3 benchmarks/fused_probe.py --masks causal,segments,prefix \
  --kernels ours-pallas,ours-cudnn,pallas-mha,ours-blockwise,tokamax-cudnn --no-masked-rows $(pick \
  "--lengths 4096 --repeats 10" "--lengths 128 --batch 1 --heads 2 --head-dim 32 --repeats 1 --interpret") \
  --name fused_probe-4k

section "linear attention and Gated DeltaNet, Pallas, vs cuDNN softmax: causal, long" "$(pick 60 30)"
run python3 benchmarks/attention.py --impls cudnn,linear-elu-pallas,delta-data-pallas --masks causal \
  --repeats 5 --time-budget 3 $(pick "--lengths 4096,16384,65536 --dtype bfloat16" \
  "--lengths 128 --heads 2 --kv-heads 2 --head-dim 32 --dtype float32") --name attention-linear-long

section "training step baseline: same, attention_impl=xla" "$(pick 50 25)"
run python3 benchmarks/train_step.py --peers ours --set dtype=bfloat16 attention_impl=xla $(pick \
  "--preset gpt2-small --batch 16 --seq-len 1024 --repeats 10" "--preset gpt-tiny --batch 2 --seq-len 64 --repeats 2") \
  --name train_step-bf16-xla
