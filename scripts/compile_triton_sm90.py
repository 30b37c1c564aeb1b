"""Compile the attention Triton kernels for an H100 (sm_90) on a machine without a GPU.

    python scripts/compile_triton_sm90.py [--dtypes bf16,fp32] [--head-dims 32,64,128] [--all-configs]

The interpreter tests check what the kernels compute; this checks that they compile (the compiled path
rejects things the interpreter accepts) and prints registers, spill bytes (stack) and shared memory
per launch config, which is how the autotune lists in triton_kernels.py were chosen. Needs triton's
bundled ptxas/cuobjdump, no driver. Exit status 1 if any kernel fails to compile.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels, not interpreted

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from iwm_kernels.attention import triton_kernels as tk  # noqa: E402

_PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
_TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def compile_one(name: str, dtype: str, head_dim: int, segments: bool, config, target):
    fn = tk._JIT[name]
    bm, bn, warps, stages = config
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": tk._block_d(head_dim), "BLOCK_M": bm, "BLOCK_N": bn,
                  "HAS_SEGMENTS": segments, "IN_DTYPE": _TL[dtype], "MM_DTYPE": _TL[dtype],
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):
            signature[arg] = _PTR[dtype]
        elif arg in ("LSE", "DELTA"):
            signature[arg] = "*fp32"
        elif arg in ("CU", "CTX_END", "SEG_LO", "SEG_HI"):
            signature[arg] = "*i32"
        elif arg in ("qk_scale", "sm_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})


def resources(kernel) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return f"registers {m.group(1)}, spill/stack {m.group(2)} B" if m else "resources: n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--head-dims", default="32,64,128")
    parser.add_argument("--kernels", default="fwd,dkdv,dq")
    parser.add_argument("--segments", default="0,1")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not just the first")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for dtype in args.dtypes.split(","):
        for head_dim in map(int, args.head_dims.split(",")):
            for segments in (s == "1" for s in args.segments.split(",")):
                for name in args.kernels.split(","):
                    configs = tk._CONFIGS[name][max(32, tk._block_d(head_dim))]
                    if dtype == "fp32":
                        configs = [tk._FP32_FIXED[name]]
                    for config in configs if args.all_configs else configs[:1]:
                        label = f"{name:5s} {dtype} Dh={head_dim:<3d} segments={int(segments)} {config}"
                        start = time.time()
                        try:
                            kernel = compile_one(name, dtype, head_dim, segments, config, target)
                        except Exception as exc:  # report every failure, then fail
                            failed += 1
                            print(f"{label}: FAILED {exc.__class__.__name__}: {str(exc)[:300]}", flush=True)
                            continue
                        print(f"{label}: ok in {time.time() - start:.1f}s, shared {kernel.metadata.shared} B, "
                              f"{resources(kernel)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
