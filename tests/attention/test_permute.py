"""Row permutations of LSH attention's hash rounds (`permute`) against the plain `torch.gather` formulation:
values and gradients, gradcheck, torch.compile, and inputs laid out as the attention module makes them."""

import pytest
import torch

from subquadratic.modeling.attention.permute import _as_words, sort_rounds, unsort_rounds

B, H, T, D = 2, 3, 16, 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _orders(r, seed=0):
    """Random permutations (B, H, R, T) and their inverses."""
    g = torch.Generator().manual_seed(seed)
    sorted_pos = torch.stack([torch.randperm(T, generator=g) for _ in range(B * H * r)]).view(B, H, r, T)
    return sorted_pos, sorted_pos.argsort(dim=-1)


def gather_sort(x, sorted_pos):
    b, h, r, t = sorted_pos.shape
    return x.gather(2, sorted_pos.reshape(b, h, r * t, 1).expand(-1, -1, -1, x.shape[-1]))


def gather_unsort(y, slots):
    return y.gather(3, slots[..., None].expand(-1, -1, -1, -1, y.shape[-1]))


def _layouts(dtype, device="cpu"):
    """(B, H, T, D) inputs: contiguous; heads of a fused (B, T, 2 * H * D) projection (strided rows, gathered
    as words); D not contiguous (gathered as elements)."""
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(B, T, 2 * H * D, generator=g).to(device, dtype)
    return {
        "contiguous": torch.randn(B, H, T, D, generator=g).to(device, dtype),
        "fused_heads": fused[..., H * D:].view(B, T, H, D).transpose(1, 2),
        "transposed": torch.randn(B, H, D, T, generator=g).to(device, dtype).transpose(-1, -2),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "fused_heads", "transposed"])
def test_forward_equals_gather(r, layout, device):
    sorted_pos, slots = (t.to(device) for t in _orders(r))
    x = _layouts(torch.float32, device)[layout]
    assert torch.equal(sort_rounds(x, sorted_pos, slots), gather_sort(x, sorted_pos))
    y = gather_sort(x, sorted_pos).view(B, H, r, T, D)
    assert torch.equal(unsort_rounds(y, sorted_pos, slots), gather_unsort(y, slots))
    assert torch.equal(unsort_rounds(y, sorted_pos, slots), x.unsqueeze(2).expand(-1, -1, r, -1, -1))


@torch.no_grad()  # with a graph being recorded rows move as elements (a dtype view has no gradient)
def test_rows_move_as_words_without_copies():
    x = _layouts(torch.bfloat16)["fused_heads"]  # D = 4 bf16: one int64 per row
    words = _as_words(x)
    assert words.dtype == torch.int64 and words.shape[-1] == 1 and words.data_ptr() == x.data_ptr()
    assert _as_words(x[..., :2]).dtype == torch.int32  # 4 bytes per row
    assert _as_words(x[..., 1:3]).dtype == torch.bfloat16  # rows start off the 4-byte grid
    assert _as_words(_layouts(torch.bfloat16)["transposed"]).dtype == torch.bfloat16  # rows not contiguous
    assert _as_words(x.double()).dtype == torch.float64
    with torch.enable_grad():
        assert _as_words(x) is x


def _grads(fn_sort, fn_unsort, x, y, w_sort, w_unsort):
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    loss = (fn_sort(x).float() * w_sort).sum() + (fn_unsort(y).float() * w_unsort).sum()
    return torch.autograd.grad(loss, (x, y))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "fused_heads"])
def test_gradients_equal_gather(r, dtype, layout, device):
    sorted_pos, slots = (t.to(device) for t in _orders(r, seed=r))
    g = torch.Generator().manual_seed(2)
    x = _layouts(dtype, device)[layout]
    y = torch.randn(B, H, r, T, D, generator=g).to(device, dtype)
    w_sort = torch.randn(B, H, r * T, D, generator=g).to(device)
    w_unsort = torch.randn(B, H, r, T, D, generator=g).to(device)
    got = _grads(lambda x: sort_rounds(x, sorted_pos, slots), lambda y: unsort_rounds(y, sorted_pos, slots),
                 x, y, w_sort, w_unsort)
    expected = _grads(lambda x: gather_sort(x, sorted_pos), lambda y: gather_unsort(y, slots),
                      x, y, w_sort, w_unsort)
    for a, e in zip(got, expected):
        assert a.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
        else:  # bf16: the sum over rounds rounds differently from scatter_add's
            torch.testing.assert_close(a.float(), e.float(), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("r", [1, 3])
def test_gradcheck(r):
    sorted_pos, slots = _orders(r, seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(B, H, r, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sort_rounds(x, sorted_pos, slots), (x,))
    assert torch.autograd.gradcheck(lambda y: unsort_rounds(y, sorted_pos, slots), (y,))
    assert torch.autograd.gradgradcheck(lambda x: sort_rounds(x, sorted_pos, slots), (x,))


def test_torch_func_grad_equals_the_gather_gradient():
    sorted_pos, slots = _orders(3, seed=4)
    x = torch.randn(B, H, T, D, dtype=torch.float64)
    w = torch.randn(B, H, 3 * T, D, dtype=torch.float64)
    got = torch.func.grad(lambda x: (sort_rounds(x, sorted_pos, slots) * w).sum())(x)
    expected = torch.func.grad(lambda x: (gather_sort(x, sorted_pos) * w).sum())(x)
    torch.testing.assert_close(got, expected)


def test_without_grad_and_under_autocast():
    sorted_pos, slots = _orders(3)
    x = _layouts(torch.float32)["fused_heads"]
    assert not sort_rounds(x, sorted_pos, slots).requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.bfloat16().requires_grad_()
        out = sort_rounds(xb, sorted_pos, slots)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad, torch.full_like(xb, 3.0))


@pytest.mark.parametrize("r", [1, 3])
def test_compiled(r):
    sorted_pos, slots = _orders(r, seed=4)
    g = torch.Generator().manual_seed(4)
    fused = torch.randn(B, T, 2 * H * D, generator=g, requires_grad=True)
    w = torch.randn(B, H, r, T, D, generator=g)

    def fn(fused, sorted_pos, slots):
        x = fused[..., :H * D].view(B, T, H, D).transpose(1, 2)
        y = sort_rounds(x, sorted_pos, slots).view(B, H, r, T, D) * w
        return unsort_rounds(y, sorted_pos, slots)

    def reference(fused):
        x = fused[..., :H * D].view(B, T, H, D).transpose(1, 2)
        return gather_unsort(gather_sort(x, sorted_pos).view(B, H, r, T, D) * w, slots)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = compiled(fused, sorted_pos, slots)
    expected = reference(fused)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    weight = torch.randn(got.shape, generator=g)
    (grad_got,) = torch.autograd.grad((got * weight).sum(), fused)
    (grad_expected,) = torch.autograd.grad((expected * weight).sum(), fused)
    torch.testing.assert_close(grad_got, grad_expected)
