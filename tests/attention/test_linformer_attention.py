"""Linformer attention: exactness against full attention at k = n, parameter counts of the sharing modes,
padding handling of each projection kind, the fast (SDPA) path against the readable one, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from subquadratic.modeling.attention import linformer as linformer_module
from subquadratic.modeling.attention.flex import fast_paths
from subquadratic.modeling.attention.linformer import LinformerSelfAttention, SequenceProjection

HIDDEN, HEADS, HEAD_SIZE, N = 16, 2, 8, 16
KINDS = ["linear", "mean", "max", "conv"]


def make(kind="linear", k=4, sharing="none", n=N):
    torch.manual_seed(0)
    return LinformerSelfAttention(HIDDEN, HEADS, HEAD_SIZE, max_length=n, projected_length=k, sharing=sharing,
                                  projection_kind=kind).eval()


def full_attention(attn: LinformerSelfAttention, x: torch.Tensor, mask: torch.Tensor | None = None):
    """Plain softmax attention over all T keys with the module's own query/key/value/output weights."""
    b, t, _ = x.shape
    h = attn.num_heads
    d = attn.query.out_features // h

    def heads(proj):
        return proj(x).view(b, t, h, d).transpose(1, 2)

    scores = heads(attn.query) @ heads(attn.key).transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ heads(attn.value)
    return attn.output(out.transpose(1, 2).reshape(b, t, h * d))


def set_identity(projection: SequenceProjection) -> None:
    """E = I (linear, k = n) or a filter of ones over windows of one position (conv, k = n)."""
    with torch.no_grad():
        if projection.kind == "linear":
            projection.weight.copy_(torch.eye(projection.max_length).expand_as(projection.weight))
        elif projection.kind == "conv":
            projection.weight.fill_(1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sharing", ["none", "headwise", "key-value"])
def test_identity_projection_equals_full_attention(kind, sharing):
    attn = make(kind, k=N, sharing=sharing)
    for module in (attn.key_projection, attn.value_projection):
        if module is not None:
            set_identity(module)
    x = torch.randn(2, N, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), full_attention(attn, x))


def test_identity_layerwise_projection_equals_full_attention():
    attn = make("linear", k=N, sharing="layerwise")
    shared = SequenceProjection("linear", N, N)
    set_identity(shared)
    x = torch.randn(2, N, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, shared_projection=shared), full_attention(attn, x))


@pytest.mark.parametrize("kind", ["mean", "max", "conv"])
def test_pooling_at_k_equal_n_matches_masked_full_attention_on_short_padded_inputs(kind):
    """With windows of one position, empty slots (padding, or past the input's end) are masked out exactly."""
    attn = make(kind, k=N)
    set_identity(attn.key_projection)
    set_identity(attn.value_projection)
    x = torch.randn(2, 11, HIDDEN)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 7:] = False
    with torch.no_grad():
        out, ref = attn(x, padding_mask=mask), full_attention(attn, x, mask)
    torch.testing.assert_close(out[0, :7], ref[0, :7])
    torch.testing.assert_close(out[1], ref[1])


@pytest.mark.parametrize("sharing, expected", [
    ("none", 2 * HEADS * 4 * N),  # E_i, F_i for every head
    ("headwise", 2 * 4 * N),  # one E and one F for the layer
    ("key-value", 4 * N),  # E = F
    ("layerwise", 0),  # owned by the model, passed to forward
])
def test_linear_projection_parameter_counts(sharing, expected):
    attn = make("linear", k=4, sharing=sharing)
    dense = 4 * (HIDDEN * HEADS * HEAD_SIZE + HIDDEN)  # query, key, value, output with biases
    assert sum(p.numel() for p in attn.parameters()) == dense + expected


@pytest.mark.parametrize("sharing, expected", [("none", 2 * HEADS * 4), ("headwise", 2 * 4), ("key-value", 4)])
def test_conv_and_pooling_parameter_counts(sharing, expected):
    """conv: one filter of n/k = 4 weights per projection; pooling has no parameters."""
    def projections(kind):
        return sum(p.numel() for name, p in make(kind, k=4, sharing=sharing).named_parameters() if "projection" in name)

    assert projections("conv") == expected
    assert projections("mean") == projections("max") == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sharing", ["none", "key-value"])
def test_padding_does_not_change_real_tokens(kind, sharing):
    """A sequence alone and followed by padding (any amount, any content) gives the same outputs."""
    attn = make(kind, k=4, sharing=sharing)
    x = torch.randn(1, 9, HIDDEN)
    with torch.no_grad():
        alone = attn(x)
        for extra in (1, 3, 7):
            padded = torch.cat([x, 100 * torch.randn(1, extra, HIDDEN)], dim=1)
            mask = torch.arange(9 + extra)[None] < 9
            torch.testing.assert_close(attn(padded, padding_mask=mask)[:, :9], alone, atol=1e-5, rtol=1e-4)


def test_pooling_windows():
    """mean divides by the real tokens of each window; max ignores padding; empty windows are masked."""
    x = torch.arange(1.0, 7.0).view(1, 1, 6, 1)  # positions hold 1..6
    mask = torch.tensor([[True, True, True, False, False, False]])
    mean, slots = SequenceProjection("mean", 8, 4)(x, mask)  # windows of 2: [1,2] [3,pad] [pad,pad]
    assert mean.flatten().tolist() == [1.5, 3.0, 0.0]
    assert slots.flatten().tolist() == [True, True, False]
    maxed, _ = SequenceProjection("max", 8, 4)(-x, mask)
    assert maxed.flatten().tolist() == [-1.0, -3.0, 0.0]


def test_projected_length_and_linear_cost():
    """Scores are T x k: the linear projection always yields k slots; pooling ceil(T / (n/k)) of them."""
    x = torch.randn(1, HEADS, 10, HEAD_SIZE)
    assert SequenceProjection("linear", N, 4, HEADS)(x)[0].shape == (1, HEADS, 4, HEAD_SIZE)
    assert SequenceProjection("mean", N, 4)(x)[0].shape == (1, HEADS, 3, HEAD_SIZE)


def test_bfloat16_runs_with_fp32_softmax():
    attn = make("linear").to(torch.bfloat16)
    out = attn(torch.randn(2, 10, HIDDEN, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_errors():
    with pytest.raises(ValueError, match="n=16"):
        make()(torch.randn(1, 17, HIDDEN))
    with pytest.raises(ValueError, match="bidirectional"):
        LinformerSelfAttention(HIDDEN, HEADS, HEAD_SIZE, N, 4, causal=True)
    with pytest.raises(ValueError, match="k=32"):
        make(k=32)
    with pytest.raises(ValueError, match="must divide n=16"):
        make("mean", k=5)
    with pytest.raises(ValueError, match="sharing 'all'"):
        make(sharing="all")
    with pytest.raises(ValueError, match="projection kind 'fft'"):
        make("fft")
    with pytest.raises(ValueError, match="shared_projection"):
        make(sharing="layerwise")(torch.randn(1, 4, HIDDEN))


def outputs_and_gradients(attn, x, mask, shared, fast):
    """Outputs and the gradients of the input and of every parameter (the shared projection's included)."""
    x = x.clone().requires_grad_()
    params = list(attn.parameters()) + (list(shared.parameters()) if shared is not None else [])
    with fast_paths(fast):
        out = attn(x, padding_mask=mask, shared_projection=shared)
    # weighted so that every output position and feature gets its own gradient
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [x] + params)
    return out, grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sharing", ["none", "headwise", "key-value", "layerwise"])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_path_matches_readable_path(kind, sharing, padded):
    """SDPA (and, for projections shared by all heads, projecting before the key/value maps) gives the readable
    path's outputs and gradients, on an input shorter than n (first T columns) with or without padding; the
    padding of row 0 leaves pooled slots with no real token, which must be masked."""
    attn = make(kind, k=4, sharing=sharing).train()  # training mode: dropout is 0, so the paths stay comparable
    shared = SequenceProjection(kind, N, 4) if sharing == "layerwise" else None
    with torch.no_grad():  # give the biases weight: zero-mean init would hide a wrong bias term
        for module in (attn.key, attn.value):
            module.bias.normal_()
    x = torch.randn(2, 11, HIDDEN)
    mask = None
    if padded:
        mask = torch.ones(2, 11, dtype=torch.bool)
        mask[0, 5:] = False
    readable, readable_grads = outputs_and_gradients(attn, x, mask, shared, fast=False)
    fast, fast_grads = outputs_and_gradients(attn, x, mask, shared, fast=True)
    torch.testing.assert_close(fast, readable)
    for got, expected in zip(fast_grads, readable_grads, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("sharing", ["headwise", "key-value"])
@pytest.mark.parametrize("batch,length,bias", [(1, N, True), (3, 7, True), (2, N, False)])
def test_learned_keys_and_values_written_out_match_the_readable_path(monkeypatch, sharing, batch, length, bias):
    """Learned projections shared by the heads, without padding: the keys and values come from
    `_LearnedKeysValues` (its own backward), at batch 1 and above, inputs shorter than n, maps with and without
    biases, in fp32 (as the readable path) and under bf16 autocast (within bf16's rounding)."""
    calls = []
    apply = linformer_module._LearnedKeysValues.apply
    monkeypatch.setattr(linformer_module._LearnedKeysValues, "apply", lambda *a: calls.append(1) or apply(*a))
    attn = make("linear", k=4, sharing=sharing).train()
    with torch.no_grad():
        for module in (attn.key, attn.value):
            module.bias.normal_()
            if not bias:
                module.bias = None
    x = torch.randn(batch, length, HIDDEN)
    readable, readable_grads = outputs_and_gradients(attn, x, None, None, fast=False)
    fast, fast_grads = outputs_and_gradients(attn, x, None, None, fast=True)
    assert calls
    torch.testing.assert_close(fast, readable)
    for got, expected in zip(fast_grads, readable_grads, strict=True):
        torch.testing.assert_close(got, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, half_grads = outputs_and_gradients(attn, x, None, None, fast=True)
    assert half.dtype == torch.bfloat16 and len(calls) == 2
    torch.testing.assert_close(half.float(), readable, atol=3e-2, rtol=3e-2)
    for got, expected in zip(half_grads, readable_grads, strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=3e-2 * expected.abs().max().item(), rtol=5e-2)


def test_learned_keys_and_values_under_autocast_with_a_watched_query_map():
    """A hook on the query map keeps the inputs uncast for it; the keys and values still take them in autocast's
    dtype (their backward multiplied fp32 gradients with bf16 rows)."""
    attn = make("linear", k=4, sharing="headwise").train()
    x = torch.randn(2, N, HIDDEN)
    readable, readable_grads = outputs_and_gradients(attn, x, None, None, fast=False)
    attn.query.register_forward_hook(lambda module, inputs, output: output)
    x = x.clone().requires_grad_()
    with fast_paths(True), torch.autocast("cpu", dtype=torch.bfloat16):  # the forward pass only, as in training
        half = attn(x)
    weights = torch.linspace(-1, 1, half.numel()).view_as(half)
    half_grads = torch.autograd.grad((half.float() * weights).sum(), [x] + list(attn.parameters()))
    torch.testing.assert_close(half.float(), readable, atol=3e-2, rtol=3e-2)
    for got, expected in zip(half_grads, readable_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=3e-2 * expected.abs().max().item(), rtol=5e-2)


@pytest.mark.parametrize("kind, padded, masked", [("linear", True, False), ("mean", False, False),
                                                  ("max", True, True)])
def test_fast_path_runs_sdpa_with_a_mask_only_for_empty_slots(monkeypatch, kind, padded, masked):
    """The fast path calls SDPA once (with dropout_p when training); it passes a mask only when pooled slots can be
    empty, so that the flash kernel can run otherwise. The readable path, and the default on CPU, never call it."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    attn = LinformerSelfAttention(HIDDEN, HEADS, HEAD_SIZE, N, 4, projection_kind=kind, dropout=0.25)
    x = torch.randn(2, 11, HIDDEN, requires_grad=True)
    mask = torch.tensor([[True] * 5 + [False] * 6, [True] * 11]) if padded else None
    with fast_paths(True):
        attn(x, padding_mask=mask).sum().backward()
        attn.eval()(x, padding_mask=mask)
    assert len(calls) == 2
    assert [call["dropout_p"] for call in calls] == [0.25, 0.0]
    assert all((call["attn_mask"] is not None) == masked for call in calls)
    for setting in (False, None):
        with fast_paths(setting):
            attn(x, padding_mask=mask)
    assert len(calls) == 2


@pytest.mark.parametrize("kind", ["linear", "mean"])
def test_fast_path_calls_maps_that_are_watched(kind):
    """A forward hook on the value map (as LoRA-style wrappers and offloading add) takes effect on the fast path
    too: the inputs are not projected first then, and both paths give the hooked result."""
    attn = make(kind, k=4, sharing="headwise").eval()
    x = torch.randn(2, 11, HIDDEN)
    with torch.no_grad(), fast_paths(True):
        plain = attn(x)
    attn.value.register_forward_hook(lambda module, inputs, output: output * 0)
    with torch.no_grad():
        with fast_paths(True):
            fast = attn(x)
        with fast_paths(False):
            readable = attn(x)
    torch.testing.assert_close(fast, readable)
    torch.testing.assert_close(fast, attn.output.bias.expand_as(fast))  # zero values: only the output's bias
    assert not torch.allclose(fast, plain)
