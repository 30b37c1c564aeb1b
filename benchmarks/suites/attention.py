"""Attention suite: one predictor attention layer at the IWM predictor's shapes, forward and
forward+backward, ours against what people would use instead.

Token counts come from I-JEPA/IWM multi-block masks on the 14x14 grid of ViT-B/16 (196 patches):
4 target blocks of 15-20 % of the patches (aspect 0.75-1.5; sizes shared by the batch, positions per
sample), context = the complement of their union (IWM), so contexts are ragged. Implementations:

  SDPA padded (<backend>)   F.scaled_dot_product_attention on the repeated-context batch padded to the
                            longest sequence, with a key-padding mask; "default" is PyTorch's own
                            dispatch, then each backend forced (a backend that refuses the mask says why).
                            Padding is done once outside the timing (favours the baseline).
  xformers BlockDiagonalMask / flash-attn varlen   the packed repeated-context work, where importable
                            (flash_attn_varlen_func: CUDA, fp16/bf16). SDPA's cuDNN backend is one of the
                            forced SDPA backends on a GPU.
  FlexAttention repeated / shared   torch.nn.attention.flex_attention, compiled (torch.compile with static
                            shapes, one compile per case: its fused kernel), on the packed tokens as
                            one [1, H, T, Dh] batch with a BlockMask: repeated layout, the same-sequence
                            rule (a query sees the keys of its own packed sequence, seq[q] == seq[k]);
                            shared layout, the same sequence and the segment rule (a key in segment 0,
                            or in the query's own segment). The block mask is built once per batch and
                            reused, as users do; its build time is a figure of its own ("block mask
                            build ms"). On the CPU, forward only: FlexAttention has no CPU backward (the
                            reason is read from torch itself and reported under what did not run).
  ours repeated / shared    varlen_attention (Triton on CUDA, native on CPU) on the packed repeated
                            layout, and on the shared-context layout (one sequence per sample).

TFLOP/s count useful work only: 4 * heads * head_dim FLOPs per visible (query, key) pair forward and
3.5x that forward+backward (FlashAttention's convention: the backward is 5 matmuls to the forward's 2).
Padding is not useful; the shared layout's smaller pair count is its own useful work. Per-layer figures;
a depth-12 (or 18) predictor runs the layer 12 (18) times.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from iwm_kernels import pack_predictor_sequences
from iwm_kernels._backend import runs_on
from iwm_kernels.attention import prepare, run_backend

from ..common import Row, quiet_compile, time_fn, time_left

SUITE = "attention"
GRID = 14           # ViT-B/16 at 224 px
NUM_TARGETS = 4
BASELINE = "SDPA padded (default)"
HELD_EQUAL = "tokens, sequences and attention semantics (repeated layout: full attention per sequence)"


@dataclass(frozen=True)
class PredictorShape:
    name: str
    heads: int
    head_dim: int
    depths: str

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


SHAPES = {
    "pred384": PredictorShape("pred384", 12, 32, "12 and 18 (ViT-B)"),
    "pred512": PredictorShape("pred512", 16, 32, "36 (ViT-L)"),
    "pred384-dh64": PredictorShape("pred384-dh64", 6, 64, "head dim 64"),
}


def multiblock_lengths(batch: int, num_targets: int = NUM_TARGETS, grid: int = GRID, seed: int = 0,
                       scale=(0.15, 0.2), aspect=(0.75, 1.5)) -> tuple[list[int], list[int]]:
    """(context lengths [batch], target block lengths [batch * num_targets], sample-major)."""
    gen = torch.Generator().manual_seed(seed)
    n = grid * grid
    sizes = []
    for _ in range(num_targets):  # block size shared by the batch
        s = float(torch.empty(()).uniform_(*scale, generator=gen))
        a = math.exp(float(torch.empty(()).uniform_(math.log(aspect[0]), math.log(aspect[1]), generator=gen)))
        h = max(1, min(grid, round(math.sqrt(s * n * a))))
        w = max(1, min(grid, round(math.sqrt(s * n / a))))
        sizes.append((h, w))
    ctx, tgt = [], []
    for _ in range(batch):
        union = torch.zeros(grid, grid, dtype=torch.bool)
        for h, w in sizes:
            top = int(torch.randint(0, grid - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, grid - w + 1, (1,), generator=gen))
            union[top:top + h, left:left + w] = True
            tgt.append(h * w)
        ctx.append(int((~union).sum()))
    return ctx, tgt


def _offsets(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


@dataclass
class Case:
    shape: PredictorShape
    batch: int
    dtype: torch.dtype
    repeated: object   # PackedPredictorInput
    shared: object

    @property
    def label(self) -> str:
        return f"{self.shape.name} B={self.batch} {str(self.dtype).replace('torch.', '')}"


def make_case(shape: PredictorShape, batch: int, dtype: torch.dtype, device: torch.device) -> Case:
    ctx, tgt = multiblock_lengths(batch)
    # Only the layouts matter here: pack placeholder tokens, attention inputs are drawn per layout.
    context = torch.zeros(sum(ctx), 1, device=device)
    targets = torch.zeros(sum(tgt), 1, device=device)
    args = (context, _offsets(ctx, device), targets, _offsets(tgt, device), NUM_TARGETS)
    return Case(shape, batch, dtype, pack_predictor_sequences(*args, shared_context=False),
                pack_predictor_sequences(*args, shared_context=True))


def _qkv(T: int, shape: PredictorShape, dtype, device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(T, shape.heads, shape.head_dim, device=device, dtype=dtype, generator=gen)
            .requires_grad_() for _ in range(3)]


def _pad(x: torch.Tensor, layout) -> torch.Tensor:
    S, L = layout.num_seqs, layout.longest
    buf = x.new_zeros((S * L,) + tuple(x.shape[1:]))
    buf[layout.seq_index * L + layout.positions] = x
    return buf.view(S, L, *x.shape[1:]).transpose(1, 2).detach().requires_grad_()


def _sdpa_backends(device: torch.device) -> list[tuple[str, Optional[object]]]:
    from torch.nn.attention import SDPBackend

    out: list[tuple[str, Optional[object]]] = [("default", None), ("math", SDPBackend.MATH),
                                               ("flash", SDPBackend.FLASH_ATTENTION)]
    if device.type == "cuda":
        out += [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    return out


def _xformers() -> tuple[Optional[object], str]:
    try:
        import xformers.ops as xops  # noqa: F401
        from xformers.ops import fmha

        return fmha, ""
    except Exception as exc:
        return None, f"xformers not importable ({exc.__class__.__name__}: {str(exc)[:80]})"


def _flash_attn() -> tuple[Optional[Callable], str]:
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func, ""
    except Exception as exc:
        return None, f"flash-attn not importable ({exc.__class__.__name__}: {str(exc)[:80]})"


def _flex() -> tuple[Optional[tuple[Callable, Callable]], str]:
    """(flex_attention, create_block_mask), or None with the reason (torch < 2.5, or a broken install)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        return (flex_attention, create_block_mask), ""
    except Exception as exc:
        return None, f"FlexAttention not importable ({exc.__class__.__name__}: {str(exc)[:80]})"


FLEX_COMPILE = True   # the fused kernel; tests set False for the (slow, unfused) eager form
_compiled_flex: dict = {}


def flex_function(flex_attention: Callable) -> Callable:
    """torch.compile(flex_attention), once per process (eager flex materialises every score).

    Static shapes (dynamic=False): each case's shape compiles on its own. With torch's automatic dynamic
    shapes the second shape recompiles with symbolic sizes, and Inductor's CPU FlexAttention template
    then emits C++ that does not compile (torch 2.13: `cur_qSplitSize8` undeclared), which failed three
    of the four CPU rows."""
    if not FLEX_COMPILE:
        return flex_attention
    if "fn" not in _compiled_flex:
        _compiled_flex["fn"] = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex["fn"]


@contextlib.contextmanager
def flex_recompiles(limit: int = 64):
    """Room for one static compile per (case, layout, grad mode): dynamo's default limit (8 per function)
    would otherwise fall back to eager FlexAttention, silently, part way through the suite."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    with dynamo_config.patch(**{name: max(limit, getattr(dynamo_config, name))}):
        yield


def flex_mask_mod(seq_of_token: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> Callable:
    """FlexAttention's mask_mod for a packed layout. Repeated layout: the same-sequence rule over the
    packed tokens. Shared layout: the same sequence, then the segment rule of
    iwm_kernels.attention.reference.segment_mask (a key in segment 0, or in the query's segment)."""
    if segment_ids is None:
        def same_sequence(b, h, q, kv):
            return seq_of_token[q] == seq_of_token[kv]
        return same_sequence

    def same_sequence_and_segment(b, h, q, kv):
        seg_q, seg_k = segment_ids[q], segment_ids[kv]
        return (seq_of_token[q] == seq_of_token[kv]) & ((seg_k == 0) | (seg_k == seg_q))
    return same_sequence_and_segment


def flex_backward_problem(device: torch.device) -> str:
    """'' when FlexAttention's backward runs on `device`; else torch's own reason (CPU: unsupported)."""
    found, why = _flex()
    if found is None:
        return why
    flex_attention, create_block_mask = found
    try:
        q = torch.randn(1, 1, 16, 16, device=device, requires_grad=True)
        mask = create_block_mask(lambda b, h, i, j: i >= 0, None, None, 16, 16, device=device)
        with quiet_compile():
            flex_attention(q, q, q, block_mask=mask).sum().backward()
        return ""
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0].split(". ")[0][:160] if str(exc).strip() else ""
        return f"FlexAttention backward on {device.type}: {exc.__class__.__name__}: {msg} (torch {torch.__version__})"


def flex_block_mask(layout, segment_ids: Optional[torch.Tensor], device: torch.device):
    """The BlockMask of a packed layout (seq_index of every token, segment ids for the shared one)."""
    _, create_block_mask = _flex()[0]
    total = layout.seq_index.numel()
    mod = flex_mask_mod(layout.seq_index.long(), None if segment_ids is None else segment_ids.long())
    return create_block_mask(mod, None, None, total, total, device=device)


def implementations(case: Case, device: torch.device) -> dict[str, tuple[Optional[Callable], str, dict]]:
    """name -> (make() returning (forward thunk, inputs needing grads), why-not, info). make() allocates."""
    impls: dict[str, tuple[Optional[Callable], str, dict]] = {}
    shape, dtype = case.shape, case.dtype
    rep, sh = case.repeated, case.shared
    rep_layout = prepare(rep.cu_seqlens, None, rep.num_tokens, rep.max_seqlen)
    sh_layout = prepare(sh.cu_seqlens, sh.segment_ids, sh.num_tokens, sh.max_seqlen)
    scale = shape.head_dim ** -0.5

    key_padding = (torch.arange(rep_layout.longest, device=device)[None, :]
                   < rep_layout.lengths[:, None])[:, None, None, :]
    for name, be in _sdpa_backends(device):
        def make(be=be):
            q, k, v = (_pad(x, rep_layout) for x in _qkv(rep.num_tokens, shape, dtype, device, 0))

            def fwd():
                if be is None:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding, scale=scale)
                from torch.nn.attention import sdpa_kernel

                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding, scale=scale)
            return fwd, (q, k, v)
        impls[f"SDPA padded ({name})"] = (make, "", {})

    fmha, why = _xformers()
    if fmha is not None and device.type == "cuda":
        lengths = rep_layout.lengths.tolist()

        def make_x():
            bias = fmha.BlockDiagonalMask.from_seqlens(lengths)
            q, k, v = _qkv(rep.num_tokens, shape, dtype, device, 0)
            return (lambda: fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale),
                    (q, k, v))
        impls["xformers BlockDiagonalMask"] = (make_x, "", {})
    else:
        impls["xformers BlockDiagonalMask"] = (None, why or "xformers needs CUDA tensors", {})

    flash, why = _flash_attn()
    if flash is not None and device.type == "cuda" and dtype != torch.float32:
        def make_f():
            q, k, v = _qkv(rep.num_tokens, shape, dtype, device, 0)
            cu = rep.cu_seqlens
            return (lambda: flash(q, k, v, cu, cu, rep.max_seqlen, rep.max_seqlen, softmax_scale=scale), (q, k, v))
        impls["flash-attn varlen"] = (make_f, "", {})
    else:
        impls["flash-attn varlen"] = (None, why or "flash-attn needs CUDA fp16/bf16", {})

    found, why = _flex()
    for mode, pk, layout in (("repeated", rep, rep_layout), ("shared", sh, sh_layout)):
        name = f"FlexAttention {mode}"
        if found is None:
            impls[name] = (None, why, {})
            continue

        def make_flex(pk=pk, layout=layout, grad=True):
            fn = flex_function(found[0])
            mask = flex_block_mask(layout, pk.segment_ids, device)   # once per batch, reused every call
            q, k, v = (x.detach().transpose(0, 1)[None].contiguous().requires_grad_(grad)
                       for x in _qkv(pk.num_tokens, shape, dtype, device, 0))

            def fwd():
                return fn(q, k, v, block_mask=mask, scale=scale)[0].transpose(0, 1)  # packed [T, H, Dh]
            return fwd, (q, k, v)
        impls[name] = (make_flex, "", {"layout": layout, "segment_ids": pk.segment_ids, "flex": True})

    ours = "triton" if device.type == "cuda" else "native"
    status = runs_on(ours, device, "varlen_attention", dtype)
    for mode, pk, layout in (("repeated", rep, rep_layout), ("shared", sh, sh_layout)):
        def make_o(pk=pk, layout=layout):
            q, k, v = _qkv(pk.num_tokens, shape, dtype, device, 0)
            return (lambda: run_backend(ours, q, k, v, layout, pk.max_seqlen, scale), (q, k, v))
        impls[f"ours {mode} ({ours})"] = (make_o if status.available else None, "" if status.available
                                          else status.detail, {"layout": layout})
    if device.type == "cpu":
        def make_r():
            q, k, v = _qkv(rep.num_tokens, shape, dtype, device, 0)
            return (lambda: run_backend("reference", q, k, v, rep_layout, rep.max_seqlen, scale), (q, k, v))
        impls["reference (per-sequence loop)"] = (make_r, "", {})
    return impls


def configs(device: torch.device, quick: bool) -> list[tuple[PredictorShape, int, torch.dtype]]:
    if device.type == "cuda":
        if quick:
            return [(SHAPES["pred384"], 64, torch.bfloat16), (SHAPES["pred384"], 256, torch.bfloat16),
                    (SHAPES["pred512"], 128, torch.bfloat16), (SHAPES["pred384-dh64"], 128, torch.bfloat16)]
        return [(SHAPES[s], b, torch.bfloat16) for s in SHAPES for b in (64, 128, 256)]
    if quick:
        return [(SHAPES["pred384"], 4, torch.float32)]
    return [(SHAPES["pred384"], 8, torch.float32), (SHAPES["pred384-dh64"], 8, torch.float32)]


def _pairs_rep(layout) -> int:
    return int((layout.lengths ** 2).sum())


def check_outputs(case: Case, outputs: dict, rep_layout, sh_layout, device: torch.device) -> list[Row]:
    """Correctness on the real shape: every forward output (packed [T, H, Dh]) of the repeated layout
    against PyTorch's SDPA on the padded batch, and of the shared layout against the reference kernel
    (per-sequence SDPA with the segment mask) on the same inputs. A MISMATCH row for each that differs."""
    shape, dtype = case.shape, case.dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    want = {}
    if BASELINE in outputs:
        padded = outputs[BASELINE].transpose(1, 2).reshape(-1, shape.heads, shape.head_dim)
        want["repeated"] = padded[rep_layout.seq_index * rep_layout.longest + rep_layout.positions]
    if any("shared" in name for name in outputs):
        sh = case.shared
        with torch.no_grad():
            q, k, v = _qkv(sh.num_tokens, shape, dtype, device, 0)
            want["shared"] = run_backend("reference", q, k, v, sh_layout, sh.max_seqlen, shape.head_dim ** -0.5)
    rows = []
    for name, out in outputs.items():
        mode = "shared" if "shared" in name else "repeated"
        if name == BASELINE or mode not in want or name.startswith("SDPA padded"):
            continue
        bad = float((out.float() - want[mode].float()).abs().max())
        if not bad <= tol:
            against = "SDPA" if mode == "repeated" else "the reference kernel"
            rows.append(Row(SUITE, case.label, name, None, note=f"MISMATCH vs {against}: {bad:.3g}"))
    return rows


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> list[Row]:
    with quiet_compile(), flex_recompiles():  # FlexAttention compiles (and warns when it does not)
        return _run(device, quick, progress)


def _run(device: torch.device, quick: bool, progress: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    flex_bwd_why: dict[str, str] = {}
    budget = 0.3 if quick else 1.0
    cases = configs(device, quick)
    # Headline: forward+backward at the ViT-B predictor shape, the largest batch timed.
    main = [(s.name, b) for s, b, _ in cases if s.name == "pred384"] or [(cases[0][0].name, cases[0][1])]
    headline_case = max(main, key=lambda c: c[1])
    for shape, batch, dtype in cases:
        case = make_case(shape, batch, dtype, device)
        impls = implementations(case, device)
        rep_layout = prepare(case.repeated.cu_seqlens, None, case.repeated.num_tokens, case.repeated.max_seqlen)
        sh_layout = prepare(case.shared.cu_seqlens, case.shared.segment_ids, case.shared.num_tokens,
                            case.shared.max_seqlen)
        per_pair = 4 * shape.heads * shape.head_dim
        pairs = {"repeated": _pairs_rep(rep_layout), "shared": sh_layout.visible_pairs()}
        padded_pairs = rep_layout.num_seqs * rep_layout.longest ** 2
        config = {"shape": shape.name, "heads": shape.heads, "head_dim": shape.head_dim, "batch": batch,
                  "dtype": str(dtype), "depths": shape.depths, "tokens_repeated": case.repeated.num_tokens,
                  "tokens_shared": case.shared.num_tokens, "max_seqlen_repeated": case.repeated.max_seqlen,
                  "max_seqlen_shared": case.shared.max_seqlen}
        rows.append(Row(SUITE, case.label, "shared vs repeated (counts)", None, config=config, extra={
            "tokens repeated": case.repeated.num_tokens, "tokens shared": case.shared.num_tokens,
            "token ratio": case.repeated.num_tokens / case.shared.num_tokens,
            "attention FLOP ratio": pairs["repeated"] / pairs["shared"],
            "padding overhead (padded/useful pairs)": padded_pairs / pairs["repeated"]},
            note="shared-context mode's saving (target: >= 2x on both)"))
        check = {}
        flex_build_ms = {}
        for pass_name, flop_mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            label = f"{case.label} {pass_name}"
            for name, (make, why, info) in impls.items():
                mode = "shared" if "shared" in name else "repeated"
                flops = per_pair * pairs[mode] * flop_mult
                progress(f"attention | {label} | {name}")
                extra = {}
                if make is not None and info.get("flex"):
                    if pass_name == "fwd+bwd":
                        if device.type not in flex_bwd_why:
                            flex_bwd_why[device.type] = flex_backward_problem(device)
                        why = flex_bwd_why[device.type]
                    if not why and FLEX_COMPILE and time_left() < 60:
                        why = "skipped: the attention suite's time share is spent (FlexAttention compiles)"
                    if why:
                        make = None
                    else:
                        if mode not in flex_build_ms:
                            flex_build_ms[mode] = time_fn(
                                lambda: flex_block_mask(info["layout"], info["segment_ids"], device), device,
                                budget_s=budget / 2)
                        extra["block mask build ms"] = flex_build_ms[mode]
                        make = partial(make, grad=pass_name != "fwd")
                if make is None:
                    rows.append(Row(SUITE, label, name, None, flops=flops, note=why, config=config))
                    continue
                try:
                    fwd, inputs = make()
                    if pass_name == "fwd":
                        def step():
                            with torch.no_grad():
                                return fwd()
                        out = step()
                    else:
                        out = fwd()
                        grad = torch.randn_like(out)

                        def step():
                            return torch.autograd.grad(fwd(), inputs, grad)
                    if pass_name == "fwd":
                        check[name] = out
                    ms = time_fn(step, device, budget_s=budget)
                except Exception as exc:
                    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    rows.append(Row(SUITE, label, name, None, flops=flops, config=config,
                                    note=f"failed: {exc.__class__.__name__}: {msg}"[:160]))
                    continue
                note = "different semantics: context computed once (segments)" if mode == "shared" else ""
                rows.append(Row(SUITE, label, name, ms, flops=flops, baseline=BASELINE, note=note, config=config,
                                headline=pass_name == "fwd+bwd" and (shape.name, batch) == headline_case,
                                same_work=mode != "shared", extra=extra,
                                differs="shared-context layout (other semantics)" if mode == "shared" else "",
                                held_equal=HELD_EQUAL if mode == "repeated" else ""))
                del inputs, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows += check_outputs(case, check, rep_layout, sh_layout, device)
        del case, impls, check
    return rows
