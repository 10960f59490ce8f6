#!/usr/bin/env bash
# The device check, as ONE command on the GPU machine (device tool `run`, carry [".whl"], timeout_s ~580):
#   bash benchmarks/device/gpu_checks.sh
# Installs the carried wheels (benchmarks/device/fetch_wheels.sh) into /tmp/site, prints versions, runs the
# gpu-marked tests, then benchmarks/gpu_bench.py; everything is logged under $OUT (or ./device-out here).
# Budget: the tests take ~1-2 min; gpu_bench gets what is left of GPU_CHECK_BUDGET_S (default 480 s), split over
# its 6 side runs (2 models x ours-hf, ours-paged, trl; ours-vllm only if vllm is there).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/device-out}"; mkdir -p "$OUT"
start=$(date +%s); budget="${GPU_CHECK_BUDGET_S:-480}"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1 && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "vllm"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - a report, not a check
        print(name, "missing:", type(exc).__name__, exc)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
} 2>&1 | tee "$OUT/versions.txt"
python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.txt"
left=$(( budget - ($(date +%s) - start) ))
if (( left > 90 )); then
  timeout "$left" python3 benchmarks/gpu_bench.py --timeout $(( (left - 60) / 6 )) 2>&1 | tee "$OUT/gpu_bench.txt"
else
  echo "no time left for gpu_bench.py ($left s)" | tee "$OUT/gpu_bench.txt"
fi
echo "gpu_checks.sh done in $(( $(date +%s) - start )) s"
