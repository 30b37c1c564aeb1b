"""The one wrapper-prefix stripper (iwm_kernels.names): the EMA's parameter pairing and the I-JEPA
checkpoint loader both go through it, so a name unwrapped for one is unwrapped for the other."""
import torch

import iwm_kernels
from iwm.models import build_encoder, build_predictor, load_ijepa_checkpoint
from iwm_kernels.names import strip_wrapper_prefixes


def test_leading_and_nested_prefixes_are_stripped():
    assert strip_wrapper_prefixes("module._orig_mod.blocks.0.w") == "blocks.0.w"
    nested = "_orig_mod.blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.w"
    assert strip_wrapper_prefixes(nested) == "blocks.0.w"
    assert strip_wrapper_prefixes("blocks.0.modules.w") == "blocks.0.modules.w"  # only whole components


def test_ijepa_loader_strips_what_the_ema_strips(seed):
    """A checkpoint of an FSDP-wrapped, compiled model (nested prefixes) loads; the old loader stripped
    only leading `module.` / `_orig_mod.`, so `blocks.0._fsdp_wrapped_module.*` keys failed to load."""
    enc = build_encoder("vit_small", img_size=32, patch_size=16, depth=2)
    pred = build_predictor(enc.num_patches, enc.patch_embed.grid, 384, depth=2, predictor_embed_dim=96,
                           num_heads=6, conditioning="none", shared_context=False)

    def wrapped(state):
        return {"_orig_mod." + k.replace("blocks.0.", "blocks.0._fsdp_wrapped_module."): v for k, v in state.items()}
    ckpt = {"encoder": wrapped(enc.state_dict()), "target_encoder": wrapped(enc.state_dict()),
            "predictor": wrapped(pred.state_dict())}
    enc2, _, _ = load_ijepa_checkpoint(ckpt)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc2.eval()(images), enc.eval()(images))
    # the EMA pairs a compiled wrapper's parameters with the bare module's by the same names
    target = torch.nn.Sequential(torch.nn.Linear(3, 2))
    online = torch.nn.Sequential(torch.nn.Linear(3, 2))
    iwm_kernels.ema_update_(target, torch.compile(online), 0.0)
    assert torch.equal(target[0].weight, online[0].weight)
