#!/usr/bin/env bash
# The prepared GPU check (DESIGN.md §5): on a CUDA machine with torch, triton and nvcc but no network,
# build the native extension with CUDA, run the GPU tests and the quick benchmark report, and write
# everything into OUTDIR. Budget: well under 8 minutes.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Optional wheels (e.g. xformers, carried in .whl/ because there is no network) are installed first
# into /tmp/site when present. Commit OUTDIR as benchmarks/results/YYYY-MM-DD-<gpu>/.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
  python3 -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$out/environment.txt"

status=0
echo "== build native extension (CUDA)"
timeout 240 python3 -m iwm_kernels.build 2>&1 | tee "$out/build.log" || status=1

echo "== GPU tests"
# Fixed Triton launch configs in the tests (IWM_KERNELS_AUTOTUNE=0): correctness does not need the
# autotuner, and each autotuned kernel would compile every config on this fresh machine.
IWM_KERNELS_AUTOTUNE=0 timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$out/gpu-tests.xml" tests 2>&1 \
  | tail -40 | tee "$out/gpu-tests.txt" || status=1

echo "== benchmark report (quick)"
timeout 300 python3 -m benchmarks.report --device cuda --quick --out "$out" 2>&1 | tail -80 | tee "$out/report.log" \
  || status=1
echo "gpu_check: done (status $status); results in $out"
exit $status
