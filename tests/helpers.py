"""Helpers shared by the tests: backend lists and dtype tolerance tables."""
import torch

from iwm_kernels import _backend

# dtype -> (atol, rtol) for a kernel compared with the fp32-accumulating reference.
# bf16 has 8 mantissa bits: one rounding is ~4e-3 relative; a few accumulated roundings stay under 2e-2.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def backends_on(device: str = "cpu", include_reference: bool = True):
    names = [n for n in _backend.BACKENDS if _backend.runs_on(n, torch.device(device)).available]
    return names if include_reference else [n for n in names if n != "reference"]
