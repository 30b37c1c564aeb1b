#!/usr/bin/env bash
# The prepared GPU check (docs/design.md, Testing): on a CUDA machine with torch, triton and nvcc but no network,
# build the native extension with CUDA, run the GPU tests and the quick benchmark report, write
# everything into OUTDIR and print a short final table.
#
#   bash scripts/gpu_check.sh OUTDIR            # e.g. benchmarks/results/$(date +%F)-h100
#
# Time: the whole script stays within GPU_CHECK_BUDGET_S seconds (default 420 = 7 minutes): the build
# gets at most 150 s, the GPU tests 120 s, and the report whatever is left (at least 90 s), which it
# shares between its suites (--time-budget): a suite that runs out of its share skips its optional,
# expensive parts (torch.compile variants, extra shapes) and says so in the report. The report files
# are rewritten after every suite, so even a report stopped by its timeout keeps what it finished.
#
# OUTDIR receives: environment.txt, build.log, gpu-tests.txt + gpu-tests.xml, report.md, report.json,
# the PNG plots, report.log, summary.txt. Commit it as benchmarks/results/YYYY-MM-DD-<gpu>/.
# Optional wheels (e.g. xformers, carried in .whl/ because there is no network) are installed first
# into /tmp/site when present.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget=${GPU_CHECK_BUDGET_S:-420}
device=${GPU_CHECK_DEVICE:-cuda}   # cpu: rehearse this script on a machine without a GPU
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }
left() { echo $(( budget - $(elapsed) )); }
cap() { local want=$1 have; have=$(left); echo $(( want < have ? want : have )); }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
  python3 -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
  python3 -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>&1 | tail -1
  # the attention suite's FlexAttention rows (forward and backward, compiled) need this import
  python3 -c "from torch.nn.attention.flex_attention import flex_attention; print('flex_attention: importable')" 2>&1 | tail -1
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not found"
} 2>&1 | tee "$out/environment.txt"

build=ok tests=ok bench=ok
echo "== build native extension (CUDA), at most $(cap 150) s"
timeout "$(cap 150)" python3 -m iwm_kernels.build 2>&1 | tee "$out/build.log" || build=FAILED

echo "== GPU tests, at most $(cap 120) s  [$(elapsed) s elapsed]"
# Fixed Triton launch configs in the tests (IWM_KERNELS_AUTOTUNE=0): correctness does not need the
# autotuner, and each autotuned kernel would compile every config on this fresh machine.
IWM_KERNELS_AUTOTUNE=0 timeout "$(cap 120)" python3 -m pytest -q -m gpu -p no:cacheprovider \
  --junitxml="$out/gpu-tests.xml" tests 2>&1 | tail -40 | tee "$out/gpu-tests.txt" || tests=FAILED

# The report: what is left, less 15 s for the summary; the step suite first (it has the issue's
# end-to-end targets), then the op suites. Autotuning stays on here: these are the timings we report.
report_s=$(( $(left) - 15 ))
(( report_s < 90 )) && report_s=90
echo "== benchmark report (quick), at most ${report_s} s  [$(elapsed) s elapsed]"
timeout --kill-after=10 "$report_s" python3 -m benchmarks.report --device "$device" --quick --out "$out" \
  --suites step,ema,gather,attention,augment,data --time-budget $(( report_s - 20 )) 2>&1 \
  | tee "$out/report.log" | grep --line-buffered -v '^|'
[ "${PIPESTATUS[0]}" = 0 ] || bench=FAILED
[ -s "$out/report.json" ] || bench=FAILED

echo
echo "== summary  [$(elapsed) s elapsed]"
python3 - "$out" "$build" "$tests" "$bench" <<'EOF' 2>&1 | tee "$out/summary.txt"
import json, re, sys
from pathlib import Path
out, build, tests, bench = Path(sys.argv[1]), *sys.argv[2:]
line = ""
if (out / "gpu-tests.txt").exists():
    found = [l for l in (out / "gpu-tests.txt").read_text().splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)", l)]
    line = found[-1].strip("= ") if found else ""
print(f"build: {build}; GPU tests: {tests} ({line or 'no summary line'}); report: {bench}")
try:
    data = json.loads((out / "report.json").read_text())
except Exception as exc:
    print(f"no report.json ({exc.__class__.__name__})")
    raise SystemExit(0)
c = data["ceilings"]
print(f"{data['environment']['device']}: copy {c['copy_gbps']:.0f} GB/s, {c['matmul_dtype']} matmul "
      f"{c['matmul_tflops']:.2f} TFLOP/s; report {data['elapsed_s']:.0f} s")
print(f"{'op':10s} {'case':52s} {'ours ms':>9s} {'base ms':>9s} {'speedup':>8s} {'%ceil':>6s}  ours / baseline")
fmt = lambda v, f: format(v, f) if v is not None else "-"
for e in data["headline"]:
    print(f"{e['suite']:10s} {e['case'][:52]:52s} {fmt(e['ours_ms'], '9.3f')} {fmt(e['baseline_ms'], '9.3f')} "
          f"{fmt(e['speedup'], '7.2f') + ('x' if e['speedup'] else ''):>8s} "
          f"{fmt(e['ceiling_fraction'] and 100 * e['ceiling_fraction'], '6.1f')}  {e['ours']} / {e['baseline']}"
          + (f"  [{e['note']}]" if e["note"] else ""))
    for name, ratio in (e["others"].items() if e["suite"] == "step" else ()):  # the step's compiled baselines
        print(f"{'':10s} {'':52s} {'':>9s} {'':>9s} {ratio:7.2f}x {'':>6s}  vs {name}")
for k, v in data.get("skipped_suites", {}).items():
    print(f"suite {k}: {v}")
warnings = [r for r in data["rows"] if r["note"].startswith("MISMATCH")]
for r in warnings:
    print(f"CORRECTNESS: {r['suite']} | {r['case']} | {r['impl']}: {r['note']}")
EOF
status=0
[ "$build$tests$bench" = okokok ] || status=1
echo "gpu_check: done in $(elapsed) s (status $status); results in $out"
exit $status
