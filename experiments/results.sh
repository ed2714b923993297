#!/usr/bin/env bash
# Every number published in docs/results/, in the order they were produced. Resumable: finished sweep cells,
# trained prompts and tuned models are kept and skipped. Run from the repository root after `make setup`:
#   bash experiments/results.sh [ablation|newsgroups|seeds|ensemble|model-tuning|domain-shift|scale|scale-lr]...   (default: all)
# 2 CPU cores, about 2 hours for everything; each section writes its results as it goes.
set -euo pipefail
SP=${SP:-.venv/bin/softprompt}
R=docs/results
P=prompts/results
mkdir -p "$R" "$P"
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(ablation newsgroups seeds ensemble model-tuning domain-shift scale scale-lr)

ablation() {  # the paper's length x init ablation on the default model (resumes: K=100 was added last)
  $SP sweep --out $R/ablation-smollm2 --lengths 1,5,20 --inits class-label,vocab,uniform \
    --steps 60 --eval-every 20 --valid-limit 200 --test-limit 500
  $SP sweep --out $R/ablation-smollm2 --methods prefix --lengths 20 --inits class-label \
    --steps 60 --eval-every 20 --valid-limit 200 --test-limit 500
  $SP sweep --out $R/ablation-smollm2 --lengths 100 --inits class-label,vocab,uniform \
    --steps 60 --eval-every 20 --valid-limit 200 --test-limit 500
}

newsgroups() {  # prompt tuning vs prompt design on the 20-label task
  $SP sweep --out $R/newsgroups-smollm2 --data 20newsgroups --lengths 20 --inits class-label \
    --steps 150 --eval-every 50 --valid-limit 300 --test-limit 1000
}

seeds() {  # the default recipe, five seeds: seed spread, and the members of the ensemble below
  for seed in 0 1 2 3 4; do
    [ -f $P/rt-seed$seed.safetensors ] || $SP train --data rotten-tomatoes --seed $seed --steps 100 \
      --eval-every 25 --no-baseline --out $P/rt-seed$seed.safetensors
  done
}

ensemble() {  # five prompts in one batched pass; nearest vocabulary tokens of the seed-0 prompt
  $SP ensemble --prompts $P/rt-seed0.safetensors --prompts $P/rt-seed1.safetensors \
    --prompts $P/rt-seed2.safetensors --prompts $P/rt-seed3.safetensors --prompts $P/rt-seed4.safetensors \
    --data rotten-tomatoes --json > $R/ensemble-smollm2.json
  $SP inspect $P/rt-seed0.safetensors --top 5 --json > $R/nearest-smollm2.jsonl
}

model_tuning() {  # the baseline: every weight trains, same data, batches, steps and validation
  [ -f $P/rt-model-tuned/model.safetensors ] || $SP train --method model-tuning --data rotten-tomatoes \
    --steps 100 --eval-every 25 --no-baseline --out $P/rt-model-tuned
}

domain_shift() {  # train on Rotten Tomatoes, score on VADER's product reviews, tweets and news (1,000 each)
  : > $R/domain-shift.jsonl.tmp
  for data in rotten-tomatoes vader-amazon vader-tweets vader-nyt; do
    for how in "--model smollm2-135m" "--prompt $P/rt-seed0.safetensors" "--model $P/rt-model-tuned"; do
      # shellcheck disable=SC2086
      $SP eval $how --data $data --limit 1000 --json \
        | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'data': '$data', 'how': '$how', \
'accuracy': r['accuracy'], 'macro_f1': r['macro_f1'], 'n': r['n']}))" >> $R/domain-shift.jsonl.tmp
    done
  done
  mv $R/domain-shift.jsonl.tmp $R/domain-shift.jsonl
}

scale() {  # prompt tuning vs model tuning vs prompt design across model sizes (model tuning where memory allows)
  $SP sweep --out $R/scale --models smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b \
    --methods prompt,model-tuning --lengths 20 --inits class-label --steps 60 --eval-every 20 \
    --valid-limit 200 --test-limit 500
}

scale_lr() {  # Qwen prompts with a 10x lower learning rate (0.01 made the 1.5B's validation fall), same budget
  for model in qwen2.5-coder-1.5b qwen2.5-coder-0.5b; do
    local out=$P/scale-${model#qwen2.5-coder-}-lr1e-3.safetensors
    [ -f "$out" ] || $SP train --model $model --data rotten-tomatoes --lr 0.001 --steps 60 --eval-every 20 \
      --valid-limit 200 --no-baseline --out "$out"
    $SP eval --prompt "$out" --data rotten-tomatoes --limit 500 --json > $R/scale-${model#qwen2.5-coder-}-lr1e-3.json
  done
}

for section in "${sections[@]}"; do
  echo "== $section ($(date -u +%H:%M:%S))"
  "${section//-/_}"
done
