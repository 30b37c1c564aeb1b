"""The predictor's two sequence layouts.

The default (`shared_context=False`) must be the paper's / I-JEPA's predictor: for every target block j
the dense sequence [context + pos, (action tokens,) mask tokens + pos] with full attention, so the
context tokens attend to block j's mask tokens and, from layer 2 on, differ per block. The dense
predictor below is written here from that description (plain matmul + softmax, a Python loop over the
blocks) and runs on the weights of our `VisionTransformerPredictor`.

The shared-context layout (opt-in) never lets the context see a mask token: identical at depth 1,
different from depth 2. The layout pictures in docs/models.md are the output of `reference.mask_table` on the
real packing, checked here so they cannot drift.
"""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from iwm.masks import MultiBlockMaskSampler
from iwm.models import build_predictor, get_preset
from iwm.models.presets import PRESETS
from iwm.models.predictor import VisionTransformerPredictor
from iwm_kernels import pack_predictor_sequences
from iwm_kernels.attention.reference import mask_table
from tests.helpers import backends_on

ROOT = Path(__file__).resolve().parents[1]
GRID, EMBED, DIM, HEADS, B = 4, 48, 32, 2, 3


# ---- I-JEPA's predictor, dense ---------------------------------------------------------------------
def dense_attention(attn, x):
    """Multi-head self-attention over every token of each row of x [S, L, D]: no mask at all."""
    S, L, D = x.shape
    q, k, v = attn.qkv(x).view(S, L, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(S, L, D))


def dense_block(blk, x):
    x = x + dense_attention(blk.attn, blk.norm1(x))
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))


def conditioned_mask_tokens(pred, positions, action):
    """Mask token + position, then (feature conditioning) concat the action and the 3-layer MLP."""
    tokens = pred.mask_token + positions                                      # [B, Kt, D]
    if pred.conditioning != "feature":
        return tokens
    mlp = pred.action_mlp
    joined = torch.cat([tokens, action[:, None, :].expand(-1, tokens.shape[1], -1)], dim=-1)
    return mlp.fc3(F.gelu(mlp.fc2(F.gelu(mlp.fc1(joined)))))


def dense_ijepa_predictor(pred, context, context_index, target_index, action):
    """context [B, Lc, E] at grid positions context_index [B, Lc]; target_index [B, M, Kt] ->
    predictions [B, M, Kt, E]. One dense [B, Lc (+7) + Kt, D] batch per target block j."""
    pos = pred.predictor_pos_embed[0]
    ctx = pred.predictor_embed(context) + pos[context_index]
    outputs = []
    for j in range(target_index.shape[1]):
        parts = [ctx]
        if pred.conditioning == "sequence":  # one token per action component, own projection each
            parts.append(action[..., None] * pred.action_token_weight + pred.action_token_bias)
        parts.append(conditioned_mask_tokens(pred, pos[target_index[:, j]], action))
        h = torch.cat(parts, dim=1)
        for blk in pred.predictor_blocks:
            h = dense_block(blk, h)
        outputs.append(pred.predictor_proj(pred.predictor_norm(h[:, -target_index.shape[2]:])))
    return torch.stack(outputs, dim=1)


# ---- our predictor on the same weights and equal-length masks --------------------------------------
def make_predictor(conditioning, depth, shared, gen):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    layout = {} if shared is None else {"shared_context": shared}   # None: the default layout
    pred = build_predictor(GRID * GRID, GRID, EMBED, depth=depth, predictor_embed_dim=DIM, num_heads=HEADS,
                           conditioning=conditioning, **layout).eval()
    with torch.no_grad():  # I-JEPA's init (std 0.02) nearly averages attention: make every weight matter
        for p in pred.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return pred


def equal_length_batch(gen, seed):
    """I-JEPA's collated masks (every context and every block cut to the batch minimum), packed."""
    masks = MultiBlockMaskSampler(GRID, seed=seed, min_keep=2, num_targets=3).sample(B, 0).truncated()
    M = masks.num_targets
    context_index = masks.context_index.long().view(B, -1)
    target_index = masks.target_index.long().view(B, M, -1)
    context = torch.randn(B, context_index.shape[1], EMBED, generator=gen)
    action = torch.randn(B, 7, generator=gen)
    return masks, context, context_index, target_index, action


def both_predictions(conditioning, depth, shared, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    pred = make_predictor(conditioning, depth, shared, gen)
    masks, context, context_index, target_index, action = equal_length_batch(gen, seed)
    action = None if conditioning == "none" else action
    with torch.no_grad():
        ours = pred(context.reshape(-1, EMBED), masks, action=action, backend=backend)  # [Tt, E] sample-major
        dense = dense_ijepa_predictor(pred, context, context_index, target_index, action)
    return ours.view(dense.shape), dense


@pytest.mark.parametrize("backend", backends_on("cpu"))
@pytest.mark.parametrize("conditioning", ["none", "feature", "sequence"])
@pytest.mark.parametrize("depth", [2, 3])
def test_default_layout_equals_ijepa_dense_predictor(depth, conditioning, backend, seed):
    ours, dense = both_predictions(conditioning, depth, None, backend, seed)
    torch.testing.assert_close(ours, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conditioning", ["none", "feature", "sequence"])
def test_shared_context_is_ijepa_at_depth_1_only(conditioning, seed):
    ours, dense = both_predictions(conditioning, 1, True, "reference", seed)
    torch.testing.assert_close(ours, dense, atol=1e-4, rtol=1e-4)
    ours, dense = both_predictions(conditioning, 2, True, "reference", seed)
    # From layer 2 on the context has attended to block j's mask tokens in I-JEPA, never in the shared
    # layout: the predictions differ by far more than rounding.
    assert (ours - dense).abs().max() > 1e-2


def test_every_default_is_the_papers_predictor():
    from iwm.config import Config, load_config
    from iwm.builders import model_preset

    pred = VisionTransformerPredictor(16, 4, embed_dim=48, predictor_embed_dim=32, depth=1, num_heads=2)
    assert pred.shared_context is False
    assert build_predictor(16, 4, 48, depth=1, predictor_embed_dim=32, num_heads=2).shared_context is False
    assert Config().meta.shared_context is False
    assert all(get_preset(name).shared_context is False for name in PRESETS)
    for path in sorted(ROOT.joinpath("configs").glob("*.yaml")):
        assert model_preset(load_config(path)).shared_context is (path.name == "tiny_shared.yaml"), path.name


# ---- the docs' pictures ---------------------------------------------------------------------------
def example_tables() -> dict:
    """One sample: context c1 c2, a sequence-conditioning action token a1, target blocks t1 t2 and
    u1 u2, packed by the predictor's own packing, drawn by the attention's own mask rule."""
    width = 4
    gen = torch.Generator().manual_seed(0)
    pieces = {name: torch.randn(n, width, generator=gen) for name, n in (("context", 2), ("extra", 1), ("targets", 4))}
    source_labels = ["c1", "c2", "a1", "t1", "t2", "u1", "u2"]   # rows of cat([context, extra, targets])
    tables = {}
    for name, shared in (("repeated", False), ("shared", True)):
        packed = pack_predictor_sequences(pieces["context"], torch.tensor([0, 2]), pieces["targets"],
                                          torch.tensor([0, 2, 4]), 2, shared_context=shared,
                                          extra=pieces["extra"], extra_cu=torch.tensor([0, 1]))
        labels = [source_labels[i] for i in packed.source_index.tolist()]
        tables[name] = mask_table(packed.cu_seqlens, packed.segment_ids, labels)
    return tables


def readme_table(name: str, doc: str = "docs/models.md") -> str:
    text = ROOT.joinpath(doc).read_text()
    match = re.search(rf"<!-- mask-table: {name} -->\n((?:[ \t]*\|.*\n)+)", text)
    assert match, f"{doc} has no table after <!-- mask-table: {name} -->"
    return "\n".join(line.strip() for line in match.group(1).splitlines())


@pytest.mark.parametrize("doc", ["docs/models.md", "docs/design.md"])
@pytest.mark.parametrize("name", ["repeated", "shared"])
def test_readme_layout_pictures_are_the_reference_output(name, doc):
    assert readme_table(name, doc) == example_tables()[name], "regenerate with: python -m tests.test_predictor_layout"


def test_mask_table_draws_the_rule(seed):
    table = example_tables()
    repeated = table["repeated"].splitlines()[2:]
    assert [line.count("■") for line in repeated] == [5] * 10  # every token of [c1 c2 a1 block_j] sees all five
    shared = table["shared"].splitlines()[2:]
    assert [line.count("■") for line in shared] == [3, 3, 3, 5, 5, 5, 5]  # context: itself only
    with pytest.raises(ValueError, match="labels"):
        mask_table(torch.tensor([0, 3]), None, ["x"])


if __name__ == "__main__":
    for layout, picture in example_tables().items():
        print(f"<!-- mask-table: {layout} -->\n{picture}\n")
