#!/usr/bin/env bash
# GPU checks in one call on a CUDA machine whose Python has torch but not megatron-core: install the
# wheels carried in .whl/ (megatron-core, zstandard), then run the APEX overhead benchmark (bf16) at the
# issue's config and at a ~1B-parameter config (with a kernel profile, and again without CUDA graphs if
# the budget allows), and the GPU tests. Logs go to $OUT (8 files).
#   usage: bash benchmarks/gpu_session.sh   (repository root; .whl/ filled by pip download, see RESULTS.md)
#   SECTIONS (default "small large tests eager") picks and orders the sections; "diagnose" is the 953M
#   configuration once more without APEX's scoring, then without its operator (bench --ablate);
#   "operator" times the operator alone (bench_operator.py) at the 953M and the small shapes;
#   "large16" is the 953M configuration at 16 micro-batches per step; "interval" the 953M configuration
#   with apex.score_interval=4; "large16i4" the 953M configuration at 16 micro-batches, scoring every
#   4th step. "resume" runs only the resume-mid-stage GPU test, "tests" all GPU tests, "tests_rest" the
#   GPU tests other than the resume one; "engine" is bench_engine.py --tinyllama (tokens/s, MFU);
#   "statistics" times the scoring statistic's reductions (bench_statistics.py) at the 953M shapes;
#   "overlap" is the 953M configuration with overlapped gradient reduction (parallel.overlap_grad_reduce).
#   BUDGET=seconds (default 420) skips sections that would not fit.
set -u
OUT=${OUT:-/tmp/gpu_session}
BUDGET=${BUDGET:-420}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/env.txt"

bench() {  # name, time limit (also the least time left it starts with), arguments
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt $((limit * 2 / 3)) ]; then echo "== $name: skipped (${left}s of the budget left)"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name"
    timeout "$limit" python3 benchmarks/bench_apex_overhead.py --precision bf16 --threads 4 --steps 12 --warmup 3 \
        --rounds 2 "$@" > "$OUT/$name.log" 2>&1
    echo "exit $? after ${SECONDS}s"; sed -n '/^device:/,$p' "$OUT/$name.log"; tail -2 "$OUT/$name.log"
}

LARGE="--hidden 2048 --layers 16 --heads 16 --ffn 5632 --seq 2048 --vocab 32000 --mbs 4"
for section in ${SECTIONS:-small large tests eager}; do
    case $section in
    small) bench small_bf16 100 --memory-phases ;;  # host-bound and noisy in time: read it for memory
    operator)  # the operator alone (benchmarks/bench_operator.py), with a kernel table at the 953M shapes
        echo "== operator"
        { timeout 60 python3 benchmarks/bench_operator.py --hidden 2048 --ffn 5632 --heads 16 --layers 16 --dtype bf16 --batch-mib 64 256 \
            --profile; timeout 30 python3 benchmarks/bench_operator.py --dtype bf16; } > "$OUT/operator.log" 2>&1
        echo "exit $? after ${SECONDS}s"; grep -E "^device|per step" "$OUT/operator.log" ;;
    # The profile tables (one step per variant and round, kernels sorted by GPU time) land in $OUT/prof.
    large) bench large_mbs4_bf16 150 $LARGE --profile "$OUT/prof" ;;
    eager) bench large_mbs4_eager_bf16 100 $LARGE --rounds 1 --set apex.cuda_graphs=false ;;
    overlap)  # overlapped gradient reduction (one GPU: DP 1, buckets of ~50M): the chain rule batch by batch
        # from the gradient-ready signals, eagerly, next to the "large" section's graph-replayed one
        bench large_overlap_bf16 150 $LARGE --set parallel.overlap_grad_reduce=true --set parallel.ddp_bucket_size=50000000 ;;
    interval)  # the 953M configuration scoring every 4th step (read the mean step-time ratio)
        bench large_interval4_bf16 150 $LARGE --set apex.score_interval=4 ;;
    large16)  # the same model at 131,072 tokens per step (16 micro-batches of 4 x 2048)
        bench large_micro16_bf16 200 $LARGE --micro 16 --steps 10 ;;
    diagnose)
        bench large_no_scoring_bf16 100 $LARGE --rounds 1 --ablate scoring
        bench large_no_operator_bf16 100 $LARGE --rounds 1 --ablate operator ;;
    large16i4)  # 16 micro-batches and scoring every 4th step; 8 steady steps = two scoring intervals
        bench large_micro16_interval4_bf16 130 $LARGE --micro 16 --steps 11 --rounds 1 --set apex.score_interval=4 ;;
    statistics)  # the scoring statistic's reductions at the 953M shapes (bandwidth and error per variant)
        echo "== statistics"
        timeout 60 python3 benchmarks/bench_statistics.py --tokens 8192 --ffn 5632 --hidden 2048 --groups 16 \
            --dtype bf16 > "$OUT/statistics.log" 2>&1
        echo "exit $? after ${SECONDS}s"; cat "$OUT/statistics.log" ;;
    engine)  # framework against a bare megatron-core loop, TinyLlama-shaped, tokens/s and MFU
        echo "== engine"
        timeout 120 python3 benchmarks/bench_engine.py --tinyllama > "$OUT/engine_tinyllama.log" 2>&1
        echo "exit $? after ${SECONDS}s"; tail -6 "$OUT/engine_tinyllama.log" ;;
    resume|tests|tests_rest)
        case $section in
        resume) select=(-k resume_mid_stage); limit=120 ;;
        tests) select=(); limit=$((BUDGET - SECONDS - 20)) ;;
        tests_rest) select=(-k "not resume_mid_stage"); limit=$((BUDGET - SECONDS - 20)) ;;
        esac
        [ "$limit" -gt $((BUDGET - SECONDS - 10)) ] && limit=$((BUDGET - SECONDS - 10))
        if [ "$limit" -lt 30 ]; then echo "== GPU tests ($section): skipped"; continue; fi
        echo "== GPU tests ($section, ${limit}s)"
        timeout "$limit" python3 -m pytest -q -m gpu tests/test_gpu.py "${select[@]}" --durations=0 \
            -s -p no:cacheprovider > "$OUT/gpu_tests_$section.log" 2>&1
        echo "exit $? after ${SECONDS}s"
        grep -E "passed|failed|skipped|Error|assert|relative loss|s call" "$OUT/gpu_tests_$section.log" | tail -14 ;;
    *) echo "unknown section $section"; exit 2 ;;
    esac
done
if [ -d "$OUT/prof" ]; then  # one file (the device tool returns at most 8)
    for f in "$OUT"/prof/*.txt; do echo "######## $(basename "$f")"; cat "$f"; done > "$OUT/profiles.txt"
    rm -r "$OUT/prof"
fi
