#!/usr/bin/env bash
# One device call = one run of this script: `bash benchmarks/h200.sh STAGE...` from the repo root.
# Stages: see the case below. Everything logs to $OUT/all.log; a summary prints last.
# On a machine with several GPUs, `bash benchmarks/h200.sh parallel 0=STAGE,STAGE 1=STAGE ...` runs
# each list on its own GPU at once (CUDA_VISIBLE_DEVICES=N, output under $OUT/gpuN), with env
# assignments allowed in a list (`1=KERNELS=reference,train`).
#
# The lent H200 cannot `pip install -e .` (setuptools re-runs pip with build isolation, which needs the
# network), so recycore runs from a symlink tree on PYTHONPATH: recycore/* plus kernels/ as
# recycore/kernels, with the working directory outside the repo so ./recycore does not shadow it.
set -u
R=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${1:-}" = parallel ]; then
  # Only 8 files come back from a device call: everything is gathered into $OUT/results.tgz.
  shift
  STAGING=/tmp/h200_results; rm -rf "$STAGING"; mkdir -p "$STAGING"
  for spec in "$@"; do
    gpu=${spec%%=*}; IFS=, read -r -a items <<< "${spec#*=}"
    envs=(); stages=()
    for item in "${items[@]}"; do [[ $item == *=* ]] && envs+=("$item") || stages+=("$item"); done
    env "${envs[@]}" CUDA_VISIBLE_DEVICES="$gpu" OUT="$STAGING/gpu$gpu" bash "$0" "${stages[@]}" \
      > "$STAGING/gpu$gpu.log" 2>&1 &
  done
  wait
  for spec in "$@"; do echo "=== gpu ${spec%%=*}: ${spec#*=}"; sed -n '/^=== summary/,$p' "$STAGING/gpu${spec%%=*}.log"; done
  tar czf "$OUT/results.tgz" -C "$STAGING" . && ls -la "$OUT"
  exit 0
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$R/.cache/inductor}
# Autotuning decisions are small (GEMM timings in cache/<system hash>, pointwise best configs in
# *.best_config) while the compiled cache is GBs: they come back as $OUT/inductor_autotune.tgz and, carried
# as .cache/inductor_autotune.tgz, seed the next machine's cache, which then skips the benchmarking
# (the bulk of a max-autotune compile) but still compiles. Without a carried one, the committed
# benchmarks/results/h200_inductor_autotune.tgz seeds it (recycore.bench.seed_inductor_cache);
# RECYCORE_AUTOTUNE_ARCHIVE=none autotunes from scratch.
[ -f "$R/.cache/inductor_autotune.tgz" ] && export RECYCORE_AUTOTUNE_ARCHIVE=${RECYCORE_AUTOTUNE_ARCHIVE:-$R/.cache/inductor_autotune.tgz}
pack_autotune() {
  [ -d "$TORCHINDUCTOR_CACHE_DIR" ] || return 0
  (cd "$TORCHINDUCTOR_CACHE_DIR" && find . -path './cache/*' -type f -o -name '*.best_config' -type f \
     | tar czf "$OUT/inductor_autotune.tgz" -T -) && echo "autotune decisions: $OUT/inductor_autotune.tgz"
}
P=/tmp/recycore_path_$$; rm -rf "$P"; mkdir -p "$P/recycore"
for f in "$R"/recycore/*; do ln -s "$f" "$P/recycore/"; done
ln -s "$R/kernels" "$P/recycore/kernels"
export PYTHONPATH=$P
mkdir -p /tmp/recycore_work_$$ && cd /tmp/recycore_work_$$ || exit 1
LOG=$OUT/all.log
declare -a SUMMARY
stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-8s rc=%-4s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  return "$rc"
}
python3 -c "import torch, triton, recycore.kernels as k; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), k.__file__)" | tee -a "$LOG"
python3 -c "from recycore.bench import seed_inductor_cache; seed_inductor_cache()" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
mat_warm() {
  stage mat-warm "${MAT_LIMIT:-300}" python3 -c "import torch; from recycore.bench import micro_step; \
from recycore.config import Config; print(micro_step('reference-max-autotune', Config(), repeats=3))"
}
DEMO=(--data-path "$R/data/datasets/demo_sp1024" --tokenizer-path "$R/data/tokenizers/demo_1024_bpe.model")
for s in "$@"; do
  case $s in
    # the GPU tests: the kernels (K1 at the seed shapes, K3, K2) and the model with them against the
    # reference model at the seed's width
    # (TEST_FILES: which test_*.py files, default all of these)
    tests) files=(); for t in ${TEST_FILES:-gemm mlp int5 int5_model model_kernels attention}; do files+=("$R/tests/test_$t.py"); done
           stage tests "${TESTS_LIMIT:-480}" python3 -m pytest -q -x --durations=12 -p no:cacheprovider "${files[@]}" ;;
    # one max-autotune step (per-block compile) under MAT_LIMIT seconds, filling the inductor cache in
    # TORCHINDUCTOR_CACHE_DIR (point it outside the repo to keep it across calls on a warm machine)
    matwarm) mat_warm ;;
    # whole-model micro-step (48 x 2048, fwd+bwd): reference compiled vs triton, with the profile of each
    # (RECYCORE_BENCH_PATHS picks the paths; with reference-max-autotune in it, matwarm runs first and
    # the benchmark reuses its cache; if that does not finish, the path is dropped)
    model) paths=${RECYCORE_BENCH_PATHS:-reference-compiled,triton}; paths=${paths//+/,}
           if [[ $paths == *max-autotune* && ${MAT_WARM:-1} != 0 ]]; then
             mat_warm || paths=$(echo "$paths" | sed 's/reference-max-autotune,\?//; s/,$//')
           fi
           RECYCORE_BENCH_PATHS=$paths stage model "${MODEL_LIMIT:-260}" python3 -m pytest -q -s -p no:cacheprovider \
             "$R/benchmarks/test_bench_model.py" --benchmark-json="$OUT/model.json" ;;
    # per-kernel benchmarks (BENCH_FILES: which of K1 mlp, K2 attention, K3 int5), pytest-benchmark JSON
    suite) files=(); for k in ${BENCH_FILES:-mlp attention int5}; do files+=("$R/benchmarks/test_bench_$k.py"); done
           stage suite "${SUITE_LIMIT:-500}" python3 -m pytest -q -s -p no:cacheprovider "${files[@]}" \
             --benchmark-json="$OUT/suite.json" ;;
    # K1: every GEMM of the MLP over block configs, tiled and persistent (k1_sweep.json, k1_best.json),
    # then ours with the best configs against torch.compile max-autotune (k1_baseline.json)
    k1sweep) stage k1pre 150 python3 "$R/benchmarks/test_bench_mlp.py" "$OUT" --precompile
             stage k1sweep "${K1_LIMIT:-240}" python3 "$R/benchmarks/test_bench_mlp.py" "$OUT"
             stage k1base 200 python3 "$R/benchmarks/test_bench_mlp.py" "$OUT" --baseline ;;
    # the seed's config on the demo data with the fused kernels, wall-clock capped, then the int5
    # artifact and its three figures (pre-quant, int5 round trip, int5 sliding window)
    # (KERNELS=reference for the reference model, compiled; run id h200_$KERNELS; the artifact is
    # $CKPT_DIR/h200_$KERNELS/final_model.int5.ptz)
    train) stage train "${TRAIN_LIMIT:-210}" python3 -m recycore train "${DEMO[@]}" --kernels "${KERNELS:-triton}" \
             --run-id "h200_${KERNELS:-triton}" --max-wallclock-seconds "${TRAIN_SECONDS:-70}" \
             --iterations "${ITERATIONS:-20000}" \
             --warmdown-iters "${WARMDOWN_ITERS:-30}" --warmup-steps "${WARMUP_STEPS:-3}" --ema-decay "${EMA_DECAY:-0.997}" \
             --val-loss-every "${VAL_EVERY:-0}" --train-log-every 10 --log-dir "$OUT" --checkpoint-dir "${CKPT_DIR:-/tmp/recycore_ckpt}" ;;
    # same global batch (786,432 tokens) on 1 GPU (8 micro-steps) and on 2 GPUs (4 each): losses must agree
    dist) SHORT=(--kernels triton --compile-model 0 --iterations "${DIST_STEPS:-12}" --max-wallclock-seconds 0
                 --warmup-steps 0 --warmdown-iters 0 --val-loss-every 0 --train-log-every 1
                 --val-max-tokens 65536 --eval-stride 2048 --log-dir "$OUT" --checkpoint-dir /tmp/recycore_ckpt)
          stage gpu1 200 env CUDA_VISIBLE_DEVICES=0 python3 -m recycore train "${DEMO[@]}" "${SHORT[@]}" --run-id gpu1
          stage gpu2 200 torchrun --standalone --nproc_per_node=2 -m recycore train "${DEMO[@]}" "${SHORT[@]}" \
             --run-id gpu2 ;;
    # an exported artifact (ARTIFACT=path: absolute, or relative to the repo and carried) evaluated with
    # packed int5 weights (K3) and dequantised, both compiled
    int5) art=$ARTIFACT; [[ $art == /* ]] || art=$R/$art
          for mode in --int5-direct --no-int5-direct; do
            stage "eval${mode#--}" "${EVAL_LIMIT:-120}" python3 -m recycore eval "$art" "${DEMO[@]}" --mode both \
              --json "$OUT/eval${mode#--}.json" "$mode"
          done ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
pack_autotune
echo "=== summary"; printf '%s\n' "${SUMMARY[@]}"
