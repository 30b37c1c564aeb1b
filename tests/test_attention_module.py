"""Predictor sequence packing and VarlenSelfAttention: the packing against a per-sample loop, the module
against a direct transcription of I-JEPA's dense attention, and the two predictor semantics."""
import pytest
import torch
import torch.nn.functional as F

import iwm_kernels
from iwm_kernels import PackedPredictorInput, VarlenSelfAttention, pack_predictor_sequences, unpack_targets
from iwm_kernels.attention import reference
from tests.helpers import backends_on

BACKENDS = backends_on("cpu")


def offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist())


def random_predictor_batch(gen, B=4, M=3, D=8, with_extra=False, dtype=torch.float32):
    """Ragged context (0 allowed), ragged blocks (0 allowed), optional 0..2 action tokens per sample."""
    ctx_len = torch.randint(0, 12, (B,), generator=gen).tolist()
    tgt_len = torch.randint(0, 7, (B * M,), generator=gen).tolist()
    batch = dict(context=torch.randn(sum(ctx_len), D, generator=gen).to(dtype), context_cu=offsets(ctx_len),
                 targets=torch.randn(sum(tgt_len), D, generator=gen).to(dtype), target_cu=offsets(tgt_len),
                 num_targets=M)
    if with_extra:
        ex_len = torch.randint(0, 3, (B,), generator=gen).tolist()
        batch.update(extra=torch.randn(sum(ex_len), D, generator=gen).to(dtype), extra_cu=offsets(ex_len))
    return batch


def loop_packing(context, context_cu, targets, target_cu, num_targets, shared, extra=None, extra_cu=None):
    """The obvious per-sample loop: sequences, segment ids, and the rows of the target tokens."""
    B, M = context_cu.numel() - 1, num_targets
    seqs, segs, target_rows, row = [], [], {}, 0
    for b in range(B):
        ctx = context[context_cu[b]:context_cu[b + 1]]
        if extra is not None:
            ctx = torch.cat([ctx, extra[extra_cu[b]:extra_cu[b + 1]]])
        blocks = [targets[target_cu[b * M + j]:target_cu[b * M + j + 1]] for j in range(M)]
        block_rows = [list(range(int(target_cu[b * M + j]), int(target_cu[b * M + j + 1]))) for j in range(M)]
        if shared:
            seqs.append(torch.cat([ctx] + blocks))
            segs += [0] * len(ctx) + sum(([j + 1] * len(blk) for j, blk in enumerate(blocks)), [])
            row += len(ctx)
            for rows in block_rows:
                for t in rows:
                    target_rows[t] = row
                    row += 1
        else:
            for j in range(M):
                seqs.append(torch.cat([ctx, blocks[j]]))
                row += len(ctx)
                for t in block_rows[j]:
                    target_rows[t] = row
                    row += 1
    x = torch.cat(seqs) if seqs else context[:0]
    cu = offsets([len(s) for s in seqs])
    rows = torch.tensor([target_rows[t] for t in range(targets.shape[0])], dtype=torch.long)
    return x, cu, (torch.tensor(segs) if shared else None), rows


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
def test_packing_matches_a_per_sample_loop(shared, with_extra, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = random_predictor_batch(gen, with_extra=with_extra)
    for name in ("context", "targets", "extra"):
        if name in batch:
            batch[name].requires_grad_()
    packed = pack_predictor_sequences(**batch, shared_context=shared)
    x, cu, seg, rows = loop_packing(**batch, shared=shared)
    assert isinstance(packed, PackedPredictorInput)
    assert torch.equal(packed.x, x)
    assert packed.cu_seqlens.dtype == torch.int32 and torch.equal(packed.cu_seqlens.long(), cu)
    assert packed.max_seqlen == int((cu[1:] - cu[:-1]).max())
    assert packed.num_tokens == x.shape[0] and packed.num_seqs == cu.numel() - 1
    assert torch.equal(packed.target_rows, rows)
    assert torch.equal(unpack_targets(packed.x, packed), batch["targets"])
    if shared:
        assert packed.segment_ids.dtype == torch.int32 and torch.equal(packed.segment_ids.long(), seg)
    else:
        assert packed.segment_ids is None
    # Gradients flow back to every source (a context row copied M times gets M contributions).
    w = torch.randn(x.shape, generator=gen)
    leaves = [batch[n] for n in ("context", "targets", "extra") if n in batch]
    got = torch.autograd.grad((packed.x * w).sum(), leaves)
    want = torch.autograd.grad((x * w).sum(), leaves)
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt)


def test_shared_context_halves_tokens_at_predictor_shapes(seed):
    """ViT-B/16-like: ~100 context tokens, 4 blocks of ~30: shared mode has < half the tokens."""
    gen = torch.Generator().manual_seed(seed)
    B, M = 8, 4
    ctx = torch.randint(90, 110, (B,), generator=gen).tolist()
    blk = [int(torch.randint(29, 40, (1,), generator=gen))] * (B * M)
    common = dict(context=torch.zeros(sum(ctx), 4), context_cu=offsets(ctx), targets=torch.zeros(sum(blk), 4),
                  target_cu=offsets(blk), num_targets=M)
    rep = pack_predictor_sequences(**common, shared_context=False)
    sh = pack_predictor_sequences(**common, shared_context=True)
    assert rep.num_tokens >= 2 * sh.num_tokens
    assert sh.num_seqs == B and rep.num_seqs == B * M


@pytest.mark.parametrize("case, match", [
    ("target_cu_len", "target_cu: expected 13 offsets for 12 sequences"),
    ("width", "targets: width 5 differs from context's 8"),
    ("dtype", "targets: dtype"),
    ("num_targets", "num_targets: expected an int >= 1"),
    ("extra_alone", "extra_cu: pass extra and extra_cu together"),
    ("extra_cu_len", "extra_cu: expected 5 offsets"),
    ("context_cu_end", "context_cu: must end at"),
    ("shared_flag", "shared_context: expected a bool"),
])
def test_packing_errors_name_the_argument(case, match, seed):
    batch = random_predictor_batch(torch.Generator().manual_seed(seed), B=4, M=3)
    shared = False
    if case == "target_cu_len":
        batch["target_cu"] = torch.cat([batch["target_cu"], batch["target_cu"][-1:]])
        batch["targets"] = batch["targets"]
    elif case == "width":
        batch["targets"] = torch.randn(batch["targets"].shape[0], 5)
    elif case == "dtype":
        batch["targets"] = batch["targets"].double()
    elif case == "num_targets":
        batch["num_targets"] = 0
    elif case == "extra_alone":
        batch["extra"] = torch.randn(2, 8)
    elif case == "extra_cu_len":
        batch.update(extra=torch.randn(2, 8), extra_cu=torch.tensor([0, 2]))
    elif case == "context_cu_end":
        batch["context_cu"] = batch["context_cu"].clone()
        batch["context_cu"][-1] += 1
    elif case == "shared_flag":
        shared = 1
    if case == "target_cu_len":
        match = "target_cu: expected 13 offsets for 12 sequences, got 14"
    with pytest.raises((ValueError, TypeError), match=match):
        pack_predictor_sequences(**batch, shared_context=shared)


def test_unpack_targets_checks_rows(seed):
    packed = pack_predictor_sequences(**random_predictor_batch(torch.Generator().manual_seed(seed)),
                                      shared_context=True)
    with pytest.raises(ValueError, match="out: expected"):
        unpack_targets(torch.zeros(packed.num_tokens + 1, 8), packed)


# ---- VarlenSelfAttention ---------------------------------------------------------------------------------

def ijepa_attention(x, module):
    """Direct transcription of I-JEPA's (timm's) dense Attention.forward, with module's weights."""
    B, N, C = x.shape
    H = module.num_heads
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(x, module.proj.weight, module.proj.bias)


def test_timm_parameter_names():
    m = VarlenSelfAttention(64, 4)
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert m.qkv.weight.shape == (192, 64)
    assert "qkv.bias" not in VarlenSelfAttention(64, 4, qkv_bias=False).state_dict()
    with pytest.raises(ValueError, match="num_heads"):
        VarlenSelfAttention(64, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_mode_equals_ijepa_dense(backend, seed):
    """I-JEPA's predictor: masks truncated to equal lengths, context repeated once per block
    (block-major: dense row j*B + b), dense attention. Our packed repeated mode gives the same outputs."""
    gen = torch.Generator().manual_seed(seed)
    B, M, Nc, Nt, D, H = 3, 4, 19, 6, 64, 2
    torch.manual_seed(seed)
    attn = VarlenSelfAttention(D, H)
    ctx = torch.randn(B, Nc, D, generator=gen)
    tgt = torch.randn(B, M, Nt, D, generator=gen)
    dense_in = torch.cat([ctx.repeat(M, 1, 1), tgt.transpose(0, 1).reshape(M * B, Nt, D)], dim=1)
    want = ijepa_attention(dense_in, attn)                                       # [M*B, Nc+Nt, D]
    packed = pack_predictor_sequences(ctx.reshape(B * Nc, D), offsets([Nc] * B), tgt.reshape(B * M * Nt, D),
                                      offsets([Nt] * (B * M)), M, shared_context=False)
    out = attn(packed.x, packed.cu_seqlens, packed.max_seqlen, backend=backend)
    got = out.view(B, M, Nc + Nt, D).transpose(0, 1).reshape(M * B, Nc + Nt, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unpack_targets(out, packed).view(B, M, Nt, D),
                               want[:, Nc:].reshape(M, B, Nt, D).transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_mode_targets_equal_repeated_mode(backend, seed):
    """In one attention layer a target token sees the same keys in both modes (its sample's context and
    its own block), so its output is the same; context tokens differ (shared: context only)."""
    gen = torch.Generator().manual_seed(seed)
    batch = random_predictor_batch(gen, B=3, M=3, D=32, with_extra=True)
    torch.manual_seed(seed)
    attn = VarlenSelfAttention(32, 2)
    outs = {}
    for shared in (False, True):
        p = pack_predictor_sequences(**batch, shared_context=shared)
        out = attn(p.x, p.cu_seqlens, p.max_seqlen, p.segment_ids, backend=backend)
        outs[shared] = unpack_targets(out, p)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_mode_matches_reference(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    p = pack_predictor_sequences(**random_predictor_batch(gen, B=3, M=4, D=32), shared_context=True)
    torch.manual_seed(seed)
    attn = VarlenSelfAttention(32, 2)
    x = p.x.detach().requires_grad_()
    out = attn(x, p.cu_seqlens, p.max_seqlen, p.segment_ids, backend=backend)
    q, k, v = attn.qkv(x).view(-1, 3, 2, 16).unbind(1)
    want = attn.proj(reference.varlen_attention(q, k, v, p.cu_seqlens, p.segment_ids, 0.25).reshape(-1, 32))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn(out.shape, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               atol=1e-5, rtol=1e-5)


def test_forward_dense_equals_packed_forward(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    attn = VarlenSelfAttention(64, 4)
    x = torch.randn(3, 10, 64, generator=gen)
    dense = attn.forward_dense(x)
    packed = attn(x.reshape(30, 64), offsets([10] * 3), 10)
    torch.testing.assert_close(dense.reshape(30, 64), packed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, ijepa_attention(x, attn), atol=1e-5, rtol=1e-5)


def test_module_under_torch_compile(seed):
    gen = torch.Generator().manual_seed(seed)
    p = pack_predictor_sequences(**random_predictor_batch(gen, B=2, M=2, D=32), shared_context=True)
    torch.manual_seed(seed)
    attn = VarlenSelfAttention(32, 2)
    want = attn(p.x, p.cu_seqlens, p.max_seqlen, p.segment_ids, backend="reference")
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    got = compiled(p.x, p.cu_seqlens, p.max_seqlen, p.segment_ids, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_dropout_only_in_training(seed):
    gen = torch.Generator().manual_seed(seed)
    p = pack_predictor_sequences(**random_predictor_batch(gen, B=2, M=2, D=32), shared_context=True)
    attn = VarlenSelfAttention(32, 2, attn_drop=0.5)
    args = (p.x, p.cu_seqlens, p.max_seqlen, p.segment_ids)
    attn.eval()
    ref = VarlenSelfAttention(32, 2)
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(*args), ref(*args, backend="reference"), atol=1e-5, rtol=1e-5)
    attn.train()
    with pytest.warns(RuntimeWarning, match="attn_drop"):
        out = attn(*args)
    assert out.shape == p.x.shape and not torch.allclose(out, ref(*args, backend="reference"))


def test_exports():
    for name in ("varlen_attention", "VarlenSelfAttention", "pack_predictor_sequences", "unpack_targets",
                 "PackedPredictorInput"):
        assert name in iwm_kernels.__all__ and hasattr(iwm_kernels, name)
