"""Embedding lookups with the short backward pass (`layers.embeddings.lookup`) against `nn.Embedding`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subquadratic import (
    LongformerStyleConfig,
    LongformerStyleForMaskedLM,
    ReformerLMConfig,
    ReformerLMForCausalLM,
)
from subquadratic.modeling.attention.flex import fast_paths
from subquadratic.modeling.layers.embeddings import AxialPositionEmbedding, lookup, table_rows


def _rows_and_gradient(fn, weight, ids, upstream):
    weight = weight.detach().clone().requires_grad_()
    out = fn(weight)
    (out * upstream).sum().backward()
    return out.detach(), weight.grad


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_lookup_equals_the_module_with_repeated_ids_and_padding(padding_idx):
    torch.manual_seed(0)
    embedding = nn.Embedding(11, 6, padding_idx=padding_idx)
    ids = torch.tensor([[3, 1, 1, 7, 3], [10, 1, 0, 3, 3]])  # repeats, the padding id, the last row
    upstream = torch.randn(2, 5, 6)
    expected = _rows_and_gradient(lambda w: nn.functional.embedding(ids, w, padding_idx), embedding.weight, ids,
                                  upstream)
    with fast_paths(True):
        out = lookup(embedding, ids)
        assert type(out.grad_fn).__name__ != "EmbeddingBackward0"  # the short backward ran
        got = _rows_and_gradient(lambda w: table_rows(w, ids, padding_idx), embedding.weight, ids, upstream)
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    if padding_idx is not None:
        assert got[1][padding_idx].abs().sum() == 0


def test_lookup_of_a_bf16_table_sums_its_gradients_in_fp32():
    """On CUDA, index_add_ rounds after every addition in the table's dtype (CPU sums these accurately)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    weight = torch.randn(4, 8, device=device).bfloat16()
    ids = torch.zeros(1, 4096, dtype=torch.long, device=device)  # two ids, many times: bf16 sums would stall
    ids[0, ::2] = 1
    upstream = torch.full((1, 4096, 8), 1e-3, dtype=torch.bfloat16, device=device)
    with fast_paths(True):
        _, got = _rows_and_gradient(lambda w: table_rows(w, ids), weight, ids, upstream)
    assert got.dtype == torch.bfloat16
    expected = torch.zeros(4, 8, device=device).index_add_(0, ids.flatten(), upstream.float().flatten(0, 1))
    torch.testing.assert_close(got, expected.bfloat16())


def test_lookup_calls_the_module_where_it_does_more_or_determinism_is_asked():
    embedding = nn.Embedding(5, 4)
    ids = torch.tensor([[1, 2, 2]])
    seen = []
    handle = embedding.register_forward_hook(lambda module, args, out: seen.append(out))
    with fast_paths(True):
        lookup(embedding, ids)
    handle.remove()
    assert len(seen) == 1
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with fast_paths(True):
            assert type(lookup(embedding, ids).grad_fn).__name__ == "EmbeddingBackward0"
    finally:
        torch.use_deterministic_algorithms(previous)
    with fast_paths(True):
        assert type(lookup(nn.Embedding(5, 4, max_norm=1.0), ids).grad_fn).__name__ == "EmbeddingBackward0"


def test_axial_positions_give_the_same_gradients_on_both_paths():
    torch.manual_seed(0)
    axial = AxialPositionEmbedding([4, 8], [3, 5])
    for table in axial.weights():
        nn.init.normal_(table)
    positions = torch.arange(32).expand(2, -1)
    upstream = torch.randn(2, 32, 8)
    results = []
    for fast in (False, True):
        axial.zero_grad()
        with fast_paths(fast):
            out = axial(positions)
        (out * upstream).sum().backward()
        results.append((out.detach(), [t.grad.clone() for t in axial.weights()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for got, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, expected)


def _embedding_gradients(model, inputs, fast):
    model.eval()  # no dropout: both calls see the same function
    model.zero_grad()
    with fast_paths(fast):
        model(**inputs).logits.float().square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if "embeddings" in name}


def test_longformer_embeddings_get_the_same_gradients_on_both_paths_and_without_token_types():
    torch.manual_seed(0)
    config = LongformerStyleConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, attention_window=4, max_position_embeddings=40,
                                   type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   default_global_attention="none")
    model = LongformerStyleForMaskedLM(config)
    ids = torch.randint(3, 40, (2, 12))
    ids[1, -3:] = config.pad_token_id
    inputs = {"input_ids": ids, "attention_mask": (ids != config.pad_token_id).long()}
    slow = _embedding_gradients(model, {**inputs, "token_type_ids": torch.zeros_like(ids)}, fast=False)
    fast = _embedding_gradients(model, inputs, fast=True)
    assert slow.keys() == fast.keys() and len(fast) == 5  # word, position, token type, layer norm (2)
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-6, rtol=1e-5, msg=name)
    assert fast["model.embeddings.token_type_embeddings.weight"][0].abs().sum() > 0


def test_reformer_embeddings_get_the_same_gradients_on_both_paths():
    torch.manual_seed(0)
    config = ReformerLMConfig(vocab_size=30, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                              attn_layers=["local", "local"], local_chunk_length=8, intermediate_size=32,
                              axial_pos_shape=[4, 8], axial_pos_embds_dim=[6, 10], max_position_embeddings=32,
                              hidden_dropout_prob=0.0, is_decoder=True)
    model = ReformerLMForCausalLM(config)
    inputs = {"input_ids": torch.randint(0, 30, (2, 32))}
    slow = _embedding_gradients(model, inputs, fast=False)
    fast = _embedding_gradients(model, inputs, fast=True)
    assert slow.keys() == fast.keys() and len(fast) == 3  # words and two axial tables
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-6, rtol=1e-5, msg=name)
