"""Backend selection when the fast paths are missing: a fresh process with triton hidden and the native
extension switched off must import, fall back to the reference with one warning, and refuse an
explicit request for what cannot run."""
import json
import os
import subprocess
import sys
import textwrap

import torch

import iwm_kernels

SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    sys.modules["triton"] = None            # `import triton` now raises ImportError
    os.environ["IWM_KERNELS_NO_NATIVE"] = "1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, iwm_kernels
        t, o = [torch.ones(5)], [torch.zeros(5)]
        for _ in range(3):
            iwm_kernels.ema_update_(t, o, 0.5)
        x = torch.randn(2, 4, 3)
        iwm_kernels.gather_tokens(x, torch.tensor([[0, 3], [1, 2]]))
    errors = {}
    for name in ("triton", "native"):
        try:
            iwm_kernels.ema_update_(t, o, 0.5, backend=name)
        except RuntimeError as exc:
            errors[name] = str(exc)
    avail = {k: [v.available, v.detail] for k, v in iwm_kernels.available_backends().items()}
    print(json.dumps({"warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                      "value": t[0].tolist(), "errors": errors, "available": avail}))
""")


def _run() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("IWM_KERNELS_BACKEND",)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_missing_triton_and_compiler_fall_back_with_one_warning():
    res = _run()
    # three EMA calls and a gather: one warning for the CPU fallback, on one line
    assert len(res["warnings"]) == 1, res["warnings"]
    assert "reference" in res["warnings"][0] and "\n" not in res["warnings"][0]
    assert res["value"] == [0.125] * 5                      # 1 -> 0.5 -> 0.25 -> 0.125: the update ran
    assert "cannot run here" in res["errors"]["triton"] and "cannot run here" in res["errors"]["native"]
    assert res["available"]["reference"][0] is True
    assert res["available"]["triton"][0] is False and res["available"]["triton"][1]
    assert res["available"]["native"][0] is False and "IWM_KERNELS_NO_NATIVE" in res["available"]["native"][1]


def test_resolution_follows_the_environment_each_call(monkeypatch):
    t, o = [torch.ones(3)], [torch.zeros(3)]
    monkeypatch.setenv("IWM_KERNELS_BACKEND", "reference")
    iwm_kernels.ema_update_(t, o, 0.5)
    monkeypatch.setenv("IWM_KERNELS_BACKEND", "nonsense")
    try:
        iwm_kernels.ema_update_(t, o, 0.5)
    except ValueError as exc:
        assert "IWM_KERNELS_BACKEND" in str(exc)
    else:
        raise AssertionError("an unknown backend in the environment must raise, even after a cached choice")
    assert t[0].tolist() == [0.5] * 3
