#!/usr/bin/env bash
# Fetch, on this (networked) machine, the Python 3.12 wheels the GPU device machine lacks, into .whl/ (git-ignored),
# so that one `run` there can install them offline. The device image already has torch, accelerate, peft,
# safetensors, tokenizers, huggingface-hub, pandas, pytest, ... but an older transformers and no trl/datasets
# (see the device library's KINDS.md). Then run benchmarks/device/gpu_checks.sh there with `carry: [".whl"]`.
#   bash benchmarks/device/fetch_wheels.sh              # ~17 MB
#   WITH_PYARROW=1 bash benchmarks/device/fetch_wheels.sh  # + pyarrow (~40 MB) if the image's is < 24
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
pkgs=(transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
if [[ "${WITH_PYARROW:-0}" == 1 ]]; then pkgs+=(pyarrow==26.0.1); fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pkgs[@]}"
du -sh .whl && ls .whl
