"""LSH attention against plain references that attend over exactly the allowed pairs, and its FlexAttention fast
path against the readable path (on CPU the unfused reference; the compiled kernels on CUDA)."""

import math

import pytest
import torch

from subquadratic.modeling.attention import lsh as lsh_module
from subquadratic.modeling.attention.flex import fast_paths
from subquadratic.modeling.attention.lsh import (
    LSHSelfAttention,
    _combine_rounds,
    hash_vectors,
    lsh_attend,
    lsh_attend_cached,
    rotation_width,
    sort_order,
    total_buckets,
)
from subquadratic.modeling.cache import LayerStateCache
from tests.attention.fast_path_checks import (
    assert_compiled_fast_path_matches,
    assert_dropout_and_cpu_backward_stay_readable,
    check_gpu_bf16,
    check_gpu_compiled,
    check_gpu_fp32,
    cuda_only,
    gpu_runner,
    readable_and_fast,
    record_flex_calls,
)


def _qkv(b=2, h=2, t=32, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g)
    return q, torch.nn.functional.normalize(q, dim=-1, eps=1e-6), torch.randn(b, h, t, d, generator=g)


def full_shared_qk_attention(q, k, v, causal):
    """Plain softmax attention with the Reformer's self-masking: a token's own key scores -1e5."""
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(t)
    if causal:
        scores = scores.masked_fill(i[None, :] > i[:, None], -1e9)
    scores = scores.masked_fill(torch.eye(t, dtype=torch.bool), -1e5)
    return torch.softmax(scores, -1) @ v


def brute_force_lsh(q, k, v, buckets, chunk, causal):
    """Per round: the (T, T) mask of allowed pairs built position by position from the definition, full
    softmax, then rounds combined by their log-sum-exp weights."""
    b, h, t, d = q.shape
    rounds = buckets.shape[2]
    outs, lses = [], []
    for r in range(rounds):
        out = torch.zeros(b, h, t, d)
        lse = torch.zeros(b, h, t)
        for bi in range(b):
            for hi in range(h):
                bk = buckets[bi, hi, r].tolist()
                order = sorted(range(t), key=lambda p: (bk[p], p))
                slot = {p: s for s, p in enumerate(order)}
                allowed = torch.zeros(t, t, dtype=torch.bool)
                for i in range(t):
                    for j in range(t):
                        ok = bk[i] == bk[j] and slot[j] // chunk in (slot[i] // chunk, slot[i] // chunk - 1)
                        if causal:
                            ok = ok and j <= i and slot[i] - slot[j] <= chunk
                        allowed[i, j] = ok
                scores = q[bi, hi] @ k[bi, hi].T / math.sqrt(d)
                scores = scores.masked_fill(~allowed, -1e9).masked_fill(torch.eye(t, dtype=torch.bool), -1e5)
                lse[bi, hi] = torch.logsumexp(scores, -1)
                out[bi, hi] = torch.softmax(scores, -1) @ v[bi, hi]
        outs.append(out)
        lses.append(lse)
    w = torch.softmax(torch.stack(lses, 2), dim=2)
    return (torch.stack(outs, 2) * w[..., None]).sum(2)


@pytest.mark.parametrize("causal", [True, False])
def test_one_bucket_one_chunk_is_full_attention(causal):
    q, k, v = _qkv(t=24)
    buckets = hash_vectors(q, torch.randn(1, 8, 0), num_buckets=1)
    out = lsh_attend(q, k, v, buckets, chunk_length=24, causal=causal)
    torch.testing.assert_close(out, full_shared_qk_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_buckets,rounds", [(4, 1), (8, 3), ([2, 4], 2)])
def test_many_buckets_equal_brute_force(causal, num_buckets, rounds):
    q, k, v = _qkv(b=1, h=2, t=32)
    buckets = hash_vectors(q, torch.randn(rounds, 8, 4 if num_buckets != 4 else 2), num_buckets)
    out = lsh_attend(q, k, v, buckets, chunk_length=4, causal=causal)
    torch.testing.assert_close(out, brute_force_lsh(q, k, v, buckets, 4, causal), atol=1e-5, rtol=1e-5)


def test_rounds_combine_as_one_softmax_over_all_their_keys_with_gradients():
    """Rounds over disjoint key sets, combined by their log-sum-exps, equal one softmax over all the keys (values
    and float64 gradients); bf16 rounds keep their dtype and stay close."""
    torch.manual_seed(0)
    scores, values = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(2, 12, 5, dtype=torch.float64)
    parts = [(torch.softmax(scores[..., i:i + 4], -1) @ values[:, i:i + 4], torch.logsumexp(scores[..., i:i + 4], -1))
             for i in (0, 4, 8)]
    out = torch.stack([p[0] for p in parts])[None, None]  # (1, 1, R, ...): rounds on axis 2
    lse = torch.stack([p[1] for p in parts])[None, None]
    torch.testing.assert_close(_combine_rounds(out, lse)[0, 0], torch.softmax(scores, -1) @ values)
    inputs = [out.detach().requires_grad_(True), lse.detach().requires_grad_(True)]
    assert torch.autograd.gradcheck(_combine_rounds, inputs)
    low = _combine_rounds(out.bfloat16(), lse.float())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low[0, 0].double(), torch.softmax(scores, -1) @ values, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounds_with_close_outputs_keep_the_lse_gradient_precise(dtype):
    """Rounds that found nearly the same keys have close outputs; the gradient of their log-sum-exps is a small
    difference, which stays within about 1e-2 of the fp64 one (on the same rounded inputs) in bf16/fp16 (from
    products rounded to bf16 it was 0.14 off)."""
    torch.manual_seed(0)
    base = torch.randn(2, 3, 1, 32, 16, dtype=torch.float64)
    out = (base + 0.01 * torch.randn(2, 3, 4, 32, 16, dtype=torch.float64)).to(dtype).double()
    lse = torch.randn(2, 3, 4, 32).double()
    grad = torch.randn(2, 3, 32, 16).to(dtype).double()
    lse64 = lse.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_combine_rounds(out, lse64), lse64, grad)
    lse32 = lse.float().requires_grad_(True)
    (got,) = torch.autograd.grad(_combine_rounds(out.to(dtype), lse32), lse32, grad.to(dtype))
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-2


def test_rounds_combine_under_torch_func():
    torch.manual_seed(0)
    out, lse = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64), torch.randn(1, 2, 3, 4, dtype=torch.float64)

    def plain(lse):
        return (out * torch.softmax(lse, dim=2)[..., None]).sum(dim=2).sum()

    got = torch.func.grad(lambda lse: _combine_rounds(out, lse).sum())(lse)
    torch.testing.assert_close(got, torch.func.grad(plain)(lse))


def test_attended_pairs_share_a_bucket():
    """With one-hot values the output row is the attention distribution: no weight leaves the bucket."""
    t = 40
    q, k, _ = _qkv(b=1, h=1, t=t)
    buckets = hash_vectors(q, torch.randn(1, 8, 4), num_buckets=8)
    weights = lsh_attend(q, k, torch.eye(t)[None, None], buckets, chunk_length=5, causal=False)[0, 0]
    same = buckets[0, 0, 0][:, None] == buckets[0, 0, 0][None, :]
    assert weights[~same].abs().max() < 1e-6
    assert torch.allclose(weights.sum(-1), torch.ones(t))
    assert len(set(buckets[0, 0, 0].tolist())) > 2  # the test means something only with several buckets


def test_factorised_buckets_combine_two_rotations():
    q, _, _ = _qkv(t=16)
    rot = torch.randn(2, 8, 1 + 2)  # b1 = 2 -> 1 column, b2 = 4 -> 2 columns
    got = hash_vectors(q, rot, [2, 4])
    x = torch.einsum("bhtd,rdk->bhrtk", q, rot)
    b1 = torch.cat([x[..., :1], -x[..., :1]], -1).argmax(-1)
    b2 = torch.cat([x[..., 1:], -x[..., 1:]], -1).argmax(-1)
    assert torch.equal(got, b1 + 2 * b2)
    assert got.max() < total_buckets([2, 4])


def test_cached_attention_matches_full_forward_at_every_step():
    q, k, v = _qkv(b=2, h=2, t=32)
    buckets = hash_vectors(q, torch.randn(2, 8, 4), num_buckets=8)
    full = lsh_attend(q, k, v, buckets, chunk_length=4, causal=True)
    for t in (1, 5, 17, 32):
        # the last position of the first t tokens, as the decoder sees it with a cache of t - 1
        step = lsh_attend_cached(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t], buckets[..., :t], chunk_length=4)
        prefix_full = lsh_attend(*(x[:, :, :t] for x in (q, k, v)), buckets[..., :t], 4, True) if t % 4 == 0 else None
        torch.testing.assert_close(step[:, :, 0], full[:, :, t - 1], atol=1e-5, rtol=1e-5)
        if prefix_full is not None:  # and the prefix alone gives the same outputs as inside the longer sequence
            torch.testing.assert_close(prefix_full, full[:, :, :t], atol=1e-5, rtol=1e-5)


def _module(causal=True, **kw):
    torch.manual_seed(0)
    args = dict(hidden_size=16, num_heads=2, head_size=8, chunk_length=4, num_buckets=4, num_hashes=2, causal=causal)
    return LSHSelfAttention(**{**args, **kw})


def test_module_is_causal():
    attn = _module().eval()
    x = torch.randn(1, 32, 16)
    y = x.clone()
    y[:, 20:] = torch.randn(1, 12, 16)
    torch.testing.assert_close(attn(x)[:, :20], attn(y)[:, :20])


def test_padding_does_not_change_real_tokens():
    attn = _module(causal=False).eval()
    x = torch.randn(1, 12, 16)
    alone = attn(x)
    for extra in (4, 20):
        padded = torch.cat([x, torch.randn(1, extra, 16)], dim=1)
        mask = torch.ones(1, 12 + extra, dtype=torch.bool)
        mask[:, 12:] = False
        torch.testing.assert_close(attn(padded, padding_mask=mask)[:, :12], alone, atol=1e-5, rtol=1e-5)


def test_rotations_fresh_in_training_fixed_in_eval_or_with_seed():
    x = torch.randn(1, 64, 16)
    attn = _module(num_buckets=16)
    attn.train()
    assert not torch.allclose(attn(x), attn(x))  # fresh rotations each call
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    seeded = _module(num_buckets=16, hash_seed=3).train()
    torch.testing.assert_close(seeded(x), seeded(x))
    other = _module(num_buckets=16, hash_seed=4)
    assert not torch.equal(seeded.fixed_rotations, other.fixed_rotations)


# --- FlexAttention fast path ---------------------------------------------------------------------------------

@pytest.fixture
def flex_calls(monkeypatch):
    return record_flex_calls(monkeypatch, lsh_module)


FAST_COMBOS = [  # chunk, length (never a multiple of 128), rounds, buckets, padded from (row 1)
    (16, 80, 1, 8, 69),
    (32, 96, 3, 4, 90),
    (64, 192, 2, 8, 100),
    (16, 112, 4, [2, 4], None),
    (16, 16, 2, 4, 11),  # one chunk: it must not see itself twice
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk,t,rounds,num_buckets,pad_from", FAST_COMBOS)
def test_fast_path_matches_readable_path(chunk, t, rounds, num_buckets, pad_from, causal, flex_calls):
    q, k, v = _qkv(b=2, h=2, t=t)
    padding = None
    if pad_from is not None:
        padding = torch.ones(2, t, dtype=torch.bool)
        padding[1, pad_from:] = False
    rotations = torch.randn(rounds, 8, rotation_width(num_buckets), generator=torch.Generator().manual_seed(1))
    buckets = hash_vectors(q, rotations, num_buckets, padding)  # one hashing for both paths
    assert len(buckets[0, 0, 0].unique()) > 2
    expected, got = readable_and_fast(lsh_attend, q, k, v, buckets, chunk, causal)
    assert flex_calls == [(2, 2 * rounds, t, 8)]  # one call, the rounds as extra heads
    # padding tokens attend among themselves in both paths, so every position agrees
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_fast_path_of_the_module_matches_readable_path(causal, flex_calls):
    attn = _module(causal=causal, chunk_length=16, num_buckets=8, num_hashes=3).eval()  # eval: fixed rotations
    x = torch.randn(2, 48, 16)
    padding = torch.ones(2, 48, dtype=torch.bool)
    padding[0, 37:] = False
    expected, got = readable_and_fast(attn, x, padding_mask=padding)
    assert len(flex_calls) == 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fast_path_is_skipped_where_it_cannot_run(flex_calls):
    """Attention dropout in training, gradients on CPU (FlexAttention has no CPU backward) and cached decoding
    take the readable path even when fast paths are forced."""
    attn = _module(hash_seed=0, dropout=0.1).train()
    x = torch.randn(1, 16, 16)
    assert_dropout_and_cpu_backward_stay_readable(attn, x, flex_calls)
    attn.eval()
    with fast_paths(True):
        with torch.no_grad():
            cache = LayerStateCache()
            attn(x[:, :8], cache=cache)  # the prompt: a full pass, which may take the fast path
            assert len(flex_calls) == 1
            attn(x[:, 8:9], padding_mask=torch.ones(1, 9, dtype=torch.bool), cache=cache)
        assert len(flex_calls) == 1


def test_compiled_module_with_fast_path_matches_readable_path(flex_calls):
    attn = _module(chunk_length=16, num_buckets=8, num_hashes=2).eval()
    x = torch.randn(2, 64, 16)  # a length no other test uses: the block mask is built inside the compiled region
    padding = torch.ones(2, 64, dtype=torch.bool)
    padding[1, 40:] = False
    assert_compiled_fast_path_matches(attn, x, padding, flex_calls)


# GPU: the compiled kernels (block sparsity, the hash-dependent score_mod) and their backward, including the
# gradient through the log-sum-exp that weighs the rounds, which the CPU reference above does not exercise.
GPU_COMBOS = [  # causal, chunk, rounds, length; hidden 128, 4 heads of 32, row 0 padded from 250
    (True, 64, 4, 320),  # 320: not a multiple of the 128-token blocks
    (False, 64, 1, 320),
    (False, 32, 2, 352),
    (False, 128, 2, 384),  # chunk = block: whole blocks of the band are full, the score_mod must still run there
]


def gpu_case(causal, chunk, rounds, t, hidden=128):
    torch.manual_seed(0)
    # hash_seed: the same fixed rotations in training too, so that both paths hash identically
    attn = LSHSelfAttention(hidden, 4, 32, chunk, num_buckets=8, num_hashes=rounds, causal=causal, hash_seed=1).cuda()
    return attn, gpu_runner(attn, t, hidden)


@cuda_only
@pytest.mark.parametrize("causal,chunk,rounds,t", GPU_COMBOS)
def test_gpu_fast_path_matches_readable_path_fp32(causal, chunk, rounds, t, flex_calls):
    check_gpu_fp32(gpu_case(causal, chunk, rounds, t)[1], flex_calls, calls=1)


@cuda_only
@pytest.mark.parametrize("causal,chunk,rounds,t", GPU_COMBOS)
def test_gpu_fast_path_under_bf16_autocast_is_as_accurate_as_readable_path(causal, chunk, rounds, t, flex_calls):
    check_gpu_bf16(gpu_case(causal, chunk, rounds, t)[1], flex_calls, calls=1)


@cuda_only
def test_gpu_compiled_module_with_fast_path_matches_readable_path(flex_calls):
    check_gpu_compiled(*gpu_case(True, 64, 2, 448), flex_calls)


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("num_buckets", [8, [4, 6]])
def test_buckets_are_the_argmax_over_rotations_and_their_negation(num_buckets, sliced, monkeypatch):
    """The hash avoids forming [x, -x]; it must pick the same bucket as argmax over it (Reformer, section 2),
    first maximum included: small integer coordinates make ties between x and -x and inside x common. ``sliced``:
    a memory bound that cuts the 50 positions into slices of 2 (7 positions of one round; there are 3 rounds)."""
    if sliced:
        monkeypatch.setattr(lsh_module, "HASH_CHUNK_ELEMENTS", 2 * 3 * rotation_width(num_buckets) * 7)
    torch.manual_seed(0)
    vectors = torch.randint(-2, 3, (2, 3, 50, 4)).float()
    rotations = torch.randint(-1, 2, (3, 4, rotation_width(num_buckets))).float()
    got = hash_vectors(vectors, rotations, num_buckets)
    rotated = torch.einsum("bhtd,rdk->bhrtk", vectors, rotations)
    sizes = num_buckets if isinstance(num_buckets, list) else [num_buckets]
    expected, stride, start = 0, 1, 0
    for size in sizes:
        part = rotated[..., start:start + size // 2]
        expected = expected + stride * torch.cat([part, -part], dim=-1).argmax(dim=-1)
        stride, start = stride * size, start + size // 2
    assert (rotated == 0).any()  # ties do occur
    assert torch.equal(got, expected)


@pytest.mark.parametrize("num_ids", [None, 7, 2 ** 15 + 1])
def test_sort_order_is_by_bucket_then_position_at_every_key_width(num_ids):
    """Without a bound (int64 ids), with ids that fit int16 and with a bound that needs int32: positions sorted by
    (bucket, position), their inverse, and the bucket at each slot."""
    buckets = torch.randint(0, 7, (2, 3, 4, 50), generator=torch.Generator().manual_seed(0))
    t = buckets.shape[-1]
    order = sort_order(buckets, num_ids)
    assert torch.equal(order.positions, (buckets * t + torch.arange(t)).argsort(dim=-1))
    assert torch.equal(order.positions.gather(-1, order.slots()), torch.arange(t).expand_as(buckets))
    assert torch.equal(order.buckets.long(), buckets.gather(-1, order.positions))
    assert order.buckets.dtype == {None: torch.int64, 7: torch.int16}.get(num_ids, torch.int32)
