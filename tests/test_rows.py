"""iwm_kernels.rows: the residual linear (bias into the residual, the matmul accumulating in place) and
the row gather, against their plain forms, forward and backward; and the predictor's last block, which
runs its projection and MLP on the target rows only, against the same block on every row."""
import pytest
import torch
from torch import nn

from iwm.models.vit import Block
from iwm_kernels.rows import gather_rows, residual_linear


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("shape", [(0, 24), (7, 24), (3, 5, 24)], ids=["empty", "2d", "3d"])
def test_residual_linear_equals_the_plain_form(seed, shape):
    torch.manual_seed(seed)
    lin = nn.Linear(16, 24)
    x = torch.randn(shape, requires_grad=True)
    h = torch.randn(*shape[:-1], 16, requires_grad=True)
    got, g1 = _grads(lambda: residual_linear(x, h, lin), x, h, lin.weight, lin.bias)
    want, g2 = _grads(lambda: x + lin(h), x, h, lin.weight, lin.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not x.detach().equal(got) or got.numel() == 0   # the residual was not written in place


def test_residual_linear_falls_back_where_in_place_cannot_serve(seed):
    """A strided residual, mixed dtypes, no bias, autocast: the plain form, the same values."""
    torch.manual_seed(seed)
    lin = nn.Linear(8, 8)
    h = torch.randn(4, 6, 8)
    strided = torch.randn(6, 4, 8).transpose(0, 1)
    torch.testing.assert_close(residual_linear(strided, h, lin), strided + lin(h))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = residual_linear(torch.randn(4, 6, 8), h, lin)
    assert out.shape == (4, 6, 8)
    nobias = nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 6, 8)
    torch.testing.assert_close(residual_linear(x, h, nobias), x + nobias(h))
    torch.testing.assert_close(residual_linear(x.double(), h, lin), x.double() + lin(h))


def test_gather_rows_backward_scatters(seed):
    torch.manual_seed(seed)
    x = torch.randn(10, 3, requires_grad=True)
    rows = torch.randperm(10)[:6]
    got, (g1,) = _grads(lambda: gather_rows(x, rows), x)
    want, (g2,) = _grads(lambda: x.index_select(0, rows), x)
    assert got.equal(want) and g1.equal(g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_on_the_read_rows_equals_the_whole_block(seed, dtype):
    """Block(..., rows=r) gives the whole block's rows r, and the same gradients for every parameter and
    input when only those rows are read (the predictor's last block, on ragged sequences)."""
    torch.manual_seed(seed)
    block = Block(32, 4).to(dtype)
    lengths = torch.randint(1, 12, (5,))
    cu = torch.zeros(6, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    T = int(cu[-1])
    x = torch.randn(T, 32, dtype=dtype, requires_grad=True)
    rows = torch.randperm(T)[: max(1, T // 3)]
    params = [x] + list(block.parameters())
    got, g1 = _grads(lambda: block(x, cu, int(lengths.max()), rows=rows), *params)
    want, g2 = _grads(lambda: block(x, cu, int(lengths.max())).index_select(0, rows), *params)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol)
