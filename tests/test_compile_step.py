"""torch.compile of the training step: one compile serves every later mask draw.

Each step's masks have new token counts (ragged or I-JEPA-truncated, complement or block context). The
model hands those lengths to the attention as CPU tensors and the step marks the token dims dynamic, so
the compiled forward traces once, without graph breaks, and never recompiles (error_on_recompile), on
both predictor layouts; it computes what the eager step computes (losses and updated weights), and
reads nothing back from the device. Compiles are slow on the CPU: one per layout serves every case.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from iwm import augment as aug
from iwm.masks import MultiBlockMaskSampler
from iwm.step import TrainStep
from tests.helpers import HostReadCounter, count_python_readers, small_iwm

BATCH = 4
MOMENTUM = 0.99


def _masks(grid, step: int):
    """Step i's masks, cycling through every kind the step meets: complement (IWM) and block (I-JEPA)
    contexts, each ragged and truncated (I-JEPA's collated form, equal lengths)."""
    mode = ("complement", "block")[(step // 2) % 2]
    masks = MultiBlockMaskSampler(grid, seed=1, min_keep=2, context_mode=mode).sample(BATCH, step)
    return masks.truncated() if step % 2 else masks


def _run(model, compiled: bool, steps: int, python_readers: list, probe_step: int):
    cfg = aug.AugmentConfig(out_size=model.encoder.img_size)
    # Plain SGD: an update linear in the gradient, so the weights compare tightly (AdamW would turn a
    # rounding difference in a near-zero gradient into up to lr of a step). Only forward and backward
    # are compiled; the optimizer step is the same eager code either way.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    step_fn = TrainStep(model, optimizer, device=torch.device("cpu"), aug_cfg=cfg,
                        seed=0, global_batch=BATCH, batch_size=BATCH, compile=compiled)
    gen = torch.Generator().manual_seed(0)
    size, grid = model.encoder.img_size, model.encoder.patch_embed.grid
    losses, reads, token_counts = [], None, set()
    for i in range(steps):
        images = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, generator=gen)
        masks = _masks(grid, i)
        token_counts.add((masks.context_tokens, masks.target_tokens))
        # After the first (compiling) step, any recompile raises.
        with torch._dynamo.config.patch(error_on_recompile=compiled and i > 0):
            if i == probe_step:
                reads = HostReadCounter()
                python_readers.append(reads)
                with reads:
                    result = step_fn(images, masks, i, MOMENTUM)
                python_readers.pop()
            else:
                result = step_fn(images, masks, i, MOMENTUM)
        losses.append(result.loss.detach().clone())
    return torch.stack(losses), reads, token_counts


@pytest.mark.parametrize("shared", [False, True], ids=["repeated", "shared"])
def test_compiled_step_compiles_once_and_equals_eager(shared, monkeypatch):
    python_readers = count_python_readers(monkeypatch.setattr)
    torch._dynamo.reset()
    counters.clear()
    models = []
    for _ in range(2):
        model = small_iwm(0)
        model.predictor.shared_context = shared
        models.append(model)
    steps = 6
    eager_losses, _, _ = _run(models[0], False, steps, python_readers, probe_step=-1)
    compiled_losses, reads, token_counts = _run(models[1], True, steps, python_readers, probe_step=steps - 1)

    assert len(token_counts) >= 4, "the masks must change the token counts for the test to mean anything"
    assert dict(counters["graph_break"]) == {}, f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert reads.total == 0, f"{reads.total} host reads in a compiled step:\n{reads.report()}"
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(models[1].named_parameters(), models[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    for (name, a), b in zip(models[1].target_encoder.named_parameters(), models[0].target_encoder.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"target {name}: {m}")
    torch._dynamo.reset()
