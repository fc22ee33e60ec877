#!/usr/bin/env bash
# The gateway on one GPU, as run on the borrowed H100/H200 (device tool):
#   1. the slot decoder equals the model's own forward on CUDA (tests/.../test_slot_decoder.py);
#   2. gateway_load on CUDA with the 124m preset (64 streaming clients, batching on vs off,
#      overhead, overload).
# Run from the repository root. The device image lacks some of our dependencies: wheels for
# them (cp312) are carried in .whl/ (not committed; see the closing note of issue 4).
set -euo pipefail
out=${OUT:-/tmp/gateway_gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $(ls .whl/*.whl | grep -v deepspeed)
export PYTHONPATH=/tmp/site:$PWD/libs:$PWD OMP_WAIT_POLICY=PASSIVE
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q --noconftest -p no:cacheprovider \
  tests/services/inference_gateway/test_slot_decoder.py 2>&1 | tail -3 | tee "$out/slot_decoder.txt"
python3 benchmarks/gateway_load.py --device cuda --preset "${PRESET:-124m}" --seconds 20 \
  > "$out/gateway_load_cuda.json" 2> "$out/gateway_load_cuda.err"
tail -c 3000 "$out/gateway_load_cuda.json"
