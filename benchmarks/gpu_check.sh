#!/usr/bin/env bash
# The GPU checks in one run, on a machine with CUDA: the device tests (pytest -m gpu: mining,
# embedding, label calls, bundles, training in fp32 / bf16 / compiled, exact search, the
# transforms, each against the CPU) and benchmarks/train_metric.py on the GPU.
#
#   benchmarks/gpu_check.sh OUT_DIR [train_metric.py options; default --num-workers 8]
#
# Logs and the benchmark's JSON line go to OUT_DIR. cellsift's dependencies must import: an
# installed environment, or, on a machine without network, a wheelhouse (WHEELS, default
# .whl, made with benchmarks/_wheelhouse.py) that is installed into a --target folder first.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [train_metric.py options]}
shift
opts=("$@")
[ ${#opts[@]} -eq 0 ] && opts=(--num-workers 8)
mkdir -p "$out"
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # (this checkout's cellsift)
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  site=${SITE:-/tmp/cellsift-site}
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl || exit 1
  export PYTHONPATH="$site:$PYTHONPATH"
fi
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
{ nvidia-smi; $py -c "import torch, lightning; print(torch.__version__, lightning.__version__)"; } \
  >"$out/machine.txt" 2>&1
status=0
# the files whose tests have a device variant (collecting others would need the dev extras)
$py -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra" \
  tests/test_devices.py tests/losses/test_triplet.py \
  2>&1 | tee "$out/tests.log" || status=1
$py benchmarks/train_metric.py --device cuda --no-peers "${opts[@]}" 2>&1 | tee "$out/train_metric.log" \
  || status=1
tail -n 1 "$out/train_metric.log" >"$out/train_metric.json"
exit $status
