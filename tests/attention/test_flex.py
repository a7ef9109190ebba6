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
