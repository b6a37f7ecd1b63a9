#!/usr/bin/env bash
# The CUDA path on one GPU: correctness against the plain path at tiny size, then official-size
# speed (bf16, batch 1 and a sweep) with CUDA graphs, then with torch.compile, then the codecs.
# Each piece runs under its own time limit, so one hang cannot take the whole run.
#
#   bash bench/gpu_check.sh [graphs|compile|all]   # from the repository root; log in $OUT/log
#
# graphs: tiny-size tests, official-size bench with graphs next to the plain path; compile: the
# official-size bench compiled; all (default): both, then the compiled tiny tests and codecs.
# fused: the fused Triton kernels' CUDA tests, then batch-1 speed with them, uncompiled with
# and without programmatic dependent launch (LFM2_AUDIO_PDL), then compiled, then each
# projection kernel against cuBLAS (bench/kernels.py). report: the figures the README's table
# holds for one card in one lease (~5 min): the CUDA tests, batch 1 with the fused kernels
# uncompiled and compiled, a stream sweep, and the codecs. Wheels in .whl/ (soundfile, soxr and their needs, which the GPU image lacks)
# are installed first when present.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
FRAMES=${FRAMES:-8}
SWEEP=${SWEEP:-1,64,128,256}

step() {
    local limit=$1
    shift
    echo "== $* (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "== rc=$? after $((SECONDS - start))s"
}

STAGE=${1:-all}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    command -v cc gcc || echo "no C compiler"
    if [ "$STAGE" = fused ]; then
        step 150 env TRITON_INTERPRET=0 python3 -m pytest tests/test_fused.py tests/test_cuda_graphs.py -q -x \
            -p no:cacheprovider -k "cuda and not compiled"
        for pdl in 1 0; do
            step 60 env LFM2_AUDIO_PDL=$pdl python3 bench/generate.py --device cuda --dtype bf16 --batch 1 \
                --frames "$FRAMES" --text-tokens 6 --repeats 3 --skip-plain --triton on
        done
        step 200 python3 bench/generate.py --device cuda --dtype bf16 --batch 1 --frames "$FRAMES" \
            --text-tokens 6 --repeats 3 --skip-plain --compile --triton on
        step 90 python3 bench/kernels.py
        exit 0
    fi
    if [ "$STAGE" = report ]; then
        step 150 env TRITON_INTERPRET=0 python3 -m pytest tests/test_fused.py tests/test_cuda_graphs.py -q -x \
            -p no:cacheprovider -k "cuda and not compiled"
        step 60 python3 bench/generate.py --device cuda --dtype bf16 --batch 1 --frames "$FRAMES" \
            --text-tokens 6 --repeats 3 --triton on
        step 200 python3 bench/generate.py --device cuda --dtype bf16 --batch 1 --frames "$FRAMES" \
            --text-tokens 6 --repeats 3 --skip-plain --compile --triton on
        step 120 python3 bench/generate.py --device cuda --dtype bf16 --batch "$SWEEP" --frames "$FRAMES" \
            --text-tokens 6 --repeats 3 --skip-plain
        step 60 python3 bench/codec.py --device cuda --seconds 5 --frames 20
        exit 0
    fi
    if [ "$STAGE" != compile ]; then
        step 60 python3 -m pytest tests/test_cuda_graphs.py -q -x -p no:cacheprovider -k "not compiled"
        step 120 python3 bench/generate.py --device cuda --dtype bf16 --batch "$SWEEP" --frames "$FRAMES" \
            --text-tokens 6 --repeats 3
    fi
    if [ "$STAGE" != graphs ]; then
        step 240 python3 bench/generate.py --device cuda --dtype bf16 --batch "$SWEEP" --frames "$FRAMES" \
            --text-tokens 6 --repeats 3 --compile --skip-plain
    fi
    if [ "$STAGE" = all ]; then
        step 150 python3 -m pytest tests/test_cuda_graphs.py -q -x -p no:cacheprovider -k compiled
        step 40 python3 bench/codec.py --device cuda --seconds 5 --frames 20
    fi
} 2>&1 | tee "$OUT/log"
