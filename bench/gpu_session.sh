#!/usr/bin/env bash
# Everything this project measures on a GPU, in one command (for a session lent a GPU machine with
# torch, transformers, peft and triton preinstalled; bitsandbytes must be carried as a wheel or the
# int8 rows of precision.py report "failed"). Writes logs under ${OUT:-/tmp/edgezo-gpu}.
#
#   bash bench/gpu_session.sh            # ~10 min on an H100
set -uo pipefail
out=${OUT:-/tmp/edgezo-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# CUDA tests: the philox kernels against their reference, the engine's philox job, CUDA memory tests
$py -m pytest -q -m "cuda or not slow" tests/test_triton_noise.py tests/test_noise_streams.py tests/test_zo.py \
    tests/test_dizo.py tests/test_memory.py 2>&1 | tee "$out/tests.txt"
# issue 6: the ZO step on the GPU, both noise streams, vs two forwards and the MeZO reference
$py bench/zo_step.py --model opt-2.7b --dtype fp16 --batch 16 --seq 64 --device cuda --noise torch,philox \
    --compile 2>&1 | tee "$out/zo_step_2.7b.txt"
$py bench/zo_step.py --model opt-125m --dtype fp16 --batch 16 --seq 64 --device cuda --noise torch,philox \
    2>&1 | tee "$out/zo_step_125m.txt"
# issue 5: memory per precision on a GPU-sized shape
$py bench/precision.py --device cuda --model opt-1.3b --batch 16 --seq 128 --steps 3 \
    --modes fp16-full,fp16-lora,int8-lora,int8-scales 2>&1 | tee "$out/precision_1.3b.txt"
