"""The switch that picks fast or readable attention paths (`subquadratic.modeling.attention.flex`)."""

from types import SimpleNamespace

import pytest
import torch

from subquadratic.modeling.attention import flex
from subquadratic.modeling.attention.flex import fast_paths, set_fast_paths, use_fast_path

CUDA_TENSOR = SimpleNamespace(is_cuda=True, requires_grad=True)  # stands in for a CUDA tensor on CPU-only CI


def test_default_is_fast_on_cuda_readable_on_cpu_and_opt_in_mechanisms_stay_readable():
    assert use_fast_path(CUDA_TENSOR)
    assert not use_fast_path(CUDA_TENSOR, auto=False)  # a mechanism whose fast path is opt-in
    assert not use_fast_path(torch.zeros(2))


def test_forcing_and_forbidding_apply_to_every_mechanism():
    with fast_paths(True):
        assert use_fast_path(CUDA_TENSOR, auto=False)
        assert use_fast_path(torch.zeros(2))  # forward-only checks on CPU
        assert not use_fast_path(torch.zeros(2, requires_grad=True))  # no FlexAttention backward on CPU
        assert use_fast_path(torch.zeros(2, requires_grad=True), flex=False)  # SDPA paths train on CPU too
    with fast_paths(False):
        assert not use_fast_path(CUDA_TENSOR)


def test_scopes_nest_and_restore_and_the_process_default_applies_outside_them():
    with fast_paths(False):
        with fast_paths(True):
            assert use_fast_path(CUDA_TENSOR, auto=False)
        assert not use_fast_path(CUDA_TENSOR)
    assert use_fast_path(CUDA_TENSOR)
    try:
        set_fast_paths(False)
        assert not use_fast_path(CUDA_TENSOR)
        with fast_paths(None):
            assert use_fast_path(CUDA_TENSOR)
    finally:
        set_fast_paths(None)


@pytest.mark.parametrize("value", ["yes", 1.0, "cuda"])
def test_bad_setting_names_the_allowed_values(value):
    with pytest.raises(ValueError, match="expected None, True or False"):
        set_fast_paths(value)
    with pytest.raises(ValueError, match="expected None, True or False"):
        with fast_paths(value):
            pass


def test_block_masks_are_built_once_per_key():
    calls = []

    def band(b, h, q, k):
        calls.append(1)
        return (q - k).abs() <= 4

    first = flex.cached_block_mask(("test-band", 4), band, None, None, 64, 64, "cpu", block_size=16)
    again = flex.cached_block_mask(("test-band", 4), band, None, None, 64, 64, "cpu", block_size=16)
    other = flex.cached_block_mask(("test-band", 4), band, None, None, 96, 96, "cpu", block_size=16)
    assert again is first and other is not first
    dense = first.to_dense()[0, 0]  # (q blocks, kv blocks): the band touches the diagonal and its neighbours only
    assert dense.shape == (4, 4) and dense.diagonal().all() and not dense[0, 3]


def test_a_block_mask_first_built_under_inference_mode_can_serve_a_training_step():
    """Built outside inference mode: an inference tensor could not be saved for a later step's backward pass."""
    with torch.inference_mode():
        mask = flex.cached_block_mask(("test-band-inference", 4), lambda b, h, q, k: (q - k).abs() <= 4, None, None,
                                      64, 64, "cpu", block_size=16)
    tensors = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices]
    assert not any(t.is_inference() for t in tensors if t is not None)


def _blocks(mask):
    """The partial and full blocks of a BlockMask, as dense (B, H, q blocks, kv blocks) tables."""
    dense = mask.to_dense()
    full = torch.zeros_like(dense)
    counts, indices = mask.full_kv_num_blocks, mask.full_kv_indices
    for row in range(dense.shape[2]):
        full[0, 0, row, indices[0, 0, row, :counts[0, 0, row]].long()] = 1
    return dense - full, full


def _band(before, after, segment):
    def mask_mod(b, h, q, k):  # a band inside segments of `segment` positions, like the sliding window's classes
        return (q // segment == k // segment) & (q - k <= before) & (k - q <= after)
    return mask_mod


@pytest.mark.parametrize("q_len, kv_len, before, after, segment", [
    (200, 200, 17, 9, 1000), (256, 256, 40, 40, 96), (130, 130, 130, 0, 1000), (96, 160, 33, 70, 1000)])
@pytest.mark.parametrize("use_reach", [True, False])
@pytest.mark.parametrize("chunk_elements", [300, 1 << 24])
def test_eager_block_masks_match_create_block_mask(monkeypatch, q_len, kv_len, before, after, segment, use_reach,
                                                   chunk_elements):
    """Same partial and full blocks (so the same kernel work and results) as torch's create_block_mask, whether
    the mask is evaluated in one piece or band by band, with or without the reach promise; lengths that do not
    fill the last block included."""
    from torch.nn.attention.flex_attention import create_block_mask

    monkeypatch.setattr(flex, "_MASK_CHUNK_ELEMENTS", chunk_elements)
    mask_mod = _band(before, after, segment)
    reach = (before, after) if use_reach else None
    ours = flex.build_block_mask(mask_mod, None, None, q_len, kv_len, "cpu", block_size=16, reach=reach)
    theirs = create_block_mask(mask_mod, None, None, q_len, kv_len, "cpu", BLOCK_SIZE=16)
    for mine, torchs in zip(_blocks(ours), _blocks(theirs)):
        assert torch.equal(mine, torchs)
    assert ours.seq_lengths == (q_len, kv_len)
    assert torch.equal(ours.q_num_blocks, theirs.q_num_blocks)  # the transposed (backward) side too
    assert torch.equal(ours.full_q_num_blocks, theirs.full_q_num_blocks)
