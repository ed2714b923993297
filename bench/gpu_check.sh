#!/usr/bin/env bash
# The device-machine run behind docs/benchmarks.md's CUDA rows (random-weight Llama shapes; no weights travel).
# Carry .whl (transformers 5.23.0 and peft 0.21.2 wheels, as pinned here); results land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"
python3 bench/train_step.py --config all-cuda --steps 20 --warmup 5 2>&1 | tee "$OUT/bench_cuda.log"
timeout 200 python3 bench/train_step.py --config cuda-1b-k100 --steps 20 --warmup 5 --compile 2>&1 | tee "$OUT/bench_cuda_compile.log"
# Serving on the GPU (issue #4): a random-weight 1B Llama behind the real server. Needs fastapi/uvicorn/httpx on the
# device; skipped (and said so) where the image lacks them.
if python3 -c "import fastapi, uvicorn, httpx" 2>/dev/null; then
  timeout 420 python3 bench/serve.py --quick --random-model llama-1b 2>&1 | tee "$OUT/bench_serve_cuda.log"
else
  echo "serving bench skipped: fastapi/uvicorn/httpx not installed on this machine" | tee "$OUT/bench_serve_cuda.log"
fi
