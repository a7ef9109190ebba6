"""CapturedTrainingStep: a recorded training step gives the eager step's loss and gradients (CUDA only), and bad
use fails with a clear error."""

from __future__ import annotations

import pytest
import torch

from subquadratic import LinformerForMaskedLM, LongformerStyleForMaskedLM, ReformerLMForCausalLM
from subquadratic.training.cuda_graph import CapturedTrainingStep
from tests.modeling import test_linformer, test_longformer, test_reformer

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _batch(kind: str, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 32), generator=g)
    if kind.startswith("reformer"):
        batch = {"input_ids": ids, "labels": ids}
    else:
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
        mask = torch.ones_like(ids)
        mask[1, 27:] = 0  # the second row is padded
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if kind == "longformer-global":  # 1 to 4 global tokens per row, different in each batch
            batch["global_attention_mask"] = torch.zeros_like(ids)
            for row in range(ids.shape[0]):
                batch["global_attention_mask"][row, torch.randperm(20, generator=g)[:1 + (seed + row) % 4]] = 1
    return {k: v.to(device) for k, v in batch.items()}


# On CUDA, heads of 16 take the FlexAttention paths and smaller ones the readable paths (FLEX_MIN_HEAD_DIM).
# No dropout and fixed LSH rotations, so that eager and recorded steps draw no different random numbers.
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
SETTINGS = {"longformer": {"hidden_size": 64}, "longformer-small-heads": {},
            "longformer-global": {"hidden_size": 64, "max_global_tokens": 4},  # a fixed count can be recorded
            "reformer": {"attention_head_size": 16, "hash_seed": 0}, "reformer-small-heads": {"hash_seed": 0},
            "linformer": NO_DROPOUT}


def _model(kind: str, **overrides):
    torch.manual_seed(0)
    overrides = {**SETTINGS[kind], **overrides}
    if kind.startswith("longformer"):
        return LongformerStyleForMaskedLM(test_longformer.tiny_config(**overrides))
    if kind == "linformer":
        return LinformerForMaskedLM(test_linformer.tiny_config(**overrides))
    return ReformerLMForCausalLM(test_reformer.tiny_config(is_decoder=True, max_position_embeddings=32,
                                                          axial_pos_shape=[4, 8], **overrides))


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_needs_a_model_on_cuda():
    model = _model("linformer").train()
    with pytest.raises(ValueError, match="CUDA device.*cpu"):
        CapturedTrainingStep(model, _batch("linformer", 0, "cpu"))


def test_needs_trainable_parameters():
    model = _model("linformer").requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require gradients"):
        CapturedTrainingStep(model, _batch("linformer", 0, "cpu"))


@cuda_only
@pytest.mark.parametrize("kind", list(SETTINGS))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_replays_equal_the_eager_step(kind, dtype):
    model = _model(kind).cuda().train()
    first, second = _batch(kind, 0, "cuda"), _batch(kind, 1, "cuda")
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        expected_loss = model(**second).loss
    expected_loss.backward()
    expected_loss = expected_loss.detach()  # an eager graph kept alive would stop the recording (see the class)
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    step = CapturedTrainingStep(model, first, autocast_dtype=dtype)
    assert all(not g.any() for g in _grads(model))  # the warm-up steps' gradients are discarded
    tolerance = {} if dtype is None else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(step(second), expected_loss.detach(), **tolerance)
    for got, want in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(got, want, **tolerance)
    step()  # the same batch again: gradients add up, as with loss.backward()
    for got, want in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(got, 2 * want, **tolerance)
    model.zero_grad(set_to_none=False)
    step(first)
    assert any(g.any() for g in _grads(model))


@cuda_only
def test_dropout_draws_new_numbers_at_each_replay_and_the_warmup_gives_them_back():
    model = _model("linformer", hidden_dropout_prob=0.2).cuda().train()
    batch = _batch("linformer", 0, "cuda")
    torch.manual_seed(5)
    eager = model(**batch).loss.item()  # the first step's dropout masks, from seed 5
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    step = CapturedTrainingStep(model, batch)
    losses = [step().item() for _ in range(3)]
    assert len(set(losses)) == 3, losses  # the same batch, new dropout masks
    assert losses[0] == pytest.approx(eager, rel=1e-5)  # the recording starts where the warm-up started


@cuda_only
def test_too_many_global_tokens_and_replaced_parameters_are_refused():
    model = _model("longformer-global").cuda().train()
    batch = _batch("longformer-global", 0, "cuda")
    step = CapturedTrainingStep(model, batch)
    crowded = {**batch, "global_attention_mask": batch["global_attention_mask"].clone()}
    crowded["global_attention_mask"][0, :5] = 1
    with pytest.raises(ValueError, match=r"a row with [56] global tokens.*max_global_tokens=4"):
        step(crowded)
    step(batch)  # still usable
    parameter = next(model.parameters())
    parameter.data = parameter.data.clone()
    with pytest.raises(RuntimeError, match="storage"):
        step(batch)


@cuda_only
def test_bad_batches_and_dropped_gradients_are_refused():
    model = _model("linformer").cuda().train()
    batch = _batch("linformer", 0, "cuda")
    step = CapturedTrainingStep(model, batch)
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] is \(2, 31\)"):
        step({**batch, "input_ids": batch["input_ids"][:, :31]})
    with pytest.raises(ValueError, match="keys"):
        step({"input_ids": batch["input_ids"]})
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        step(batch)


@cuda_only
def test_reversible_layers_with_dropout_are_refused():
    model = _model("reformer", hidden_dropout_prob=0.1).cuda().train()
    with pytest.raises(RuntimeError, match="dropout"):
        CapturedTrainingStep(model, _batch("reformer", 0, "cuda"))
