"""Parameter and state-dict names without the prefixes that wrappers add: DDP's `module.`,
torch.compile's `_orig_mod.`, FSDP's and activation checkpointing's wrapper modules.

The one stripper of the project: the EMA pairs target and online parameters by these names, and
iwm.models.ijepa loads checkpoints saved from wrapped models with them.
"""
from __future__ import annotations

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def strip_wrapper_prefixes(name: str) -> str:
    """`name` with every wrapper prefix removed, leading (`module._orig_mod.blocks.0.w` -> `blocks.0.w`)
    or nested (FSDP wraps submodules: `blocks.0._fsdp_wrapped_module.w` -> `blocks.0.w`)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
            if "." + prefix in name:
                name, changed = name.replace("." + prefix, "."), True
    return name
