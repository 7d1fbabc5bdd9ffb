#!/usr/bin/env bash
# One device call = one run of this script: `bash benchmarks/h200.sh STAGE...`.
# Stages: setup tests kernels model profile train2 (see below). Each stage logs to
# $OUT/<stage>.log and carries on after a failure; a summary table prints last.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
declare -a SUMMARY
stage() {  # stage NAME COMMAND...
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*"
  "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
}
for s in "$@"; do
  case $s in
    setup) stage setup bash -c 'python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -c "import torch, triton, recycore.kernels as k; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), k.__file__)"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv' ;;
    tests) stage tests python3 -m pytest -q -x tests -p no:cacheprovider ;;
    kernels) stage kernels python3 -m pytest -q benchmarks -k "not micro_step" --benchmark-json="$OUT/kernels.json" ;;
    model) stage model python3 -m pytest -q -s benchmarks/test_bench_model.py --benchmark-json="$OUT/model.json" ;;
    profile) stage profile python3 -m recycore bench --profile --paths reference-compiled,triton ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
echo "=== summary"; printf '%s\n' "${SUMMARY[@]}"
