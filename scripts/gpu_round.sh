#!/usr/bin/env bash
# One speed round on the lent GPU machine (docs/PERFORMANCE.md): builds the full-size random pi0.5 and
# pi0 engines and benches them beside the eager reference and the floor, all under /tmp/pib there.
#
#   bash scripts/gpu_round.sh start      # copies the code to /tmp/pib, starts every phase in the background
#   bash scripts/gpu_round.sh poll [S]   # waits up to S seconds (default 560) for it, prints the log's end,
#                                        # copies the bench JSONs to $OUT
#
# The work runs detached (setsid) so that it outlives one `run` call: call `poll` again within 30 s
# and the machine stays warm. Carried wheels (.whl: ModelOpt, pydantic, websockets) are installed first.
# PHASES (default "smoke pi05 pi0 batch"; also "batch16", "vision", "fp8", "denoise16", "denoise16x", "fused16", "fusedsweep", "fusedsweep0", "ncu", "fp8keep", "gputests", "persistent", "pi05persistent", "prefixattn", "pi05profile") picks phases. Checkpoints land where the recipes look for
# them (checkpoints/<name>, relative to the copied code), engines under /tmp/pib/engines.
set -uo pipefail
W=/tmp/pib
export PYTHONUNBUFFERED=1 PYTHONPATH=$W/code/src:/tmp/site PI_BUILD_CACHE=$W/cache PI_BUILD_ENGINES=$W/engines

build() { python3 -m pi_build.cli.build "$@"; }
run() { python3 -m pi_build.cli.run "$@"; }

phase_smoke() {   # the tiny model on the GPU first, fp32 and bf16 (the Triton paths): a fast failure for device bugs
  build checkpoint --config pi05_tiny --horizon 10 --out checkpoints/tiny && build all --recipe recipes/tiny.toml --skip export &&
  build all --recipe recipes/tiny.toml --skip export --set vision.precision=bf16 --set denoise.precision=bf16 &&
  run bench --recipe recipes/tiny.toml --set denoise.precision=bf16 --iters 5 --no-reference
}

phase_model() {   # $1 recipe name, $2 config, $3 horizon
  build checkpoint --config $2 --horizon $3 --dtype bfloat16 --out checkpoints/$1 &&
  build all --recipe recipes/$1.toml --skip export &&
  build denoise --recipe recipes/$1.toml --steps 1 &&
  run bench --recipe recipes/$1.toml --steps 1,10 --profile --json $W/bench_$1.json --png $W/bench_$1.png
}
phase_pi05() { phase_model pi05_libero pi05 10; }
phase_pi0() { phase_model pi0_libero pi0 50; }

# The LIBERO prompt runs on the 48-token bucket: the batch and vision recipes build that shape alone.
one_bucket() { sed -e 's/^prompt_len = 200$/prompt_len = 48/' -e '/^prompt_buckets/d' recipes/pi05_libero.toml; }
pi05_checkpoint() {
  [ -d checkpoints/pi05_libero ] || build checkpoint --config pi05 --horizon 10 --dtype bfloat16 --out checkpoints/pi05_libero
}

phase_batch() {   # throughput: pi0.5's engines for batch 1, 4 and 16 (10 steps), benched side by side
  one_bucket | sed 's/^batch = 1$/batch = [1, 4, 16]/' > recipes/pi05_batches.toml
  pi05_checkpoint && build all --recipe recipes/pi05_batches.toml --skip export &&
  run bench --recipe recipes/pi05_batches.toml --steps 10 --batch 1,4,16 --no-reference --json $W/bench_batch.json
}

phase_batch16() {  # batch 16 alone (10 steps, 48-token bucket): the batched engines benched, no batch 1 or 4 builds
  one_bucket | sed 's/^batch = 1$/batch = 16/' > recipes/pi05_b16.toml
  pi05_checkpoint && build all --recipe recipes/pi05_b16.toml --skip export &&
  run bench --recipe recipes/pi05_b16.toml --steps 10 --batch 16 --no-reference --profile --json $W/bench_batch16.json
}
phase_vision() {  # vision variants at batch 1: Inductor's max-autotune (recipe vision.autotune), then FP8
  one_bucket > recipes/pi05_b1.toml
  pi05_checkpoint && build vision --recipe recipes/pi05_b1.toml --set vision.autotune=true &&
  run bench --recipe recipes/pi05_b1.toml --set vision.autotune=true --steps 10 --no-reference --json $W/bench_vision_autotune.json &&
  build vision --recipe recipes/pi05_b1.toml --fp8 && build capture --recipe recipes/pi05_b1.toml --set vision.precision=fp8 &&
  run bench --recipe recipes/pi05_b1.toml --set vision.precision=fp8 --steps 10 --no-reference --json $W/bench_vision_fp8.json
}
phase_fp8() {     # FP8 schemes of the prefix engine (scripts/prefix_fp8_experiments.py): accuracy for pi0.5 and pi0, pi0.5's times
  python3 scripts/prefix_fp8_experiments.py --config pi05 --kinds --time --profile &&
  python3 scripts/prefix_fp8_experiments.py --config pi0 --kinds
}
phase_denoise16() {  # one pi0.5 denoise step at batch 16 (160 rows): library against the per-op Triton kernels, kernel lists
  python3 scripts/denoise_experiments.py --variants library,triton --batch 16 --prompt-len 48
}
phase_denoise16x() {  # batch 16's denoise step (160 rows): the kernels' GPU checks, the attention kernel's tilings over
                      # 18 layers' caches, the GEMMs at 160 rows (cuBLAS bf16 against FP8), the step with FP8 or autotuned GEMMs
  timeout 200 python3 -m pytest -q -x tests/test_kernels.py -k gpu -p no:cacheprovider &&
  python3 scripts/denoise_experiments.py --attention --batch 16 --prompt-len 48 --sweep &&
  python3 scripts/denoise_experiments.py --gemms --gemm-rows 160 &&
  python3 scripts/denoise_experiments.py --variants triton,triton-fp8,triton-autotune --batch 16 --prompt-len 48
}
phase_fused16() {   # the fused step in 64-row blocks at batch 16 (160 rows) against the per-op Triton kernels, tiling sweep
  python3 scripts/fused_denoise_bench.py --runs "pi05:fused,triton" --batch 16 --prompt-len 48 --sweep fused --budget-s 300 --out $W
}
phase_fusedsweep() {  # the fused step at batch 1 (pi0.5, 48-token bucket) with its tiling sweep: attention row blocks of 16/32/64
  python3 scripts/fused_denoise_bench.py --runs "pi05:fused" --prompt-len 48 --sweep fused --budget-s 300 --out $W
}
phase_fusedsweep0() {  # pi0's 51 rows (48-token prompt): the fused step against the per-op kernels it now runs, with the sweep
  python3 scripts/fused_denoise_bench.py --runs "pi0:fused,triton" --prompt-len 48 --sweep fused --budget-s 300 --out $W
}
phase_ncu() {  # Nsight Compute (hardware counters; Firecracker machines) on the first two layers of one step: pi0.5's
               # fused kernels, then pi0's fused and per-op kernels; stall reasons, occupancy, memory, as CSV
  local sections="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis"
  ncu --clock-control none --profile-from-start off --kernel-name regex:'_norm_gemm|_residual_gemm|_attention_kernel' --launch-count 10 \
      $sections --csv --page details --log-file $W/ncu_pi05_fused.csv \
      python3 scripts/fused_denoise_bench.py --runs "pi05:fused" --prompt-len 48 --ncu --budget-s 200
  ncu --clock-control none --profile-from-start off --kernel-name regex:'_norm_gemm|_residual_gemm|_attention_kernel|_skinny_mm|_few_query_attn|_combine_splits' \
      --launch-count 22 $sections --csv --page details --log-file $W/ncu_pi0.csv \
      python3 scripts/fused_denoise_bench.py --runs "pi0:fused,triton" --prompt-len 48 --ncu --budget-s 200
  wc -l $W/ncu_*.csv || echo "ncu wrote nothing: no hardware counters on this machine? (H200.md: gVisor has none)"
  return 0  # the round goes on either way
}
phase_fp8keep() {   # pi0's actions with groups of prefix linears kept in bf16 (tensor scaling)
  python3 scripts/prefix_fp8_experiments.py --config pi0 --no-rowwise --keep-sets qkv+o,qkv+o+gate_up
}
phase_gputests() {  # the fused kernels' checks on the GPU (float64 cases, the persistent step bit for bit against the five kernels)
  timeout 300 python3 -m pytest -q -x tests/test_fused_denoise.py -k gpu -p no:cacheprovider
}
phase_persistent() {  # the persistent step (one grid a step) against the five-kernel step and the per-op kernels, its sweep
  timeout 330 python3 scripts/fused_denoise_bench.py --runs "pi05:fused,persistent pi0:triton,persistent" --prompt-len 48 \
    --sweep persistent --budget-s 240 --out $W
}
phase_pi05persistent() {  # pi0.5's engines with the persistent step, benched; only if it beat the five-kernel step
  python3 -c "
import json; p = json.load(open('$W/bench.json'))['results']['pi05']['paths']
ok = p['persistent'].get('bitwise_repeat') and p['persistent']['ms_per_step'] < p['fused']['ms_per_step']
print('persistent', p['persistent'].get('ms_per_step'), 'fused', p['fused'].get('ms_per_step')); raise SystemExit(0 if ok else 1)" \
    || { echo "the persistent step did not win: no pi0.5 bench with it"; return 0; }
  export PI_BUILD_PERSISTENT=1; phase_pi05; local rc=$?; unset PI_BUILD_PERSISTENT; return $rc
}
phase_prefixattn() {  # the prefix attention kernel: its GPU checks, then against RoPE + SDPA (cuDNN) with a tile sweep;
                      # the engines of later phases keep SDPA if the kernel lost at pi0.5's batch-1 shape
  timeout 200 python3 -m pytest -q -x tests/test_kernels.py -k gpu -p no:cacheprovider &&
  timeout 330 python3 scripts/prefix_attention_bench.py --budget-s 240 ${PREFIX_ATTN_ARGS:-} --out $W || return 1
  python3 -c "
import json; r = json.load(open('$W/prefix_attention.json'))['shapes']['batch 1, 544 tokens']
raise SystemExit(0 if r['triton']['ms'] < r['library (RoPE + SDPA)']['ms'] else 1)" ||
    { echo "the prefix attention kernel lost: later phases keep SDPA"; export PI_BUILD_PREFIX_ATTENTION=library; }
}
phase_pi05profile() {  # pi0.5 on its 48-token bucket alone, 10 steps: pi-run bench --profile (where each component's time goes)
  one_bucket > recipes/pi05_b1.toml
  pi05_checkpoint && build all --recipe recipes/pi05_b1.toml --skip export &&
  run bench --recipe recipes/pi05_b1.toml --steps 10 --iters 30 --warmup 5 --no-reference --profile --json $W/bench_pi05_profile.json
}
# phase NAME runs phase_NAME: every function of that name is exported to the detached shell
export -f build run one_bucket pi05_checkpoint $(compgen -A function phase_)
export W

case "${1:-}" in
  start)
    rm -rf $W && mkdir -p $W/code /tmp/site
    cp -r src recipes scripts tests $W/code/
    if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; fi
    nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv,noheader > $W/gpu.txt
    (cd $W/code && setsid bash -c '
      for p in ${PHASES:-smoke pi05 pi0 batch}; do
        echo "=== phase $p $(date +%T)"
        if ! declare -F phase_$p > /dev/null; then echo "=== no phase $p: skipped"; continue; fi
        phase_$p || { echo "=== phase $p FAILED"; break; }
      done; echo "=== done $(date +%T)"' > $W/log 2>&1 < /dev/null &)
    sleep 5; tail -3 $W/log ;;
  poll)
    deadline=$((SECONDS + ${2:-560}))
    while [ $SECONDS -lt $deadline ] && ! grep -q "^=== done" $W/log; do sleep 5; done
    grep -v "Warning\|warn(\|return cls\|DEBUG\|warnings.warn" $W/log | tail -120
    mkdir -p "${OUT:-/tmp/out}" && cp $W/*.json $W/*.png $W/*.csv $W/gpu.txt $W/log "${OUT:-/tmp/out}/" 2>/dev/null; true ;;
  *) echo "usage: bash scripts/gpu_round.sh start|poll [seconds]" >&2; exit 2 ;;
esac
