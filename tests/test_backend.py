"""Backend selection when the fast paths are missing: a fresh process with triton hidden and the native
extension switched off must import, fall back to the reference with one warning, and refuse an
explicit request for what cannot run; and a first call made from inside a fullgraph torch.compile trace
must resolve its backend without breaking the graph."""
import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
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
    errors, reasons = {}, {}
    for name in ("triton", "native"):
        try:
            iwm_kernels.ema_update_(t, o, 0.5, backend=name)
        except RuntimeError as exc:
            errors[name] = [str(exc), exc.reasons]
        reasons[name] = iwm_kernels.not_supported_reasons("ema_update_", name, "cpu")
    from iwm_kernels._backend import resolve_backend
    try:
        resolve_backend("native", torch.device("cuda"), "gather_tokens")
    except iwm_kernels.BackendUnavailable as exc:
        errors["gather_native_cuda"] = [str(exc), exc.reasons]
    avail = {k: [v.available, v.detail, list(v.reasons)] for k, v in iwm_kernels.available_backends().items()}
    print(json.dumps({"warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                      "value": t[0].tolist(), "errors": errors, "reasons": reasons, "available": avail}))
""")


@functools.lru_cache(maxsize=None)  # one subprocess for every test that reads its answers
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
    assert "cannot run here" in res["errors"]["triton"][0] and "cannot run here" in res["errors"]["native"][0]
    assert res["available"]["reference"][0] is True
    assert res["available"]["triton"][0] is False and res["available"]["triton"][1]
    assert res["available"]["native"][0] is False and "IWM_KERNELS_NO_NATIVE" in res["available"]["native"][1]


def test_an_unavailable_explicit_backend_lists_every_reason():
    """The error for an explicit backend that cannot run names each reason the registry gives (the op's
    own limits and the environment's), and they are the ones `not_supported_reasons` reports."""
    res = _run()
    for name in ("triton", "native"):
        message, reasons = res["errors"][name]
        assert reasons and reasons == res["reasons"][name], (reasons, res["reasons"][name])
        assert all(r in message for r in reasons) and "\n" not in message
    assert any("triton is not importable" in r for r in res["reasons"]["triton"])
    assert res["reasons"]["native"] == ["disabled by IWM_KERNELS_NO_NATIVE"]
    assert res["available"]["native"][2] == ["disabled by IWM_KERNELS_NO_NATIVE"]
    message, reasons = res["errors"]["gather_native_cuda"]
    assert reasons == ["gather_tokens has no native code for cuda tensors (the triton backend covers CUDA tensors)",
                       "disabled by IWM_KERNELS_NO_NATIVE"], reasons
    assert message.startswith("gather_tokens: backend 'native' cannot run here: ")
    assert all(r in message for r in reasons)


def test_registry_states_each_ops_devices_and_dtypes():
    from iwm_kernels import _registry

    reasons = iwm_kernels.not_supported_reasons

    assert set(_registry.ops()) == {"gather_tokens", "apply_masks", "varlen_attention", "ema_update_", "photometric"}
    for op in _registry.ops():
        assert _registry.op(op).code_reasons("reference", "cuda") == []  # the reference runs anywhere
    # the ops whose native code is CPU only say so, on every machine (not an environment question)
    for op in ("gather_tokens", "apply_masks", "photometric"):
        assert any(f"{op} has no native code for cuda tensors" in r
                   for r in reasons(op, "native", "cuda"))
        assert not any("has no native code" in r for r in reasons(op, "native", "cpu"))
    assert not any("has no native code" in r for r in reasons("ema_update_", "native", "cuda"))
    # Triton attention has no float64 kernels: a reason naming the argument, and only for that dtype
    f64 = reasons("varlen_attention", "triton", "cuda", torch.float64)
    assert any(r.startswith("q: dtype float64 is not supported by the triton backend") for r in f64), f64
    for dtype in (torch.float32, torch.bfloat16, torch.float16, None):
        assert not any("dtype" in r for r in reasons("varlen_attention", "triton", "cuda", dtype))
    assert not any("dtype" in r for r in reasons("varlen_attention", "native", "cuda", torch.float64))


def test_backend_errors_keep_their_reasons_through_pickle():
    import pickle

    from iwm_kernels._backend import UnsupportedDtype

    err = pickle.loads(pickle.dumps(iwm_kernels.BackendUnavailable("op", "native", ["a", "b"])))
    assert err.reasons == ["a", "b"] and str(err) == "op: backend 'native' cannot run here: a; b"
    assert pickle.loads(pickle.dumps(UnsupportedDtype(["q: dtype float64"]))).reasons == ["q: dtype float64"]


def test_registry_arguments_are_checked():
    with pytest.raises(ValueError, match="op_name: unknown op 'gather'"):
        iwm_kernels.not_supported_reasons("gather", "native", "cpu")
    with pytest.raises(ValueError, match="backend: unknown backend 'cuda'"):
        iwm_kernels.not_supported_reasons("gather_tokens", "cuda", "cpu")
    from iwm_kernels.gather import run_forward

    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        run_forward("fast", torch.randn(1, 2, 3), torch.zeros(1, 1, dtype=torch.int64), None, None, None, False, 1e-5)


def test_automatic_choice_skips_a_backend_without_the_inputs_dtype():
    """float64 attention on CUDA tensors: Triton has no float64 kernels, so the automatic choice takes the
    next backend that can run (native where built with CUDA, else the reference) instead of raising;
    an explicit triton raises a TypeError with the reason."""
    from iwm_kernels._backend import UnsupportedDtype, resolve_backend

    cuda = torch.device("cuda")
    chosen = resolve_backend(None, cuda, "varlen_attention", torch.float64)
    assert chosen != "triton"
    assert not iwm_kernels.not_supported_reasons("varlen_attention", chosen, cuda, torch.float64)
    if not iwm_kernels.not_supported_reasons("varlen_attention", "triton", cuda, torch.float32):
        assert resolve_backend(None, cuda, "varlen_attention", torch.float32) == "triton"
        with pytest.raises(UnsupportedDtype, match="q: dtype float64 is not supported by the triton backend") as err:
            resolve_backend("triton", cuda, "varlen_attention", torch.float64)
        assert isinstance(err.value, TypeError) and len(err.value.reasons) == 1


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


FIRST_USE_COMPILED = textwrap.dedent("""
    import json, sys, torch, iwm_kernels
    backend = None if sys.argv[1] == "default" else sys.argv[1]
    cu = torch.tensor([0, 4, 10])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, x, index, target, online):
        out = iwm_kernels.varlen_attention(q, q, q, cu, 6, backend=backend)
        tokens = iwm_kernels.gather_tokens(x, index, backend=backend)
        iwm_kernels.ema_update_([target], [online], 0.5, backend=backend)
        return out, tokens

    q, x = torch.randn(10, 2, 8), torch.randn(2, 5, 3)
    index = torch.tensor([[0, 4], [2, 1]])
    target, online = torch.ones(4), torch.zeros(4)
    out, tokens = step(q, x, index, target, online)
    want = iwm_kernels.varlen_attention(q, q, q, cu, 6, backend="reference")
    print(json.dumps({"attention": bool(torch.allclose(out, want, atol=1e-5)),
                      "gather": bool(torch.equal(tokens, x[torch.arange(2)[:, None], index])),
                      "ema": target.tolist()}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["default", "native"])
def test_first_use_inside_torch_compile_fullgraph(backend):
    """The first kernel call of a process comes from inside a fullgraph trace: backend resolution (which
    imports triton and builds the native extension under a lock) must not break the graph."""
    env = {k: v for k, v in os.environ.items() if k not in ("IWM_KERNELS_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", FIRST_USE_COMPILED, backend], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"attention": True, "gather": True, "ema": [0.5] * 4}, res


@pytest.mark.slow
def test_a_build_killed_mid_way_does_not_hang_later_processes(tmp_path):
    # A process killed while torch's JIT build holds its `lock` file leaves that file behind; later
    # processes must still load the extension instead of waiting on it forever.
    import shutil

    from iwm_kernels import _native

    if not _native.status().available:
        pytest.skip("no native build here: " + _native.status().detail)
    built = sorted(_native.cache_root().glob("native-*"), key=lambda p: p.stat().st_mtime)
    key = _native._build_key(_native.sources(_native._cuda_build_possible()), _native._cuda_build_possible())
    src = _native.cache_root() / f"native-{key}"
    assert src.is_dir(), built
    cache = tmp_path / "cache"
    shutil.copytree(src, cache / src.name)
    (cache / src.name / "lock").write_text("")  # what a killed builder leaves
    code = "from iwm_kernels import _native; s = _native.status(); print(s.available, s.detail)"
    env = {**os.environ, "IWM_KERNELS_CACHE": str(cache)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("True"), res.stdout + res.stderr[-2000:]
    assert not (cache / src.name / "lock").exists()


def test_use_backend_scopes_the_choice_and_wins_over_the_environment(monkeypatch):
    """meta.kernel_backend used to be written into os.environ by the trainer (leaking into every later
    call of the process and every thread); use_backend scopes it to a block and to this thread."""
    import threading

    from iwm_kernels._backend import requested_backend

    monkeypatch.setenv("IWM_KERNELS_BACKEND", "native")
    with iwm_kernels.use_backend("reference"):
        assert requested_backend(None) == "reference"
        assert requested_backend("native") == "native"  # the per-call argument still wins
        seen = []
        worker = threading.Thread(target=lambda: seen.append(requested_backend(None)))
        worker.start()
        worker.join()
        assert seen == ["native"]  # another thread keeps its own choice
        with iwm_kernels.use_backend("auto"):
            assert requested_backend(None) is None  # automatic, the environment ignored
        with iwm_kernels.use_backend(None):
            assert requested_backend(None) == "reference"
        t, o = [torch.ones(3)], [torch.zeros(3)]
        iwm_kernels.ema_update_(t, o, 0.5)
        assert t[0].tolist() == [0.5] * 3
    assert requested_backend(None) == "native"
    with pytest.raises(ValueError, match="use_backend"):
        with iwm_kernels.use_backend("cuda"):
            pass


def test_use_backend_is_read_inside_a_compiled_function(seed):
    from iwm_kernels._backend import resolve_backend

    @torch.compile(fullgraph=True, backend="eager")
    def which(x):
        return x + (1.0 if resolve_backend(None, x.device, "probe") == "reference" else 2.0)

    with iwm_kernels.use_backend("reference"):
        assert which(torch.zeros(2)).tolist() == [1.0, 1.0]


def test_backend_modules_do_not_import_each_other_in_a_cycle():
    """_native needed _backend's Availability and _backend imported _native: either imported first
    worked only because the other was already half-initialised."""
    for first in ("iwm_kernels._native", "iwm_kernels._backend"):
        code = f"import importlib, sys; importlib.import_module({first!r}); import iwm_kernels; print(iwm_kernels.Availability)"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
    import ast
    import pathlib

    src = pathlib.Path(iwm_kernels.__file__).parent / "_native.py"
    imported = {n.module for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.ImportFrom)}
    assert "_backend" not in imported
