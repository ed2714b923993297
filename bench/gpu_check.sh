#!/usr/bin/env bash
# The device-machine runs behind docs/benchmarks.md's CUDA rows (random-weight Llama shapes; no weights travel).
#   bash bench/gpu_check.sh [train] [blocked] [two-pass] [lean] [compile] [compile-k20] [cuda-graphs] [compile-check]
#                           [peft-eager] [peft-eager-graphs] [checkpointing] [profile] [serve] [padding]
# (default: all fourteen, in that order; each section prints its wall time, to plan the next session's device minutes)
# Carry .whl: transformers 5.23.0 and peft 0.21.2 wheels as pinned here, and .whl/serve, the server's pure-Python
# dependencies (fastapi, uvicorn, httpx, typer, rich...: `pip download -d .whl/serve fastapi==0.163.2 ...`).
# Results land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
if [ -d .whl/serve ]; then
  python3 -m pip install -q --no-index --find-links .whl/serve --no-compile --no-cache-dir --target /tmp/serve-site \
    fastapi==0.163.2 uvicorn==0.54.0 httpx==0.28.1 typer==0.29.1 rich==15.0.0 || echo "server dependencies not installed"
fi
export PYTHONPATH=/tmp/site:src:bench:/tmp/serve-site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(train blocked two-pass lean compile compile-k20 cuda-graphs compile-check peft-eager peft-eager-graphs checkpointing profile serve padding)
for section in "${sections[@]}"; do
  started=$SECONDS
  case $section in
    train) python3 bench/train_step.py --config all-cuda --steps 20 --warmup 5 2>&1 | tee "$OUT/bench_cuda.log" ;;
    blocked)  # each method's steps in one block instead of alternating (ours ran 65 ms alone, 80 alternating)
      python3 bench/train_step.py --config cuda-1b-k100 --steps 20 --warmup 5 --blocked 2>&1 \
        | tee "$OUT/bench_cuda_blocked.log" ;;
    two-pass)  # the training step before prompts and tokens were packed into one pass, for the A/B
      python3 bench/train_step.py --config cuda-1b-k100 --steps 20 --warmup 5 --ours-path two-pass 2>&1 \
        | tee "$OUT/bench_cuda_two_pass.log" ;;
    lean)  # the A/B for lean_backward.py in one process: softprompt with the activations transformers keeps
      python3 bench/train_step.py --config cuda-1b-k100 --steps 20 --warmup 5 --lean-ab 2>&1 \
        | tee "$OUT/bench_cuda_lean_ab.log" ;;
    compile)  # both methods compiled layer by layer (one graph shared by the layers); bounded
      timeout 200 python3 bench/train_step.py --config cuda-1b-k100 --steps 20 --warmup 5 --compile 2>&1 \
        | tee -a "$OUT/bench_cuda_compile.log" ;;
    compile-k20)
      timeout 130 python3 bench/train_step.py --config cuda-1b-k20 --steps 20 --warmup 5 --compile 2>&1 \
        | tee -a "$OUT/bench_cuda_compile.log" ;;
    cuda-graphs)  # reduce-overhead: each layer's CUDA graph replayed, one launch instead of each kernel; PEFT's
      # graphs took 76 s to compile on the H100, and memory runs each method again in its own process
      timeout 330 python3 bench/train_step.py --config cuda-1b-k100 --steps 20 --warmup 5 --compile \
        --compile-mode reduce-overhead 2>&1 | tee -a "$OUT/bench_cuda_compile.log" ;;
    compile-check)  # compiled layers (default and CUDA graphs) give eager's scores and gradients over varying shapes
      timeout 150 python3 bench/compile_check.py --device cuda --shape llama-1b --layers 4 2>&1 \
        | tee "$OUT/compile_check.log" ;;
    peft-eager)  # issue #3's own comparison, in one process: softprompt compiled vs PEFT as it ships (K=100, K=20)
      for config in cuda-1b-k100 cuda-1b-k20; do
        timeout 100 python3 bench/train_step.py --config $config --steps 20 --warmup 5 --compile --peft-eager \
          2>&1 | tee -a "$OUT/bench_cuda_peft_eager.log"
      done ;;
    peft-eager-graphs)  # the same with CUDA graphs: ours' first step took 78 s on the H100, then a memory process
      timeout 330 python3 bench/train_step.py --config cuda-1b-k100 --steps 20 --warmup 5 --compile --peft-eager \
        --compile-mode reduce-overhead 2>&1 | tee -a "$OUT/bench_cuda_peft_eager.log" ;;
    checkpointing)  # both methods recompute each layer's activations in the backward pass (less memory, more time)
      timeout 120 python3 bench/train_step.py --config cuda-1b-k100 --steps 20 --warmup 5 --activation-checkpointing \
        2>&1 | tee "$OUT/bench_cuda_checkpointing.log" ;;
    profile) timeout 120 python3 bench/train_step.py --config cuda-1b-k100 --steps 5 --warmup 3 --profile 2>&1 \
      | tee "$OUT/profile_cuda.log" ;;
    serve)  # issue #4: a random-weight 1B Llama behind the real server
      if python3 -c "import fastapi, uvicorn, httpx" 2>/dev/null; then
        timeout 420 python3 bench/serve.py --quick --random-model llama-1b --client-processes 8 ${SERVE_SECONDS:+--seconds $SERVE_SECONDS} 2>&1 | tee "$OUT/bench_serve_cuda.log"
      else
        echo "serving bench skipped: fastapi/uvicorn/httpx not importable" | tee "$OUT/bench_serve_cuda.log"
      fi ;;
    padding)  # whether GPUs should drop a serving batch's padding too (Backbone.drops_padding: CPU only so far)
      timeout 180 python3 bench/padding.py --random-model llama-1b --batch 4,16,32 2>&1 | tee "$OUT/bench_padding_cuda.log" ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
  echo "section $section: $((SECONDS - started)) s" | tee -a "$OUT/gpu.txt"
done
