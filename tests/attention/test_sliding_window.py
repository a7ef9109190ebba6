"""Sliding-window / dilated / global attention against plain references that build the full (T, T) mask, and its
FlexAttention fast path against the readable path (on CPU the unfused reference; the compiled kernels on CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from subquadratic.modeling.attention import dense as dense_module
from subquadratic.modeling.attention import sliding_window as sliding_window_module
from subquadratic.modeling.attention.flex import fast_paths
from subquadratic.modeling.attention.masking import merge_heads, split_heads
from subquadratic.modeling.attention.sliding_window import (
    GlobalTokens,
    SlidingWindowSelfAttention,
    _windows,
    combine_softmax,
    put_rows,
)
from subquadratic.modeling.cache import LayerStateCache
from tests.attention.fast_path_checks import (
    assert_dropout_and_cpu_backward_stay_readable,
    assert_fp32_match,
    check_gpu_bf16,
    check_gpu_compiled,
    check_gpu_fp32,
    cuda_only,
    gpu_runner,
    readable_and_fast,
    record_flex_calls,
)

HIDDEN, HEADS = 16, 4


def make(window, dilation=1, causal=False, seed=0):
    torch.manual_seed(seed)
    return SlidingWindowSelfAttention(HIDDEN, HEADS, window, dilation, causal=causal).eval()


def full_softmax_attention(module, x):
    """Plain multi-head softmax attention over every pair (the local projections)."""
    q, k, v = (split_heads(proj(x), HEADS) for proj in (module.query, module.key, module.value))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return module.output(merge_heads(probs @ v))


def brute_force(module, x, padding_mask=None, global_mask=None):
    """The definition: a (B, H, T, T) mask of exactly the allowed pairs, one softmax per query."""
    b, t, _ = x.shape
    real = torch.ones(b, t, dtype=torch.bool) if padding_mask is None else padding_mask.bool()
    glob = torch.zeros(b, t, dtype=torch.bool) if global_mask is None else global_mask.bool() & real
    pos = torch.arange(t)
    off = pos[None, :] - pos[:, None]  # (T, T): key position - query position
    d = torch.tensor(module.dilation)[:, None, None]  # (H, 1, 1)
    w = module.window
    if module.causal:
        window = (off <= 0) & (-off <= w * d) & (off % d == 0)
        earlier = off <= 0
    else:
        window = (off.abs() <= (w // 2) * d) & (off % d == 0)
        earlier = torch.ones_like(off, dtype=torch.bool)
    key_real, key_glob = real[:, None, None, :], glob[:, None, None, :]
    local_allowed = key_real & ((window & ~key_glob) | (key_glob & earlier))  # (B, H, T, T)
    global_allowed = key_real & earlier

    def attend(projs, allowed):
        q, k, v = (split_heads(p(x), HEADS) for p in projs)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num() @ v

    local = attend((module.query, module.key, module.value), local_allowed)
    global_ = attend((module.query_global, module.key_global, module.value_global), global_allowed)
    out = torch.where(glob[:, None, :, None], global_, local)
    return module.output(merge_heads(out))


def inputs(b, t, pad_from=None, global_at=(), seed=1):
    torch.manual_seed(seed)
    x = torch.randn(b, t, HIDDEN)
    padding = None
    if pad_from is not None:
        padding = torch.ones(b, t, dtype=torch.bool)
        padding[0, pad_from:] = False
    glob = None
    if global_at is not None and len(global_at):
        glob = torch.zeros(b, t, dtype=torch.bool)
        for row, col in global_at:
            glob[row, col] = True
    return x, padding, glob


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [1, 5, 16])
def test_window_covering_sequence_is_full_attention(causal, t):
    module = make(window=2 * t + 2, causal=causal)
    x, _, _ = inputs(2, t)
    expected = full_softmax_attention(module, x) if not causal else brute_force(module, x)
    torch.testing.assert_close(module(x), expected)
    if not causal:  # the bidirectional case against plain attention with no mask at all
        torch.testing.assert_close(module(x), full_softmax_attention(module, x))


COMBOS = [
    # window, dilation, causal, length, pad_from (row 0), global tokens (row, col)
    (4, 1, False, 13, None, ()),
    (4, 1, True, 13, None, ()),
    (2, 1, False, 7, 5, ()),
    (6, [1, 2, 3, 1], False, 23, 17, [(0, 0), (1, 4), (1, 20)]),
    (6, [1, 2, 3, 1], True, 23, 17, [(0, 0), (1, 4), (1, 20)]),
    (4, 3, True, 19, 11, [(0, 2), (0, 16)]),  # global token 16 is padding: ignored
    (8, 2, False, 5, None, [(0, 1)]),  # window longer than the sequence
    (4, [2, 2, 1, 1], False, 9, 3, [(0, 0), (0, 1), (0, 2), (1, 8)]),  # row 0: every real token global
    (10, [4, 1, 4, 1], True, 31, None, [(1, 0)]),
]


@pytest.mark.parametrize("window,dilation,causal,t,pad_from,global_at", COMBOS)
def test_matches_brute_force(window, dilation, causal, t, pad_from, global_at):
    module = make(window, dilation, causal)
    x, padding, glob = inputs(2, t, pad_from, global_at)
    got = module(x, padding_mask=padding, global_mask=glob)
    expected = brute_force(module, x, padding, glob)
    real = torch.ones(2, t, dtype=torch.bool) if padding is None else padding
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


def test_empty_global_mask_equals_no_global_mask_with_gradients():
    module = make(4, [1, 2, 1, 2])
    x, padding, _ = inputs(2, 11, pad_from=8)
    x.requires_grad_(True)
    a = module(x, padding_mask=padding)
    b = module(x, padding_mask=padding, global_mask=torch.zeros(2, 11, dtype=torch.bool))
    torch.testing.assert_close(a, b)
    (grad_a,) = torch.autograd.grad(a[padding].sum(), x)
    (grad_b,) = torch.autograd.grad(b[padding].sum(), x)
    torch.testing.assert_close(grad_a, grad_b)


def parameter_grads(module) -> list[torch.Tensor]:
    """Every parameter's gradient, zeros for None (a parameter the call did not use)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def outputs_and_grads(module, x, padding, glob) -> list[torch.Tensor]:
    """[outputs at real positions, input gradient, parameter gradients] of one call with global tokens, under a
    fixed weighting of the outputs."""
    module.zero_grad()
    x.grad = None
    out = module(x, padding_mask=padding, global_mask=glob)
    (out[padding] * torch.linspace(-1, 1, HIDDEN)).sum().backward()
    return [out[padding].detach(), x.grad.clone()] + parameter_grads(module)


@pytest.mark.parametrize("key_chunk,query_block", [(None, None), (4, None), (None, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_brute_force(key_chunk, query_block, causal, monkeypatch):
    """``key_chunk`` 4: global queries attend to the sequence in chunks of 4 keys (`few_queries_attend`, which
    sequences of the default sizes reach only past 2048 tokens). ``query_block`` 4: every query attends to the
    global keys in blocks of 4 queries (`few_keys_dense_attend`, past 4096 tokens by default)."""
    if key_chunk:
        monkeypatch.setattr(dense_module, "LONG_KEY_CHUNK", key_chunk)
    if query_block:
        monkeypatch.setattr(dense_module, "QUERY_BLOCK", query_block)
    module = make(6, [1, 3, 1, 2], causal=causal)
    x, padding, glob = inputs(2, 16, pad_from=12, global_at=[(0, 0), (1, 9)])
    grads = []
    for fn in (lambda: module(x, padding_mask=padding, global_mask=glob),
               lambda: brute_force(module, x, padding, glob)):
        module.zero_grad()
        fn()[padding].pow(2).sum().backward()
        grads.append(parameter_grads(module))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_combine_softmax_is_the_softmax_over_both_key_sets_with_gradients():
    """Two parts over disjoint keys, combined, equal one softmax over all the keys (values and gradients, in
    float64 through gradcheck), and a lower-precision out_a keeps its dtype."""
    torch.manual_seed(0)
    scores, values = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)

    def part(s, v):
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

    out_a, lse_a = part(scores[..., :4], values[:, :4])
    out_b, lse_b = part(scores[..., 4:], values[:, 4:])
    out = combine_softmax(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ values)
    inputs_ = [x.detach().requires_grad_(True) for x in (out_a, lse_a, out_b, lse_b)]
    assert torch.autograd.gradcheck(combine_softmax, inputs_)
    low = combine_softmax(out_a.bfloat16(), lse_a.float(), out_b.bfloat16(), lse_b.float())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w", [0.9, 0.99, 0.999])
def test_combine_softmax_low_precision_gradients_when_one_part_dominates(dtype, w):
    """A query whose global key takes most of its attention (w near 1): the window part's gradient (1 - w) g and
    the log-sum-exp gradients keep their relative precision in bf16/fp16 (a w rounded to bf16 became 1 and
    zeroed them), within a few units of the dtype's rounding of the fp64 result."""
    torch.manual_seed(0)
    out_a, out_b = torch.randn(2, 64, 16, dtype=torch.float64), torch.randn(2, 64, 16, dtype=torch.float64)
    lse_a = torch.randn(2, 64, dtype=torch.float64)
    lse_b = lse_a + math.log(w / (1 - w))  # sigmoid(lse_b - lse_a) = w
    grad = torch.randn(2, 64, 16, dtype=torch.float64)
    xs64 = [x.clone().requires_grad_(True) for x in (out_a, lse_a, out_b, lse_b)]
    expected = torch.autograd.grad(combine_softmax(*xs64), xs64, grad)
    low = [out_a.to(dtype), lse_a.float(), out_b.to(dtype), lse_b.float()]
    low = [x.requires_grad_(True) for x in low]
    got = torch.autograd.grad(combine_softmax(*low), low, grad.to(dtype))
    for g, e in zip(got, expected, strict=True):
        assert ((g.double() - e).norm() / e.norm()).item() < 1e-2


def test_combine_softmax_works_under_torch_func_and_refuses_a_second_derivative():
    torch.manual_seed(0)
    out_a, out_b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lse_a, lse_b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def plain(lse_a):
        w = torch.sigmoid(lse_b - lse_a)[:, None]
        return ((1 - w) * out_a + w * out_b).sum()

    got = torch.func.grad(lambda lse: combine_softmax(out_a, lse, out_b, lse_b).sum())(lse_a)
    torch.testing.assert_close(got, torch.func.grad(plain)(lse_a))
    lse = lse_a.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(combine_softmax(out_a, lse, out_b, lse_b).sum(), lse, create_graph=True)
    with pytest.raises(RuntimeError):
        first.sum().backward()


def test_global_tokens_reused_after_inference_mode_train_and_match_fresh_ones():
    """A `GlobalTokens` built once may serve an inference-mode call and then a training step: the global-key
    mask cached under inference mode is not the one the training step saves for backward."""
    module = make(4, [1, 2, 1, 2])
    x, padding, glob = inputs(2, 12, pad_from=9, global_at=[(0, 0), (1, 7)])
    shared = GlobalTokens(glob & padding)
    with torch.inference_mode():
        module(x, padding_mask=padding, global_mask=shared)
    x = x.clone().requires_grad_(True)
    out = module(x, padding_mask=padding, global_mask=shared)
    (grad,) = torch.autograd.grad(out[padding].sum(), x)
    expected = module(x, padding_mask=padding, global_mask=glob)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected[padding].sum(), x)[0])


def test_hooked_key_and_value_maps_run_once_per_call_with_the_same_result():
    """Maps that do more than their weights say (here a forward hook) are called once, on every row, and the
    global rows are gathered from their output; plain maps project the global rows again. Same results."""
    module = make(4, [1, 2, 1, 2])
    x, padding, glob = inputs(2, 12, pad_from=9, global_at=[(0, 0), (1, 7)])
    expected = module(x, padding_mask=padding, global_mask=glob)
    calls = []
    for linear in (module.key, module.value):
        linear.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    got = module(x, padding_mask=padding, global_mask=glob)
    assert calls == [x.shape, x.shape]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("causal", [False, True])
def test_global_maps_folded_into_the_queries_equal_the_maps_applied_to_every_token(causal):
    """Plain global key and value maps are folded into the few global queries (`_global_queries`); hooked ones
    are applied to every token as written. Same outputs and gradients (the key map's bias gets an exact zero
    folded, and only rounding from the applied maps)."""
    module = make(4, [1, 2, 1, 2], causal=causal)
    x, padding, glob = inputs(2, 12, pad_from=9, global_at=[(0, 0), (0, 5), (1, 7)])
    x.requires_grad_(True)
    results, calls = [], []
    for hooked in (False, True):
        if hooked:
            for linear in (module.key_global, module.value_global):
                linear.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
        results.append(outputs_and_grads(module, x, padding, glob))
    assert calls == [x.shape, x.shape]
    assert not results[0][2 + [p is module.key_global.bias for p in module.parameters()].index(True)].any()
    assert module.key_global.bias.grad.abs().max() < 1e-6
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_global_rows_taken_from_the_projection_equal_their_own_products(causal, monkeypatch):
    """Where the global kernels run, the global tokens' keys and values are their rows of the q/k/v projection,
    whose gradient is added into the projection's in place (`_project_with_global_rows`), instead of products of
    their own. Taken that way here on the readable path (CPU, no Triton): the same outputs and gradients."""
    module = make(4, [1, 2, 1, 2], causal=causal)
    x, padding, glob = inputs(2, 12, pad_from=9, global_at=[(0, 0), (0, 5), (1, 7)])
    x.requires_grad_(True)
    results, calls = [], []
    for from_projection in (False, True):
        if from_projection:
            monkeypatch.setattr(SlidingWindowSelfAttention, "_projects_global_rows", lambda *args: True)
            taken = SlidingWindowSelfAttention._project_with_global_rows
            monkeypatch.setattr(SlidingWindowSelfAttention, "_project_with_global_rows",
                                lambda *args, taken=taken: calls.append(1) or taken(*args))
        results.append(outputs_and_grads(module, x, padding, glob))
    assert calls == [1]
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_put_rows_writes_the_valid_rows_with_gradients():
    """Rows land at their positions where valid, padded slots leave x as it was; gradients as for the same
    result built out of place."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 4, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[5, 1], [2, 0]])  # row 1's second slot is padding (position 0 is not global)
    valid = torch.tensor([[True, True], [True, False]])
    expected = x.clone()
    for bi, gi in valid.nonzero().tolist():
        expected[bi, :, index[bi, gi]] = rows[bi, :, gi]
    got = put_rows(x * 1, rows, index, valid)
    torch.testing.assert_close(got, expected)
    weight = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad((got * weight).sum(), [x, rows]),
                               torch.autograd.grad((expected * weight).sum(), [x, rows]))


def test_compiled_windows_have_the_eager_gradient():
    """Inductor's backward of overlapping `unfold` windows is wrong (pytorch#172064: here off by O(1) at every
    size tried); compiled, `_windows` gathers by index instead."""
    x = torch.randn(2, 3, 30, 4, requires_grad=True)
    weight = torch.randn(_windows(x, 5, 5, 5).shape)
    grads = []
    for windows in (_windows, torch.compile(_windows)):
        x.grad = None
        (windows(x, 5, 5, 5) * weight).sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_heads_in_scattered_dilation_groups_compile_without_a_graph_break():
    """Heads of one dilation that are not consecutive are gathered by index tensors kept per device; inside
    torch.compile those are graph constants (a cache lookup broke the graph, after which inductor failed)."""
    torch.manual_seed(0)
    module = SlidingWindowSelfAttention(32, 4, 4, [1, 2, 1, 3])
    x = torch.randn(2, 24, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    grads = []
    for forward in (module, compiled):
        x.grad = None
        out = forward(x)
        out.square().sum().backward()
        grads.append((out.detach(), x.grad.clone()))
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected)


def test_compiled_module_gradients_equal_eager():
    """torch.compile (inductor) gives the eager gradients with padding and global tokens (the configuration whose
    key gradients came out wrong, through unfold on CPU and also otherwise on an H200: with global tokens the
    attention now runs eagerly inside compiled code; the windows without them are compiled, see the test above)."""
    torch.manual_seed(0)
    module = SlidingWindowSelfAttention(128, 4, 32, 1)
    x = torch.randn(2, 333, 128, requires_grad=True)
    padding = torch.ones(2, 333, dtype=torch.bool)
    padding[0, 250:] = False
    glob = torch.zeros(2, 333, dtype=torch.bool)
    glob[0, 3] = True
    weight = torch.randn(2, 333, 128)
    torch._dynamo.reset()
    results = []
    for forward in (module.forward, torch.compile(module.forward)):
        module.zero_grad()
        x.grad = None
        out = forward(x, padding_mask=padding, global_mask=glob)
        (out[padding] * weight[padding]).sum().backward()
        results.append([out[padding].detach(), x.grad.clone()] + parameter_grads(module))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_padding_never_changes_real_outputs():
    module = make(4, [1, 2, 1, 3])
    x, _, glob = inputs(1, 10, global_at=[(0, 3)])
    alone = module(x, global_mask=glob)
    junk = torch.randn(1, 7, HIDDEN) * 100
    padded = torch.cat([x, junk], dim=1)
    mask = torch.zeros(1, 17, dtype=torch.bool)
    mask[:, :10] = True
    glob_padded = torch.cat([glob, torch.ones(1, 7, dtype=torch.bool)], dim=1)  # global flags on padding: ignored
    out = module(padded, padding_mask=mask, global_mask=glob_padded)
    torch.testing.assert_close(out[:, :10], alone, atol=1e-5, rtol=1e-4)


def test_no_quadratic_tensor_is_saved_for_backward():
    """Training memory is linear: nothing kept for the backward pass has T * T elements."""
    t = 1024
    module = SlidingWindowSelfAttention(16, 2, window=16, dilation=[1, 4])
    x = torch.randn(1, t, 16, requires_grad=True)
    glob = torch.zeros(1, t, dtype=torch.bool)
    glob[0, [0, 500]] = True
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: sizes.append(s.numel()) or s, lambda s: s):
        module(x, global_mask=glob).sum().backward()
    assert max(sizes) < t * t // 8, max(sizes)


@pytest.mark.parametrize("dilation,global_at", [(1, ()), ([1, 2, 3, 1], [(0, 1), (1, 0)])])
def test_cached_decoding_equals_full_pass(dilation, global_at):
    module = make(4, dilation, causal=True)
    x, padding, glob = inputs(2, 14, global_at=global_at)
    padding = torch.ones(2, 14, dtype=torch.bool)
    padding[1, :2] = False  # left padding
    full = module(x, padding_mask=padding, global_mask=glob)
    cache = LayerStateCache()
    prompt = 5
    outs = [module(x[:, :prompt], padding_mask=padding[:, :prompt], cache=cache,
                   global_mask=None if glob is None else glob[:, :prompt])]
    for i in range(prompt, 14):
        outs.append(module(x[:, i:i + 1], padding_mask=padding[:, :i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, dim=1)[padding], full[padding], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="Global attention on new tokens"):
        module(x[:, :1], cache=cache, global_mask=torch.ones(2, 1, dtype=torch.bool))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`window`=5"):
        SlidingWindowSelfAttention(HIDDEN, HEADS, window=5)
    with pytest.raises(ValueError, match="`dilation`"):
        SlidingWindowSelfAttention(HIDDEN, HEADS, window=4, dilation=[1, 2])


@pytest.mark.parametrize("causal", [True, False])
def test_covering_window_takes_the_sdpa_path_with_the_same_numbers(causal, monkeypatch):
    """A window that holds the whole sequence is exactly full attention, computed by scaled_dot_product_attention;
    it must agree with the readable banded path, padding included."""
    torch.manual_seed(0)
    attn = SlidingWindowSelfAttention(32, 4, window=64, causal=causal).eval()
    x = torch.randn(2, 30, 32)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 21:] = False
    assert attn.covers(30) and not attn.covers(66 if causal else 34)
    fast = attn(x, padding_mask=mask)
    monkeypatch.setattr(type(attn), "covers", lambda self, length: False)
    readable = attn(x, padding_mask=mask)
    torch.testing.assert_close(fast[0], readable[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1, :21], readable[1, :21], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(fast).all()


# --- FlexAttention fast path ---------------------------------------------------------------------------------------

LONG_COMBOS = [  # lengths crossing 128-token blocks, not multiples of the window or of the dilations
    (6, 1, False, 141, 100, [(0, 3), (1, 60), (1, 62)]),  # 62 is a global token inside 60's window
    (6, [1, 2, 3, 1], True, 141, 100, [(0, 3), (1, 60), (1, 62)]),
    (8, [4, 1, 4, 2], False, 263, 200, ()),
    (10, [1, 3, 1, 3], True, 263, None, [(0, 130)]),
    # 131 global tokens in a row: on the FlexAttention path each query block's copy of them spans two key blocks
    (6, [1, 2, 1, 2], False, 263, 250, [(0, col) for col in range(0, 262, 2)] + [(1, 5)]),
    # no padding, no global tokens: no score_mod; 142 is not a multiple of 3, so the positions added to fill
    # the last residue class are masked by the block mask's mask_mod instead
    (6, [1, 2, 3, 1], True, 142, None, ()),
    (6, [3, 1, 3, 2], False, 142, None, ()),
]


# On CPU, FlexAttention runs its unfused reference, and says so once per process.
eager_flex = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def flex_calls(monkeypatch):
    return record_flex_calls(monkeypatch, sliding_window_module)


@eager_flex
@pytest.mark.parametrize("window,dilation,causal,t,pad_from,global_at", COMBOS + LONG_COMBOS)
def test_fast_path_matches_readable_path(window, dilation, causal, t, pad_from, global_at, flex_calls):
    module = make(window, dilation, causal)
    x, padding, glob = inputs(2, t, pad_from, global_at)
    expected, got = readable_and_fast(module, x, padding_mask=padding, global_mask=glob)
    assert len(flex_calls) == len(module.head_groups)  # one call per dilation group
    real = torch.ones(2, t, dtype=torch.bool) if padding is None else padding
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(got).all()  # padded positions too


@eager_flex
def test_fast_path_is_skipped_where_it_cannot_run(flex_calls):
    """Attention dropout in training, and gradients on CPU (FlexAttention has no CPU backward), take the readable
    path even when fast paths are forced; training without dropout does not."""
    module = SlidingWindowSelfAttention(HIDDEN, HEADS, window=4, dropout=0.1).train()
    x, padding, glob = inputs(2, 13, pad_from=9, global_at=[(1, 2)])
    assert_dropout_and_cpu_backward_stay_readable(module, x, flex_calls, padding_mask=padding, global_mask=glob)
    with fast_paths(True):
        with torch.no_grad():
            module(x, padding_mask=padding, global_mask=glob)
        assert len(flex_calls) == 1


# GPU: the compiled kernels (block sparsity, full blocks, the padding score_mod) and their backward, which the CPU
# reference above does not exercise.
GPU_COMBOS = [  # window, dilation, causal, global tokens; hidden 128, 4 heads of 32, length 333, row 0 padded
    (32, 1, False, ()),
    (32, 1, True, [(0, 3), (1, 160), (1, 170)]),  # 170 is a global token inside 160's window
    (32, [1, 2, 3, 1], False, [(0, 3), (1, 160), (1, 170)]),
    (16, [2, 1, 1, 4], True, ()),
]


def gpu_case(window, dilation, causal, global_at, t=333, hidden=128, padded=True):
    torch.manual_seed(0)
    module = SlidingWindowSelfAttention(hidden, 4, window, dilation, causal=causal).cuda()
    glob = None
    if global_at:
        glob = torch.zeros(2, t, dtype=torch.bool, device="cuda")
        for row, col in global_at:
            glob[row, col] = True
    return module, gpu_runner(module, t, hidden, padded=padded, global_mask=glob)


@cuda_only
@pytest.mark.parametrize("window,dilation,causal,global_at", GPU_COMBOS)
def test_gpu_fast_path_matches_readable_path_fp32(window, dilation, causal, global_at, flex_calls):
    module, run = gpu_case(window, dilation, causal, global_at)
    check_gpu_fp32(run, flex_calls, calls=len(module.head_groups))


@cuda_only
@pytest.mark.parametrize("window,dilation,causal,global_at", GPU_COMBOS)
def test_gpu_fast_path_under_bf16_autocast_is_as_accurate_as_readable_path(window, dilation, causal, global_at,
                                                                            flex_calls):
    module, run = gpu_case(window, dilation, causal, global_at)
    check_gpu_bf16(run, flex_calls, calls=len(module.head_groups))


@cuda_only
@pytest.mark.parametrize("dilation,causal", [(1, False), ([1, 2, 3, 1], True)])
def test_gpu_fast_path_without_padding_matches_readable_path(dilation, causal, flex_calls):
    """No padding mask and no global tokens: the kernels run without a score_mod (333 tokens: the classes of
    dilation 2 and 3 get added positions, masked by the block mask)."""
    module, run = gpu_case(32, dilation, causal, (), padded=False)
    check_gpu_fp32(run, flex_calls, calls=len(module.head_groups))
    check_gpu_bf16(run, flex_calls, calls=2 * len(module.head_groups))


@cuda_only
def test_gpu_compiled_module_with_fast_path_matches_readable_path(flex_calls):
    check_gpu_compiled(*gpu_case(32, [1, 2, 3, 1], False, ()), flex_calls)


@cuda_only
def test_gpu_compiled_module_with_global_tokens_matches_readable_path(flex_calls):
    """Compiled, the attention of a call with global tokens runs eagerly (`_with_global_tokens`; compiled by
    inductor its input gradients came out wrong on an H200), through the eager fast path."""
    module, run = gpu_case(32, [1, 2, 3, 1], False, [(0, 3), (1, 160), (1, 170)], t=335)
    expected = run(fast=False, bf16=False)
    module.forward = torch.compile(module.forward)
    for _ in range(2):
        assert_fp32_match(run(fast=True, bf16=False), expected)
    assert flex_calls
