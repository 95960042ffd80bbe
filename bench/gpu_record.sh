#!/usr/bin/env bash
# The recorded GPU runs, in three device calls made back to back (the machine keeps /tmp while it
# stays warm; a phase that finds no model rebuilds it). Each writes $OUT/PHASE.tgz and prints a summary.
#
#   bash bench/gpu_record.sh compare   # random 8B NF4 model, engine alone, HTTP serving, /metrics scrape
#   bash bench/gpu_record.sh peers     # Unsloth (default, CUDA graphs, + LoRA), transformers+bnb; report; structured
#   bash bench/gpu_record.sh all       # compare + peers in one call (what the recorded table uses)
#   bash bench/gpu_record.sh checks    # GPU kernel tests, eager-step profile, fine-tune example on CUDA, NF4 kernels
#
# Device tool: carry [".gpu-carry"] (../shared/gpu/make-site.sh opentelemetry-api llguidance==1.9.1 ...).
set -u
phase=${1:?phase: compare, peers or checks}
mkdir -p /tmp/site && tar xzf .gpu-carry/site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
WORK=/tmp/cmp
RES=/tmp/res-$phase
mkdir -p "$RES"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RES/gpu.txt" 2>&1
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >> "$RES/gpu.txt" 2>&1
t0=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
save() { tar czf "$OUT/$phase.tgz" -C "$RES" .; }  # after every stage: a cut run keeps what ran

ensure_model() {
    [ -f "$WORK/model-bnb-4bit/config.json" ] && [ -d "$WORK/model-loras/lora-7" ] && return
    elapsed "building the random 8B model"
    timeout 300 python bench/compare.py --shape llama3-8b --work "$WORK" --out "$RES/cmp" --stages model > "$RES/model.log" 2>&1
}

case $phase in
compare)
    ensure_model
    elapsed "engine"
    timeout 200 python bench/compare.py --shape llama3-8b --work "$WORK" --out "$RES/cmp" --stages engine > "$RES/engine.log" 2>&1
    save
    elapsed "serve"
    timeout 240 python bench/compare.py --shape llama3-8b --work "$WORK" --out "$RES/cmp" --stages serve > "$RES/serve.log" 2>&1
    mkdir -p "$WORK/keep" && cp "$RES"/cmp/*.json "$RES/cmp/metrics.txt" "$WORK/keep/" 2>/dev/null
    ;;
peers)
    ensure_model
    mkdir -p "$RES/cmp" && cp "$WORK"/keep/* "$RES/cmp/" 2>/dev/null
    elapsed "peers"
    timeout 330 python bench/peers.py --model "$WORK/model-bnb-4bit" --adapter "$WORK/model-loras/lora-0" \
        --peers unsloth-graphs,hf-bnb,unsloth,unsloth-graphs-lora --batch-sizes 1,8,64 --time-budget-s 320 \
        --max-run-s 120 --out "$RES/cmp/peers.md" > "$RES/peers.log" 2>&1
    python bench/compare.py --shape llama3-8b --work "$WORK" --out "$RES/cmp" --stages report > "$RES/report.log" 2>&1
    save
    elapsed "structured"
    timeout 150 python bench/structured.py --parts check,libraries,engine --batch-sizes 1,64 --device cuda \
        --out "$RES/structured-h200.md" > "$RES/structured.log" 2>&1
    ;;
all)  # every figure of the comparison from one call: model, engine, HTTP, peers, report
    timeout 60 python -m pytest -q -m gpu tests/kernels -n 8 -p no:cacheprovider -k "stacked or dequantize or greedy" \
        > "$RES/gpu-tests.txt" 2>&1
    echo "rc $?" >> "$RES/gpu-tests.txt"
    ensure_model
    save
    elapsed "engine"
    timeout 150 python bench/compare.py --shape llama3-8b --work "$WORK" --out "$RES/cmp" --stages engine > "$RES/engine.log" 2>&1
    save
    elapsed "serve"
    timeout 170 python bench/compare.py --shape llama3-8b --work "$WORK" --out "$RES/cmp" --stages serve > "$RES/serve.log" 2>&1
    save
    elapsed "peers"
    timeout 240 python bench/peers.py --model "$WORK/model-bnb-4bit" --adapter "$WORK/model-loras/lora-0" \
        --peers unsloth-graphs,hf-bnb,unsloth,unsloth-graphs-lora --batch-sizes 1,8,64 --time-budget-s 230 \
        --max-run-s 100 --out "$RES/cmp/peers.md" > "$RES/peers.log" 2>&1
    python bench/compare.py --shape llama3-8b --work "$WORK" --out "$RES/cmp" --stages report > "$RES/report.log" 2>&1
    save
    elapsed "eager profile (Unsloth-loaded model)"
    timeout $(( 575 - ($(date +%s) - t0) )) python bench/profile_eager.py --model "$WORK/model-bnb-4bit" --prompt-lens 64,512 \
        --no-profile > "$RES/profile-eager-unsloth.txt" 2>&1
    ;;
checks)
    elapsed "gpu tests"
    timeout 180 python -m pytest -q -m gpu tests/kernels -n 8 -p no:cacheprovider > "$RES/gpu-tests.txt" 2>&1
    echo "rc $?" >> "$RES/gpu-tests.txt"
    save
    elapsed "eager profile"
    timeout 150 python bench/profile_eager.py --random-shape llama3-8b --prompt-lens 1,64,512 > "$RES/profile-eager.txt" 2>&1
    save
    elapsed "fine-tune example"
    timeout 150 python examples/finetune_and_serve.py --device cuda --out /tmp/ft > "$RES/finetune.log" 2>&1
    echo "rc $?" >> "$RES/finetune.log"
    cp /tmp/ft/summary.json "$RES/finetune-summary.json" 2>/dev/null
    save
    elapsed "nf4 kernels"
    timeout 100 python bench/kernels_nf4.py --precompile 14 --out "$RES/kernels-nf4.md" --json "$RES/kernels-nf4.json" > "$RES/kernels-nf4.log" 2>&1
    ;;
esac
elapsed "done"
save
tail -n 4 "$RES"/*.log "$RES"/*.txt 2>/dev/null | cut -c1-300
cat "$RES/cmp/compare.md" 2>/dev/null
