#!/usr/bin/env bash
# The one prepared GPU command: every GPU measurement the open issues ask for, in under 7 minutes,
# each row printed as it finishes, JSON and logs under $OUT.
#
#     bash benchmarks/gpu.sh        # on a fresh H200 / H100 (the device tool: timeout_s 570)
#
#   1. the GPU tests (-m gpu): graphed head loop == eager, bf16 head, no host syncs while sampling,
#      FlexAttention parity on CUDA                                                   (<= 60 s)
#   2. training throughput (#25): bench-1b on packed rows of realistic documents and on
#      single-document rows, lever by lever (dense, flex, head bf16 / compile, liger, bf16
#      weights, decoder layers compiled), MFU at the bf16 peak, backbone alone, peak memory (<= 150 s)
#   3. generation (#24): bench-1b 256-token images, DDIM 50, CFG 3, batch 1 / 4 / 16, eager vs
#      graphed head loop, step schedule, bf16 head; ms per image token and the ratio to the
#      memory-bandwidth floor (H100 3.35, H200 4.8 TB/s)                                (<= 130 s)
#   4. parallel decoding (#28): bench-1b 256-token images, one token per pass vs groups of 4
#      (64 passes), batch 1 and 16, seconds per image and the ratio                      (<= 80 s)
#
# Needs torch (CUDA), transformers, einops, safetensors, sentencepiece: no deepspeed, diffusers or
# webdataset. Liger is measured when `liger-kernel` is importable (carry its wheel in .whl/).
# Stage time limits: TEST_TIMEOUT, BENCH_TIMEOUT, GEN_TIMEOUT, PAR_TIMEOUT (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
git rev-parse --short HEAD 2>/dev/null || true
status=0
echo "== 1/4 GPU tests"
timeout "${TEST_TIMEOUT:-60}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_head.py \
    tests/test_diffusion_sampling.py tests/test_packed_attention.py tests/test_decode_step.py 2>&1 | tee "$OUT/gpu_tests.log" || status=1
echo "== 2/4 training throughput, packed rows"
timeout "${BENCH_TIMEOUT:-150}" python3 -m benchmarks.bench_packed --device cuda --preset bench-1b \
    --rows "${ROWS:-4}" --seq-len "${SEQ_LEN:-4096}" --repeats "${REPEATS:-3}" --out "$OUT" 2>&1 | tee "$OUT/train.log" || status=1
echo "== 3/4 generation"
OMNI_GEN_BUDGET_S="${GEN_BUDGET:-100}" timeout "${GEN_TIMEOUT:-130}" python3 -m benchmarks.run --device cuda \
    --only generation --out "$OUT" 2>&1 | tee "$OUT/generation.log" || status=1
echo "== 4/4 parallel decoding"
timeout "${PAR_TIMEOUT:-80}" python3 -m benchmarks.bench_parallel --device cuda --preset bench-1b --groups 4 \
    --batches 1,16 --out "$OUT/parallel.json" 2>&1 | tee "$OUT/parallel.log" || status=1
exit $status
