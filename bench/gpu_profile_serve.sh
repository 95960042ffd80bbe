#!/usr/bin/env bash
# Where the serving host time goes at 64 streams on the GPU: the server (8B-shaped random NF4 model)
# runs under py-spy (sampling every thread, raw stacks) while bench/serve.py drives 64 concurrent
# streams; bench/profile_summary.py then splits the samples by thread and function.
#
# Device tool: carry [".gpu-carry"] with the py-spy wheel in .gpu-carry/pyspy/ (pip download py-spy).
#   bash bench/gpu_profile_serve.sh      # writes $OUT/serve-prof.tgz
set -u
mkdir -p /tmp/site && tar xzf .gpu-carry/site.tgz -C /tmp/site && bash scripts/import_names.sh /tmp/site
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
RES=/tmp/res-prof
mkdir -p "$RES" /tmp/pyspy
python3 -m zipfile -e .gpu-carry/pyspy/*.whl /tmp/pyspy
SPY=$(ls /tmp/pyspy/py_spy-*.data/scripts/py-spy) && chmod +x "$SPY"
t0=$(date +%s)
timeout 200 python bench/make_random_model.py --shape llama3-8b --out /tmp/m8b --quantize-bnb --bnb-out /tmp/m8b-bnb \
    > "$RES/model.log" 2>&1
echo "[$(( $(date +%s) - t0 ))s] model"
"$SPY" record -r 250 --threads -f raw -o "$RES/serve-prof.txt" -- \
    python -m sloth_serve.cli --model /tmp/m8b-bnb --port 8123 --max-num-seqs 64 --max-model-len 1024 > "$RES/server.log" 2>&1 &
spy=$!
for _ in $(seq 120); do curl -sf localhost:8123/health > /dev/null && break; sleep 1; done
echo "[$(( $(date +%s) - t0 ))s] server ready"
base=(--base-url http://127.0.0.1:8123/v1 --disable-tqdm --vocab-size 128000 --input-len 64 --output-len 128)
python bench/serve.py "${base[@]}" --max-concurrency 64 --num-prompts 64 > "$RES/warm.txt" 2>&1
python bench/serve.py "${base[@]}" --max-concurrency 64 --num-prompts 256 --skip-test-request > "$RES/c64.txt" 2>&1
python bench/serve.py "${base[@]}" --max-concurrency 1 --num-prompts 8 --skip-test-request > "$RES/c1.txt" 2>&1
echo "[$(( $(date +%s) - t0 ))s] load done"
pkill -INT -f "sloth_serve.cli --model /tmp/m8b-bnb"
for _ in $(seq 60); do kill -0 $spy 2> /dev/null || break; sleep 1; done
echo "[$(( $(date +%s) - t0 ))s] profile written"
grep -E "Output token|Median TPOT|Median TTFT" "$RES/c64.txt" "$RES/c1.txt"
python bench/profile_summary.py "$RES/serve-prof.txt" > "$RES/summary.txt" 2>&1
head -c 6000 "$RES/summary.txt"
tar czf "$OUT/serve-prof.tgz" -C "$RES" .
