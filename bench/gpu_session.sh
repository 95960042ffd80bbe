#!/usr/bin/env bash
# One device call: GPU tests, then the engine benchmark on a random-weight Llama-3-8B NF4 model.
# Usage (device tool, carry .gpu-carry): bash bench/gpu_session.sh   (writes under $OUT)
set -u
mkdir -p /tmp/site && tar xzf .gpu-carry/site.tgz -C /tmp/site && bash scripts/import_names.sh /tmp/site
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >> "$OUT/gpu.txt" 2>&1
[ -n "${SKIP_TESTS:-}" ] || timeout 150 python -m pytest -q -m gpu tests/kernels -x -p no:cacheprovider > "$OUT/gpu-tests.txt" 2>&1
echo "gpu tests rc $?" >> "$OUT/gpu-tests.txt"
timeout 240 python bench/engine.py --random-shape llama3-8b --batch-sizes ${BATCHES:-1,8,64} ${LORAS:---random-loras 8} --repeats 2 \
    --out "$OUT/engine-8b.md" > "$OUT/engine-8b.log" 2>&1
echo "engine rc $?" >> "$OUT/engine-8b.log"
[ -n "${SKIP_EAGER:-}" ] || timeout 90 python bench/engine.py --random-shape llama3-8b --batch-sizes 1,64 --enforce-eager --repeats 1 \
    --out "$OUT/engine-8b-eager.md" > "$OUT/engine-8b-eager.log" 2>&1
echo "eager rc $?" >> "$OUT/engine-8b-eager.log"
tail -n 5 "$OUT"/*.log "$OUT/gpu-tests.txt"
