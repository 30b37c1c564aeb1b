"""Model layer: I-JEPA parity (dense transcriptions written here from the published semantics), packed
ragged paths against per-sample loops, conditioning, presets, checkpoint loading, bad batches."""
import copy

import pytest
import torch
import torch.nn.functional as F

from iwm.masks import MaskBatch, MultiBlockMaskSampler
from iwm.models import IWM, build_encoder, build_predictor, get_preset, load_ijepa_checkpoint
from iwm.models.predictor import ActionMLP


# ---- I-JEPA, transcribed densely ---------------------------------------------------------------------
def ijepa_apply_masks(x, masks):
    out = []
    for m in masks:
        idx = m.long().unsqueeze(-1).repeat(1, 1, x.size(-1))
        out.append(torch.gather(x, 1, idx))
    return torch.cat(out, dim=0)


def ijepa_attention(attn, x):
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))


def ijepa_blocks(blocks, x):
    for blk in blocks:
        x = x + ijepa_attention(blk.attn, blk.norm1(x))
        x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
    return x


def ijepa_encoder(enc, images, masks=None):
    x = enc.patch_embed.proj(images).flatten(2).transpose(1, 2) + enc.pos_embed
    if masks is not None:
        x = ijepa_apply_masks(x, masks)
    return enc.norm(ijepa_blocks(enc.blocks, x))


def ijepa_predictor(pred, x, masks_x, masks):
    B = len(x) // len(masks_x)
    x = pred.predictor_embed(x)
    x = x + ijepa_apply_masks(pred.predictor_pos_embed.repeat(B, 1, 1), masks_x)
    n_ctx = x.shape[1]
    pos = ijepa_apply_masks(pred.predictor_pos_embed.repeat(B, 1, 1), masks)
    pos = torch.cat([pos[i * B:(i + 1) * B].repeat(len(masks_x), 1, 1) for i in range(len(masks))], dim=0)
    tokens = pred.mask_token.repeat(pos.size(0), pos.size(1), 1) + pos
    x = x.repeat(len(masks), 1, 1)
    x = torch.cat([x, tokens], dim=1)
    x = pred.predictor_norm(ijepa_blocks(pred.predictor_blocks, x))
    return pred.predictor_proj(x[:, n_ctx:])


def small_models(conditioning="none", shared=False, img=32, patch=8, dim=64, heads=2, depth=2, pdim=32, pdepth=2):
    enc = build_encoder("vit_tiny", img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)
    pred = build_predictor(enc.num_patches, enc.patch_embed.grid, dim, depth=pdepth, predictor_embed_dim=pdim,
                           num_heads=heads, conditioning=conditioning, shared_context=shared)
    return enc.eval(), pred.eval()


def sample_masks(grid, batch, seed, **kw):
    return MultiBlockMaskSampler(grid, seed=seed, min_keep=2, **kw).sample(batch, 0)


# ---- encoder ------------------------------------------------------------------------------------------
def test_encoder_matches_ijepa_dense(seed):
    enc, _ = small_models()
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(enc(images, backend="reference"), ijepa_encoder(enc, images), atol=1e-5, rtol=1e-5)
    masks = [torch.stack([torch.randperm(16)[:7] for _ in range(3)])]
    torch.testing.assert_close(enc(images, masks, backend="reference"), ijepa_encoder(enc, images, masks),
                               atol=1e-5, rtol=1e-5)


def test_encoder_packed_ragged_equals_per_sample_loop(seed):
    enc, _ = small_models()
    images = torch.randn(4, 3, 32, 32)
    mb = sample_masks(4, 4, seed)
    out = enc(images, mb.context_index, cu_seqlens=mb.context_cu)
    cu = mb.context_cu.tolist()
    for b in range(4):
        idx = mb.context_index[cu[b]:cu[b + 1]].long()
        want = ijepa_encoder(enc, images[b:b + 1], [idx[None]])[0]
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small", "vit_base"])
def test_encoder_presets_have_timm_names(name):
    enc = build_encoder(name, img_size=32, patch_size=16)
    keys = set(enc.state_dict())
    assert {"patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
            "blocks.0.mlp.fc1.weight", "blocks.0.norm1.weight", "norm.weight"} <= keys
    with pytest.raises(ValueError, match="img_size"):
        build_encoder(name, img_size=100, patch_size=16)


# ---- predictor ----------------------------------------------------------------------------------------
def test_predictor_ijepa_convention_matches_dense(seed):
    enc, pred = small_models("none", shared=False)
    B = 3
    masks_x = [torch.stack([torch.randperm(16)[:6] for _ in range(B)])]
    masks = [torch.stack([torch.randperm(16)[:4] for _ in range(B)]) for _ in range(4)]
    z = torch.randn(B, 6, 64)
    torch.testing.assert_close(pred(z, masks_x, masks, backend="reference"), ijepa_predictor(pred, z, masks_x, masks),
                               atol=1e-5, rtol=1e-5)


def test_packed_repeated_context_equals_ijepa_on_truncated_masks(seed):
    """shared_context=False on equal-length (truncated) masks == I-JEPA's dense predictor."""
    enc, pred = small_models("none", shared=False)
    mb = sample_masks(4, 3, seed)
    masks_enc, masks_pred = mb.to_ijepa()
    mt = MaskBatch.from_ijepa(masks_enc, masks_pred, grid=mb.grid)
    ctx = torch.randn(mt.context_index.numel(), 64)
    out = pred(ctx, mt, backend="reference")                                 # [Tt, E], sample-major
    want = ijepa_predictor(pred, ctx.view(3, -1, 64), masks_enc, masks_pred)  # [M*B, K, E], mask-major
    M, K = len(masks_pred), masks_pred[0].shape[1]
    want = want.view(M, 3, K, 64).transpose(0, 1).reshape(-1, 64)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conditioning", ["none", "feature", "sequence"])
@pytest.mark.parametrize("shared", [False, True])
def test_packed_predictor_equals_per_sample_loop(conditioning, shared, seed):
    _, pred = small_models(conditioning, shared=shared)
    B = 3
    mb = sample_masks(4, B, seed)
    ctx = torch.randn(mb.context_index.numel(), 64)
    action = torch.randn(B, 7) if conditioning != "none" else None
    out = pred(ctx, mb, action=action, backend="reference")
    for b in range(B):
        one = mb.slice(b, b + 1)
        c0, c1 = mb.context_cu[b], mb.context_cu[b + 1]
        t0, t1 = mb.target_cu_per_sample[b], mb.target_cu_per_sample[b + 1]
        got = pred(ctx[c0:c1], one, action=None if action is None else action[b:b + 1], backend="reference")
        torch.testing.assert_close(out[t0:t1], got, atol=1e-5, rtol=1e-5)


def test_feature_conditioning_split_equals_concat_mlp(seed):
    mlp = ActionMLP(32, 7)
    tokens, action = torch.randn(10, 32), torch.randn(10, 7)
    split = mlp.finish(mlp.position_part(tokens) + mlp.sample_part(action))
    torch.testing.assert_close(split, mlp(tokens, action), atol=1e-5, rtol=1e-5)


def test_conditioning_changes_predictions_and_zero_action_is_valid(seed):
    _, pred = small_models("feature", shared=True)
    mb = sample_masks(4, 2, seed)
    ctx = torch.randn(mb.context_index.numel(), 64)
    a = pred(ctx, mb, action=torch.zeros(2, 7))
    b = pred(ctx, mb, action=torch.randn(2, 7))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="action: required"):
        pred(ctx, mb)
    with pytest.raises(ValueError, match="action: expected shape"):
        pred(ctx, mb, action=torch.zeros(2, 5))


def test_shared_context_uses_fewer_tokens(seed):
    from iwm_kernels import pack_predictor_sequences
    mb = sample_masks(8, 4, seed)
    ctx = torch.randn(mb.context_index.numel(), 8)
    tgt = torch.randn(mb.target_index.numel(), 8)
    rep = pack_predictor_sequences(ctx, mb.context_cu, tgt, mb.target_cu, 4, shared_context=False)
    sh = pack_predictor_sequences(ctx, mb.context_cu, tgt, mb.target_cu, 4, shared_context=True)
    assert sh.num_tokens < rep.num_tokens


# ---- I-JEPA checkpoints -------------------------------------------------------------------------------
def test_load_ijepa_checkpoint_with_module_prefixes(seed):
    enc = build_encoder("vit_small", img_size=32, patch_size=16, depth=2)
    pred = build_predictor(enc.num_patches, enc.patch_embed.grid, 384, depth=2, predictor_embed_dim=96,
                           num_heads=6, conditioning="none", shared_context=False)
    ckpt = {"encoder": {f"module.{k}": v for k, v in enc.state_dict().items()},
            "target_encoder": {f"module.{k}": v for k, v in enc.state_dict().items()},
            "predictor": {f"module.{k}": v for k, v in pred.state_dict().items()},
            "epoch": 3, "opt": {}, "scaler": None, "batch_size": 8, "world_size": 1, "lr": 1e-3}
    enc2, pred2, tgt2 = load_ijepa_checkpoint(ckpt)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc2.eval()(images), enc.eval()(images))
    assert enc2.num_heads == 6 and pred2.conditioning == "none" and len(pred2.predictor_blocks) == 2
    with pytest.raises(ValueError, match="not an I-JEPA checkpoint"):
        load_ijepa_checkpoint({"encoder": {}})


# ---- IWM step -----------------------------------------------------------------------------------------
def tiny_iwm(conditioning="feature", shared=True):
    return IWM.from_preset("tiny", conditioning=conditioning, shared_context=shared, encoder_depth=2, pred_depth=2)


def batch_for(model, B, seed):
    gen = torch.Generator().manual_seed(seed)
    size = model.encoder.img_size
    src, tgt = torch.randn(B, 3, size, size, generator=gen), torch.randn(B, 3, size, size, generator=gen)
    masks = MultiBlockMaskSampler(model.encoder.patch_embed.grid, seed=seed).sample(B, 0)
    return src, tgt, masks, torch.randn(B, 7, generator=gen)


@pytest.mark.parametrize("conditioning, shared", [("none", False), ("feature", False), ("sequence", False),
                                                   ("sequence", True)])   # the default layout, then segments
def test_iwm_step_backend_parity(conditioning, shared, seed):
    """Same batch, every kernel on the reference backend vs the fast backends: same loss and gradients,
    in both predictor layouts."""
    from tests.helpers import backends_on
    torch.manual_seed(seed)
    ref = tiny_iwm(conditioning, shared=shared)
    src, tgt, masks, action = batch_for(ref, 3, seed)
    action = action if conditioning != "none" else None
    results = {}
    for backend in backends_on("cpu"):
        model = copy.deepcopy(ref)
        loss, stats = model(src, tgt, masks, action, backend=backend)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (loss.detach(), grads, stats)
    base_loss, base_grads, _ = results["reference"]
    for backend, (loss, grads, stats) in results.items():
        torch.testing.assert_close(loss, base_loss, atol=1e-5, rtol=1e-4, msg=lambda m: f"{backend}: {m}")
        assert set(grads) == set(base_grads)
        for n in grads:
            torch.testing.assert_close(grads[n], base_grads[n], atol=2e-5, rtol=2e-3,
                                       msg=lambda m: f"{backend} grad {n}: {m}")
        assert stats["target_tokens"] == masks.target_index.numel()


def test_iwm_bad_batches(seed):
    model = tiny_iwm()
    src, tgt, masks, action = batch_for(model, 2, seed)
    with pytest.raises(ValueError, match="source: expected images"):
        model(src[:, :, :10], tgt, masks, action)
    with pytest.raises(ValueError, match="target: shape"):
        model(src, tgt[:1], masks, action)
    bad = src.clone()
    bad[0, 0, 0, 0] = float("nan")
    model.check_inputs = True  # opt-in (a host sync per step); the training step leaves it off
    with pytest.raises(ValueError, match="source: images contain NaN"):
        model(bad, tgt, masks, action)
    model.check_inputs = False
    with pytest.raises(ValueError, match="action: expected shape"):
        model(src, tgt, masks, action[:, :4])
    with pytest.raises(ValueError, match="masks: built for 3 samples"):
        model(src, tgt, MultiBlockMaskSampler(model.encoder.patch_embed.grid).sample(3, 0), action)


def test_update_target_is_ema(seed):
    model = tiny_iwm()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.75)
    for t, b, o in zip(model.target_encoder.parameters(), before, model.encoder.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * o)


def test_presets():
    for name in ("ijepa_vitb16", "iwm_inv_vitb16", "iwm_equi_vitb16", "iwm_equi_vitl16", "tiny"):
        assert get_preset(name).img_size % get_preset(name).patch_size == 0
    assert get_preset("iwm_equi_vitb16").pred_depth == 18 and get_preset("ijepa_vitb16").conditioning == "none"
    with pytest.raises(ValueError, match="preset: unknown preset"):
        get_preset("vit_giant")


def test_iwm_step_under_torch_compile_matches_eager(seed):
    """The compile option: the whole step traced through the custom ops (aot_eager keeps CI fast; the
    benchmark suite times inductor)."""
    model = tiny_iwm()
    src, tgt, masks, action = batch_for(model, 3, seed)
    loss, _ = model(src, tgt, masks, action)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    compiled_model = copy.deepcopy(model)
    compiled_model.zero_grad(set_to_none=True)
    loss_c, _ = torch.compile(compiled_model, backend="aot_eager")(src, tgt, masks, action)
    loss_c.backward()
    torch.testing.assert_close(loss_c.detach(), loss.detach(), atol=1e-6, rtol=1e-5)
    for n, p in compiled_model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_bf16_autocast_step_is_close_to_fp32(seed):
    model = tiny_iwm()
    src, tgt, masks, action = batch_for(model, 3, seed)
    loss32, _ = model(src, tgt, masks, action)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = model(src, tgt, masks, action)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert abs(float(loss16.detach()) - float(loss32.detach())) < 0.05 * float(loss32.detach())


def test_encoder_lengths_as_ints_or_cpu_tensor_equal_the_checked_path(seed):
    """seq_lengths as Python ints (made into a CPU tensor) or as the MaskBatch's host_sizes column give the
    checked path's output (the lengths only choose how the CPU attention runs)."""
    enc = IWM.from_preset("tiny").encoder
    masks = MultiBlockMaskSampler(8, min_keep=4, seed=seed).sample(3, 0)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    ref = enc(x, masks.context_index, cu_seqlens=masks.context_cu)
    for lengths in (list(masks.context_sizes), masks.host_sizes[:, 0]):
        got = enc(x, masks.context_index, cu_seqlens=masks.context_cu, max_seqlen=masks.context_index.shape[0],
                  check_values=False, seq_lengths=lengths)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
