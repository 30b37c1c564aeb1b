"""FSDP2 sharding and activation checkpointing for `IWM`, with PyTorch's own engines
(`torch.distributed.fsdp.fully_shard`, `torch.utils.checkpoint`).

Sharding: `fully_shard` per transformer block, then per sub-model (encoder, target encoder,
predictor), then the whole model. The target encoder gets exactly the encoder's wrapping on the same
mesh, so every parameter of both is split the same way (dim 0, `torch.chunk` over the ranks): a rank's
target shard holds the same elements as its online shard and the EMA runs on the local shards alone,
with no all-gather (iwm_kernels.ema_update_ takes the DTensors' local tensors).

Activation checkpointing changes a block's class, not its place in the module tree: parameter names
and state_dict keys stay those of the plain model, so checkpoints move between the modes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .models import IWM

PARALLEL_MODES = ("ddp", "fsdp2")
CHECKPOINT_MODES = ("none", "blocks", "every_k")


# ---------------------------------------------------------------------------------------------- sharding
def _blocks(model: IWM) -> dict[str, nn.ModuleList]:
    return {"encoder": model.encoder.blocks, "target_encoder": model.target_encoder.blocks,
            "predictor": model.predictor.predictor_blocks}


def shard_model(model: IWM, *, mesh=None, use_bfloat16: bool = False) -> IWM:
    """Shard `model` in place with FSDP2 and return it.

    mesh: a 1-D DeviceMesh over the data-parallel ranks (default: every rank of the initialised process
    group, on the parameters' device type). use_bfloat16: compute in bf16 (the unsharded parameters are
    bf16 copies) with fp32 master weights, gradients and gradient reductions.

    The module's parameters become new DTensor objects: an optimizer built on the old ones must be
    rebound (`rebind_optimizer`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not isinstance(model, IWM):
        raise TypeError(f"model: expected an iwm.models.IWM, got {type(model).__name__}")
    if mesh is None:
        mesh = default_mesh(next(model.parameters()).device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bfloat16 else None,
                                  reduce_dtype=torch.float32 if use_bfloat16 else None)
    for part, blocks in _blocks(model).items():
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
            # The dense path (full images: the target encoder; I-JEPA's layout) calls forward_dense.
            register_fsdp_forward_method(block, "forward_dense")
        fully_shard(getattr(model, part), mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root: one lazy init, one end-of-backward
    return model


def default_mesh(device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("shard_model: FSDP2 needs an initialised process group (run under torchrun)")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def rebind_optimizer(optimizer: torch.optim.Optimizer, before: dict[int, str], model: nn.Module) -> None:
    """Point `optimizer`'s param groups at `model`'s (sharded) parameters of the same names.

    before: id(old parameter) -> name, taken before sharding. Optimizer state already present (a full,
    replicated state loaded from a DDP checkpoint) is split like its parameter: each rank keeps its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    now = dict(model.named_parameters())
    for group in optimizer.param_groups:
        new_params = []
        for p in group["params"]:
            if id(p) not in before:
                raise ValueError("optimizer: holds a parameter that is not one of the model's")
            new = now[before[id(p)]]
            state = optimizer.state.pop(p, None)
            if state:
                optimizer.state[new] = {
                    k: distribute_tensor(v.to(new.device), new.device_mesh, new.placements)
                    if isinstance(new, DTensor) and torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0
                    else v for k, v in state.items()}
            new_params.append(new)
        group["params"] = new_params


def parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A norm computed over DTensor gradients is a DTensor (a pending sum over the shards): its full
    value as a plain tensor on every rank (one all-reduce on the device, no host read)."""
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else norm


# --------------------------------------------------------------------------------- activation checkpointing
class _Checkpointed:
    """Mixin: the block's forward runs under torch.utils.checkpoint (non-reentrant), so its activations
    are recomputed in the backward instead of kept."""

    def forward(self, *args, **kwargs):
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})
    return _CLASSES[cls]


def checkpointed_blocks(model: IWM, mode: str, every_k: int = 1) -> list[nn.Module]:
    """The encoder and predictor blocks `mode` checkpoints (every_k: blocks 0, k, 2k, ... of each)."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(CHECKPOINT_MODES)}")
    if mode == "every_k" and (not isinstance(every_k, int) or isinstance(every_k, bool) or every_k < 1):
        raise ValueError(f"every_k: must be an integer >= 1, got {every_k!r}")
    if mode == "none":
        return []
    k = every_k if mode == "every_k" else 1
    return [b for blocks in (model.encoder.blocks, model.predictor.predictor_blocks)
            for i, b in enumerate(blocks) if i % k == 0]


def apply_activation_checkpointing(model: IWM, mode: str, every_k: int = 1) -> IWM:
    """Checkpoint the encoder's and the predictor's blocks in place (the target encoder runs without
    gradients: nothing to save). Same numbers, less activation memory, one more forward per block.
    Apply before sharding (the FSDP2 hooks then wrap the checkpointed forward)."""
    for block in checkpointed_blocks(model, mode, every_k):
        if not isinstance(block, _Checkpointed):
            block.__class__ = _checkpointed_class(type(block))
    return model


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module, _Checkpointed)


def describe(parallel: str, mode: str, every_k: int, world_size: int) -> str:
    """The startup log's words for the mode."""
    if world_size <= 1:
        what = "one process"
    elif parallel == "fsdp2":
        what = f"FSDP2 over {world_size} processes (parameters, gradients and optimizer state sharded)"
    else:
        what = f"DDP over {world_size} processes"
    ac = {"none": "off", "blocks": "every block",
          "every_k": f"blocks 0, {every_k}, {2 * every_k}, ... of the encoder and predictor"}.get(mode, mode)
    return f"parallel: {what}; activation checkpointing: {ac}"

