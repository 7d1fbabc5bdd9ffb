#!/usr/bin/env bash
# One device call = one run of this script: `bash benchmarks/h200.sh STAGE...` from the repo root.
# Stages: see the case below. Everything logs to $OUT/all.log; a summary prints last.
# The figures of every stage also land as rows of the results history in $OUT/results_new.jsonl; back
# home, `python3 benchmarks/report.py --append results_new.jsonl` adds them to benchmarks/results.jsonl.
# COMMIT=<short sha> names the code that ran (a snapshot without .git cannot tell; default: git, else
# unknown); BENCH_RUN (default: the start time) groups the call's rows, which are compared only among themselves.
# On a machine with several GPUs, `bash benchmarks/h200.sh parallel 0=STAGE,STAGE 1=STAGE ...` runs
# each list on its own GPU at once (CUDA_VISIBLE_DEVICES=N, output under $OUT/gpuN), with env
# assignments allowed in a list (`1=KERNELS=reference,train`).
#
# The lent H200 cannot `pip install -e .` (no network for build isolation; without it, it failed there too),
# so recycore runs from a symlink tree on PYTHONPATH: recycore/* plus kernels/ as recycore/kernels, with
# the working directory outside the repo so ./recycore does not shadow it.
set -u
R=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
COMMIT=${COMMIT:-$(git -C "$R" rev-parse --short HEAD 2>/dev/null || echo unknown)}
BENCH_RUN=${BENCH_RUN:-$(date -u +%Y-%m-%dT%H:%M:%S)}  # not RUN_ID: recycore reads that as its run id
export COMMIT BENCH_RUN  # the per-GPU lists of `parallel` share them
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
  find "$STAGING" -name results_new.jsonl -exec cat {} + > "$OUT/results_new.jsonl"
  [ -s "$OUT/results_new.jsonl" ] || rm -f "$OUT/results_new.jsonl"
  tar czf "$OUT/results.tgz" -C "$STAGING" . && ls -la "$OUT"
  exit 0
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$R/.cache/inductor}
# Autotuning decisions are small (GEMM timings in cache/<system hash>, pointwise best configs in
# *.best_config) while the compiled cache is GBs: they come back as $OUT/inductor_autotune.tgz and, carried
# as .cache/inductor_autotune.tgz, seed the next machine's cache, which then skips the benchmarking
# (the bulk of a max-autotune compile) but still compiles. Without a carried one, the committed
# benchmarks/h200_inductor_autotune.tgz seeds it (recycore.bench.seed_inductor_cache);
# RECYCORE_AUTOTUNE_ARCHIVE=none autotunes from scratch.
[ -f "$R/.cache/inductor_autotune.tgz" ] && export RECYCORE_AUTOTUNE_ARCHIVE=${RECYCORE_AUTOTUNE_ARCHIVE:-$R/.cache/inductor_autotune.tgz}
pack_autotune() {
  [ -d "$TORCHINDUCTOR_CACHE_DIR" ] || return 0
  (cd "$TORCHINDUCTOR_CACHE_DIR" && find . -path './cache/*' -type f -o -name '*.best_config' -type f \
     | tar czf "$OUT/inductor_autotune.tgz" -T -) && echo "autotune decisions: $OUT/inductor_autotune.tgz"
}
path_tree() {  # path_tree DIR SRC: DIR/recycore = SRC/recycore/* + SRC/kernels as recycore/kernels
  rm -rf "$1"; mkdir -p "$1/recycore"
  for f in "$2"/recycore/*; do ln -s "$f" "$1/recycore/"; done
  ln -s "$2/kernels" "$1/recycore/kernels"
}
P=/tmp/recycore_path_$$; path_tree "$P" "$R"
export PYTHONPATH=$P
mkdir -p /tmp/recycore_work_$$ && cd /tmp/recycore_work_$$ || exit 1
LOG=$OUT/all.log
# The tree also goes into site-packages (a .pth), for a test's subprocess with a bare environment.
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
{ echo "$P" > "$SITE/recycore_device.pth" && echo "site-packages: $SITE/recycore_device.pth -> $P" \
  || echo "site-packages not writable: subprocesses with a bare environment will not find recycore"; } 2>&1 | tee -a "$LOG"
declare -a SUMMARY
stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  # SIGINT at the limit (SIGKILL 30 s later): pytest then still prints its failures' tracebacks, the
  # slowest durations and the summary, which a plain kill loses
  timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-8s rc=%-4s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  return "$rc"
}
python3 -c "import os, torch, triton, recycore.kernels as k; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), k.__file__,
f'cores: {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), torch threads {torch.get_num_threads()}')" | tee -a "$LOG"
read -r TORCH_V TRITON_V GPU_NAME < <(python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())")
record() {  # record SOURCE FILE [report.py options]: FILE's figures as rows of $OUT/results_new.jsonl
  local source=$1 file=$2; shift 2
  [ -f "$file" ] || return 0
  python3 "$R/benchmarks/report.py" --import-pytest-benchmark "$file" --out "$OUT/results_new.jsonl" \
    --commit "$COMMIT" --run "$BENCH_RUN" --source "$source" --gpu "$GPU_NAME" --torch "$TORCH_V" --triton "$TRITON_V" \
    "$@" 2>&1 | tee -a "$LOG"
}
python3 -c "from recycore.bench import seed_inductor_cache; seed_inductor_cache()" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
mat_warm() {
  stage mat-warm "${MAT_LIMIT:-300}" python3 -c "import torch; from recycore.bench import micro_step; \
from recycore.config import Config; print(micro_step('reference-max-autotune', Config(), repeats=3))"
}
DEMO=(--data-path "$R/data/datasets/demo_sp1024" --tokenizer-path "$R/data/tokenizers/demo_1024_bpe.model")
for s in "$@"; do
  case $s in
    # the GPU tests: the kernels (K1 at the seed shapes, K2, K3, K4), the model with them against the
    # reference model at the seed's width, the graphed step (TEST_FILES: which test_*.py files, default
    # these; `all` for every file; TEST_K: a pytest -k expression). The image has pytest-xdist: TEST_WORKERS
    # (4) processes share the GPU, so the Triton compiles that dominate the run spread over the host's
    # cores, by default a file per worker (TEST_DIST=loadfile: its module fixtures and kernels built once;
    # `load` spreads single tests). Verbose, so that a run cut by its limit still names every test that
    # failed; the summary lists them; $OUT/tests.xml (JUnit) has every finished test's time and failure.
    tests) files=(); names=${TEST_FILES:-gemm mlp int5 int5_model model_kernels attention qk_prep head graphs}
           [ "$names" = all ] && names=$(cd "$R/tests" && ls test_*.py | sed 's/^test_//; s/\.py$//')
           for t in $names; do files+=("$R/tests/test_$t.py"); done
           stage tests "${TESTS_LIMIT:-480}" python3 -m pytest -v -rfE --tb=short -n "${TEST_WORKERS:-4}" --dist "${TEST_DIST:-loadfile}" ${PYTEST_X--x} ${TEST_K:+-k "$TEST_K"} \
             --durations=12 --junitxml="$OUT/tests.xml" -p no:cacheprovider "${files[@]}"
           while read -r line; do SUMMARY+=("  $line"); done < <(grep -oE "(FAILED|ERROR) [^ ]+::[^ ]+" "$LOG" | sort -u) ;;
    # one max-autotune step (per-block compile) under MAT_LIMIT seconds, filling the inductor cache in
    # TORCHINDUCTOR_CACHE_DIR (point it outside the repo to keep it across calls on a warm machine)
    matwarm) mat_warm ;;
    # whole-model micro-step (48 x 2048, fwd+bwd): reference compiled vs fused, with the profile of each
    # (RECYCORE_BENCH_PATHS picks the paths; with reference-max-autotune in it, matwarm runs first and
    # the benchmark reuses its cache; if that does not finish, the path is dropped)
    model) paths=${RECYCORE_BENCH_PATHS:-reference-compiled,fused}; paths=${paths//+/,}
           if [[ $paths == *max-autotune* && ${MAT_WARM:-1} != 0 ]]; then
             mat_warm || paths=$(echo "$paths" | sed 's/reference-max-autotune,\?//; s/,$//')
           fi
           RECYCORE_BENCH_PATHS=$paths stage model "${MODEL_LIMIT:-260}" python3 -m pytest -q -s -p no:cacheprovider \
             "$R/benchmarks/test_bench_model.py" --benchmark-json="$OUT/model.json"
           record "RECYCORE_BENCH_PATHS=$paths bash benchmarks/h200.sh model" "$OUT/model.json" ;;
    # per-kernel benchmarks (BENCH_FILES: which of K1 mlp, K2 attention, K3 int5), pytest-benchmark JSON
    suite) files=(); for k in ${BENCH_FILES:-mlp attention int5}; do files+=("$R/benchmarks/test_bench_$k.py"); done
           stage suite "${SUITE_LIMIT:-500}" python3 -m pytest -q -s -p no:cacheprovider "${files[@]}" \
             --benchmark-json="$OUT/suite.json"
           record "BENCH_FILES='${BENCH_FILES:-mlp attention int5}' bash benchmarks/h200.sh suite" "$OUT/suite.json" ;;
    # K1: every GEMM of the MLP over block configs, tiled and persistent (k1_sweep.json, k1_best.json),
    # then ours with the best configs against torch.compile max-autotune (k1_baseline.json)
    k1sweep) stage k1pre 150 python3 "$R/benchmarks/test_bench_mlp.py" "$OUT" --precompile
             stage k1sweep "${K1_LIMIT:-240}" python3 "$R/benchmarks/test_bench_mlp.py" "$OUT"
             stage k1base 200 python3 "$R/benchmarks/test_bench_mlp.py" "$OUT" --baseline ;;
    # the seed's config on the demo data with the fused kernels, wall-clock capped, then the int5
    # artifact and its three figures (pre-quant, int5 round trip, int5 sliding window)
    # (KERNELS=reference for the reference model, compiled; run id h200_$KERNELS; the artifact is
    # $CKPT_DIR/h200_$KERNELS/final_model.int5.ptz)
    train) stage train "${TRAIN_LIMIT:-210}" python3 -m recycore train "${DEMO[@]}" --kernels "${KERNELS:-auto}" \
             --run-id "h200_${KERNELS:-auto}" --max-wallclock-seconds "${TRAIN_SECONDS:-70}" \
             --iterations "${ITERATIONS:-20000}" \
             --warmdown-iters "${WARMDOWN_ITERS:-30}" --warmup-steps "${WARMUP_STEPS:-3}" --ema-decay "${EMA_DECAY:-0.997}" \
             --val-loss-every "${VAL_EVERY:-0}" --train-log-every 10 --log-dir "$OUT" --checkpoint-dir "${CKPT_DIR:-/tmp/recycore_ckpt}"
           if [ "${TRAIN_SECONDS:-70}" = 0 ]; then length="${ITERATIONS:-20000} steps"; else length="${TRAIN_SECONDS:-70} s cap"; fi
           record "KERNELS=${KERNELS:-auto} ITERATIONS=${ITERATIONS:-20000} TRAIN_SECONDS=${TRAIN_SECONDS:-70} bash benchmarks/h200.sh train" \
             "$OUT/h200_${KERNELS:-auto}.jsonl" --variant "${KERNELS:-auto}" --shape "seed config, demo data, 1 GPU, $length" ;;
    # same global batch (786,432 tokens) on 1 GPU (8 micro-steps) and on 2 GPUs (4 each): losses must agree
    dist) SHORT=(--kernels fused --compile-model 0 --iterations "${DIST_STEPS:-12}" --max-wallclock-seconds 0
                 --warmup-steps 0 --warmdown-iters 0 --val-loss-every 0 --train-log-every 1
                 --val-max-tokens 65536 --eval-stride 2048 --log-dir "$OUT" --checkpoint-dir /tmp/recycore_ckpt)
          stage gpu1 200 env CUDA_VISIBLE_DEVICES=0 python3 -m recycore train "${DEMO[@]}" "${SHORT[@]}" --run-id gpu1
          stage gpu2 200 torchrun --standalone --nproc_per_node=2 -m recycore train "${DEMO[@]}" "${SHORT[@]}" \
             --run-id gpu2
          for n in 1 2; do
            record "DIST_STEPS=${DIST_STEPS:-12} bash benchmarks/h200.sh dist" "$OUT/gpu$n.jsonl" --as-benchmark "data-parallel training" \
              --variant "$n GPU$([ $n = 1 ] || echo s)" --shape "seed config, eager, 786,432 tokens/step, ${DIST_STEPS:-12} steps"
          done ;;
    # a seed-config artifact of the initial weights, in seconds (no training): $CKPT_DIR/seed_init.int5.ptz,
    # for `ARTIFACT=/tmp/recycore_ckpt/seed_init.int5.ptz ... int5` (eval time depends on the shapes only)
    seedartifact) stage seedartifact 120 python3 "$R/benchmarks/seed_artifact.py" \
                    "${CKPT_DIR:-/tmp/recycore_ckpt}/seed_init.int5.ptz" "${DEMO[@]}" ;;
    # an exported artifact (ARTIFACT=path: absolute, or relative to the repo and carried) evaluated with
    # packed int5 weights (K3) and dequantised, both compiled
    int5) art=$ARTIFACT; [[ $art == /* ]] || art=$R/$art
          for mode in --int5-direct --no-int5-direct; do
            stage "eval${mode#--}" "${EVAL_LIMIT:-120}" python3 -m recycore eval "$art" "${DEMO[@]}" --mode both \
              --json "$OUT/eval${mode#--}.json" "$mode"
            record "ARTIFACT=$ARTIFACT bash benchmarks/h200.sh int5" "$OUT/eval${mode#--}.json"
          done ;;
    # 200-step runs at LOSSMATCH_TOKENS (196,608: 8 micro-steps of 12 x 2048; the seed's 786,432 for #20's
    # check at the seed config) tokens/step in the background, iteration-based schedule, LOSSMATCH_RUNS of:
    # graphs1 / graphs0 (default kernels, the step replayed as CUDA graphs or not: #17's loss match),
    # reference (the reference model, graphed: #20's fused-vs-reference check).
    # No timing: they share the GPU with what runs meanwhile. `wait-bg` waits for them.
    bg-lossmatch)
           for run in ${LOSSMATCH_RUNS:-graphs1 graphs0}; do
             case $run in graphs1|graphs0) args=(--cuda-graphs "${run#graphs}") ;; reference) args=(--kernels reference) ;;
               *) echo "unknown loss-match run $run"; exit 2 ;; esac
             (timeout "${LOSSMATCH_LIMIT:-420}" python3 -m recycore train "${DEMO[@]}" --run-id "lossmatch_$run" "${args[@]}" \
                --train-batch-tokens "${LOSSMATCH_TOKENS:-196608}" --iterations "${LOSSMATCH_STEPS:-200}" \
                --max-wallclock-seconds 0 --warmdown-iters 60 --warmup-steps 20 --val-loss-every 0 --train-log-every 1 \
                --log-dir "$OUT" --checkpoint-dir /tmp/recycore_ckpt > "$OUT/lossmatch_$run.log" 2>&1; \
              echo "lossmatch_$run rc=$?" >> "$OUT/bg.txt") &
           done ;;
    wait-bg) start=$SECONDS; wait; SUMMARY+=("$(printf '%-8s %9s %4ss' wait-bg "" "$((SECONDS - start))")")
             cat "$OUT/bg.txt" 2>/dev/null | tee -a "$LOG"
             for f in "$OUT"/lossmatch_*.log; do tail -4 "$f" | tee -a "$LOG"; done ;;
    # training at 196,608 tokens/step (8 x 12 x 2048) with KERNELS (default auto): ITERATIONS (300) steps,
    # iteration-based schedule, or with TRAIN_SECONDS > 0 a wall-clock cap (ITERATIONS then defaults to
    # 20000, so the clock ends the run; the same-wall-clock pair: KERNELS=auto and KERNELS=reference,
    # then `compare_train.py A.jsonl B.jsonl --x time`)
    train196k) its=${ITERATIONS:-300}; length="$its steps"
           [ "${TRAIN_SECONDS:-0}" = 0 ] || { its=${ITERATIONS:-20000}; length="$TRAIN_SECONDS s cap"; }
           stage train196k "${TRAIN_LIMIT:-420}" python3 -m recycore train "${DEMO[@]}" --kernels "${KERNELS:-auto}" \
             --run-id "t196k_${KERNELS:-auto}" --train-batch-tokens 196608 --iterations "$its" \
             --max-wallclock-seconds "${TRAIN_SECONDS:-0}" --warmdown-iters 60 --warmup-steps 20 --val-loss-every 0 \
             --train-log-every 1 --log-dir "$OUT" --checkpoint-dir /tmp/recycore_ckpt
           record "KERNELS=${KERNELS:-auto} ITERATIONS=$its TRAIN_SECONDS=${TRAIN_SECONDS:-0} bash benchmarks/h200.sh train196k" \
             "$OUT/t196k_${KERNELS:-auto}.jsonl" --as-benchmark "training (196,608 tokens/step)" --variant "${KERNELS:-auto}" \
             --shape "seed config, demo data, 1 GPU, 8 x 12 x 2048, $length" ;;
    # the seed's full batch (786,432 tokens/step, 8 x 48 x 2048), STEPS (40) steps: ms/step
    fullbatch) stage fullbatch "${TRAIN_LIMIT:-300}" python3 -m recycore train "${DEMO[@]}" --kernels "${KERNELS:-auto}" \
             --run-id "full_${KERNELS:-auto}" --iterations "${STEPS:-40}" --max-wallclock-seconds 0 --warmdown-iters 10 \
             --warmup-steps 20 --val-loss-every 0 --train-log-every 1 --val-max-tokens 65536 --eval-stride 2048 \
             --log-dir "$OUT" --checkpoint-dir /tmp/recycore_ckpt
           record "KERNELS=${KERNELS:-auto} STEPS=${STEPS:-40} bash benchmarks/h200.sh fullbatch" "$OUT/full_${KERNELS:-auto}.jsonl" \
             --as-benchmark "training (786,432 tokens/step)" --variant "${KERNELS:-auto}" --shape "seed config, demo data, 1 GPU, 8 x 48 x 2048" ;;
    # K3: every fused int5 candidate at every weight shape and M against cuBLAS on the dequantised weight
    k3table) stage k3table "${K3_LIMIT:-400}" python3 "$R/benchmarks/test_bench_int5.py" --table --out "$OUT"
             record "bash benchmarks/h200.sh k3table (python3 benchmarks/test_bench_int5.py --table)" "$OUT/k3_rows.jsonl" ;;
    # K2: every forward, dK/dV (one- and two-pass backward) and dQ config at the seed shape, every path at
    # T = 1024, 2048, 4096, and their profiles (k2_sweep.json; its timings as rows, k2_rows.jsonl)
    k2sweep) stage k2sweep "${K2_LIMIT:-300}" python3 "$R/benchmarks/test_bench_attention.py" "$OUT"
             record "bash benchmarks/h200.sh k2sweep (python3 benchmarks/test_bench_attention.py OUT)" "$OUT/k2_rows.jsonl" ;;
    # K4: the fused QK norm + RoPE + gain kernel, and the fused head (norm + tied linear + soft-cap + CE)
    qkbench) stage qkbench "${QK_LIMIT:-200}" python3 "$R/benchmarks/test_bench_qk_prep.py" ;;
    headbench) stage headbench "${HEAD_LIMIT:-150}" python3 "$R/benchmarks/test_bench_head.py" "$OUT/k4_head.json" ;;
    # inductor's generated code for one micro-step (OC_PATH, default fused; OC_SEQS sequences, default 12),
    # compiled afresh, in $OUT/output_code.tgz; the log names every kernel that only copies. Then (OC_CPU=0:
    # not) the same code generated on the CPU (`--device cpu`, about 30 s), to calibrate that stand-in
    outputcode) codes=()
                stage outputcode "${OC_LIMIT:-240}" python3 "$R/benchmarks/output_code.py" /tmp/output_code.py \
                  --path "${OC_PATH:-fused}" --batch-seqs "${OC_SEQS:-12}" && codes+=(output_code.py)
                if [ "${OC_CPU:-1}" != 0 ]; then
                  stage oc-cpu 120 python3 "$R/benchmarks/output_code.py" /tmp/output_code_cpu.py --device cpu \
                    --path "${OC_PATH:-fused}" --batch-seqs "${OC_SEQS:-12}" && codes+=(output_code_cpu.py)
                fi
                [ ${#codes[@]} = 0 ] || tar czf "$OUT/output_code.tgz" -C /tmp "${codes[@]}" ;;
    # host cost per call of every launcher (benchmarks/host_cost.py) for this code and, with BASELINE=DIR
    # (a tree of recycore/ and kernels/ of an earlier commit, relative to the repo and carried;
    # BASELINE_COMMIT names it), for that code too: HOST_ROUNDS (5) alternating processes per version
    hostcost) if [ -n "${BASELINE:-}" ]; then
                base=/tmp/recycore_base_$$; path_tree "$base" "$R/$BASELINE"
                stage hostcost 300 python3 "$R/benchmarks/host_cost.py" "$OUT/hostcost.jsonl" --rounds "${HOST_ROUNDS:-5}" \
                  --compare "before, ${BASELINE_COMMIT:-baseline}=$base" "after, $COMMIT=$P"
              else
                stage hostcost 120 python3 "$R/benchmarks/host_cost.py" "$OUT/hostcost.jsonl" --label "$COMMIT"
              fi
              record "BASELINE=${BASELINE:-} bash benchmarks/h200.sh hostcost" "$OUT/hostcost.jsonl" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
pack_autotune
echo "=== summary"; printf '%s\n' "${SUMMARY[@]}"
