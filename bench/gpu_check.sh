#!/usr/bin/env bash
# GPU verification on a CUDA machine (no Dagster/MLflow needed: the lib layer is the GPU path).
#   bash bench/gpu_check.sh
# Runs the CUDA tests (bf16 autocast + channels_last training, CUDA inference == CPU inference,
# offline weights) and the training throughput benchmark on the GPU for linear and pmg heads.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available())'
$PY -m pytest -q -p no:cacheprovider tests/test_training.py tests/test_inference.py tests/test_models.py
$PY bench/bench_train.py --device cuda --steps 40 --warmup 5 --workers 4 "$@"
