#!/usr/bin/env bash
# Everything a GPU must show, from a fresh checkout, offline, in about 8 minutes:
#   bash benchmarks/gpu_check.sh OUT_DIR
# Needs JAX with CUDA, flax, optax, orbax, pytest and sentencepiece installed; the project is used from this
# checkout (no install, no network). Wheels for optional peers (tokamax and what it needs) are taken from .whl/
# when that folder exists (see benchmarks/README or RESULTS.md: "GPU check"); what is missing is skipped and said.
# Writes OUT_DIR/gpu_check.log (everything printed), OUT_DIR/results.md (every result table) and
# OUT_DIR/results.tar.gz (the JSON files). Each section has a time limit, so one slow part cannot eat the rest.
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ffl-site \
    .whl/*.whl && export PYTHONPATH=/tmp/ffl-site || echo "wheels in .whl/ did not install: peers skipped"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
section() { echo; echo "=== $1 (t=$(( $(date +%s) - start ))s, limit ${2}s)"; }
run() { local limit=$1; shift; timeout -k 5 "$limit" "$@"; local rc=$?; [ $rc -eq 124 ] && echo "(timed out)"; return 0; }
results_before=$(ls benchmarks/results/ 2>/dev/null)

section "device" 30
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
run 30 python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, jax.devices())"

section "fused attention kernels: values, gradients, fully masked rows, fwd+bwd time" 130
run 130 python3 benchmarks/fused_probe.py --lengths 2048,8192 --masks causal,segments,prefix \
  --kernels ours-flash,ours-xla,ours-blockwise,ours-cudnn,pallas-mha,tokamax-mosaic,tokamax-triton,tokamax-cudnn --repeats 10

section "training step: GPT-2 small, bf16, batch 16 x 1024, impl auto" 90
run 80 python3 benchmarks/train_step.py --preset gpt2-small --batch 16 --seq-len 1024 --peers ours \
  --set dtype=bfloat16 --repeats 10 --name train_step-gpt2-small-bf16-auto-gpu
section "training step: same, attention_impl=xla" 80
run 80 python3 benchmarks/train_step.py --preset gpt2-small --batch 16 --seq-len 1024 --peers ours \
  --set dtype=bfloat16 attention_impl=xla --repeats 10 --name train_step-gpt2-small-bf16-xla-gpu

section "attention benchmark, bf16, causal, 1k-16k" 60
run 60 python3 benchmarks/attention.py --lengths 1024,4096,16384 --impls reference,xla,blockwise,cudnn,flash,linear-elu \
  --masks causal --repeats 5 --time-budget 3 --name attention-gpu-bf16

section "linear attention and Gated DeltaNet: Pallas kernels vs XLA chunk forms vs cuDNN softmax, bf16, causal, 4k-64k" 90
run 90 python3 benchmarks/attention.py --lengths 4096,16384,65536 \
  --impls cudnn,linear-elu-pallas,linear-elu-xla,linear-elu-data,delta-data-pallas,delta-data-xla --masks causal \
  --repeats 5 --time-budget 3 \
  --name attention-gpu-linear-bf16

section "kernel and layer tests on the GPU (highest matmul precision)" 90
JAX_DEFAULT_MATMUL_PRECISION=highest run 90 python3 -m pytest -q -p no:cacheprovider -n 4 \
  tests/test_flash.py tests/test_softmax.py tests/test_masks.py tests/test_linear.py tests/test_linear_gates.py \
  tests/test_linear_pallas.py tests/test_delta.py tests/test_layers_attention.py \
  2>&1 | tail -40

section "collect" 10
new=$(comm -13 <(echo "$results_before") <(ls benchmarks/results/))
for f in $(echo "$new" | grep '\.md$'); do cat "benchmarks/results/$f"; echo; done > "$out/results.md"
(cd benchmarks/results && tar czf "$out/results.tar.gz" $(echo "$new" | grep '\.json$') 2>/dev/null)
echo "done in $(( $(date +%s) - start ))s"
