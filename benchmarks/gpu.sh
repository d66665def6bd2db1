#!/usr/bin/env bash
# The prepared GPU measurement of issue #25 (training throughput on packed rows), one command:
#     bash benchmarks/gpu.sh            # on a fresh H200/H100; JSON under $OUT (default benchmarks/results)
# Needs torch (CUDA), transformers, einops, safetensors, sentencepiece: no deepspeed, diffusers or
# webdataset. Liger is measured when `liger-kernel` is importable (carry its wheel: pip install
# --no-deps .whl/liger_kernel-*.whl). Each lever prints one JSON line as it finishes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then pip install --no-deps --quiet .whl/*.whl || true; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# bench-1b, 4 rows x 4,096 tokens of packed realistic documents, and single-document rows.
timeout "${BENCH_TIMEOUT:-400}" python -m benchmarks.bench_packed --device cuda --preset bench-1b \
    --rows "${ROWS:-4}" --seq-len "${SEQ_LEN:-4096}" --repeats "${REPEATS:-3}" --out "$OUT" "$@"
